//! `POST /api/deployments`: authenticate (under the failed-auth limit), check the body,
//! authorize against the model with proven addresses, take the token's `jti` and the SIWE
//! nonce once, take a quota slot and the model, and queue the same `model_ready_to_deploy`
//! message the ML platform would send. A request refused or timed out gives back everything
//! it took ([`Acquired::give_back`]).
//!
//! The platform's webhook ([`super::webhooks`]) orders a deployment through the same steps:
//! [`guarded`], [`claim_idempotency`] and [`admit_and_queue`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use utoipa::ToSchema;

use super::authorization::{self, Authenticated, ClientIp};
use super::errors::{ApiError, ErrorResponse, Request};
use super::queueing::{admit_and_queue, Quota};
use super::ApiState;
use crate::queue;

/// How long an `Idempotency-Key` is remembered: a day, as the retries of one client go.
const IDEMPOTENCY_TTL_SECS: u64 = 86_400;

/// Seed 000's request body. `auth_token` may carry the JWT instead of the header;
/// `siwe_message` and `siwe_signature` prove `user_address` (docs/api.md).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployTokenRequest {
    /// The model's id (its MLflow registered-model name).
    #[schema(example = "model_7", pattern = r"^[A-Za-z0-9_.\-]{1,128}$")]
    pub model_id: String,
    /// Ethereum address of the deploying user: an address the caller has proven (the token's
    /// `address` claim or a SIWE proof), unless the caller is the model's owner.
    #[schema(
        example = "0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d",
        pattern = r"^0x[0-9a-fA-F]{40}$"
    )]
    pub user_address: String,
    /// Token name; default `Hokusai {model_id}`.
    #[schema(pattern = r"^[A-Za-z0-9._()\-][A-Za-z0-9 ._()\-]{0,159}$")]
    pub token_name: Option<String>,
    /// Token symbol (letters and digits, `-` between groups), kept as given; default
    /// generated from the id and unique among the symbols issued.
    #[schema(max_length = 64, pattern = r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")]
    pub token_symbol: Option<String>,
    /// The JWT, when not sent as `Authorization: Bearer`.
    pub auth_token: Option<String>,
    /// A Sign-In with Ethereum (EIP-4361) message signed by `user_address`: proves it.
    #[schema(max_length = 4096)]
    pub siwe_message: Option<String>,
    /// The message's EIP-191 signature, 65 bytes in hex.
    #[schema(pattern = r"^(0x)?[0-9a-fA-F]{130}$")]
    pub siwe_signature: Option<String>,
    /// Where to POST this deployment's outcome (`deployment.completed` or
    /// `deployment.failed`, signed with the service's callback secret; docs/webhooks.md). HTTPS,
    /// and its host must not resolve to a loopback, private, link-local or metadata address.
    #[schema(max_length = 2048, example = "https://app.example.com/hooks/hokusai")]
    pub callback_url: Option<String>,
}

/// Seed 000's response to a deployment request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeployTokenResponse {
    pub success: bool,
    pub deployment_id: String,
    pub model_id: String,
    /// Seconds until the deployment is expected on chain.
    pub estimated_confirmation_time: u64,
    /// Wei, decimal: the gas of the one transaction that deploys and registers x the max fee
    /// per gas we would sign.
    pub estimated_gas_cost: String,
    pub status_url: String,
}

#[utoipa::path(
    post,
    path = "/api/deployments",
    request_body = DeployTokenRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeating a request with the same key returns the same deployment")),
    responses(
        (status = 202, description = "Deployment queued", body = DeployTokenResponse),
        (status = 200, description = "Replay of an earlier request with the same Idempotency-Key", body = DeployTokenResponse),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorResponse),
        (status = 401, description = "AUTH_FAILED (also a reused token `jti` or SIWE nonce, or a bad SIWE proof)", body = ErrorResponse),
        (status = 403, description = "AUTH_FAILED: not the model's owner or a proven contributor", body = ErrorResponse),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorResponse),
        (status = 409, description = "TOKEN_EXISTS or IDEMPOTENCY_CONFLICT", body = ErrorResponse),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorResponse),
        (status = 422, description = "MODEL_NOT_VALIDATED", body = ErrorResponse),
        (status = 429, description = "RATE_LIMIT_EXCEEDED: the deployment quota, or too many failed authentications from the client's address", body = ErrorResponse),
        (status = 503, description = "DEPLOYMENTS_PAUSED, CIRCUIT_BREAKER_OPEN, INSUFFICIENT_GAS, UPSTREAM_UNAVAILABLE or TIMEOUT", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(client): Extension<ClientIp>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let mut req = Request::new("/api/deployments", client.label());
    // Over `api.max_body_bytes` the body extractor stops reading: answer in our format.
    let result = match body {
        Ok(body) => create_inner(&state, &mut req, &headers, &body).await,
        Err(_) => Err(too_large(&state)),
    };
    req.finish(&state, result)
}

pub(super) fn too_large(state: &ApiState) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!(
            "the body is larger than {} bytes",
            state.settings.api.max_body_bytes
        ),
    )
}

/// Runs a checked POST under `api.request_timeout_ms` and, when it is refused or times out,
/// gives back what it took (see [`Acquired`]).
async fn create_inner(
    state: &Arc<ApiState>,
    log: &mut Request,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    if body.len() > state.settings.api.max_body_bytes {
        return Err(too_large(state));
    }
    let req = parse_request(body);
    // Authenticate first: an anonymous caller learns nothing about the body.
    let (body_token, body_proof) = match &req {
        Ok(r) => (
            r.auth_token.as_deref(),
            r.siwe_message.as_deref().zip(r.siwe_signature.as_deref()),
        ),
        Err(_) => (None, None),
    };
    if let Ok(r) = &req {
        if r.siwe_message.is_some() != r.siwe_signature.is_some() {
            return Err(ApiError::invalid(
                if r.siwe_message.is_some() {
                    "siwe_signature"
                } else {
                    "siwe_message"
                },
                "required",
                "siwe_message and siwe_signature go together",
            ));
        }
    }
    let proof = authorization::proof(headers, body_proof)?;
    let who = state.authenticate(log, headers, body_token, proof).await?;
    let req = req?;
    log.model_id = Some(req.model_id.chars().take(128).collect());
    let request = Checked::from(req)?;
    if let Some(a) = request.user_address {
        who.may_name(a)?;
    }
    if let Some(u) = &request.callback_url {
        check_callback(state, u).await?;
    }

    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().unwrap_or("");
            if k.is_empty() || k.len() > 128 || !k.chars().all(|c| c.is_ascii_graphic()) {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "format",
                    "Idempotency-Key must be 1 to 128 printable ASCII characters",
                ));
            }
            Some((
                state.key("idempotency", &format!("{}:{k}", who.caller.user_id)),
                IDEMPOTENCY_TTL_SECS,
            ))
        }
    };
    let acquired = Acquired::new(
        &who.caller.user_id,
        &request.model_id,
        idem,
        who.caller.jti.as_deref().map(|j| state.jti_key(j)),
        who.siwe.as_ref().map(|p| state.nonce_key(&p.nonce)),
    );
    guarded(
        state,
        &acquired,
        create_checked(state, &who, &request, &acquired),
    )
    .await
}

/// Runs a deployment request's `work` under `api.request_timeout_ms` and, when it is refused
/// or times out, gives back what it took (see [`Acquired`]).
pub(super) async fn guarded(
    state: &Arc<ApiState>,
    acquired: &Arc<Acquired>,
    work: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let result = tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(ApiError::timeout()));
    if result.is_err() && acquired.any() {
        // A task of its own, so it finishes even if this request is dropped; awaited (within
        // the same limit) so a retry after the answer finds everything given back.
        let task = tokio::spawn(acquired.clone().give_back(state.clone()));
        let _ = tokio::time::timeout(limit, task).await;
    }
    result
}

/// What a deployment request has taken so far, each marked just before the Redis command that
/// takes it is sent (a timeout may drop the request between sending and the answer): a request
/// refused or timed out gives it all back in [`Acquired::give_back`], its one cleanup path.
pub(super) struct Acquired {
    pub(super) deployment_id: String,
    user_id: String,
    model_id: String,
    /// `<prefix>:idempotency:<user>:<key>` when the request has an `Idempotency-Key`
    /// (`<prefix>:webhook-idempotency:<key>` for the webhook's), and how long it is kept.
    idempotency_key: Option<(String, u64)>,
    /// The token's `jti` mark, when the token has one.
    jti_key: Option<String>,
    /// The SIWE nonce's mark, when the request carries a proof.
    nonce_key: Option<String>,
    /// The Idempotency-Key was claimed for this deployment.
    key: AtomicBool,
    /// The token's `jti` was taken.
    jti: AtomicBool,
    /// The SIWE nonce was taken.
    nonce: AtomicBool,
    /// A quota slot was taken.
    pub(super) quota: AtomicBool,
    /// The model was claimed.
    pub(super) claim: AtomicBool,
    /// The deployment record and message were sent (one MULTI/EXEC).
    pub(super) commit: AtomicBool,
}

impl Acquired {
    /// Nothing taken yet, for a new deployment id.
    pub(super) fn new(
        user_id: &str,
        model_id: &str,
        idempotency_key: Option<(String, u64)>,
        jti_key: Option<String>,
        nonce_key: Option<String>,
    ) -> Arc<Acquired> {
        Arc::new(Acquired {
            deployment_id: uuid::Uuid::new_v4().to_string(),
            user_id: user_id.to_owned(),
            model_id: model_id.to_owned(),
            idempotency_key,
            jti_key,
            nonce_key,
            key: AtomicBool::new(false),
            jti: AtomicBool::new(false),
            nonce: AtomicBool::new(false),
            quota: AtomicBool::new(false),
            claim: AtomicBool::new(false),
            commit: AtomicBool::new(false),
        })
    }

    /// The id the deployment gets if it is queued.
    pub(super) fn deployment_id(&self) -> &str {
        &self.deployment_id
    }

    pub(super) fn mark(flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
    }
    pub(super) fn clear(flag: &AtomicBool) {
        flag.store(false, Ordering::SeqCst);
    }
    fn has(flag: &AtomicBool) -> bool {
        flag.load(Ordering::SeqCst)
    }
    fn any(&self) -> bool {
        [
            &self.key,
            &self.jti,
            &self.nonce,
            &self.quota,
            &self.claim,
            &self.commit,
        ]
        .into_iter()
        .any(Self::has)
    }

    /// Gives back what the refused request took: its Idempotency-Key, its token's `jti` and its
    /// SIWE nonce (so the request can be retried: they are single use for deployments, not for
    /// refusals), its quota slot (the quota counts deployments), its claim on the model. Keys
    /// and claims are deleted only while they still hold this deployment's id.
    async fn give_back(self: Arc<Self>, state: Arc<ApiState>) {
        let id = self.deployment_id.as_str();
        if Self::has(&self.commit) {
            // The transaction may have been applied before its answer was lost: then the
            // deployment is queued and keeps everything (a retry with the key replays it).
            let queued: Result<i64, _> = state.redis.exists(state.key("deployment", id)).await;
            if matches!(queued, Ok(n) if n > 0) {
                warn!(
                    deployment_id = id,
                    "the deployment was queued although its request failed"
                );
                return;
            }
        }
        let idempotency_key = self.idempotency_key.as_ref().map(|(k, _)| k.clone());
        for (flag, key, what) in [
            (&self.key, &idempotency_key, "an Idempotency-Key"),
            (&self.jti, &self.jti_key, "a token's jti"),
            (&self.nonce, &self.nonce_key, "a SIWE nonce"),
        ] {
            if let (true, Some(key)) = (Self::has(flag), key) {
                if let Err(e) = queue::delete_if_holds(&state.redis, key, id).await {
                    warn!(error = %e, "could not give back {what}; retries with it are refused until it expires");
                }
            }
        }
        if Self::has(&self.quota) {
            state.limiter.refund(&self.user_id, id).await;
        }
        if Self::has(&self.claim) {
            if let Err(e) =
                queue::delete_if_holds(&state.redis, &state.key("api-model", &self.model_id), id)
                    .await
            {
                warn!(error = %e, "could not release a model claim; it is taken over once known failed");
            }
        }
    }
}

/// A repeated request with the same Idempotency-Key: the first answer again.
async fn replay(state: &ApiState, id: &str, model_id: &str) -> Result<Response, ApiError> {
    let rec: HashMap<String, String> = state
        .redis
        .hgetall(state.key("deployment", id))
        .await
        .map_err(ApiError::redis)?;
    match (rec.get("response"), rec.get("model_id")) {
        (Some(r), Some(m)) if m == model_id => {
            let body: DeployTokenResponse = serde_json::from_str(r).map_err(ApiError::redis)?;
            let mut resp = (StatusCode::OK, Json(body)).into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(resp)
        }
        (Some(_), Some(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "IDEMPOTENCY_CONFLICT",
            "this Idempotency-Key was used for another model",
        )),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "IDEMPOTENCY_CONFLICT",
            "a request with this Idempotency-Key is still in progress; retry in a moment",
        )),
    }
}

/// A deployment order whose fields passed their rules: the POST's body, or the platform's
/// webhook.
pub(super) struct Checked {
    pub model_id: String,
    /// The deploying user's address, the message's `contributor_address`; the webhook names
    /// none (only a service caller may order without one).
    pub user_address: Option<Address>,
    pub token_name: Option<String>,
    /// As the caller gave it; `None`: generated when the deployment is queued.
    pub token_symbol: Option<String>,
    /// Checked by [`check_callback`] before anything is queued.
    pub callback_url: Option<String>,
}

/// A request's `callback_url`: refused unless callbacks are on (`webhooks.callback_secret`)
/// and the URL passes the delivery rules (HTTPS, a public address; see
/// [`crate::webhooks::target`]).
async fn check_callback(state: &ApiState, url: &str) -> Result<(), ApiError> {
    let w = &state.settings.webhooks;
    if w.callback_secret.is_none() {
        return Err(ApiError::invalid(
            "callback_url",
            "disabled",
            "this service sends no callbacks; poll status_url or subscribe to its events instead",
        ));
    }
    crate::webhooks::target::Guard::new(&w.allow_hosts)
        .check(url)
        .await
        .map(|_| ())
        .map_err(|reason| {
            ApiError::invalid(
                "callback_url",
                "public_https",
                format!("callback_url is refused: {reason}"),
            )
        })
}

impl Checked {
    fn from(r: DeployTokenRequest) -> Result<Checked, ApiError> {
        if !model_id_ok(&r.model_id) {
            return Err(ApiError::invalid(
                "model_id",
                "format",
                "model_id must be 1 to 128 letters, digits, `-`, `_` or `.`",
            ));
        }
        let user_address: Address = r.user_address.trim().parse().map_err(|_| {
            ApiError::invalid(
                "user_address",
                "address",
                "user_address must be a 0x-prefixed 20-byte hex address",
            )
        })?;
        if let Some(n) = &r.token_name {
            let ok = !n.trim().is_empty()
                && n.len() <= 160
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || " -_.()".contains(c));
            if !ok {
                return Err(ApiError::invalid(
                    "token_name",
                    "format",
                    "token_name must be 1 to 160 letters, digits, spaces or -_.()",
                ));
            }
        }
        let token_symbol = match &r.token_symbol {
            Some(s) => {
                if !symbol_ok(s) {
                    return Err(ApiError::invalid(
                        "token_symbol",
                        "format",
                        "token_symbol must be letters and digits in groups joined by single `-`, at most 64 characters",
                    ));
                }
                Some(s.clone())
            }
            None => None,
        };
        Ok(Checked {
            model_id: r.model_id,
            user_address: Some(user_address),
            token_name: r.token_name,
            token_symbol,
            callback_url: r.callback_url,
        })
    }
}

/// Letters and digits in groups joined by single `-`, at most 64 characters: a symbol a caller
/// may give (the message's rule; it is written on chain in upper case).
pub(super) fn symbol_ok(s: &str) -> bool {
    s.len() <= 64
        && s.split('-')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// 1 to 128 letters, digits, `-`, `_` or `.`: an MLflow model name we accept.
pub(super) fn model_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_request(body: &[u8]) -> Result<DeployTokenRequest, ApiError> {
    parse_json(body)
}

/// A JSON body as `T`, or `VALIDATION_ERROR` naming the field (`model.id` when nested) and the
/// rule it broke.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let top = path == "." || path.is_empty();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let within = |f: &str| {
            if top {
                f.to_owned()
            } else {
                format!("{path}.{f}")
            }
        };
        let (field, rule) = if let Some(f) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            (within(f), "required")
        } else if let Some(f) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            // The path already ends with the unknown field.
            (if top { f.to_owned() } else { path }, "unknown_field")
        } else if top {
            ("body".to_owned(), "json")
        } else {
            (path, "type")
        };
        ApiError::invalid(&field, rule, format!("invalid request body: {msg}"))
    })
}

/// Takes the request's idempotency key for its deployment (set-if-absent): `None` when this
/// request now holds it (or has none), else the answer to a repeat: the first request's answer
/// again, or a conflict.
pub(super) async fn claim_idempotency(
    state: &ApiState,
    acquired: &Acquired,
    model_id: &str,
) -> Result<Option<Response>, ApiError> {
    let Some((key, ttl_secs)) = &acquired.idempotency_key else {
        return Ok(None);
    };
    Acquired::mark(&acquired.key);
    let claimed: Option<String> = state
        .redis
        .set(
            key,
            acquired.deployment_id.as_str(),
            Some(fred::types::Expiration::EX(*ttl_secs as i64)),
            Some(fred::types::SetOptions::NX),
            true,
        )
        .await
        .map_err(ApiError::redis)?;
    match claimed {
        None => Ok(None),
        Some(earlier) => {
            // Another request's key: not ours to give back. A replay deploys nothing, so it
            // needs no unused jti or nonce.
            Acquired::clear(&acquired.key);
            replay(state, &earlier, model_id).await.map(Some)
        }
    }
}

async fn create_checked(
    state: &ApiState,
    who: &Authenticated,
    req: &Checked,
    acquired: &Acquired,
) -> Result<Response, ApiError> {
    let deployment_id = acquired.deployment_id.as_str();
    if let Some(replayed) = claim_idempotency(state, acquired, &req.model_id).await? {
        return Ok(replayed);
    }
    // Single use: a token with a `jti`, and a SIWE proof, serve one deployment request.
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    if let Some(key) = &acquired.jti_key {
        Acquired::mark(&acquired.jti);
        let ttl = who.caller.expires_at.saturating_sub(now) + state.settings.api.jwt.leeway_secs;
        if !state.take_once(key, deployment_id, ttl).await? {
            Acquired::clear(&acquired.jti);
            info!(user = %who.caller.user_id, "a token's jti was used again");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "AUTH_FAILED",
                "this token was already used for a deployment request; ask for a new one",
            ));
        }
    }
    if let (Some(key), Some(proven)) = (&acquired.nonce_key, &who.siwe) {
        Acquired::mark(&acquired.nonce);
        if !state
            .take_once(key, deployment_id, proven.nonce_ttl_secs)
            .await?
        {
            Acquired::clear(&acquired.nonce);
            info!(user = %who.caller.user_id, "a SIWE nonce was used again");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "AUTH_FAILED",
                "this SIWE message was already used; sign a new one with a new nonce",
            ));
        }
    }
    admit_and_queue(state, who, req, acquired, Quota::Caller).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_field_and_the_rule() {
        let e = parse_request(br#"{"user_address":"0x00"}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "model_id");
        let e = parse_request(br#"{"model_id":"m","user_address":"0x0","extra":1}"#).unwrap_err();
        let d = e.details.unwrap();
        assert_eq!(
            (d["field"].as_str(), d["rule"].as_str()),
            (Some("extra"), Some("unknown_field"))
        );
        let e = parse_request(br#"{"model_id":7,"user_address":"0x0"}"#).unwrap_err();
        assert_eq!(e.details.unwrap()["field"], "model_id");
        let e = parse_request(b"not json").unwrap_err();
        assert_eq!(e.code, "VALIDATION_ERROR");
    }
}
