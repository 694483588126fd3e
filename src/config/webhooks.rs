//! `[webhooks]`: the ML platform's inbound webhook and the outbound deliveries.

use super::*;

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
    pub(super) fn read_secrets(
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

impl Settings {
    pub(super) fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        // Each pair: the secret, and the one being rotated out beside it.
        for (key, secret, prev_key, previous) in [
            (
                "webhooks.inbound_secret",
                &w.inbound_secret,
                "webhooks.inbound_secret_previous",
                &w.inbound_secret_previous,
            ),
            (
                "webhooks.callback_secret",
                &w.callback_secret,
                "webhooks.callback_secret_previous",
                &w.callback_secret_previous,
            ),
        ] {
            for (k, s) in [(key, secret), (prev_key, previous)] {
                if s.as_ref()
                    .is_some_and(|s| s.expose().len() < MIN_WEBHOOK_SECRET)
                {
                    return Err(invalid(
                        k,
                        format!("must be at least {MIN_WEBHOOK_SECRET} characters"),
                    ));
                }
            }
            if previous.is_some() && secret.is_none() {
                return Err(invalid(
                    prev_key,
                    format!("needs {key} (the secret that replaces it)"),
                ));
            }
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
}
