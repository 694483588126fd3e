//! How the service reaches Redis, and what it knows of where its data lives: the mode
//! (standalone, Redis Cluster, Sentinel), the primary in use, the replicas that confirmed the
//! writes that must survive a failover, and the failovers seen.
//!
//! Redis replicates asynchronously: a primary that dies can take with it writes it already
//! acknowledged. Two kinds of write must not be lost that way, so with
//! `redis.min_replica_acks` > 0 the worker follows them with `WAIT`:
//! - the journal record of a signed transaction, before it is broadcast (else a promoted replica
//!   would not know the nonce is in flight, and a different transaction would be signed for it);
//! - the `MULTI` that publishes and acknowledges a message (or dead-letters it), before the
//!   worker counts the message done.
//!
//! Everything else can be lost and redone: a lost lock or heartbeat is taken again, a lost
//! event record is rebuilt from the durable transaction record and its receipt.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use fred::prelude::*;
use fred::types::config::ServerConfig;
use fred::types::{ClusterHash, CustomCommand};

use crate::config::{RedisMode, RedisSettings, Settings};
use crate::queue::QueueError;
use crate::telemetry::names;

/// Rewrites the server part of a client configuration for the configured mode: a cluster's
/// seed is the URL's host; a sentinel set comes from `redis.sentinel_addresses`. The URL's
/// user, password, database and TLS stay.
pub fn apply_mode(config: &mut Config, redis: &RedisSettings) {
    let (host, port) = match &config.server {
        ServerConfig::Centralized { server } => (server.host.to_string(), server.port),
        _ => return,
    };
    match redis.mode() {
        RedisMode::Cluster => config.server = ServerConfig::new_clustered(vec![(host, port)]),
        RedisMode::Sentinel => {
            let hosts: Vec<(String, u16)> = redis
                .sentinel_addresses
                .iter()
                .filter_map(|a| {
                    let (h, p) = a.trim().rsplit_once(':')?;
                    Some((h.to_owned(), p.parse().ok()?))
                })
                .collect();
            config.server = ServerConfig::new_sentinel(
                hosts,
                redis.sentinel_service_name.clone().unwrap_or_default(),
            );
        }
        RedisMode::Standalone => {}
    }
}

/// What a process knows of the topology: shared with the ops server.
#[derive(Debug)]
pub struct Topology {
    /// Replicas that confirmed the last `WAIT` (-1: none ran).
    pub replica_acks: AtomicI64,
    /// The primary serving our slot as last seen, `host:port`.
    pub primary: Mutex<Option<String>>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            replica_acks: AtomicI64::new(-1),
            primary: Mutex::default(),
        }
    }
}

impl Topology {
    pub fn primary(&self) -> Option<String> {
        self.primary.lock().expect("never poisoned").clone()
    }

    /// Reads which server holds our slot now; a change from the last reading is a failover:
    /// logged, counted and returned (`Some((from, to))`) for the caller to audit.
    pub fn observe(&self, client: &Client, state_prefix: &str) -> Option<(String, String)> {
        let now = primary_in_use(client, state_prefix)?;
        let mut last = self.primary.lock().expect("never poisoned");
        let before = last.replace(now.clone());
        match before {
            Some(b) if b != now => {
                tracing::warn!(from = %b, to = %now, "redis failover: the primary serving our keys changed");
                metrics::counter!(names::REDIS_FAILOVERS).increment(1);
                Some((b, now))
            }
            _ => None,
        }
    }
}

/// The slot every key of this deployment lives in (cluster mode; elsewhere just a number).
pub fn slot(state_prefix: &str) -> u16 {
    crate::config::key_slot(&format!("{state_prefix}:journal"))
}

/// The server a client sends our keys to: the owner of our slot on a cluster, else the one
/// connection it has.
pub fn primary_in_use(client: &Client, state_prefix: &str) -> Option<String> {
    if client.is_clustered() {
        let state = client.cached_cluster_state()?;
        let server = state.get_server(slot(state_prefix))?;
        return Some(format!("{}:{}", server.host, server.port));
    }
    client
        .active_connections()
        .first()
        .map(|s| format!("{}:{}", s.host, s.port))
}

/// Waits until `redis.min_replica_acks` replicas hold every write this client made so far.
#[derive(Clone)]
pub struct Durability {
    client: Client,
    wanted: u32,
    timeout_ms: u64,
    slot: u16,
    topology: Arc<Topology>,
}

impl Durability {
    pub fn new(client: Client, settings: &Settings, topology: Arc<Topology>) -> Durability {
        Durability {
            client,
            wanted: settings.redis.min_replica_acks,
            timeout_ms: settings.redis.replica_ack_timeout_ms,
            slot: slot(&settings.queues.state_prefix),
            topology,
        }
    }

    /// Off: returns at once.
    pub async fn wait(&self) -> Result<(), QueueError> {
        if self.wanted == 0 {
            return Ok(());
        }
        // Sent to the node owning our slot: WAIT counts the writes of its own connection.
        let cmd = CustomCommand::new_static("WAIT", ClusterHash::Custom(self.slot), true);
        let started = std::time::Instant::now();
        let got: i64 = self
            .client
            .custom(
                cmd,
                vec![self.wanted.to_string(), self.timeout_ms.to_string()],
            )
            .await?;
        metrics::histogram!(names::REDIS_DURATION, "op" => "wait")
            .record(started.elapsed().as_secs_f64());
        self.topology.replica_acks.store(got, Ordering::Relaxed);
        metrics::gauge!(names::REDIS_REPLICA_ACKS).set(got as f64);
        if got < i64::from(self.wanted) {
            return Err(QueueError::Replication {
                wanted: self.wanted,
                got,
            });
        }
        Ok(())
    }
}
