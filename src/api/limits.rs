//! Rate limits in Redis, shared by every API replica and exact under concurrency. One Lua
//! script checks a set of rolling windows and, only if all have room, records the request in
//! all of them. Windows are sorted sets of acceptance times, so "5 per hour" means any 60
//! minutes, not a calendar hour.
//!
//! Three uses: the deployment quota (the caller's hour and day and the global hour, the
//! circuit breaker; the platform's webhook takes the global hour only), failed authentication
//! per client address, and status/quote reads per user. A failed authentication is recorded
//! by the same check-and-record script, so of concurrent failures from one address exactly
//! the limit are answered `401` and the rest `429`; a request with good credentials only
//! looks (an empty member records nothing), so it holds no slot, yet a throttled address gets
//! `429` whatever it sends and cannot tell a good credential from a bad one.

use fred::prelude::*;

use crate::config::LimitSettings;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;

/// KEYS: the windows' sorted sets. ARGV: now (ms), member (empty: look, record nothing), then
/// per window its limit and length (ms). Returns {1, remaining in the first window} when
/// admitted, or {0, index of the full window (1-based), ms until its oldest entry leaves it}.
const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local counts = {}
for i, key in ipairs(KEYS) do
  local limit, len = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - len)
  counts[i] = redis.call('ZCARD', key)
  if counts[i] >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local wait = len
    if oldest[2] then wait = tonumber(oldest[2]) + len - now end
    return {0, i, wait}
  end
end
if ARGV[2] == '' then return {1, tonumber(ARGV[3]) - counts[1]} end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, tonumber(ARGV[2 + 2 * i]))
end
return {1, tonumber(ARGV[3]) - counts[1] - 1}
"#;

/// What the limiter decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted {
        limit: u32,
        remaining: u32,
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
    /// Failed authentications from one client address per minute.
    AuthFailures,
    /// Status and quote reads of one user per minute.
    Reads,
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

    /// The deployment windows' sorted sets, in the script's order: user hour, user day,
    /// global hour.
    fn quota_keys(&self, user: &str) -> [String; 3] {
        [
            format!("{}:user:{user}:hour", self.prefix),
            format!("{}:user:{user}:day", self.prefix),
            self.global_key(),
        ]
    }

    fn global_key(&self) -> String {
        format!("{}:global:hour", self.prefix)
    }

    fn global_window(&self) -> (String, Window, u32, u64) {
        (
            self.global_key(),
            Window::Global,
            self.settings.global_per_hour,
            HOUR_MS,
        )
    }

    fn auth_key(&self, client: &str) -> String {
        format!("{}:auth:{client}", self.prefix)
    }

    fn reads_key(&self, user: &str) -> String {
        format!("{}:reads:{user}", self.prefix)
    }

    /// Records `member` in every window, or says which is full.
    async fn take(
        &self,
        windows: &[(String, Window, u32, u64)],
        member: &str,
    ) -> Result<Decision, fred::error::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let keys: Vec<String> = windows.iter().map(|w| w.0.clone()).collect();
        let mut args: Vec<Value> = vec![now.into(), member.into()];
        for (_, _, limit, len) in windows {
            args.push(i64::from(*limit).into());
            args.push((*len as i64).into());
        }
        let r: Vec<i64> = self.client.eval(SCRIPT, keys, args).await?;
        let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(if at(0) == 1 {
            Decision::Admitted {
                limit: windows[0].2,
                remaining: at(1) as u32,
            }
        } else {
            let (_, window, limit, _) = windows[(at(1).max(1) as usize - 1).min(windows.len() - 1)];
            Decision::Refused {
                window,
                limit,
                retry_after_secs: at(2).div_ceil(1000).max(1),
            }
        })
    }

    /// Removes `member` from the given windows; failures are logged, not returned (a slot
    /// not given back only expires with its window).
    async fn give_back(&self, keys: &[String], member: &str) {
        let pipeline = self.client.pipeline();
        let queued: Result<(), fred::error::Error> = async {
            for k in keys {
                let _: () = pipeline.zrem(k, member).await?;
            }
            let _: Vec<i64> = pipeline.all().await?;
            Ok(())
        }
        .await;
        if let Err(e) = queued {
            tracing::warn!(error = %e, "could not give back a rate-limit slot");
        }
    }

    /// Admits one deployment for `user` (recorded under `member`, the deployment id) or says
    /// which window is full. The answer's limit and remaining are the hour's.
    pub async fn admit(
        &self,
        user: &str,
        tier: Option<&str>,
        member: &str,
    ) -> Result<Decision, fred::error::Error> {
        let (per_hour, per_day) = self.limits_for(tier);
        let [hour, day, _] = self.quota_keys(user);
        self.take(
            &[
                (hour, Window::UserHour, per_hour, HOUR_MS),
                (day, Window::UserDay, per_day, DAY_MS),
                self.global_window(),
            ],
            member,
        )
        .await
    }

    /// Admits one deployment under the circuit breaker alone (the global hour): the ML
    /// platform's webhook, which has no per-user quota. [`Limiter::refund`] gives it back too.
    pub async fn admit_global(&self, member: &str) -> Result<Decision, fred::error::Error> {
        self.take(&[self.global_window()], member).await
    }

    /// Gives back the slot `member` took: the request was refused after admission. A member
    /// that was never admitted is no one's slot, so this is harmless then.
    pub async fn refund(&self, user: &str, member: &str) {
        self.give_back(&self.quota_keys(user), member).await;
    }

    /// Whether `client` may still be heard: under its failed-authentication limit. Records
    /// nothing.
    pub async fn auth_allowed(&self, client: &str) -> Result<Decision, fred::error::Error> {
        self.take(&[self.auth_window(client)], "").await
    }

    /// Records a failed authentication of `client` (`member` unique per request), or says the
    /// limit is reached and records nothing.
    pub async fn auth_failed(
        &self,
        client: &str,
        member: &str,
    ) -> Result<Decision, fred::error::Error> {
        self.take(&[self.auth_window(client)], member).await
    }

    fn auth_window(&self, client: &str) -> (String, Window, u32, u64) {
        (
            self.auth_key(client),
            Window::AuthFailures,
            self.settings.auth_failures_per_minute,
            MINUTE_MS,
        )
    }

    /// Admits one status or quote read of `user`.
    pub async fn read(&self, user: &str, member: &str) -> Result<Decision, fred::error::Error> {
        let limit = self.settings.status_per_minute;
        self.take(
            &[(self.reads_key(user), Window::Reads, limit, MINUTE_MS)],
            member,
        )
        .await
    }
}
