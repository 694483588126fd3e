//! The delivery jobs in Redis, under the state prefix:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<state_prefix>:webhooks:ready` | list | jobs to send now (queued at the newest end) |
//! | `<state_prefix>:webhooks:processing:<worker>` | list | jobs a worker is sending |
//! | `<state_prefix>:webhooks:scheduled` | sorted set | jobs waiting for a retry, by due time (ms) |
//! | `<state_prefix>:webhooks:dead` | list | jobs that spent their attempts (newest first) |
//!
//! Every move is one atomic step (`BLMOVE`, `MULTI`, or a script), so a job is always in
//! exactly one place, and a crash leaves it where a restart or the reaper finds it.

use fred::prelude::*;
use fred::types::lists::LMoveDirection;
use fred::types::Value;

use super::events::Job;
use crate::audit::{Audit, Fields};
use crate::queue::QueueError;

/// Moves due scheduled jobs to the ready list, at most ARGV[2] per call.
/// KEYS: scheduled, ready. ARGV: now (ms), limit. Returns how many moved.
const PROMOTE_SCRIPT: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, job in ipairs(due) do
  redis.call('ZREM', KEYS[1], job)
  redis.call('LPUSH', KEYS[2], job)
end
return #due
"#;

/// Moves the dead jobs whose job, event or deployment id is ARGV[1] (all when ARGV[1] is
/// empty) back to the ready list with their attempts reset. KEYS: dead, ready.
const REQUEUE_DEAD_SCRIPT: &str = r#"
local moved = 0
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local ok, job = pcall(cjson.decode, items[i])
  if ok and type(job) == 'table' and (ARGV[1] == '' or job.job_id == ARGV[1]
      or job.event_id == ARGV[1] or job.deployment_id == ARGV[1]) then
    if redis.call('LREM', KEYS[1], 1, items[i]) == 1 then
      job.attempts = 0
      job.dead_at = nil
      redis.call('LPUSH', KEYS[2], cjson.encode(job))
      moved = moved + 1
    end
  end
end
return moved
"#;

/// The key names, from the state prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub ready: String,
    pub scheduled: String,
    pub dead: String,
    processing_prefix: String,
}

impl Keys {
    pub fn new(state_prefix: &str) -> Keys {
        Keys {
            ready: format!("{state_prefix}:webhooks:ready"),
            scheduled: format!("{state_prefix}:webhooks:scheduled"),
            dead: format!("{state_prefix}:webhooks:dead"),
            processing_prefix: format!("{state_prefix}:webhooks:processing"),
        }
    }

    pub fn processing(&self, worker: &str) -> String {
        format!("{}:{worker}", self.processing_prefix)
    }
}

/// Depths at one instant.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Depths {
    pub ready: u64,
    pub scheduled: u64,
    pub dead: u64,
}

/// One worker's view of the jobs (and the operator's, with any worker id).
#[derive(Clone)]
pub struct Store {
    client: Client,
    pub keys: Keys,
    processing: String,
}

impl Store {
    pub fn new(client: Client, state_prefix: &str, worker_id: &str) -> Store {
        let keys = Keys::new(state_prefix);
        Store {
            processing: keys.processing(worker_id),
            keys,
            client,
        }
    }

    /// Waits up to `timeout_secs` on `blocking` (a connection used for nothing else) for a
    /// ready job, moving it into this worker's processing list.
    pub async fn take(
        &self,
        blocking: &Client,
        timeout_secs: f64,
    ) -> Result<Option<String>, QueueError> {
        let r: Result<Option<String>, _> = blocking
            .blmove(
                &self.keys.ready,
                &self.processing,
                LMoveDirection::Right,
                LMoveDirection::Left,
                timeout_secs,
            )
            .await;
        match r {
            Ok(v) => Ok(v),
            Err(e) if *e.kind() == fred::error::ErrorKind::Timeout => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A job sent: forgotten.
    pub async fn done(&self, raw: &str) -> Result<(), QueueError> {
        let _: i64 = self.client.lrem(&self.processing, 1, raw).await?;
        Ok(())
    }

    /// A job to try again at `due_ms`, as `next` (its attempt counted).
    pub async fn retry(&self, raw: &str, next: &Job, due_ms: i64) -> Result<(), QueueError> {
        let tx = self.client.multi();
        let _: () = tx.lrem(&self.processing, 1, raw).await?;
        let _: () = tx
            .zadd(
                &self.keys.scheduled,
                None,
                None,
                false,
                false,
                (due_ms as f64, next.to_json()),
            )
            .await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// A job that spent its attempts, to the webhook dead-letter list.
    pub async fn dead(&self, raw: &str, dead: &Job) -> Result<(), QueueError> {
        let tx = self.client.multi();
        let _: () = tx.lrem(&self.processing, 1, raw).await?;
        let _: () = tx.lpush(&self.keys.dead, dead.to_json()).await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// A callback answered 410: the job ends and the deployment's callback is switched off.
    pub async fn gone(&self, raw: &str, record: &str) -> Result<(), QueueError> {
        let tx = self.client.multi();
        let _: () = tx.lrem(&self.processing, 1, raw).await?;
        let _: () = tx.hset(record, ("callback_gone", "1")).await?;
        let _: Value = tx.exec(true).await?;
        Ok(())
    }

    /// Moves due retries to the ready list; any worker may, the script makes it once.
    pub async fn promote(&self, now_ms: i64) -> Result<u64, QueueError> {
        Ok(self
            .client
            .eval(
                PROMOTE_SCRIPT,
                vec![self.keys.scheduled.clone(), self.keys.ready.clone()],
                vec![now_ms.to_string(), "500".to_owned()],
            )
            .await?)
    }

    /// Returns to the ready list what an earlier process with our worker id was sending when it
    /// stopped: those jobs are sent again, unchanged.
    pub async fn recover_own(&self) -> Result<u64, QueueError> {
        Ok(crate::queue::move_all(&self.client, &self.processing, &self.keys.ready).await?)
    }

    pub async fn depths(&self) -> Result<Depths, QueueError> {
        let p = self.client.pipeline();
        let _: () = p.llen(&self.keys.ready).await?;
        let _: () = p.zcard(&self.keys.scheduled).await?;
        let _: () = p.llen(&self.keys.dead).await?;
        let (ready, scheduled, dead) = p.all().await?;
        Ok(Depths {
            ready,
            scheduled,
            dead,
        })
    }

    /// The newest `limit` dead jobs.
    pub async fn dead_list(&self, limit: u64) -> Result<Vec<Job>, QueueError> {
        let end = limit.max(1) as i64 - 1;
        let items: Vec<String> = self.client.lrange(&self.keys.dead, 0, end).await?;
        Ok(items
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect())
    }

    /// Dead jobs with this job, event or deployment id.
    pub async fn dead_show(&self, id: &str) -> Result<Vec<Job>, QueueError> {
        let items: Vec<String> = self.client.lrange(&self.keys.dead, 0, -1).await?;
        Ok(items
            .iter()
            .filter_map(|j| serde_json::from_str::<Job>(j).ok())
            .filter(|j| j.job_id == id || j.event_id == id || j.deployment_id == id)
            .collect())
    }

    /// Sends dead jobs again (one id, or all), with a fresh set of attempts and the same event
    /// id and body.
    pub async fn requeue(&self, id: Option<&str>, audit: &Audit) -> Result<u64, QueueError> {
        let moved: u64 = self
            .client
            .eval(
                REQUEUE_DEAD_SCRIPT,
                vec![self.keys.dead.clone(), self.keys.ready.clone()],
                vec![id.unwrap_or("").to_owned()],
            )
            .await?;
        if moved > 0 {
            audit
                .record(
                    "webhook_requeued",
                    Fields::from([
                        ("id", id.unwrap_or("*").to_owned()),
                        ("count", moved.to_string()),
                    ]),
                )
                .await;
        }
        Ok(moved)
    }

    /// Deletes every dead job.
    pub async fn purge(&self, audit: &Audit) -> Result<u64, QueueError> {
        let n = crate::queue::purge_list(&self.client, &self.keys.dead).await?;
        audit
            .record("webhook_purged", Fields::from([("count", n.to_string())]))
            .await;
        Ok(n)
    }
}
