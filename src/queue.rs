//! Redis queues: the reliable-queue pattern over fred.
//!
//! A message moves atomically (`BLMOVE`) from the inbound list into this worker's own
//! processing list `<processing>:<worker_id>` and leaves it only in the same `MULTI` that
//! publishes its event or dead-letters it, so a crash at any instant leaves it somewhere.
//! Each worker keeps a heartbeat key; any worker requeues the processing list of a worker
//! whose heartbeat expired (a Lua script, so no item is dropped or doubled), and a process
//! restarting under the same worker id requeues its own list at start-up.
//!
//! All keys of one deployment are used together in scripts and transactions; on Redis
//! Cluster give them a common hash tag (`{hokusai}:...`) in configuration.

use std::time::Duration;

use fred::prelude::*;
use fred::types::lists::LMoveDirection;

use crate::config::{RedisSettings, Settings};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// The TLS files of `[redis]` cannot be used; found when the client is built.
    #[error("redis TLS: {0}")]
    Tls(String),
    /// Fewer replicas than `redis.min_replica_acks` confirmed a write in time: it could be lost
    /// in a failover, so what depends on it waits.
    #[error(
        "only {got} of {wanted} replicas confirmed the write within redis.replica_ack_timeout_ms"
    )]
    Replication { wanted: u32, got: i64 },
}

impl QueueError {
    /// Every Redis error is an infrastructure fault: retry, never dead-letter for it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Redis(_) | QueueError::Replication { .. })
    }
}

/// Requeues a dead worker's processing list, and its webhook deliveries under way, unless its
/// heartbeat came back.
/// KEYS: heartbeat, processing list, inbound, workers set, webhook processing list, webhook
/// ready list. ARGV: worker id.
const REAP_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT') do n = n + 1 end
while redis.call('LMOVE', KEYS[5], KEYS[6], 'LEFT', 'RIGHT') do n = n + 1 end
redis.call('SREM', KEYS[4], ARGV[1])
return n
"#;

/// Moves every item of a list onto another, oldest ending nearest the consumer.
const REQUEUE_SCRIPT: &str = r#"
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
return n
"#;

/// Returns to the inbound queue every item of our processing list that we are not working on
/// (counted with multiplicity). Run only while no BLMOVE is outstanding.
/// KEYS: processing list, inbound. ARGV: the raw messages in flight.
const SWEEP_SCRIPT: &str = r#"
local keep = {}
for _, m in ipairs(ARGV) do keep[m] = (keep[m] or 0) + 1 end
local moved = 0
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (keep[item] or 0) > 0 then
    keep[item] = keep[item] - 1
  else
    redis.call('LREM', KEYS[1], 1, item)
    redis.call('RPUSH', KEYS[2], item)
    moved = moved + 1
  end
end
return moved
"#;

/// Takes a model lock if it is free, ours, or held by a dead or restarted process.
/// KEYS: lock, the heartbeat of the holder the caller saw (the lock itself when free).
/// ARGV: owner ("worker|instance|seq"), ttl seconds, the holder the caller saw ("" for none).
/// Every key it reads is declared, so it runs on a Redis Cluster; -1: the holder is not the
/// one the caller named (it reads the holder and tries again).
const LOCK_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (cur or '') ~= ARGV[3] then return -1 end
if cur then
  local w, inst = string.match(cur, '^([^|]*)|([^|]*)|')
  local hb = w and redis.call('GET', KEYS[2])
  if hb and hb == inst then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"#;

/// Returns one taken message from our processing list to the consumer's end of the inbound
/// queue (taken while the pause flag was set). KEYS: processing, inbound. ARGV: the message.
const PUT_BACK_SCRIPT: &str = r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) return 1 end
return 0
"#;

/// Deletes a lock only if we still own it.
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Takes a signer lease if free, or held by an earlier process of this worker id.
/// KEYS: lease. ARGV: owner ("worker|instance"), owner's worker prefix ("worker|"), ttl seconds.
const LEASE_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] or string.sub(cur, 1, #ARGV[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  return 1
end
return 0
"#;

/// Extends a lease we still hold (1); takes it again when it lapsed and nobody took it
/// meanwhile (2: Redis was out of reach longer than the lease, or a failover lost it); 0
/// means another process has it now.
const RENEW_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 2
end
return 0
"#;

/// The two connections a worker needs: a blocking one for `BLMOVE` alone (a blocking command
/// stalls every other command on its connection) and one for everything else.
#[derive(Clone)]
pub struct Redis {
    pub commands: Client,
    pub blocking: Client,
}

/// Builds a client that reconnects forever with backoff and bounds every command.
pub fn client(settings: &Settings) -> Result<Client, QueueError> {
    client_with_attempts(settings, config(settings)?, 3)
}

/// Where and how to connect: the URL, the password, and the TLS set-up (files read here, once
/// per call; clones share it).
fn config(settings: &Settings) -> Result<Config, QueueError> {
    let mut config = Config::from_url(&settings.redis.url)?;
    crate::topology::apply_mode(&mut config, &settings.redis);
    if let Some(password) = &settings.redis.password {
        config.password = Some(password.expose().to_owned());
    }
    if config.tls.is_some() {
        config.tls = Some(tls_connector(&settings.redis)?.into());
    }
    Ok(config)
}

fn client_with_attempts(
    settings: &Settings,
    config: Config,
    attempts: u32,
) -> Result<Client, QueueError> {
    let timeout = Duration::from_millis(settings.redis.command_timeout_ms);
    let client = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = timeout;
            // How often fred sends a command that was in flight when a connection dropped.
            c.max_command_attempts = attempts;
        })
        // 0 attempts = forever; 100 ms doubling to 5 s: a restarted Redis is found quickly.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()?;
    Ok(client)
}

/// The rustls client for `rediss://`: the system's roots or `tls_ca_file`'s CAs, and a client
/// certificate when `tls_cert_file`/`tls_key_file` are set.
fn tls_connector(redis: &RedisSettings) -> Result<fred::types::config::TlsConnector, QueueError> {
    use fred::rustls::pki_types::pem::PemObject;
    use fred::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use fred::rustls::{ClientConfig, RootCertStore};

    let fail = |key: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        QueueError::Tls(format!("{key} {}: {e}", path.display()))
    };
    let certs = |key: &str, path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, _> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| fail(key, path, &e))?;
        if certs.is_empty() {
            return Err(fail(key, path, &"no PEM certificate in it"));
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    match &redis.tls_ca_file {
        Some(path) => {
            for cert in certs("redis.tls_ca_file", path)? {
                roots
                    .add(cert)
                    .map_err(|e| fail("redis.tls_ca_file", path, &e))?;
            }
        }
        None => {
            let found = fred::rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(QueueError::Tls(
                    "no system CA certificates found; set redis.tls_ca_file".into(),
                ));
            }
        }
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match (&redis.tls_cert_file, &redis.tls_key_file) {
        (Some(cert), Some(key)) => {
            crate::config::refuse_world_access(key, "redis.tls_key_file")
                .map_err(|e| QueueError::Tls(e.to_string()))?;
            let chain = certs("redis.tls_cert_file", cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| fail("redis.tls_key_file", key, &e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| fail("redis.tls_cert_file", cert, &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config.into())
}

impl Redis {
    /// Starts both connections without waiting: a Redis that is down at start-up is retried in
    /// the background and shows as not ready, instead of crashing the process.
    pub fn connect(settings: &Settings) -> Result<Redis, QueueError> {
        let config = config(settings)?;
        let commands = client_with_attempts(settings, config.clone(), 3)?;
        // Never re-send BLMOVE: a lost reply must surface as an error, after which the worker
        // sweeps its list for a message the server moved but we never received.
        let blocking = client_with_attempts(settings, config, 1)?;
        commands.connect();
        blocking.connect();
        Ok(Redis { commands, blocking })
    }

    pub async fn quit(&self) {
        let _ = self.commands.quit().await;
        let _ = self.blocking.quit().await;
    }
}

/// Queue names and this worker's identity.
#[derive(Clone)]
pub struct Queues {
    redis: Redis,
    pub inbound: String,
    /// Prefix of every worker's processing list.
    processing_prefix: String,
    /// This worker's processing list.
    pub processing: String,
    pub dlq: String,
    pub outbound: String,
    pub failures: String,
    state_prefix: String,
    /// Where webhook deliveries are queued (in the same step as the event they carry).
    webhooks: crate::webhooks::Keys,
    /// Makes the final publish or dead-letter wait for replicas (`redis.min_replica_acks`).
    durability: Option<crate::topology::Durability>,
    pub worker_id: String,
    /// Random per process start: tells a restarted worker's locks from its predecessor's.
    pub instance: String,
    blocking_timeout: f64,
    heartbeat_ttl: u64,
}

impl Queues {
    pub fn new(redis: Redis, settings: &Settings, worker_id: String) -> Queues {
        let q = &settings.queues;
        Queues {
            redis,
            inbound: q.inbound.clone(),
            processing_prefix: q.processing.clone(),
            processing: processing_key(&q.processing, &worker_id),
            dlq: q.dlq.clone(),
            outbound: q.outbound.clone(),
            failures: q.failures.clone(),
            state_prefix: q.state_prefix.clone(),
            webhooks: crate::webhooks::Keys::new(&q.state_prefix),
            durability: None,
            worker_id,
            instance: uuid::Uuid::new_v4().simple().to_string(),
            blocking_timeout: settings.redis.blocking_timeout_secs as f64,
            heartbeat_ttl: settings.pipeline.heartbeat_ttl_secs,
        }
    }

    /// The final `MULTI`s wait for replicas with `d` (see [`Queues::durable`]).
    pub fn with_durability(mut self, d: crate::topology::Durability) -> Queues {
        self.durability = Some(d);
        self
    }

    /// Waits until replicas hold what this connection wrote (the publish or dead-letter just
    /// made): called after those `MULTI`s, retried on its own so they never run twice.
    pub async fn durable(&self) -> Result<(), QueueError> {
        match &self.durability {
            Some(d) => d.wait().await,
            None => Ok(()),
        }
    }

    /// The command connection (not the blocking one).
    pub fn client(&self) -> &Client {
        &self.redis.commands
    }

    /// Runs one of this module's Lua scripts on the command connection.
    async fn script<R: FromValue>(
        &self,
        op: &'static str,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<R, QueueError> {
        timed(op, self.redis.commands.eval(script, keys, args)).await
    }

    fn workers_key(&self) -> String {
        workers_key(&self.state_prefix)
    }

    /// Waits up to the blocking timeout for one message, moving it into our processing list.
    pub async fn take(&self) -> Result<Option<Vec<u8>>, QueueError> {
        let r: Result<Value, _> = self
            .redis
            .blocking
            .blmove(
                &self.inbound,
                &self.processing,
                LMoveDirection::Right,
                LMoveDirection::Left,
                self.blocking_timeout,
            )
            .await;
        match r {
            Ok(v) => Ok(value_bytes(v)),
            // fred reports BLMOVE's null reply (nothing arrived in time) as a timeout error.
            Err(e) if *e.kind() == ErrorKind::Timeout => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether an operator paused the workers (`hokusai-deployer pause`).
    pub async fn paused(&self) -> Result<bool, QueueError> {
        let n: u64 = self
            .redis
            .commands
            .exists(pause_key(&self.state_prefix))
            .await?;
        Ok(n > 0)
    }

    /// The pause flag and the outbound queue's length, in one round trip: whether to take
    /// anything now.
    pub async fn hold_state(&self) -> Result<(bool, u64), QueueError> {
        let p = self.redis.commands.pipeline();
        let _: () = p.exists(pause_key(&self.state_prefix)).await?;
        let _: () = p.llen(&self.outbound).await?;
        let (paused, outbound): (u64, u64) = p.all().await?;
        Ok((paused > 0, outbound))
    }

    /// Puts a message taken while paused back where the next consumer takes from.
    pub async fn put_back(&self, raw: &[u8]) -> Result<(), QueueError> {
        let _: i64 = self
            .script(
                "put_back",
                PUT_BACK_SCRIPT,
                vec![self.processing.clone(), self.inbound.clone()],
                vec![Value::Bytes(raw.to_vec().into())],
            )
            .await?;
        Ok(())
    }

    /// Publishes the event, queues its webhook deliveries and removes the message, in one
    /// transaction.
    pub async fn ack_with_event(
        &self,
        raw: &[u8],
        event: &str,
        webhooks: &[String],
    ) -> Result<(), QueueError> {
        let tx = self.redis.commands.multi();
        let _: () = tx.lpush(&self.outbound, event).await?;
        if !webhooks.is_empty() {
            let _: () = tx.lpush(&self.webhooks.ready, webhooks.to_vec()).await?;
        }
        let _: () = tx.lrem(&self.processing, 1, raw).await?;
        timed("ack", tx.exec::<Value>(true)).await?;
        Ok(())
    }

    /// Publishes an event that no message waits on (a deployment made again after a
    /// reorganisation), with its webhook deliveries.
    pub async fn publish(&self, event: &str, webhooks: &[String]) -> Result<(), QueueError> {
        let tx = self.redis.commands.multi();
        let _: () = tx.lpush(&self.outbound, event).await?;
        if !webhooks.is_empty() {
            let _: () = tx.lpush(&self.webhooks.ready, webhooks.to_vec()).await?;
        }
        timed("publish", tx.exec::<Value>(true)).await?;
        Ok(())
    }

    /// Dead-letters a message in one `MULTI`: the DLQ entry, the failure event, the message's
    /// outcome (read by the API's status endpoint, kept [`OUTCOME_TTL_SECS`]), its webhook
    /// deliveries and the removal from our processing list.
    pub async fn dead_letter(
        &self,
        raw: &[u8],
        message_id: &str,
        entry: &str,
        failure_event: &str,
        webhooks: &[String],
    ) -> Result<(), QueueError> {
        let tx = self.redis.commands.multi();
        let _: () = tx.lpush(&self.dlq, entry).await?;
        if !webhooks.is_empty() {
            let _: () = tx.lpush(&self.webhooks.ready, webhooks.to_vec()).await?;
        }
        let _: () = tx.lpush(&self.failures, failure_event).await?;
        let _: () = tx
            .set(
                outcome_key(&self.state_prefix, message_id),
                failure_event,
                Some(fred::types::Expiration::EX(OUTCOME_TTL_SECS)),
                None,
                false,
            )
            .await?;
        let _: () = tx.lrem(&self.processing, 1, raw).await?;
        let _: () = tx
            .publish(progress_channel(&self.state_prefix), message_id)
            .await?;
        timed("dead_letter", tx.exec::<Value>(true)).await?;
        Ok(())
    }

    /// Requeues items of our processing list that no job of ours holds (see [`SWEEP_SCRIPT`]).
    pub async fn sweep_orphans(&self, in_flight: Vec<Vec<u8>>) -> Result<u64, QueueError> {
        timed(
            "sweep",
            sweep(
                &self.redis.commands,
                &self.processing,
                &self.inbound,
                in_flight,
            ),
        )
        .await
    }

    /// Requeues what a previous process with our worker id left in our processing list.
    pub async fn recover_own(&self) -> Result<u64, QueueError> {
        timed(
            "requeue",
            move_all(&self.redis.commands, &self.processing, &self.inbound),
        )
        .await
    }

    /// Announces this worker alive for `heartbeat_ttl` seconds.
    pub async fn heartbeat(&self) -> Result<(), QueueError> {
        let key = heartbeat_key(&self.state_prefix, &self.worker_id);
        let _: () = self
            .redis
            .commands
            .set(
                &key,
                self.instance.as_str(),
                Some(Expiration::EX(self.heartbeat_ttl as i64)),
                None,
                false,
            )
            .await?;
        let _: () = self
            .redis
            .commands
            .sadd(self.workers_key(), self.worker_id.as_str())
            .await?;
        Ok(())
    }

    /// Removes our heartbeat at a clean shutdown so the reaper need not wait for it to expire.
    pub async fn retire(&self) -> Result<(), QueueError> {
        let key = heartbeat_key(&self.state_prefix, &self.worker_id);
        let _: () = self.redis.commands.del(&key).await?;
        Ok(())
    }

    /// Requeues the processing lists of every worker whose heartbeat has expired.
    pub async fn reap(&self) -> Result<u64, QueueError> {
        let workers: Vec<String> = self.redis.commands.smembers(self.workers_key()).await?;
        let mut total = 0;
        for w in workers.iter().filter(|w| **w != self.worker_id) {
            let keys = vec![
                heartbeat_key(&self.state_prefix, w),
                processing_key(&self.processing_prefix, w),
                self.inbound.clone(),
                self.workers_key(),
                self.webhooks.processing(w),
                self.webhooks.ready.clone(),
            ];
            let n: i64 = self
                .script("reap", REAP_SCRIPT, keys, vec![w.as_str().into()])
                .await?;
            if n > 0 {
                tracing::warn!(worker = %w, requeued = n, "requeued a dead worker's messages");
                total += n as u64;
            }
        }
        Ok(total)
    }

    /// Tries to take the lock of a model; `Ok(false)` when a live worker holds it.
    pub async fn lock_model(
        &self,
        model_id: &str,
        owner: &str,
        ttl_secs: u64,
    ) -> Result<bool, QueueError> {
        let lock = self.lock_key(model_id);
        // First as if the lock were free (the usual case: one round trip); when the script
        // finds a holder, read it so its heartbeat key can be declared, and try again.
        let mut holder: Option<String> = None;
        for _ in 0..5 {
            let heartbeat = holder
                .as_deref()
                .and_then(|h| h.split('|').next())
                .map(|w| heartbeat_key(&self.state_prefix, w))
                .unwrap_or_else(|| lock.clone());
            let args = vec![
                owner.into(),
                ttl_secs.to_string().into(),
                holder.clone().unwrap_or_default().into(),
            ];
            let n: i64 = self
                .script("lock", LOCK_SCRIPT, vec![lock.clone(), heartbeat], args)
                .await?;
            if n >= 0 {
                return Ok(n == 1);
            }
            holder = timed("lock", self.redis.commands.get(&lock)).await?;
        }
        // The lock changed hands five times while we looked: someone is busy with it.
        Ok(false)
    }

    pub async fn unlock_model(&self, model_id: &str, owner: &str) -> Result<(), QueueError> {
        let _: i64 = self
            .script(
                "unlock",
                UNLOCK_SCRIPT,
                vec![self.lock_key(model_id)],
                vec![owner.into()],
            )
            .await?;
        Ok(())
    }

    fn lock_key(&self, model_id: &str) -> String {
        format!("{}:lock:{model_id}", self.state_prefix)
    }

    fn lease_key(&self, signer: &str) -> String {
        format!("{}:signer:{}", self.state_prefix, signer.to_lowercase())
    }

    fn lease_owner(&self) -> String {
        format!("{}|{}", self.worker_id, self.instance)
    }

    /// Leases a deployer key to this process: no other process signs with it until the lease
    /// lapses (one heartbeat TTL after our last renewal), so nonces are never shared.
    pub async fn lease_signer(&self, signer: &str) -> Result<bool, QueueError> {
        let args = vec![
            self.lease_owner().into(),
            format!("{}|", self.worker_id).into(),
            self.heartbeat_ttl.to_string().into(),
        ];
        let n: i64 = self
            .script("lease", LEASE_SCRIPT, vec![self.lease_key(signer)], args)
            .await?;
        Ok(n == 1)
    }

    /// Renews our lease; `Ok(false)` means it was lost and signing must stop at once.
    pub async fn renew_signer(&self, signer: &str) -> Result<bool, QueueError> {
        let args = vec![
            self.lease_owner().into(),
            self.heartbeat_ttl.to_string().into(),
        ];
        let n: i64 = self
            .script("renew", RENEW_SCRIPT, vec![self.lease_key(signer)], args)
            .await?;
        if n == 2 {
            // Nobody else signs with it (they would hold the lease): carry on; a nonce someone
            // used meanwhile is found and skipped like any other.
            tracing::warn!(signer, "the signer lease had lapsed (Redis out of reach, or a failover lost it); taken again");
        }
        Ok(n >= 1)
    }

    pub async fn release_signer(&self, signer: &str) -> Result<(), QueueError> {
        let args = vec![self.lease_owner().into()];
        let _: i64 = self
            .script("unlock", UNLOCK_SCRIPT, vec![self.lease_key(signer)], args)
            .await?;
        Ok(())
    }
}

/// Deletes `key` only while its value is still `owner` (a lock or claim we hold); the same
/// script as the workers' unlock.
pub async fn delete_if_holds(client: &Client, key: &str, owner: &str) -> Result<(), QueueError> {
    let _: i64 = client
        .eval(UNLOCK_SCRIPT, vec![key.to_owned()], vec![owner.to_owned()])
        .await?;
    Ok(())
}

/// Moves every item of `processing` that is not among `in_flight` (counted with multiplicity)
/// to the consumer's end of `queue`: after a `BLMOVE` whose answer was lost, the item the
/// server moved is found and given back. Run only while no `BLMOVE` on `processing` is
/// outstanding.
pub async fn sweep(
    client: &Client,
    processing: &str,
    queue: &str,
    in_flight: Vec<Vec<u8>>,
) -> Result<u64, fred::error::Error> {
    let args: Vec<Value> = in_flight
        .into_iter()
        .map(|m| Value::Bytes(m.into()))
        .collect();
    client
        .eval(
            SWEEP_SCRIPT,
            vec![processing.to_owned(), queue.to_owned()],
            args,
        )
        .await
}

/// Moves every item of `from` onto the consumer's end of `to` in one step ([`REQUEUE_SCRIPT`]):
/// a processing list left by an earlier run goes back to its queue.
pub async fn move_all(client: &Client, from: &str, to: &str) -> Result<u64, fred::error::Error> {
    client
        .eval(
            REQUEUE_SCRIPT,
            vec![from.to_owned(), to.to_owned()],
            Vec::<String>::new(),
        )
        .await
}

/// Deletes a list and returns how many items it held, in one step (a dead-letter purge).
pub async fn purge_list(client: &Client, key: &str) -> Result<u64, fred::error::Error> {
    client
        .eval(
            "local n = redis.call('LLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n",
            vec![key.to_owned()],
            Vec::<String>::new(),
        )
        .await
}

/// Key names of the state shared by workers and operator commands, spelled in one place.
pub fn workers_key(state_prefix: &str) -> String {
    format!("{state_prefix}:workers")
}

/// The heartbeat key of a worker; the lock script reads `<state_prefix>:heartbeat:<worker>`.
pub fn heartbeat_key(state_prefix: &str, worker: &str) -> String {
    format!("{state_prefix}:heartbeat:{worker}")
}

/// How long a dead-lettered message's outcome stays readable by message id.
pub const OUTCOME_TTL_SECS: i64 = 30 * 86_400;

/// The `deployment_failed` event of a dead-lettered message, by message id.
pub fn outcome_key(state_prefix: &str, message_id: &str) -> String {
    format!("{state_prefix}:outcome:{message_id}")
}

/// Every token symbol this deployment has issued, symbol -> model id: what a generated symbol
/// must differ from (the journal records each deployed model's symbol here).
pub fn symbols_key(state_prefix: &str) -> String {
    format!("{state_prefix}:symbols")
}

/// The Pub/Sub channel of deployment progress: workers publish on it at each transition a
/// status reader sees: the model id when its transaction or event is journaled, the message
/// id when it is dead-lettered (a refused message may name no model). Every API process's
/// live-status streams (`GET /api/deployments/{id}/events`) re-read a deployment's status when
/// its model id or its own id arrives. A hint, not the record: a lost one is covered by the streams'
/// periodic re-read.
pub fn progress_channel(state_prefix: &str) -> String {
    format!("{state_prefix}:progress")
}

pub fn pause_key(state_prefix: &str) -> String {
    format!("{state_prefix}:paused")
}

/// A worker's processing list: `<queues.processing>:<worker_id>`.
pub fn processing_key(processing_prefix: &str, worker: &str) -> String {
    format!("{processing_prefix}:{worker}")
}

/// Runs one Redis call and records its latency (`hokusai_redis_command_duration_seconds`).
async fn timed<R>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<R, fred::error::Error>>,
) -> Result<R, QueueError> {
    let started = std::time::Instant::now();
    let r = fut.await;
    metrics::histogram!(crate::telemetry::names::REDIS_DURATION, "op" => op)
        .record(started.elapsed().as_secs_f64());
    Ok(r?)
}

/// A list item as bytes, whether Redis answered with a string or a blob.
fn value_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Bytes(b) => Some(b.to_vec()),
        other => other.as_bytes().map(<[u8]>::to_vec),
    }
}
