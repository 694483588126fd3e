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

mod api;
mod redis;
#[cfg(test)]
mod tests;
mod webhooks;

pub use api::{ApiSettings, JwtSettings, LimitSettings, MlflowSettings, SiweSettings, TierLimits};
pub use redis::{key_slot, RedisMode, RedisSettings};
pub use webhooks::{EndpointSettings, WebhookSettings, WEBHOOK_EVENTS};

/// The defaults every deployment starts from.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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
