//! `[redis]`: where Redis is and how it is reached (standalone, Redis Cluster, Sentinel), and
//! the replica acknowledgements of the writes that must survive a failover.

use super::*;

#[derive(Clone, Deserialize, Serialize)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` (TLS), with optional `user:password@`.
    #[serde(serialize_with = "ser_masked_url")]
    pub url: String,
    /// Timeout of every non-blocking command.
    pub command_timeout_ms: u64,
    /// One BLMOVE's wait; bounds how long shutdown waits for the consumer.
    pub blocking_timeout_secs: u64,
    /// The ACL user's password, when it should not sit in the URL (a Kubernetes or ECS
    /// secret beside a URL in a ConfigMap); replaces the URL's password.
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub password: Option<Secret>,
    /// `rediss://` only: PEM file of the CAs that sign the server's certificate (a private
    /// CA); unset trusts the system's roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` only: PEM client certificate chain and key, for servers started with
    /// `tls-auth-clients yes`. Both or neither.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// `standalone`, `cluster` (the URL's host is a seed node) or `sentinel` (the URL gives
    /// the user, password, database and TLS; `sentinel_addresses` and `sentinel_service_name`
    /// the set). Unset: from the URL's scheme (`redis-cluster://`, `redis-sentinel://`).
    #[serde(default)]
    pub mode: Option<String>,
    /// Sentinel mode: the sentinels, `host:port` each.
    #[serde(default)]
    pub sentinel_addresses: Vec<String>,
    /// Sentinel mode: the name the sentinels monitor the primary under.
    #[serde(default)]
    pub sentinel_service_name: Option<String>,
    /// Replicas that must hold a write-ahead journal record (and the final publish) before the
    /// worker goes on (`WAIT`); 0 does not wait. 1 for ElastiCache with replicas.
    #[serde(default)]
    pub min_replica_acks: u32,
    /// How long one `WAIT` waits for those replicas; too few in time is a Redis fault (retried).
    #[serde(default = "default_replica_ack_timeout")]
    pub replica_ack_timeout_ms: u64,
}

fn default_replica_ack_timeout() -> u64 {
    1_000
}

/// How the service reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

impl RedisSettings {
    /// `redis.mode`, else the URL's scheme.
    pub fn mode(&self) -> RedisMode {
        match self.mode.as_deref() {
            Some("cluster") => RedisMode::Cluster,
            Some("sentinel") => RedisMode::Sentinel,
            Some(_) => RedisMode::Standalone,
            None if self.url.starts_with("redis-cluster://") => RedisMode::Cluster,
            None if self.url.starts_with("redis-sentinel://") => RedisMode::Sentinel,
            None => RedisMode::Standalone,
        }
    }
}

/// The hash slot of a key, as Redis Cluster computes it (CRC16 of the `{tag}` when there is
/// one, else of the whole key).
pub fn key_slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

impl Settings {
    pub(super) fn validate_redis_mode(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        if let Some(m) = &r.mode {
            if !matches!(m.as_str(), "standalone" | "cluster" | "sentinel") {
                return Err(invalid(
                    "redis.mode",
                    "one of standalone, cluster, sentinel",
                ));
            }
        }
        if r.replica_ack_timeout_ms == 0 || r.replica_ack_timeout_ms > 60_000 {
            return Err(invalid(
                "redis.replica_ack_timeout_ms",
                "must be between 1 and 60000",
            ));
        }
        match r.mode() {
            RedisMode::Sentinel if !r.url.starts_with("redis-sentinel://") => {
                if r.sentinel_addresses.is_empty() {
                    return Err(invalid(
                        "redis.sentinel_addresses",
                        "sentinel mode needs the sentinels (host:port, comma separated)",
                    ));
                }
                for a in &r.sentinel_addresses {
                    let ok = a
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                    if !ok {
                        return Err(invalid(
                            "redis.sentinel_addresses",
                            format!("`{a}` is not host:port"),
                        ));
                    }
                }
                if r.sentinel_service_name.as_deref().unwrap_or("").is_empty() {
                    return Err(invalid(
                        "redis.sentinel_service_name",
                        "sentinel mode needs the name the sentinels monitor (e.g. mymaster)",
                    ));
                }
            }
            RedisMode::Cluster => {
                // Every MULTI and script touches several of these keys: one slot for all.
                let q = &self.queues;
                let keys = [
                    ("queues.inbound", q.inbound.clone()),
                    ("queues.processing", format!("{}:worker-a", q.processing)),
                    ("queues.processing", format!("{}:worker-b", q.processing)),
                    ("queues.dlq", q.dlq.clone()),
                    ("queues.outbound", q.outbound.clone()),
                    ("queues.failures", q.failures.clone()),
                    (
                        "queues.state_prefix",
                        format!("{}:journal:a", q.state_prefix),
                    ),
                    ("queues.state_prefix", format!("{}:lock:b", q.state_prefix)),
                ];
                let first = key_slot(&keys[0].1);
                if keys.iter().any(|(_, k)| key_slot(k) != first) {
                    let mut names: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
                    names.dedup();
                    return Err(invalid(
                        "queues",
                        format!(
                            "in Redis Cluster mode every key must live in one hash slot, but {} map to different slots; give them one hash tag, e.g. `{{hokusai}}:model_ready_queue`, `{{hokusai}}:model_ready_queue:processing`, `{{hokusai}}:deployer`",
                            names.join(", ")
                        ),
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }
}
