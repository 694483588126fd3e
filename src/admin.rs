//! What operators do to the queues: read their depths and the workers' heartbeats, list, show,
//! requeue and purge dead letters, and set or clear the pause flag. Every change is one atomic
//! Redis step, so two operators racing never lose or double a message, and every change is
//! written to the audit trail.

use chrono::{DateTime, Utc};
use fred::prelude::*;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::{Audit, Fields};
use crate::config::{QueueSettings, Settings};
use crate::message::DeadLetter;
use crate::queue::{heartbeat_key, pause_key, processing_key, workers_key, QueueError};

/// Pops up to ARGV[1] of the oldest dead letters; each well-formed one goes back to the end of
/// the inbound queue as its original message, anything else returns to the DLQ's newest end.
/// KEYS: dlq, inbound. Returns {moved, examined}.
const REQUEUE_OLDEST_SCRIPT: &str = r#"
local moved, examined = 0, 0
for _ = 1, tonumber(ARGV[1]) do
  local item = redis.call('RPOP', KEYS[1])
  if not item then break end
  examined = examined + 1
  local ok, entry = pcall(cjson.decode, item)
  if ok and type(entry) == 'table' and type(entry.original) == 'string' then
    redis.call('LPUSH', KEYS[2], entry.original)
    moved = moved + 1
  else
    redis.call('LPUSH', KEYS[1], item)
  end
end
return {moved, examined}
"#;

/// Moves every dead letter whose `message_id` is ARGV[1] back to the inbound queue.
/// KEYS: dlq, inbound. Returns how many moved.
const REQUEUE_ID_SCRIPT: &str = r#"
local moved = 0
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local ok, entry = pcall(cjson.decode, items[i])
  if ok and type(entry) == 'table' and entry.message_id == ARGV[1]
     and type(entry.original) == 'string' then
    if redis.call('LREM', KEYS[1], 1, items[i]) == 1 then
      redis.call('LPUSH', KEYS[2], entry.original)
      moved = moved + 1
    end
  end
end
return moved
"#;

/// Which stored events `events replay` re-publishes.
#[derive(Debug, Clone)]
pub enum Replay {
    /// These models' events.
    Models(Vec<String>),
    /// Every event published at or after this time (the journal's `event_at`, else the
    /// event's `deployment_timestamp`).
    Since(DateTime<Utc>),
}

/// Who paused the workers, when and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pause {
    pub by: String,
    pub at: String,
    #[serde(default)]
    pub reason: String,
}

/// One worker as its heartbeat shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    /// False once the heartbeat expired (the next reaper pass requeues its list).
    pub alive: bool,
    /// Seconds until the heartbeat expires.
    pub heartbeat_ttl_secs: i64,
    pub processing: u64,
}

/// Queue depths and workers at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub inbound: u64,
    /// Sum over every worker's processing list.
    pub processing: u64,
    pub dlq: u64,
    pub outbound: u64,
    pub failures: u64,
    pub workers: Vec<WorkerInfo>,
    pub paused: Option<Pause>,
}

/// A DLQ entry as listed: parsed when it is one of ours, raw otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    pub entry: Option<DeadLetter>,
    pub raw: String,
}

#[derive(Clone)]
pub struct Admin {
    client: Client,
    q: QueueSettings,
    audit: Audit,
}

impl Admin {
    pub fn new(client: Client, settings: &Settings, actor: &str) -> Admin {
        Admin {
            audit: Audit::new(client.clone(), settings, actor),
            client,
            q: settings.queues.clone(),
        }
    }

    /// Depths of every queue, the workers and the pause flag, in one round trip.
    pub async fn stats(&self) -> Result<Stats, QueueError> {
        let workers: Vec<String> = self
            .client
            .smembers(workers_key(&self.q.state_prefix))
            .await?;
        let p = self.client.pipeline();
        for k in [
            &self.q.inbound,
            &self.q.dlq,
            &self.q.outbound,
            &self.q.failures,
        ] {
            let _: () = p.llen(k).await?;
        }
        let _: () = p.get(pause_key(&self.q.state_prefix)).await?;
        for w in &workers {
            let _: () = p.ttl(heartbeat_key(&self.q.state_prefix, w)).await?;
            let _: () = p.llen(processing_key(&self.q.processing, w)).await?;
        }
        let v: Vec<Value> = p.all().await?;
        let n = |i: usize| v.get(i).and_then(Value::as_i64).unwrap_or(0);
        let paused = v
            .get(4)
            .and_then(|x| x.as_str().map(|s| s.to_string()))
            .map(|s| {
                serde_json::from_str(&s).unwrap_or(Pause {
                    by: "unknown".into(),
                    at: String::new(),
                    reason: s,
                })
            });
        let mut infos: Vec<WorkerInfo> = workers
            .into_iter()
            .enumerate()
            .map(|(i, worker_id)| {
                let ttl = n(5 + 2 * i);
                WorkerInfo {
                    worker_id,
                    alive: ttl > 0 || ttl == -1,
                    heartbeat_ttl_secs: ttl,
                    processing: n(6 + 2 * i).max(0) as u64,
                }
            })
            .collect();
        infos.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(Stats {
            inbound: n(0) as u64,
            dlq: n(1) as u64,
            outbound: n(2) as u64,
            failures: n(3) as u64,
            processing: infos.iter().map(|w| w.processing).sum(),
            workers: infos,
            paused,
        })
    }

    /// The newest `limit` dead letters, newest first.
    pub async fn dlq_list(&self, limit: u64) -> Result<Vec<Letter>, QueueError> {
        let end = limit.max(1) as i64 - 1;
        let items: Vec<String> = self.client.lrange(&self.q.dlq, 0, end).await?;
        Ok(items.into_iter().map(letter).collect())
    }

    /// Every dead letter of one message id (a message can fail more than once).
    pub async fn dlq_show(&self, message_id: &str) -> Result<Vec<Letter>, QueueError> {
        let items: Vec<String> = self.client.lrange(&self.q.dlq, 0, -1).await?;
        Ok(items
            .into_iter()
            .map(letter)
            .filter(|l| l.entry.as_ref().is_some_and(|e| e.message_id == message_id))
            .collect())
    }

    /// Moves one message's dead letters back to the inbound queue; returns how many moved.
    pub async fn dlq_requeue(&self, message_id: &str) -> Result<u64, QueueError> {
        let moved: u64 = self
            .client
            .eval(
                REQUEUE_ID_SCRIPT,
                vec![self.q.dlq.clone(), self.q.inbound.clone()],
                vec![message_id.to_owned()],
            )
            .await?;
        if moved > 0 {
            self.audit
                .record(
                    "dlq_requeued",
                    Fields::from([
                        ("message_id", message_id.into()),
                        ("count", moved.to_string()),
                    ]),
                )
                .await;
        }
        Ok(moved)
    }

    /// Re-publishes stored `token_deployed` events from the journal, each with
    /// `"replayed": true`, onto `to` (default the outbound queue), in the order of their models'
    /// ids. Changes nothing on chain. Returns the model ids replayed; one audit entry names
    /// them and the operator.
    pub async fn replay_events(
        &self,
        which: &Replay,
        to: Option<&str>,
    ) -> Result<Vec<String>, QueueError> {
        let prefix = &self.q.state_prefix;
        let models: Vec<String> = match which {
            Replay::Models(m) => m.clone(),
            Replay::Since(_) => {
                let strip = crate::journal::Journal::key_of(prefix, "");
                let pattern = format!("{}*", crate::acl::glob_escape(&strip));
                let mut keys = self.client.scan_buffered(pattern, Some(500), None);
                let mut out = Vec::new();
                while let Some(k) = keys.next().await {
                    let k = k?;
                    if let Some(id) = k.as_str().and_then(|s| s.strip_prefix(&strip)) {
                        out.push(id.to_owned());
                    }
                }
                out
            }
        };
        let mut picked: Vec<(String, String)> = Vec::new();
        for model in models {
            let key = crate::journal::Journal::key_of(prefix, &model);
            let (event, at): (Option<String>, Option<String>) =
                self.client.hmget(&key, vec!["event", "event_at"]).await?;
            let Some(event) = event else { continue };
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&event) else {
                continue;
            };
            if let Replay::Since(since) = which {
                let when = at
                    .as_deref()
                    .or_else(|| v["deployment_timestamp"].as_str())
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
                if when.is_none_or(|t| t < *since) {
                    continue;
                }
            }
            v["replayed"] = true.into();
            picked.push((model, v.to_string()));
        }
        picked.sort();
        let queue = to.unwrap_or(&self.q.outbound);
        if !picked.is_empty() {
            let events: Vec<String> = picked.iter().map(|(_, e)| e.clone()).collect();
            // Oldest model id first out of an LPUSH/BRPOP list.
            let _: u64 = self.client.lpush(queue, events).await?;
        }
        let models: Vec<String> = picked.into_iter().map(|(m, _)| m).collect();
        self.audit
            .record(
                "events_replayed",
                Fields::from([
                    ("count", models.len().to_string()),
                    ("models", models.join(",").chars().take(1000).collect()),
                    ("queue", queue.to_owned()),
                ]),
            )
            .await;
        Ok(models)
    }

    /// Moves every dead letter present when it starts back to the inbound queue, oldest first,
    /// in batches. Each entry is popped atomically, so concurrent runs never move one twice.
    pub async fn dlq_requeue_all(&self) -> Result<u64, QueueError> {
        let mut remaining: u64 = self.client.llen(&self.q.dlq).await?;
        let mut total = 0;
        while remaining > 0 {
            let batch = remaining.min(500);
            let (moved, examined): (u64, u64) = self
                .client
                .eval(
                    REQUEUE_OLDEST_SCRIPT,
                    vec![self.q.dlq.clone(), self.q.inbound.clone()],
                    vec![batch.to_string()],
                )
                .await?;
            total += moved;
            if examined == 0 {
                break;
            }
            remaining = remaining.saturating_sub(examined);
        }
        if total > 0 {
            self.audit
                .record(
                    "dlq_requeued",
                    Fields::from([("message_id", "*".into()), ("count", total.to_string())]),
                )
                .await;
        }
        Ok(total)
    }

    /// Deletes every dead letter; returns how many there were.
    pub async fn dlq_purge(&self) -> Result<u64, QueueError> {
        let n = crate::queue::purge_list(&self.client, &self.q.dlq).await?;
        self.audit
            .record("dlq_purged", Fields::from([("count", n.to_string())]))
            .await;
        Ok(n)
    }

    /// Sets the pause flag: every worker stops taking messages within a second.
    pub async fn pause(&self, by: &str, reason: &str) -> Result<Pause, QueueError> {
        let p = Pause {
            by: by.to_owned(),
            at: crate::message::rfc3339(chrono::Utc::now()),
            reason: reason.to_owned(),
        };
        let body = serde_json::to_string(&p).expect("Pause always serializes");
        let _: () = self
            .client
            .set(pause_key(&self.q.state_prefix), body, None, None, false)
            .await?;
        self.audit
            .record("paused", Fields::from([("reason", reason.to_owned())]))
            .await;
        Ok(p)
    }

    /// Clears the pause flag; returns whether it was set.
    pub async fn resume(&self) -> Result<bool, QueueError> {
        let n: u64 = self.client.del(pause_key(&self.q.state_prefix)).await?;
        self.audit.record("resumed", Fields::new()).await;
        Ok(n > 0)
    }
}

fn letter(raw: String) -> Letter {
    Letter {
        entry: serde_json::from_str(&raw).ok(),
        raw,
    }
}
