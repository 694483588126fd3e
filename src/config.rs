//! Configuration: built once from layers (built-in defaults, an optional file, then environment
//! variables), validated into typed values at start-up. No other module reads the environment.
//!
//! Layers, lowest first:
//! 1. `config/default.toml` (compiled into the binary, so the binary runs anywhere);
//! 2. the seed's plain variable names (`REDIS_URL`, `WEB3_PROVIDER_URL`, ...), for operators
//!    who configured the earlier deployer;
//! 3. a file given with `--config`;
//! 4. `HOKUSAI__SECTION__KEY` variables (`HOKUSAI__CHAIN__RPC_URLS=a,b` for lists).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

/// The defaults every deployment starts from.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Seed 001's variable names and the keys they set (lower precedence than `HOKUSAI__` ones).
const SEED_ALIASES: &[(&str, &str)] = &[
    ("REDIS_URL", "redis.url"),
    ("REDIS_PASSWORD", "redis.password"),
    ("WEB3_PROVIDER_URL", "chain.rpc_urls"),
    ("DEPLOYER_PRIVATE_KEY", "chain.private_key"),
    ("MODEL_REGISTRY_ADDRESS", "chain.model_registry_address"),
    ("TOKEN_MANAGER_ADDRESS", "chain.token_manager_address"),
    ("LOG_LEVEL", "log.level"),
    ("MAX_RETRIES", "pipeline.max_retries"),
    ("DEPLOYMENT_TIMEOUT", "chain.receipt_timeout_secs"),
    ("INBOUND_QUEUE", "queues.inbound"),
    ("OUTBOUND_QUEUE", "queues.outbound"),
    ("DLQ_NAME", "queues.dlq"),
    ("PROCESSING_QUEUE", "queues.processing"),
    // Seeds 002 and 003: the API's port and secrets as the ECS task passes them.
    ("PORT", "api.port"),
    ("JWT_SECRET", "api.jwt.secret"),
    ("API_KEYS", "api.api_keys"),
    ("MLFLOW_TRACKING_URI", "api.mlflow.url"),
];

/// Keys that hold lists; their environment values are comma separated.
const LIST_KEYS: &[&str] = &[
    "chain.rpc_urls",
    "chain.aws_kms_key_ids",
    "api.cors_origins",
    "api.trusted_proxies",
    "api.jwt.algorithms",
    "webhooks.allow_hosts",
    "redis.sentinel_addresses",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("configuration key `{key}`: cannot read {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An address (`10.0.0.7`) or a CIDR block (`10.0.0.0/16`), as `api.trusted_proxies` holds them.
pub fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR block"))
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// An optional secret from configuration: an empty or blank value (a variable or Secret key
/// left empty) means unset, for every secret alike.
fn blank_is_unset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<Secret>::deserialize(d)?.filter(|s| !s.0.trim().is_empty()))
}

/// A secret value: prints as `[redacted]` in `Debug` and `Display`, and serializes the same way.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value; grep for it to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Where a deployer key lives: in this process, or in AWS KMS (only its id here; the key
/// never leaves KMS, which signs each transaction's hash).
#[derive(Debug, Clone)]
pub enum DeployerKey {
    Local(Secret),
    AwsKms(String),
}

/// A key file anyone on the machine can read (or write) is refused: the key spends real money.
/// Group access is allowed, as Kubernetes gives it to secret volumes with an `fsGroup`.
pub(crate) fn refuse_world_access(path: &Path, key: &'static str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(invalid(
            key,
            format!(
                "{} is accessible to every user (mode {mode:o}); `chmod o-rwx` it (0600 or 0400)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Replaces the user-info part and any query string of a URL so it can be logged.
pub fn mask_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("***");
                let _ = u.set_password(None);
            }
            if u.query().is_some() {
                u.set_query(Some("***"));
            }
            // API keys often travel as the last path segment (Infura, Alchemy).
            let segments: Vec<String> = u
                .path_segments()
                .map(|s| s.map(str::to_owned).collect())
                .unwrap_or_default();
            if let Some(last) = segments.last() {
                if last.len() >= 16 && last.chars().all(|c| c.is_ascii_alphanumeric()) {
                    let mut masked = segments.clone();
                    *masked.last_mut().expect("non-empty: checked by `last`") = "***".into();
                    u.set_path(&masked.join("/"));
                }
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

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

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct QueueSettings {
    pub inbound: String,
    /// Prefix of the per-worker processing lists.
    pub processing: String,
    pub dlq: String,
    pub outbound: String,
    /// Failure events for monitoring (seed 001 §6.5).
    pub failures: String,
    /// Prefix of journal, lock and heartbeat keys.
    pub state_prefix: String,
    /// Backpressure: over this many events waiting on the outbound queue (the website has
    /// stopped consuming), workers take no new message; 0 turns it off.
    #[serde(default)]
    pub outbound_max_len: u64,
    /// ... until the outbound queue is back under this (default half the maximum).
    #[serde(default)]
    pub outbound_resume_len: Option<u64>,
}

impl QueueSettings {
    /// The low-water mark under which a held-back worker takes messages again.
    pub fn outbound_resume_len(&self) -> u64 {
        self.outbound_resume_len
            .unwrap_or(self.outbound_max_len / 2)
    }
}

#[derive(Clone, Deserialize, Serialize)]
pub struct ChainSettings {
    #[serde(serialize_with = "ser_masked_urls")]
    pub rpc_urls: Vec<String>,
    pub chain_id: Option<u64>,
    pub model_registry_address: String,
    pub token_manager_address: String,
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub private_key: Option<Secret>,
    pub private_key_file: Option<PathBuf>,
    /// Deployer keys held in AWS KMS (`ECC_SECG_P256K1`, sign/verify): key ids, ARNs or
    /// aliases, one per pool member. Instead of private keys; needs `--features aws-kms`.
    #[serde(default)]
    pub aws_kms_key_ids: Vec<String>,
    /// Blocks a transaction must be under before it counts; unset takes the network's
    /// (`networks.<chain id>.confirmations`, else 1). See [`Settings::confirmations`].
    #[serde(default)]
    pub confirmations: Option<u64>,
    /// How many blocks a published deployment stays under watch for a reorganisation that
    /// removes it; unset takes the network's, else 64. 0 turns the watch off.
    #[serde(default)]
    pub reorg_watch_blocks: Option<u64>,
    /// The circuit breaker on chain operations.
    #[serde(default)]
    pub breaker: BreakerSettings,
    pub rpc_timeout_ms: u64,
    pub receipt_timeout_secs: u64,
    pub poll_interval_ms: u64,
    pub gas_limit_margin_percent: u64,
    /// Highest max fee per gas we pay, in gwei; unset means no cap.
    #[serde(default)]
    pub max_fee_per_gas_gwei: Option<f64>,
    /// How long a message waits for fees under the cap before it is dead-lettered
    /// as `INSUFFICIENT_GAS`.
    pub fee_cap_wait_secs: u64,
    /// Priority fee (tip) per gas in gwei; unset takes the 20th percentile of recent blocks'
    /// tips from `eth_feeHistory`.
    #[serde(default)]
    pub priority_fee_gwei: Option<f64>,
    /// A transaction not mined this long after it was sent is replaced (same nonce, higher fees).
    pub replace_after_secs: u64,
    /// How much a replacement raises both fees, in percent (nodes want at least 10-12.5).
    pub replacement_bump_percent: u64,
    /// Under this balance (ether) readiness warns (`balance: low`); deployments go on.
    pub min_balance_eth: f64,
}

/// `chain.breaker`: after `failures` attempts in a row found no RPC URL answering, the worker
/// takes no message and in-flight ones wait (their retries are not spent) until a probe after
/// `cool_down_secs` succeeds. `failures = 0` turns it off.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cool_down_secs: u64,
}

impl BreakerSettings {
    /// The failures that open the breaker: `failures`, but never more than a message's own
    /// attempts (`pipeline.max_retries` + 1), or one message could spend all its retries
    /// before the breaker opens. 0: off.
    pub fn threshold(&self, max_retries: u32) -> u32 {
        self.failures.min(max_retries.saturating_add(1))
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            cool_down_secs: 15,
        }
    }
}

impl ChainSettings {
    /// `max_fee_per_gas_gwei` in wei.
    pub fn fee_cap_wei(&self) -> Option<u128> {
        self.max_fee_per_gas_gwei.map(|g| (g * 1e9) as u128)
    }

    /// `priority_fee_gwei` in wei.
    pub fn priority_fee_wei(&self) -> Option<u128> {
        self.priority_fee_gwei.map(|g| (g * 1e9) as u128)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PipelineSettings {
    /// The most messages in flight per process: a cap over the chain's own bound (two blocks'
    /// worth of deployments, see `Chain::in_flight_bound`).
    pub concurrency: usize,
    pub max_retries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub min_improvement_percentage: f64,
    pub max_message_bytes: usize,
    pub model_lock_ttl_secs: u64,
    /// Stable id of this process (a pod name); random when absent.
    pub worker_id: Option<String>,
    /// A worker whose heartbeat is older than this is presumed dead and its list requeued.
    #[serde(default = "default_heartbeat_ttl")]
    pub heartbeat_ttl_secs: u64,
}

fn default_heartbeat_ttl() -> u64 {
    15
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    pub level: String,
    pub format: String,
}

/// The operations HTTP server (health, readiness, metrics) and the audit trail.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OpsSettings {
    /// Address the ops server binds.
    pub bind: String,
    /// Port of `/health`, `/health/ready`, `/health/detailed` and `/metrics`; 0 picks a free one.
    pub port: u16,
    /// Each readiness probe (Redis, RPC, registry) gives up after this long.
    pub probe_timeout_ms: u64,
    /// The audit stream keeps about this many entries (`XADD MAXLEN ~`).
    pub audit_max_len: u64,
    /// Write the metrics as CloudWatch Embedded Metric Format lines on stdout (ECS: awslogs
    /// carries them and CloudWatch extracts the metrics).
    #[serde(default)]
    pub cloudwatch_emf: bool,
    /// Seconds between two EMF reports.
    #[serde(default = "default_emf_interval")]
    pub cloudwatch_emf_interval_secs: u64,
    /// The `Environment` dimension of the EMF metrics (`development`, `staging`, `production`).
    #[serde(default = "default_environment")]
    pub environment: String,
}

fn default_emf_interval() -> u64 {
    60
}

fn default_environment() -> String {
    "development".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct Network {
    pub name: String,
    #[serde(default)]
    pub explorer: String,
    /// This network's default for `chain.confirmations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmations: Option<u64>,
    /// This network's default for `chain.reorg_watch_blocks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reorg_watch_blocks: Option<u64>,
}

/// Confirmations when neither `chain.confirmations` nor the network table says.
pub const DEFAULT_CONFIRMATIONS: u64 = 1;
/// Blocks a published deployment stays watched when neither setting nor network table says.
pub const DEFAULT_REORG_WATCH_BLOCKS: u64 = 64;

#[derive(Clone, Deserialize, Serialize)]
pub struct Settings {
    pub redis: RedisSettings,
    pub queues: QueueSettings,
    pub chain: ChainSettings,
    pub pipeline: PipelineSettings,
    pub log: LogSettings,
    pub ops: OpsSettings,
    pub api: ApiSettings,
    /// Webhooks: the ML platform's `model_registered` deliveries to the API.
    #[serde(default)]
    pub webhooks: WebhookSettings,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
}

/// `[webhooks]`: the inbound `POST /api/webhooks/model-registered` of the ML platform's
/// `WebhookPublisher`, and the outbound deliveries of `deployment.completed` and
/// `deployment.failed` to configured endpoints and per-request callbacks (docs/webhooks.md).
#[derive(Clone, Deserialize, Serialize)]
pub struct WebhookSettings {
    /// The HMAC-SHA256 secret the platform signs each body with; unset turns the endpoint off
    /// (`404`). Environment only (`HOKUSAI__WEBHOOKS__INBOUND_SECRET`), refused in a file.
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub inbound_secret: Option<Secret>,
    /// The secret being rotated out, still accepted beside `inbound_secret` until the platform
    /// signs with the new one. Environment only.
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub inbound_secret_previous: Option<Secret>,
    /// How long an `X-Hokusai-Idempotency-Key` is remembered: a repeat within it is answered
    /// with the first outcome and queues nothing. The platform's scheme signs no time, so this
    /// window is its replay defence.
    #[serde(default = "default_idempotency_ttl")]
    pub idempotency_ttl_secs: u64,
    /// An `X-Hokusai-Timestamp` (unix seconds), when sent, must be this close to our clock.
    #[serde(default = "default_timestamp_tolerance")]
    pub timestamp_tolerance_secs: u64,
    /// Receivers of every deployment's events, from the configuration file.
    #[serde(default)]
    pub endpoints: Vec<EndpointSettings>,
    /// Signs the deliveries to a request's `callback_url`; unset, a request naming one is
    /// refused. Environment only (`HOKUSAI__WEBHOOKS__CALLBACK_SECRET`).
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub callback_secret: Option<Secret>,
    /// The callback secret being rotated out (its signature goes beside the new one).
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub callback_secret_previous: Option<Secret>,
    /// Host names (or IP addresses) a delivery may reach although they resolve to a loopback,
    /// private, link-local or metadata address, and over plain `http`: internal receivers.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Deliveries made before one goes to the webhook dead-letter list.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// The wait before the second attempt; each later wait is `retry_multiplier` times longer
    /// (with jitter), up to `retry_max_ms`.
    #[serde(default = "default_webhook_retry_initial")]
    pub retry_initial_ms: u64,
    #[serde(default = "default_webhook_retry_multiplier")]
    pub retry_multiplier: f32,
    #[serde(default = "default_webhook_retry_max")]
    pub retry_max_ms: u64,
    /// One request's bound: connection, TLS, sending and the answer's head and first bytes.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Deliveries in flight per worker process.
    #[serde(default = "default_webhook_concurrency")]
    pub concurrency: usize,
}

/// `[[webhooks.endpoints]]`: one receiver of outbound events.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSettings {
    /// Names the endpoint in jobs, metrics, the audit and the `webhooks` commands.
    pub name: String,
    pub url: String,
    /// The environment variable holding the signing secret, or
    #[serde(default)]
    pub secret_env: Option<String>,
    /// a file holding it (mode 0600 or 0400). Exactly one of the two.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The secret being rotated out, when rotating: its signature is sent beside the first.
    #[serde(default)]
    pub previous_secret_env: Option<String>,
    #[serde(default)]
    pub previous_secret_file: Option<PathBuf>,
    /// `deployment.completed`, `deployment.failed`; default both.
    #[serde(default = "default_endpoint_events")]
    pub events: Vec<String>,
    /// Extra headers sent with each delivery (not secrets: they are in the file).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The signing secrets, current first, read from the variable or file above by
    /// [`Settings::with_webhook_secrets`].
    #[serde(skip)]
    pub secrets: Vec<Secret>,
}

/// The outbound event types.
pub const WEBHOOK_EVENTS: [&str; 2] = ["deployment.completed", "deployment.failed"];

fn default_endpoint_events() -> Vec<String> {
    WEBHOOK_EVENTS.iter().map(|s| (*s).to_owned()).collect()
}

fn default_idempotency_ttl() -> u64 {
    86_400
}

fn default_timestamp_tolerance() -> u64 {
    300
}

fn default_webhook_attempts() -> u32 {
    10
}

fn default_webhook_retry_initial() -> u64 {
    30_000
}

fn default_webhook_retry_multiplier() -> f32 {
    3.0
}

fn default_webhook_retry_max() -> u64 {
    4 * 3_600_000
}

fn default_webhook_timeout() -> u64 {
    10_000
}

fn default_webhook_concurrency() -> usize {
    8
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            inbound_secret: None,
            inbound_secret_previous: None,
            idempotency_ttl_secs: default_idempotency_ttl(),
            timestamp_tolerance_secs: default_timestamp_tolerance(),
            endpoints: vec![],
            callback_secret: None,
            callback_secret_previous: None,
            allow_hosts: vec![],
            max_attempts: default_webhook_attempts(),
            retry_initial_ms: default_webhook_retry_initial(),
            retry_multiplier: default_webhook_retry_multiplier(),
            retry_max_ms: default_webhook_retry_max(),
            timeout_ms: default_webhook_timeout(),
            concurrency: default_webhook_concurrency(),
        }
    }
}

impl WebhookSettings {
    /// The secrets a delivery may be signed with: the current one, then the previous one. Empty
    /// when the endpoint is off.
    pub fn inbound_secrets(&self) -> Vec<&Secret> {
        self.inbound_secret
            .iter()
            .chain(&self.inbound_secret_previous)
            .collect()
    }

    /// Whether anything is ever delivered: an endpoint, or callbacks allowed.
    pub fn outbound(&self) -> bool {
        !self.endpoints.is_empty() || self.callback_secret.is_some()
    }
}

impl EndpointSettings {
    /// The signing secrets, current first, read from their variable or file.
    fn read_secrets(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<Secret>, ConfigError> {
        let one = |var: &Option<String>,
                   file: &Option<PathBuf>,
                   which: &str|
         -> Result<Option<Secret>, ConfigError> {
            let value = match (var, file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "webhooks.endpoints",
                        format!(
                            "endpoint `{}`: set {which}secret_env or {which}secret_file, not both",
                            self.name
                        ),
                    ))
                }
                (Some(v), None) => {
                    Some(env(v).filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                        invalid(
                            "webhooks.endpoints",
                            format!(
                                "endpoint `{}`: the variable {v} ({which}secret_env) is not set",
                                self.name
                            ),
                        )
                    })?)
                }
                (None, Some(path)) => {
                    refuse_world_access(path, "webhooks.endpoints")?;
                    Some(
                        std::fs::read_to_string(path)
                            .map_err(|source| ConfigError::File {
                                key: "webhooks.endpoints",
                                path: path.clone(),
                                source,
                            })?
                            .trim()
                            .to_owned(),
                    )
                }
                (None, None) => None,
            };
            match value {
                Some(v) if v.len() < MIN_WEBHOOK_SECRET => Err(invalid(
                    "webhooks.endpoints",
                    format!(
                        "endpoint `{}`: the {which}secret must be at least {MIN_WEBHOOK_SECRET} characters",
                        self.name
                    ),
                )),
                v => Ok(v.map(Secret::new)),
            }
        };
        let current = one(&self.secret_env, &self.secret_file, "")?.ok_or_else(|| {
            invalid(
                "webhooks.endpoints",
                format!("endpoint `{}`: needs secret_env or secret_file", self.name),
            )
        })?;
        let previous = one(
            &self.previous_secret_env,
            &self.previous_secret_file,
            "previous_",
        )?;
        Ok(std::iter::once(current).chain(previous).collect())
    }
}

/// Shortest inbound webhook secret: 32 characters, as `api.jwt.secret` (HMAC keys of 128 bits
/// and more once the usual hex or base64 encodings are counted).
const MIN_WEBHOOK_SECRET: usize = 32;

/// The HTTP deployment API (`hokusai-deployer api`, or `run --api` beside a worker).
#[derive(Clone, Deserialize, Serialize)]
pub struct ApiSettings {
    pub bind: String,
    /// 3001 as seeds 002 and 003 have it (`PORT`); 0 picks a free one.
    pub port: u16,
    /// Base of `status_url` in answers (`https://contracts.hokus.ai`); empty: a relative URL.
    pub public_url: String,
    /// A request taking longer is answered 503 `TIMEOUT`.
    pub request_timeout_ms: u64,
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; empty allows none (the front end's server calls us).
    pub cors_origins: Vec<String>,
    /// Static keys for service-to-service calls (`X-API-Key`), comma separated.
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub api_keys: Option<Secret>,
    /// How long a deployment's record and status are kept.
    pub deployment_ttl_days: u64,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` names the client: the load
    /// balancer. A peer not listed is the client itself, whatever it forwards.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Live status streams (`GET /api/deployments/{id}/events`): seconds between two re-reads
    /// of a stream's status when no notification came, so a lost Pub/Sub message delays a
    /// transition by at most this long (0 is taken as 1).
    pub events_recheck_secs: u64,
    /// Seconds between two keep-alive comments on a quiet stream (0 is taken as 1).
    pub events_keepalive_secs: u64,
    /// A stream is closed after this many seconds (sooner when its JWT expires); the browser
    /// reconnects with `Last-Event-ID`.
    pub events_max_secs: u64,
    pub jwt: JwtSettings,
    pub siwe: SiweSettings,
    pub limits: LimitSettings,
    pub mlflow: MlflowSettings,
}

#[derive(Clone, Deserialize, Serialize)]
pub struct JwtSettings {
    /// Accepted algorithms: any of HS256, HS384, HS512 (with `secret`) and RS256, RS384, RS512,
    /// ES256, ES384, PS256 (with `public_key_file`). A token naming any other, or `none`, is
    /// refused, as is one whose algorithm does not match the configured key's kind.
    pub algorithms: Vec<String>,
    #[serde(default, deserialize_with = "blank_is_unset")]
    pub secret: Option<Secret>,
    /// PEM public key for the asymmetric algorithms.
    pub public_key_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Refuse tokens without a `jti` (each token then serves one deployment request).
    #[serde(default)]
    pub require_jti: bool,
}

/// Sign-In with Ethereum (EIP-4361) proofs of an address, beside the JWT.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SiweSettings {
    /// The domain a message must name (the front end's host, `app.hokus.ai`); unset refuses
    /// every proof.
    #[serde(default)]
    pub domain: Option<String>,
    /// A prefix the message's URI must start with; unset: the URI's host must be the domain.
    #[serde(default)]
    pub uri: Option<String>,
    /// A message issued longer ago is refused, even without an expiration time; this bounds
    /// how long a used nonce is remembered.
    pub max_age_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LimitSettings {
    /// Deployments one user may request per rolling hour and day (seed 000: 5 and 20).
    pub per_hour: u32,
    pub per_day: u32,
    /// Overrides by the token's `tier` claim.
    #[serde(default)]
    pub tiers: BTreeMap<String, TierLimits>,
    /// Circuit breaker: deployments accepted from all users per hour; beyond it every request
    /// is refused with `SERVICE_UNAVAILABLE` until the hour rolls on.
    pub global_per_hour: u32,
    /// Failed authentications one client address may make per minute; then `429`.
    pub auth_failures_per_minute: u32,
    /// Status and quote requests one user may make per minute; then `429`.
    pub status_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TierLimits {
    pub per_hour: u32,
    pub per_day: u32,
}

/// Where models come from: an MLflow tracking server's REST API, and which registered-model
/// tags carry the deployer's facts.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MlflowSettings {
    #[serde(serialize_with = "ser_masked_url")]
    pub url: String,
    pub timeout_ms: u64,
    /// How long a model's facts are reused before MLflow is asked again.
    pub cache_secs: u64,
    /// Tag whose value `true` means validated.
    pub validated_tag: String,
    /// Tag holding when the model was validated (RFC 3339).
    pub validated_at_tag: String,
    /// Tag holding the owner's user id (the JWT's `sub`).
    pub owner_tag: String,
    /// Tag holding contributors' Ethereum addresses, comma separated.
    pub contributors_tag: String,
    /// Tag holding the MLflow run whose metrics prove the improvement; else the latest
    /// version's run.
    pub run_tag: String,
    /// Tag naming the metric; its `baseline_<metric>` and `<metric>` values are read from the run.
    pub metric_tag: String,
}

/// `Debug` for settings that hold URLs or secrets goes through the masking serializer.
macro_rules! debug_via_serialize {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match serde_json::to_string(self) {
                    Ok(s) => f.write_str(&s),
                    Err(_) => f.write_str(stringify!($t)),
                }
            }
        }
    )*};
}
debug_via_serialize!(
    RedisSettings,
    ChainSettings,
    Settings,
    ApiSettings,
    JwtSettings,
    WebhookSettings
);

fn ser_masked_url<S: serde::Serializer>(u: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_url(u))
}

fn ser_masked_urls<S: serde::Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(urls.len()))?;
    for u in urls {
        seq.serialize_element(&mask_url(u))?;
    }
    seq.end()
}

/// Where configuration comes from; tests pass their own variables instead of the process's.
pub struct Sources<'a> {
    pub file: Option<&'a Path>,
    pub env: Vec<(String, String)>,
}

impl Sources<'_> {
    /// The process environment and an optional file: what `main` uses.
    pub fn process(file: Option<&Path>) -> Sources<'_> {
        Sources {
            file,
            env: std::env::vars().collect(),
        }
    }
}

impl Settings {
    /// Loads and validates every layer; errors name the key at fault.
    pub fn load(sources: Sources<'_>) -> Result<Settings, ConfigError> {
        use config::{Config, Environment, File, FileFormat};

        // The seed's names form their own layer: above the defaults, below files and HOKUSAI__.
        let mut aliases = Config::builder();
        for (var, key) in SEED_ALIASES {
            if let Some((_, v)) = sources.env.iter().find(|(k, _)| k == var) {
                aliases = if LIST_KEYS.contains(key) {
                    aliases.set_override(*key, split_list(v))?
                } else {
                    aliases.set_override(*key, v.as_str())?
                };
            }
        }
        let mut b = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .add_source(aliases.build()?);
        if let Some(path) = sources.file {
            // A file may hold anything but the key: secrets live in the environment or a key file.
            let only_file = Config::builder()
                .add_source(File::from(path).required(true))
                .build()?;
            if only_file.get_string("chain.private_key").is_ok() {
                return Err(invalid(
                    "chain.private_key",
                    "must not be set in a configuration file; use HOKUSAI__CHAIN__PRIVATE_KEY or chain.private_key_file",
                ));
            }
            for (key, var) in [
                (
                    "webhooks.inbound_secret",
                    "HOKUSAI__WEBHOOKS__INBOUND_SECRET",
                ),
                (
                    "webhooks.inbound_secret_previous",
                    "HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS",
                ),
                (
                    "webhooks.callback_secret",
                    "HOKUSAI__WEBHOOKS__CALLBACK_SECRET",
                ),
                (
                    "webhooks.callback_secret_previous",
                    "HOKUSAI__WEBHOOKS__CALLBACK_SECRET_PREVIOUS",
                ),
            ] {
                if only_file.get_string(key).is_ok() {
                    return Err(invalid(
                        key,
                        format!("must not be set in a configuration file; use {var}"),
                    ));
                }
            }
            b = b.add_source(File::from(path).required(true));
        }
        let mut env = Environment::with_prefix("HOKUSAI")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(sources.env.iter().cloned().collect()));
        for key in LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
        let settings: Settings = b.add_source(env).build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Reads each webhook endpoint's signing secrets from its variable (looked up with `env`)
    /// or file. Only the processes that sign need them (`run`, `check-config`): an operator's
    /// `webhooks list` works from the same file without them.
    pub fn with_webhook_secrets(
        mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        for e in &mut self.webhooks.endpoints {
            e.secrets = e.read_secrets(env)?;
        }
        Ok(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.chain.rpc_urls.is_empty() {
            return Err(invalid(
                "chain.rpc_urls",
                "at least one RPC URL is required",
            ));
        }
        for u in &self.chain.rpc_urls {
            let parsed = url::Url::parse(u)
                .map_err(|e| invalid("chain.rpc_urls", format!("{}: {e}", mask_url(u))))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(invalid(
                    "chain.rpc_urls",
                    format!("{}: only http and https are supported", mask_url(u)),
                ));
            }
        }
        let r =
            url::Url::parse(&self.redis.url).map_err(|e| invalid("redis.url", e.to_string()))?;
        if !matches!(
            r.scheme(),
            "redis" | "rediss" | "redis-cluster" | "redis-sentinel"
        ) {
            return Err(invalid("redis.url", "scheme must be redis:// or rediss://"));
        }
        self.validate_redis_mode()?;
        let local_key = self.chain.private_key.is_some() || self.chain.private_key_file.is_some();
        if !self.chain.aws_kms_key_ids.is_empty() && local_key {
            return Err(invalid(
                "chain.aws_kms_key_ids",
                "set either KMS key ids or private keys (chain.private_key, chain.private_key_file), not both",
            ));
        }
        if self
            .chain
            .aws_kms_key_ids
            .iter()
            .any(|k| k.trim().is_empty())
        {
            return Err(invalid("chain.aws_kms_key_ids", "an empty key id"));
        }
        if !self.chain.aws_kms_key_ids.is_empty() && !cfg!(feature = "aws-kms") {
            return Err(invalid(
                "chain.aws_kms_key_ids",
                "this build has no AWS KMS support (build with --features aws-kms)",
            ));
        }
        let tls = r.scheme() == "rediss";
        for (key, set) in [
            ("redis.tls_ca_file", self.redis.tls_ca_file.is_some()),
            ("redis.tls_cert_file", self.redis.tls_cert_file.is_some()),
            ("redis.tls_key_file", self.redis.tls_key_file.is_some()),
        ] {
            if set && !tls {
                return Err(invalid(key, "needs a rediss:// redis.url (TLS)"));
            }
        }
        if self.redis.tls_cert_file.is_some() != self.redis.tls_key_file.is_some() {
            return Err(invalid(
                "redis.tls_cert_file",
                "redis.tls_cert_file and redis.tls_key_file go together",
            ));
        }
        if self.redis.command_timeout_ms <= self.redis.blocking_timeout_secs * 1000 {
            return Err(invalid(
                "redis.command_timeout_ms",
                "must be longer than redis.blocking_timeout_secs, or every BLMOVE would time out",
            ));
        }
        for (key, v) in [
            ("queues.inbound", &self.queues.inbound),
            ("queues.processing", &self.queues.processing),
            ("queues.dlq", &self.queues.dlq),
            ("queues.outbound", &self.queues.outbound),
            ("queues.failures", &self.queues.failures),
            ("queues.state_prefix", &self.queues.state_prefix),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.queues.inbound == self.queues.dlq || self.queues.inbound == self.queues.outbound {
            return Err(invalid(
                "queues.inbound",
                "must differ from the DLQ and outbound queue",
            ));
        }
        for p in &self.api.trusted_proxies {
            parse_net(p).map_err(|reason| invalid("api.trusted_proxies", reason))?;
        }
        for (key, v) in [
            (
                "api.limits.auth_failures_per_minute",
                self.api.limits.auth_failures_per_minute,
            ),
            (
                "api.limits.status_per_minute",
                self.api.limits.status_per_minute,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self
            .api
            .siwe
            .domain
            .as_deref()
            .is_some_and(|d| d.trim().is_empty())
        {
            return Err(invalid(
                "api.siwe.domain",
                "must not be blank (leave it unset to refuse SIWE proofs)",
            ));
        }
        self.validate_webhooks()?;
        if self.queues.outbound_max_len > 0
            && self.queues.outbound_resume_len() >= self.queues.outbound_max_len
        {
            return Err(invalid(
                "queues.outbound_resume_len",
                "must be under queues.outbound_max_len",
            ));
        }
        if self.pipeline.concurrency == 0 {
            return Err(invalid("pipeline.concurrency", "must be at least 1"));
        }
        if !self.pipeline.min_improvement_percentage.is_finite() {
            return Err(invalid(
                "pipeline.min_improvement_percentage",
                "must be a finite number",
            ));
        }
        if self.pipeline.max_message_bytes < 256 {
            return Err(invalid(
                "pipeline.max_message_bytes",
                "must be at least 256",
            ));
        }
        if self.pipeline.heartbeat_ttl_secs < 3 {
            return Err(invalid("pipeline.heartbeat_ttl_secs", "must be at least 3"));
        }
        if self.ops.bind.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid("ops.bind", "must be an IP address such as 0.0.0.0"));
        }
        if self.ops.cloudwatch_emf_interval_secs == 0 {
            return Err(invalid(
                "ops.cloudwatch_emf_interval_secs",
                "must be at least 1",
            ));
        }
        if self.ops.environment.is_empty()
            || !self
                .ops
                .environment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(invalid(
                "ops.environment",
                "letters, digits, '-' and '_' only (the EMF Environment dimension)",
            ));
        }
        if self.ops.probe_timeout_ms == 0 {
            return Err(invalid("ops.probe_timeout_ms", "must be at least 1"));
        }
        if let Some(cap) = self.chain.max_fee_per_gas_gwei {
            if !cap.is_finite() || cap <= 0.0 {
                return Err(invalid(
                    "chain.max_fee_per_gas_gwei",
                    "must be a positive number of gwei",
                ));
            }
        }
        if let Some(tip) = self.chain.priority_fee_gwei {
            if !tip.is_finite() || tip < 0.0 {
                return Err(invalid(
                    "chain.priority_fee_gwei",
                    "must be zero or a positive number of gwei",
                ));
            }
        }
        if !(13..=100).contains(&self.chain.replacement_bump_percent) {
            return Err(invalid(
                "chain.replacement_bump_percent",
                "must be between 13 and 100 (nodes refuse replacements raised by less than 10-12.5 %)",
            ));
        }
        if self.chain.replace_after_secs == 0 {
            return Err(invalid("chain.replace_after_secs", "must be at least 1"));
        }
        let b = &self.chain.breaker;
        if b.failures > 0 && b.cool_down_secs == 0 {
            return Err(invalid(
                "chain.breaker.cool_down_secs",
                "must be at least 1",
            ));
        }
        if self.chain.poll_interval_ms == 0 {
            return Err(invalid("chain.poll_interval_ms", "must be at least 1"));
        }
        if let Some(id) = &self.pipeline.worker_id {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(
                    "pipeline.worker_id",
                    "letters, digits, '-', '_' and '.' only",
                ));
            }
        }
        if !matches!(self.log.format.as_str(), "json" | "pretty" | "auto") {
            return Err(invalid("log.format", "one of json, pretty, auto"));
        }
        for k in self.networks.keys() {
            k.parse::<u64>()
                .map_err(|_| invalid("networks", format!("`{k}` is not a chain id")))?;
        }
        Ok(())
    }

    fn validate_redis_mode(&self) -> Result<(), ConfigError> {
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

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        for (key, secret) in [
            ("webhooks.inbound_secret", &w.inbound_secret),
            (
                "webhooks.inbound_secret_previous",
                &w.inbound_secret_previous,
            ),
        ] {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose().len() < MIN_WEBHOOK_SECRET)
            {
                return Err(invalid(
                    key,
                    format!("must be at least {MIN_WEBHOOK_SECRET} characters"),
                ));
            }
        }
        if w.inbound_secret_previous.is_some() && w.inbound_secret.is_none() {
            return Err(invalid(
                "webhooks.inbound_secret_previous",
                "needs webhooks.inbound_secret (the secret that replaces it)",
            ));
        }
        // A replay answers from the deployment record, so the key must not outlive it.
        let record_secs = self.api.deployment_ttl_days.saturating_mul(86_400);
        if w.idempotency_ttl_secs < 60 || w.idempotency_ttl_secs > record_secs {
            return Err(invalid(
                "webhooks.idempotency_ttl_secs",
                format!(
                    "must be between 60 and api.deployment_ttl_days in seconds ({record_secs})"
                ),
            ));
        }
        if w.timestamp_tolerance_secs == 0 {
            return Err(invalid(
                "webhooks.timestamp_tolerance_secs",
                "must be at least 1",
            ));
        }
        for (key, secret) in [
            ("webhooks.callback_secret", &w.callback_secret),
            (
                "webhooks.callback_secret_previous",
                &w.callback_secret_previous,
            ),
        ] {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose().len() < MIN_WEBHOOK_SECRET)
            {
                return Err(invalid(
                    key,
                    format!("must be at least {MIN_WEBHOOK_SECRET} characters"),
                ));
            }
        }
        if w.callback_secret_previous.is_some() && w.callback_secret.is_none() {
            return Err(invalid(
                "webhooks.callback_secret_previous",
                "needs webhooks.callback_secret (the secret that replaces it)",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &w.endpoints {
            let named = |reason: String| {
                invalid(
                    "webhooks.endpoints",
                    format!("endpoint `{}`: {reason}", e.name),
                )
            };
            if e.name.is_empty()
                || e.name.len() > 64
                || !e
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(named(
                    "name: 1 to 64 letters, digits, '-', '_' and '.'".into(),
                ));
            }
            if !names.insert(e.name.as_str()) {
                return Err(named("two endpoints have this name".into()));
            }
            let u = url::Url::parse(&e.url).map_err(|err| named(format!("url: {err}")))?;
            let host = u.host_str().unwrap_or_default().to_owned();
            let allowed = w
                .allow_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host.trim_matches(['[', ']'])));
            if !(u.scheme() == "https" || (u.scheme() == "http" && allowed)) {
                return Err(named(format!(
                    "url must be https (plain http only for a host in webhooks.allow_hosts): {}",
                    mask_url(&e.url)
                )));
            }
            if e.events.is_empty() {
                return Err(named("events: name at least one".into()));
            }
            for ev in &e.events {
                if !WEBHOOK_EVENTS.contains(&ev.as_str()) {
                    return Err(named(format!(
                        "events: `{ev}` is not one of {}",
                        WEBHOOK_EVENTS.join(", ")
                    )));
                }
            }
            for (k, v) in &e.headers {
                let ok_name = axum::http::HeaderName::from_bytes(k.as_bytes()).is_ok();
                let ok_value = axum::http::HeaderValue::from_str(v).is_ok();
                let ours = k.to_ascii_lowercase().starts_with("x-hokusai-")
                    || ["content-type", "content-length", "host", "user-agent"]
                        .contains(&k.to_ascii_lowercase().as_str());
                if !ok_name || !ok_value || ours {
                    return Err(named(format!("headers: `{k}` is not a header we may set (invalid, or one the delivery sets itself)")));
                }
            }
        }
        if w.max_attempts == 0 || w.max_attempts > 100 {
            return Err(invalid(
                "webhooks.max_attempts",
                "must be between 1 and 100",
            ));
        }
        if w.retry_initial_ms == 0 || w.retry_max_ms < w.retry_initial_ms {
            return Err(invalid(
                "webhooks.retry_initial_ms",
                "must be at least 1 and at most webhooks.retry_max_ms",
            ));
        }
        if !(1.0..=10.0).contains(&w.retry_multiplier) {
            return Err(invalid(
                "webhooks.retry_multiplier",
                "must be between 1 and 10",
            ));
        }
        if w.timeout_ms < 100 || w.timeout_ms > 60_000 {
            return Err(invalid(
                "webhooks.timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if w.concurrency == 0 || w.concurrency > 256 {
            return Err(invalid("webhooks.concurrency", "must be between 1 and 256"));
        }
        Ok(())
    }

    /// The contract addresses, required by everything that deploys.
    pub fn contract_addresses(&self) -> Result<(Address, Address), ConfigError> {
        Ok((
            parse_address(
                "chain.model_registry_address",
                &self.chain.model_registry_address,
            )?,
            parse_address(
                "chain.token_manager_address",
                &self.chain.token_manager_address,
            )?,
        ))
    }

    /// The deployer key pool as the worker uses it: the KMS keys if any are named, otherwise
    /// the private keys of [`Settings::private_keys`].
    pub fn deployer_keys(&self) -> Result<Vec<DeployerKey>, ConfigError> {
        if !self.chain.aws_kms_key_ids.is_empty() {
            return Ok(self
                .chain
                .aws_kms_key_ids
                .iter()
                .map(|id| DeployerKey::AwsKms(id.clone()))
                .collect());
        }
        Ok(self
            .private_keys()?
            .into_iter()
            .map(DeployerKey::Local)
            .collect())
    }

    /// The first deployer key (for one-off commands such as `contracts deploy`).
    pub fn private_key(&self) -> Result<Option<Secret>, ConfigError> {
        Ok(self.private_keys()?.into_iter().next())
    }

    /// The deployer key pool: `chain.private_key` (comma separated) or `chain.private_key_file`
    /// (one key per line, `#` comments). Each worker process leases one key at a time.
    pub fn private_keys(&self) -> Result<Vec<Secret>, ConfigError> {
        let text = if let Some(k) = &self.chain.private_key {
            k.expose().replace(',', "\n")
        } else if let Some(path) = &self.chain.private_key_file {
            refuse_world_access(path, "chain.private_key_file")?;
            std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                key: "chain.private_key_file",
                path: path.clone(),
                source,
            })?
        } else {
            return Ok(vec![]);
        };
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret::new(l.to_owned()))
            .collect())
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.chain.rpc_timeout_ms)
    }

    /// `api.api_keys` as a list (comma separated in one secret).
    pub fn api_keys(&self) -> Vec<Secret> {
        self.api
            .api_keys
            .as_ref()
            .map(|k| {
                split_list(k.expose())
                    .into_iter()
                    .map(Secret::new)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Name and explorer of a chain; unknown chains are named after their id, never refused.
    pub fn network(&self, chain_id: u64) -> Network {
        self.networks
            .get(&chain_id.to_string())
            .cloned()
            .unwrap_or_else(|| Network {
                name: format!("chain-{chain_id}"),
                explorer: String::new(),
                confirmations: None,
                reorg_watch_blocks: None,
            })
    }

    /// Blocks a transaction must be under before it counts on this chain: `chain.confirmations`,
    /// else the network table's, else 1. Never under 1.
    pub fn confirmations(&self, chain_id: u64) -> u64 {
        self.chain
            .confirmations
            .or(self.network(chain_id).confirmations)
            .unwrap_or(DEFAULT_CONFIRMATIONS)
            .max(1)
    }

    /// Blocks a published deployment stays under watch on this chain:
    /// `chain.reorg_watch_blocks`, else the network table's, else 64.
    pub fn reorg_watch_blocks(&self, chain_id: u64) -> u64 {
        self.chain
            .reorg_watch_blocks
            .or(self.network(chain_id).reorg_watch_blocks)
            .unwrap_or(DEFAULT_REORG_WATCH_BLOCKS)
    }
}

fn parse_address(key: &'static str, v: &str) -> Result<Address, ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(
            key,
            "is required (run `hokusai-deployer contracts deploy` on a fresh chain)",
        ));
    }
    v.trim()
        .parse::<Address>()
        .map_err(|e| invalid(key, format!("not an address: {e}")))
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_mode_refuses_keys_in_different_slots_and_names_the_tag() {
        let load = |env: &[(&str, &str)]| {
            Settings::load(Sources {
                file: None,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
        };
        let Err(e) = load(&[("HOKUSAI__REDIS__MODE", "cluster")]) else {
            panic!("the default names map to different slots");
        };
        let e = e.to_string();
        assert!(e.contains("configuration key `queues`"), "{e}");
        assert!(
            e.contains("queues.inbound") && e.contains("queues.state_prefix"),
            "{e}"
        );
        assert!(e.contains("{hokusai}:model_ready_queue"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let tagged = [
            ("HOKUSAI__REDIS__URL", "redis-cluster://127.0.0.1:7000"),
            ("HOKUSAI__QUEUES__INBOUND", "{hokusai}:model_ready_queue"),
            (
                "HOKUSAI__QUEUES__PROCESSING",
                "{hokusai}:model_ready_queue:processing",
            ),
            ("HOKUSAI__QUEUES__DLQ", "{hokusai}:model_ready_queue:dlq"),
            (
                "HOKUSAI__QUEUES__OUTBOUND",
                "{hokusai}:token_deployed_queue",
            ),
            (
                "HOKUSAI__QUEUES__FAILURES",
                "{hokusai}:deployment_failed_queue",
            ),
            ("HOKUSAI__QUEUES__STATE_PREFIX", "{hokusai}:deployer"),
        ];
        let s = load(&tagged).expect("one tag, one slot");
        assert_eq!(s.redis.mode(), RedisMode::Cluster, "from the URL's scheme");
        // Standalone Redis does not care.
        assert!(load(&[]).is_ok());
        let e = load(&[("HOKUSAI__REDIS__MODE", "sentinel")])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("redis.sentinel_addresses"), "{e}");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, format!("{}\n", crate::localstack::ANVIL_DEV_KEY)).unwrap();
        let p = path.to_str().unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, true),
            (0o644, false),
            (0o606, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let s = load(&[("HOKUSAI__CHAIN__PRIVATE_KEY_FILE", p)]).unwrap();
            let r = s.private_keys();
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chain.private_key_file"), "{e}");
            }
        }
    }

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load(Sources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn defaults_are_the_seed_queue_names() {
        let s = load(&[]).unwrap();
        assert_eq!(s.queues.inbound, "hokusai:model_ready_queue");
        assert_eq!(s.queues.processing, "hokusai:model_ready_queue:processing");
        assert_eq!(s.queues.dlq, "hokusai:model_ready_queue:dlq");
        assert_eq!(s.queues.outbound, "hokusai:token_deployed_queue");
    }

    #[test]
    fn hokusai_variables_override_seed_aliases() {
        let s = load(&[
            ("REDIS_URL", "redis://alias:1"),
            ("HOKUSAI__REDIS__URL", "redis://direct:2"),
            ("WEB3_PROVIDER_URL", "http://a:1,http://b:2"),
            ("HOKUSAI__PIPELINE__CONCURRENCY", "7"),
        ])
        .unwrap();
        assert_eq!(s.redis.url, "redis://direct:2");
        assert_eq!(s.chain.rpc_urls, vec!["http://a:1", "http://b:2"]);
        assert_eq!(s.pipeline.concurrency, 7);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(&[("HOKUSAI__PIPELINE__CONCURRENCY", "0")]).unwrap_err();
        assert!(e.to_string().contains("pipeline.concurrency"), "{e}");
        let e = load(&[("HOKUSAI__CHAIN__RPC_URLS", "ws://x")]).unwrap_err();
        assert!(e.to_string().contains("chain.rpc_urls"), "{e}");
        let s = load(&[]).unwrap();
        let e = s.contract_addresses().unwrap_err();
        assert!(
            e.to_string().contains("chain.model_registry_address"),
            "{e}"
        );
    }

    #[test]
    fn key_in_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[chain]\nprivate_key = \"0xabc\"\n").unwrap();
        let e = Settings::load(Sources {
            file: Some(&p),
            env: vec![],
        })
        .unwrap_err();
        assert!(e.to_string().contains("chain.private_key"), "{e}");
    }

    #[test]
    fn secrets_and_url_credentials_never_print() {
        let s = load(&[
            ("HOKUSAI__CHAIN__PRIVATE_KEY", "0xdeadbeefsecret"),
            ("HOKUSAI__REDIS__URL", "redis://user:hunter2@h:6379"),
            (
                "HOKUSAI__CHAIN__RPC_URLS",
                "https://mainnet.infura.io/v3/abcdef0123456789abcdef",
            ),
        ])
        .unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("deadbeefsecret"));
        let json = serde_json::to_string(&s).unwrap();
        for secret in ["deadbeefsecret", "hunter2", "abcdef0123456789abcdef"] {
            assert!(!json.contains(secret), "{secret} leaked in {json}");
        }
    }

    #[test]
    fn a_blank_secret_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "0x01\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = file.display().to_string();
        let s = load(&[
            ("DEPLOYER_PRIVATE_KEY", " "),
            ("HOKUSAI__CHAIN__PRIVATE_KEY_FILE", &path),
            ("REDIS_PASSWORD", ""),
            ("JWT_SECRET", ""),
        ])
        .unwrap();
        assert_eq!(s.private_keys().unwrap().len(), 1, "the file's key");
        assert!(s.redis.password.is_none() && s.api.jwt.secret.is_none());
    }

    #[test]
    #[cfg(not(feature = "aws-kms"))]
    fn kms_keys_need_the_aws_kms_build() {
        let e = load(&[("HOKUSAI__CHAIN__AWS_KMS_KEY_IDS", "alias/hokusai-a")]).unwrap_err();
        assert!(e.to_string().contains("--features aws-kms"), "{e}");
    }

    #[test]
    #[cfg(feature = "aws-kms")]
    fn kms_keys_replace_private_keys_and_never_mix_with_them() {
        let s = load(&[(
            "HOKUSAI__CHAIN__AWS_KMS_KEY_IDS",
            "alias/hokusai-a,arn:aws:kms:eu-west-1:1:key/b",
        )])
        .unwrap();
        let keys = s.deployer_keys().unwrap();
        assert!(
            matches!(&keys[..], [DeployerKey::AwsKms(a), DeployerKey::AwsKms(b)]
                if a == "alias/hokusai-a" && b.ends_with("key/b")),
            "{keys:?}"
        );
        let e = load(&[
            ("HOKUSAI__CHAIN__AWS_KMS_KEY_IDS", "alias/hokusai-a"),
            ("DEPLOYER_PRIVATE_KEY", "0x01"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn redis_tls_files_need_rediss_and_come_in_pairs() {
        let e = load(&[("HOKUSAI__REDIS__TLS_CA_FILE", "/ca.pem")]).unwrap_err();
        assert!(e.to_string().contains("redis.tls_ca_file"), "{e}");
        assert!(e.to_string().contains("rediss://"), "{e}");
        let e = load(&[
            ("HOKUSAI__REDIS__URL", "rediss://u@h:6380"),
            ("HOKUSAI__REDIS__TLS_CERT_FILE", "/c.pem"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("tls_key_file"), "{e}");
        let s = load(&[
            ("REDIS_URL", "rediss://hokusai-worker@h:6380"),
            ("REDIS_PASSWORD", "hunter2-hunter2-hunter2"),
        ])
        .unwrap();
        assert_eq!(
            s.redis.password.unwrap().expose(),
            "hunter2-hunter2-hunter2"
        );
    }

    #[test]
    fn webhook_secrets_come_from_the_environment_only_and_rotate_in_pairs() {
        const A: &str = "inbound-secret-a-0123456789abcdef0123";
        const B: &str = "inbound-secret-b-0123456789abcdef0123";
        let s = load(&[]).unwrap();
        assert!(s.webhooks.inbound_secrets().is_empty(), "off by default");
        assert_eq!(s.webhooks.idempotency_ttl_secs, 86_400);
        let s = load(&[
            ("HOKUSAI__WEBHOOKS__INBOUND_SECRET", A),
            ("HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS", B),
        ])
        .unwrap();
        let secrets: Vec<&str> = s
            .webhooks
            .inbound_secrets()
            .iter()
            .map(|s| s.expose())
            .collect();
        assert_eq!(secrets, [A, B]);
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains(A) && !json.contains(B), "{json}");
        assert!(!format!("{s:?}").contains(A));

        let e = load(&[("HOKUSAI__WEBHOOKS__INBOUND_SECRET", "short")]).unwrap_err();
        assert!(e.to_string().contains("webhooks.inbound_secret"), "{e}");
        let e = load(&[("HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS", B)]).unwrap_err();
        assert!(
            e.to_string().contains("webhooks.inbound_secret_previous"),
            "{e}"
        );
        let e = load(&[("HOKUSAI__WEBHOOKS__IDEMPOTENCY_TTL_SECS", "99999999")]).unwrap_err();
        assert!(
            e.to_string().contains("webhooks.idempotency_ttl_secs"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("[webhooks]\ninbound_secret = \"{A}\"\n")).unwrap();
        let e = Settings::load(Sources {
            file: Some(&p),
            env: vec![],
        })
        .unwrap_err();
        assert!(e.to_string().contains("webhooks.inbound_secret"), "{e}");
        assert!(!e.to_string().contains(A), "{e}");
        std::fs::write(&p, "[webhooks]\nidempotency_ttl_secs = 3600\n").unwrap();
        let s = Settings::load(Sources {
            file: Some(&p),
            env: vec![],
        })
        .unwrap();
        assert_eq!(s.webhooks.idempotency_ttl_secs, 3600);
    }

    #[test]
    fn unknown_chain_is_named_by_id() {
        let s = load(&[]).unwrap();
        assert_eq!(s.network(137).name, "polygon");
        assert_eq!(s.network(999).name, "chain-999");
    }
}
