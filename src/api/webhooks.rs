//! `POST /api/webhooks/model-registered`: the ML platform's `WebhookPublisher` announces a model
//! registered in MLflow, and the API orders its deployment as `POST /api/deployments` does for a
//! service: the model's facts from MLflow, the same `model_ready_to_deploy` message.
//!
//! Checks, each before the next input is read:
//! 1. the endpoint is on: `webhooks.inbound_secret` is set, else `404 NOT_FOUND` as for any
//!    unknown path;
//! 2. the body is within `api.max_body_bytes` (`413`);
//! 3. `X-Hokusai-Signature` is `sha256=` and the hex HMAC-SHA256 of the raw body under the
//!    secret or, while it is rotated, the previous one: compared in constant time before the
//!    body is parsed (`401`);
//! 4. an `X-Hokusai-Timestamp`, when sent, is within `webhooks.timestamp_tolerance_secs` (`401`);
//! 5. `X-Hokusai-Idempotency-Key` is present (`400`), then the body (`400`).
//!
//! The deployment then takes the POST's own steps ([`deployment::guarded`],
//! [`deployment::claim_idempotency`], [`deployment::admit_and_queue`]): the idempotency key is
//! taken set-if-absent for `webhooks.idempotency_ttl_secs`, so a repeat of an accepted delivery
//! is answered `200` with the first answer and queues nothing, while a refused one gives its
//! key back and a retry is judged again. The circuit breaker applies, no per-user quota.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tracing::info;
use utoipa::ToSchema;

use super::authorization::{Authenticated, ClientIp};
use super::credentials::Caller;
use super::deployment::{self, Acquired, Checked};
use super::errors::{ApiError, ErrorResponse, Request};
use super::queueing::{self, Quota};
use super::ApiState;
use crate::config::Secret;

/// The route, as matched.
pub const ROUTE: &str = "/api/webhooks/model-registered";
/// Whom the webhook's deployments are recorded for: service keys read their status.
pub const CALLER: &str = "webhook:model-registered";

const SIGNATURE_HEADER: &str = "x-hokusai-signature";
const IDEMPOTENCY_HEADER: &str = "x-hokusai-idempotency-key";
const TIMESTAMP_HEADER: &str = "x-hokusai-timestamp";
/// The only event this endpoint takes.
const EVENT_TYPE: &str = "model_registered";
/// The only model status the publisher sends (its schema's one value).
const REGISTERED: &str = "registered";
/// Longest idempotency key: the publisher's is a 36-character uuid5; the POST allows 128.
const MAX_KEY: usize = 128;
/// Longest version or run id kept in the audit entry (the message's own label limit).
const MAX_LABEL: usize = 128;

type HmacSha256 = Hmac<Sha256>;

/// The publisher's body: `{"event_type":"model_registered","model":{…},"timestamp":…,"source":"mlflow"}`.
/// Other fields (`api_schema`, `eval_spec`, `user_id`, …) are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ModelRegisteredEvent {
    /// `model_registered`.
    #[schema(example = "model_registered")]
    pub event_type: String,
    pub model: RegisteredModel,
    /// When the platform published (ISO 8601); informative.
    #[schema(example = "2026-11-23T13:00:00.123456Z")]
    pub timestamp: Option<String>,
    /// `mlflow`; informative.
    #[schema(example = "mlflow")]
    pub source: Option<String>,
}

/// The registered model, as the publisher names it.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisteredModel {
    /// The token symbol in lower case (`msg-ai`): the deployment's `token_symbol`, kept as
    /// given (written on chain in upper case).
    #[schema(
        example = "msg-ai",
        max_length = 64,
        pattern = r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$"
    )]
    pub id: String,
    /// The MLflow registered-model name: the deployment's `model_id`, whose facts (validation,
    /// metric, run, version) are read from MLflow.
    #[schema(example = "model_7", pattern = r"^[A-Za-z0-9_.\-]{1,128}$")]
    pub name: String,
    /// `registered`.
    #[schema(example = "registered")]
    pub status: Option<String>,
    /// The registered version (recorded in the audit entry; the message carries MLflow's
    /// latest).
    #[schema(example = "3")]
    pub version: Option<String>,
    /// The MLflow run (recorded in the audit entry; the message carries the run the model's
    /// tags name).
    pub run_id: Option<String>,
}

impl ModelRegisteredEvent {
    /// The deployment it orders, or `VALIDATION_ERROR` naming the field at fault.
    fn order(&self) -> Result<Checked, ApiError> {
        if self.event_type != EVENT_TYPE {
            return Err(ApiError::invalid(
                "event_type",
                "one_of",
                format!("this endpoint takes `{EVENT_TYPE}` events only"),
            ));
        }
        if self
            .model
            .status
            .as_deref()
            .is_some_and(|s| s != REGISTERED)
        {
            return Err(ApiError::invalid(
                "model.status",
                "one_of",
                format!("only a `{REGISTERED}` model is deployed"),
            ));
        }
        if !deployment::model_id_ok(&self.model.name) {
            return Err(ApiError::invalid(
                "model.name",
                "format",
                "model.name must be the MLflow registered-model name: 1 to 128 letters, digits, `-`, `_` or `.`",
            ));
        }
        if !deployment::symbol_ok(&self.model.id) {
            return Err(ApiError::invalid(
                "model.id",
                "format",
                "model.id (the token symbol) must be letters and digits in groups joined by single `-`, at most 64 characters",
            ));
        }
        Ok(Checked {
            model_id: self.model.name.clone(),
            user_address: None,
            token_name: None,
            token_symbol: Some(self.model.id.clone()),
            callback_url: None,
        })
    }
}

#[utoipa::path(
    post,
    path = "/api/webhooks/model-registered",
    request_body = ModelRegisteredEvent,
    params(
        ("X-Hokusai-Signature" = String, Header, description = "`sha256=` and the hex HMAC-SHA256 of the raw body under `webhooks.inbound_secret` (or `webhooks.inbound_secret_previous` while it is rotated)"),
        ("X-Hokusai-Idempotency-Key" = String, Header, description = "The delivery's key (the publisher's uuid5 over model id, token symbol, run id and version): a repeat of an accepted delivery within `webhooks.idempotency_ttl_secs` gets the first answer and queues nothing"),
        ("X-Hokusai-Timestamp" = Option<String>, Header, description = "Unix seconds; when sent, it must be within `webhooks.timestamp_tolerance_secs` of the server's clock"),
    ),
    responses(
        (status = 202, description = "Deployment queued", body = deployment::DeployTokenResponse),
        (status = 200, description = "A repeat of an accepted delivery (same X-Hokusai-Idempotency-Key): the first answer, nothing queued", body = deployment::DeployTokenResponse),
        (status = 400, description = "VALIDATION_ERROR: no X-Hokusai-Idempotency-Key, a body that is not the event, a model name or symbol that breaks its rule", body = ErrorResponse),
        (status = 401, description = "AUTH_FAILED: a missing or wrong X-Hokusai-Signature, or an X-Hokusai-Timestamp out of the window", body = ErrorResponse),
        (status = 404, description = "NOT_FOUND: no webhooks.inbound_secret is configured (the endpoint is off); MODEL_NOT_FOUND: MLflow has no such registered model", body = ErrorResponse),
        (status = 409, description = "TOKEN_EXISTS, or IDEMPOTENCY_CONFLICT (the key's first delivery is still in progress, or was for another model)", body = ErrorResponse),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorResponse),
        (status = 422, description = "MODEL_NOT_VALIDATED", body = ErrorResponse),
        (status = 503, description = "DEPLOYMENTS_PAUSED, CIRCUIT_BREAKER_OPEN, INSUFFICIENT_GAS, UPSTREAM_UNAVAILABLE or TIMEOUT: transient, retry", body = ErrorResponse),
    )
)]
pub async fn model_registered(
    State(state): State<Arc<ApiState>>,
    Extension(client): Extension<ClientIp>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let mut req = Request::new(ROUTE, client.label());
    let result = if state.settings.webhooks.inbound_secrets().is_empty() {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such endpoint",
        ))
    } else {
        match body {
            Ok(body) => receive(&state, &mut req, &headers, &body).await,
            // Over `api.max_body_bytes` the body extractor stops reading.
            Err(_) => Err(deployment::too_large(&state)),
        }
    };
    req.finish(&state, result)
}

async fn receive(
    state: &Arc<ApiState>,
    log: &mut Request,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    if body.len() > state.settings.api.max_body_bytes {
        return Err(deployment::too_large(state));
    }
    let settings = &state.settings.webhooks;
    if !signed(&settings.inbound_secrets(), headers, body) {
        info!(client = %log.client, "webhook signature refused");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_FAILED",
            "X-Hokusai-Signature is missing or does not match the body: sign the raw body with HMAC-SHA256 and the shared secret",
        ));
    }
    log.caller = Some(CALLER.into());
    fresh(
        headers,
        chrono::Utc::now().timestamp(),
        settings.timestamp_tolerance_secs,
    )?;
    let key = idempotency_key(headers)?;
    let event: ModelRegisteredEvent = deployment::parse_json(body)?;
    log.model_id = Some(event.model.name.chars().take(128).collect());
    let order = event.order()?;

    let acquired = Acquired::new(
        CALLER,
        &order.model_id,
        Some((
            state.key("webhook-idempotency", key),
            settings.idempotency_ttl_secs,
        )),
        None,
        None,
    );
    let who = platform();
    let answer = deployment::guarded(state, &acquired, async {
        if let Some(replayed) =
            deployment::claim_idempotency(state, &acquired, &order.model_id).await?
        {
            return Ok(replayed);
        }
        queueing::admit_and_queue(state, &who, &order, &acquired, Quota::GlobalOnly).await
    })
    .await?;
    if answer.status() == StatusCode::ACCEPTED {
        let label = |v: &Option<String>| {
            v.as_deref()
                .unwrap_or_default()
                .chars()
                .take(MAX_LABEL)
                .collect::<String>()
        };
        let mut fields = crate::audit::Fields::new();
        fields.insert("idempotency_key", key.to_owned());
        fields.insert("deployment_id", acquired.deployment_id().to_owned());
        fields.insert("model_id", order.model_id.clone());
        fields.insert("token_symbol", event.model.id.clone());
        fields.insert("model_version", label(&event.model.version));
        fields.insert("run_id", label(&event.model.run_id));
        fields.insert("client", log.client.clone());
        let audit = state.audit.clone();
        // Beside the answer, as the refusals' entries: the publisher does not wait for it.
        tokio::spawn(async move { audit.record("webhook_received", fields).await });
        info!(deployment_id = acquired.deployment_id(), model_id = %order.model_id, "webhook deployment queued");
    }
    Ok(answer)
}

/// The platform as a caller: trusted like a service key, with no address of its own.
fn platform() -> Authenticated {
    Authenticated {
        caller: Caller {
            user_id: CALLER.into(),
            address: None,
            jti: None,
            expires_at: 0,
            tier: None,
            service: true,
        },
        siwe: None,
    }
}

/// `X-Hokusai-Signature` is `sha256=<hex HMAC-SHA256(secret, body)>` under one of `secrets`.
/// Each comparison is constant time ([`Mac::verify_slice`]) and every secret is tried, so the
/// time taken says nothing about the signature or which secret it matched.
fn signed(secrets: &[&Secret], headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(given) = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    secrets.iter().fold(false, |ok, secret| {
        let mut mac = HmacSha256::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(body);
        mac.verify_slice(&given).is_ok() | ok
    })
}

/// An `X-Hokusai-Timestamp` (unix seconds), when sent, is within `tolerance_secs` of `now`. The
/// platform's signature does not cover it, so it turns away stale deliveries; replays are
/// turned away by the idempotency key.
fn fresh(headers: &HeaderMap, now: i64, tolerance_secs: u64) -> Result<(), ApiError> {
    let Some(v) = headers.get(TIMESTAMP_HEADER) else {
        return Ok(());
    };
    let at: i64 = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "X-Hokusai-Timestamp",
                "format",
                "X-Hokusai-Timestamp must be unix seconds",
            )
        })?;
    if now.abs_diff(at) > tolerance_secs {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_FAILED",
            format!("X-Hokusai-Timestamp is more than {tolerance_secs} s from the server's clock"),
        ));
    }
    Ok(())
}

/// `X-Hokusai-Idempotency-Key`: required, 1 to 128 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_HEADER) else {
        return Err(ApiError::invalid(
            "X-Hokusai-Idempotency-Key",
            "required",
            "X-Hokusai-Idempotency-Key is required",
        ));
    };
    let k = v.to_str().unwrap_or("");
    if k.is_empty() || k.len() > MAX_KEY || !k.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "X-Hokusai-Idempotency-Key",
            "format",
            "X-Hokusai-Idempotency-Key must be 1 to 128 printable ASCII characters",
        ));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "inbound-secret-0123456789abcdef0123";
    const OLD: &str = "previous-secret-0123456789abcdef012";

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    /// The publisher's signature, computed here from the RFC 2104 definition on SHA-256 alone
    /// (independent of the `hmac` crate the endpoint uses).
    fn reference_hmac(key: &[u8], body: &[u8]) -> String {
        use sha2::Digest;
        let mut k = [0u8; 64];
        k[..key.len()].copy_from_slice(key);
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(body)
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        format!("sha256={}", hex::encode(outer))
    }

    #[test]
    fn a_signature_verifies_under_either_secret_and_nothing_else() {
        let body = br#"{"event_type":"model_registered","model":{"id":"msg-ai","name":"m","status":"registered","version":"1"},"timestamp":"2026-11-23T13:00:00.123456Z","source":"mlflow"}"#;
        let (new, old) = (Secret::new(SECRET), Secret::new(OLD));
        let both = [&new, &old];
        let sig = reference_hmac(SECRET.as_bytes(), body);
        assert!(signed(&both, &with(SIGNATURE_HEADER, &sig), body));
        assert!(signed(&[&new], &with(SIGNATURE_HEADER, &sig), body));
        // Upper-case hex is the same signature.
        let upper = format!("sha256={}", sig["sha256=".len()..].to_uppercase());
        assert!(signed(&both, &with(SIGNATURE_HEADER, &upper), body));
        // The secret being rotated out still verifies while configured.
        let by_old = reference_hmac(OLD.as_bytes(), body);
        assert!(signed(&both, &with(SIGNATURE_HEADER, &by_old), body));
        assert!(!signed(&[&new], &with(SIGNATURE_HEADER, &by_old), body));
        // A changed body, a truncated or unprefixed signature, none at all.
        let mut changed = body.to_vec();
        changed[40] ^= 1;
        assert!(!signed(&both, &with(SIGNATURE_HEADER, &sig), &changed));
        assert!(!signed(
            &both,
            &with(SIGNATURE_HEADER, &sig[..sig.len() - 2]),
            body
        ));
        assert!(!signed(
            &both,
            &with(SIGNATURE_HEADER, &sig["sha256=".len()..]),
            body
        ));
        assert!(!signed(&both, &with(SIGNATURE_HEADER, "sha256="), body));
        assert!(!signed(&both, &HeaderMap::new(), body));
        assert!(!signed(&[], &with(SIGNATURE_HEADER, &sig), body));
    }

    #[test]
    fn a_timestamp_counts_only_when_sent_and_only_within_the_window() {
        let now = 1_800_000_000;
        assert!(fresh(&HeaderMap::new(), now, 300).is_ok());
        assert!(fresh(&with(TIMESTAMP_HEADER, "1800000299"), now, 300).is_ok());
        assert!(fresh(&with(TIMESTAMP_HEADER, "1799999700"), now, 300).is_ok());
        let stale = fresh(&with(TIMESTAMP_HEADER, "1799999699"), now, 300).unwrap_err();
        assert_eq!((stale.status.as_u16(), stale.code), (401, "AUTH_FAILED"));
        let ahead = fresh(&with(TIMESTAMP_HEADER, "1800000301"), now, 300).unwrap_err();
        assert_eq!(ahead.status.as_u16(), 401);
        let bad = fresh(&with(TIMESTAMP_HEADER, "yesterday"), now, 300).unwrap_err();
        assert_eq!((bad.status.as_u16(), bad.code), (400, "VALIDATION_ERROR"));
    }

    #[test]
    fn the_event_maps_to_a_deployment_of_the_registered_model_with_its_symbol() {
        let body = br#"{"event_type":"model_registered","model":{"id":"msg-ai","name":"model_7","status":"registered","version":"3","run_id":"abc","api_schema":{"x":1},"user_id":"u"},"timestamp":"2026-11-23T13:00:00Z","source":"mlflow"}"#;
        let e: ModelRegisteredEvent = deployment::parse_json(body).unwrap();
        let o = e.order().unwrap();
        assert_eq!(o.model_id, "model_7");
        assert_eq!(o.token_symbol.as_deref(), Some("msg-ai"));
        assert!(o.user_address.is_none() && o.token_name.is_none());

        let field = |body: &[u8]| {
            let e = deployment::parse_json::<ModelRegisteredEvent>(body)
                .and_then(|e| e.order().map(|_| ()))
                .unwrap_err();
            assert_eq!(e.code, "VALIDATION_ERROR");
            e.details.unwrap()["field"].as_str().unwrap().to_owned()
        };
        assert_eq!(field(br#"{"model":{"id":"a","name":"b"}}"#), "event_type");
        assert_eq!(
            field(br#"{"event_type":"model_registered","model":{"name":"b"}}"#),
            "model.id"
        );
        assert_eq!(
            field(br#"{"event_type":"model_deleted","model":{"id":"a","name":"b"}}"#),
            "event_type"
        );
        assert_eq!(
            field(br#"{"event_type":"model_registered","model":{"id":"a","name":"b","status":"failed"}}"#),
            "model.status"
        );
        assert_eq!(
            field(br#"{"event_type":"model_registered","model":{"id":"a","name":"Sales lead model"}}"#),
            "model.name"
        );
        assert_eq!(
            field(br#"{"event_type":"model_registered","model":{"id":"msg--ai","name":"b"}}"#),
            "model.id"
        );
        assert_eq!(field(b"not json"), "body");
    }

    #[test]
    fn the_idempotency_key_is_required_and_bounded() {
        assert_eq!(
            idempotency_key(&with(
                IDEMPOTENCY_HEADER,
                "6f1ed002-ab5d-5bd2-8d6e-8e8c3b6c1b56"
            ))
            .unwrap(),
            "6f1ed002-ab5d-5bd2-8d6e-8e8c3b6c1b56"
        );
        for h in [
            HeaderMap::new(),
            with(IDEMPOTENCY_HEADER, ""),
            with(IDEMPOTENCY_HEADER, &"k".repeat(129)),
            with(IDEMPOTENCY_HEADER, "a key"),
        ] {
            let e = idempotency_key(&h).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (400, "VALIDATION_ERROR"));
        }
    }
}
