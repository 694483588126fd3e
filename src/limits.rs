//! Deployment quotas in Redis, shared by every API replica and exact under concurrency: one Lua
//! script checks the caller's rolling hour and day and the global hour (the circuit breaker)
//! and, only if all three have room, records the deployment in all three. Windows are sorted
//! sets of acceptance times, so "5 per hour" means any 60 minutes, not a calendar hour.

use fred::prelude::*;

use crate::config::LimitSettings;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;

/// KEYS: user hour, user day, global hour. ARGV: now (ms), member, hour limit, day limit,
/// global limit, hour ms, day ms.
/// Returns {1, remaining in the hour} when admitted, or
/// {0, window (1 hour, 2 day, 3 global), ms until the oldest entry leaves it}.
const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local windows = {
  {KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[6])},
  {KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[7])},
  {KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6])},
}
local counts = {}
for i, w in ipairs(windows) do
  redis.call('ZREMRANGEBYSCORE', w[1], '-inf', now - w[3])
  counts[i] = redis.call('ZCARD', w[1])
  if counts[i] >= w[2] then
    local oldest = redis.call('ZRANGE', w[1], 0, 0, 'WITHSCORES')
    local wait = w[3]
    if oldest[2] then wait = tonumber(oldest[2]) + w[3] - now end
    return {0, i, wait}
  end
end
for _, w in ipairs(windows) do
  redis.call('ZADD', w[1], now, ARGV[2])
  redis.call('PEXPIRE', w[1], w[3])
end
return {1, windows[1][2] - counts[1] - 1}
"#;

/// What the limiter decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        limit_hour: u32,
        remaining_hour: u32,
    },
    /// Over a window: which one and how long until a slot frees.
    Refused {
        window: Window,
        limit: u32,
        retry_after_secs: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    UserHour,
    UserDay,
    /// The circuit breaker: every user together.
    Global,
}

#[derive(Clone)]
pub struct Limiter {
    client: Client,
    prefix: String,
    settings: LimitSettings,
}

impl Limiter {
    pub fn new(client: Client, state_prefix: &str, settings: LimitSettings) -> Limiter {
        Limiter {
            client,
            prefix: format!("{state_prefix}:ratelimit"),
            settings,
        }
    }

    /// The caller's hourly and daily limits: their tier's, or the defaults.
    pub fn limits_for(&self, tier: Option<&str>) -> (u32, u32) {
        match tier.and_then(|t| self.settings.tiers.get(t)) {
            Some(t) => (t.per_hour, t.per_day),
            None => (self.settings.per_hour, self.settings.per_day),
        }
    }

    /// The windows' sorted sets, in the script's order: user hour, user day, global hour.
    fn keys(&self, user: &str) -> [String; 3] {
        [
            format!("{}:user:{user}:hour", self.prefix),
            format!("{}:user:{user}:day", self.prefix),
            format!("{}:global:hour", self.prefix),
        ]
    }

    /// Gives back the slot `member` took: the request was refused after admission. A member
    /// that was never admitted is no one's slot, so this is harmless then.
    pub async fn refund(&self, user: &str, member: &str) {
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            for k in self.keys(user) {
                let _: () = pipeline.zrem(k, member).await?;
            }
            let _: Vec<i64> = pipeline.all().await?;
            Ok(())
        }
        .await;
        if let Err(e) = queued {
            tracing::warn!(error = %e, "could not refund a rate-limit slot");
        }
    }

    /// Admits one deployment for `user` (recorded under `member`, the deployment id) or says
    /// which window is full.
    pub async fn admit(
        &self,
        user: &str,
        tier: Option<&str>,
        member: &str,
    ) -> Result<Decision, fred::error::Error> {
        let (per_hour, per_day) = self.limits_for(tier);
        let now = chrono::Utc::now().timestamp_millis();
        let keys = Vec::from(self.keys(user));
        let args: Vec<Value> = vec![
            now.into(),
            member.into(),
            i64::from(per_hour).into(),
            i64::from(per_day).into(),
            i64::from(self.settings.global_per_hour).into(),
            (HOUR_MS as i64).into(),
            (DAY_MS as i64).into(),
        ];
        let r: Vec<i64> = self.client.eval(SCRIPT, keys, args).await?;
        let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(if at(0) == 1 {
            Decision::Admitted {
                limit_hour: per_hour,
                remaining_hour: at(1) as u32,
            }
        } else {
            let (window, limit) = match at(1) {
                1 => (Window::UserHour, per_hour),
                2 => (Window::UserDay, per_day),
                _ => (Window::Global, self.settings.global_per_hour),
            };
            Decision::Refused {
                window,
                limit,
                retry_after_secs: at(2).div_ceil(1000).max(1),
            }
        })
    }
}
