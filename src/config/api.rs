//! `[api]`: the HTTP deployment API, its tokens, Sign-In with Ethereum, limits and MLflow.

use super::*;

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
