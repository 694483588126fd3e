//! `POST /api/deployments`: authenticate (under the failed-auth limit), check the body,
//! authorize against the model with proven addresses, take the token's `jti` and the SIWE
//! nonce once, take a quota slot and the model, and queue the same `model_ready_to_deploy`
//! message the ML platform would send. A request refused or timed out gives back everything
//! it took ([`Acquired::give_back`]).

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
use serde_json::json;
use tracing::{info, warn};
use utoipa::ToSchema;

use super::authorization::{self, Authenticated, ClientIp};
use super::errors::{ApiError, ErrorResponse, Request};
use super::limits::{Decision, Window};
use super::{quote, symbol, ApiState};
use crate::chain::ModelRegistry;
use crate::message;
use crate::mlflow::Model;
use crate::queue;

/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_TTL_SECS: i64 = 86_400;

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

fn too_large(state: &ApiState) -> ApiError {
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
    who.may_name(request.user_address)?;

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
            Some(state.key("idempotency", &format!("{}:{k}", who.caller.user_id)))
        }
    };
    let acquired = Arc::new(Acquired {
        deployment_id: uuid::Uuid::new_v4().to_string(),
        user_id: who.caller.user_id.clone(),
        model_id: request.model_id.clone(),
        idempotency_key: idem,
        jti_key: who.caller.jti.as_deref().map(|j| state.jti_key(j)),
        nonce_key: who.siwe.as_ref().map(|p| state.nonce_key(&p.nonce)),
        key: AtomicBool::new(false),
        jti: AtomicBool::new(false),
        nonce: AtomicBool::new(false),
        quota: AtomicBool::new(false),
        claim: AtomicBool::new(false),
        commit: AtomicBool::new(false),
    });
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let result = tokio::time::timeout(limit, create_checked(state, &who, &request, &acquired))
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

/// What a POST has taken so far, each marked just before the Redis command that takes it is
/// sent (a timeout may drop the request between sending and the answer): a request refused or
/// timed out gives it all back in [`Acquired::give_back`], its one cleanup path.
struct Acquired {
    deployment_id: String,
    user_id: String,
    model_id: String,
    /// `<prefix>:idempotency:<user>:<key>` when the request has an `Idempotency-Key`.
    idempotency_key: Option<String>,
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
    quota: AtomicBool,
    /// The model was claimed.
    claim: AtomicBool,
    /// The deployment record and message were sent (one MULTI/EXEC).
    commit: AtomicBool,
}

impl Acquired {
    fn mark(flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
    }
    fn clear(flag: &AtomicBool) {
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
        for (flag, key, what) in [
            (&self.key, &self.idempotency_key, "an Idempotency-Key"),
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

/// A request whose fields passed their rules.
struct Checked {
    model_id: String,
    user_address: Address,
    token_name: Option<String>,
    /// As the caller gave it; `None`: generated when the deployment is queued.
    token_symbol: Option<String>,
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
                let ok = s.len() <= 64
                    && s.split('-')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()));
                if !ok {
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
            user_address,
            token_name: r.token_name,
            token_symbol,
        })
    }
}

/// 1 to 128 letters, digits, `-`, `_` or `.`: an MLflow model name we accept.
pub(super) fn model_id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_request(body: &[u8]) -> Result<DeployTokenRequest, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let (field, rule) = if let Some(f) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            (f.to_owned(), "required")
        } else if let Some(f) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            (f.to_owned(), "unknown_field")
        } else if path == "." || path.is_empty() {
            ("body".to_owned(), "json")
        } else {
            (path, "type")
        };
        ApiError::invalid(&field, rule, format!("invalid request body: {msg}"))
    })
}

async fn create_checked(
    state: &ApiState,
    who: &Authenticated,
    req: &Checked,
    acquired: &Acquired,
) -> Result<Response, ApiError> {
    let deployment_id = acquired.deployment_id.as_str();
    if let Some(key) = &acquired.idempotency_key {
        Acquired::mark(&acquired.key);
        let claimed: Option<String> = state
            .redis
            .set(
                key,
                deployment_id,
                Some(fred::types::Expiration::EX(IDEMPOTENCY_TTL_SECS)),
                Some(fred::types::SetOptions::NX),
                true,
            )
            .await
            .map_err(ApiError::redis)?;
        if let Some(earlier) = claimed {
            // Another request's key: not ours to give back. A replay deploys nothing, so it
            // needs no unused jti or nonce.
            Acquired::clear(&acquired.key);
            return replay(state, &earlier, &req.model_id).await;
        }
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
    let paused: i64 = state
        .redis
        .exists(queue::pause_key(&state.prefix))
        .await
        .map_err(ApiError::redis)?;
    if paused > 0 {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "DEPLOYMENTS_PAUSED",
            "deployments are paused by an operator; try again later",
        ));
    }
    Acquired::mark(&acquired.quota);
    let decision = state
        .limiter
        .admit(
            &who.caller.user_id,
            who.caller.tier.as_deref(),
            deployment_id,
        )
        .await
        .map_err(ApiError::redis)?;
    let (limit, remaining) = match decision {
        Decision::Admitted { limit, remaining } => (limit, remaining),
        Decision::Refused {
            window,
            limit,
            retry_after_secs,
        } => {
            // Nothing was recorded.
            Acquired::clear(&acquired.quota);
            let (status, code, what) = match window {
                Window::UserDay => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED", format!("at most {limit} deployments per day")),
                Window::Global => (StatusCode::SERVICE_UNAVAILABLE, "CIRCUIT_BREAKER_OPEN", format!("the service accepts at most {limit} deployments per hour from everyone together")),
                _ => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED", format!("at most {limit} deployments per hour")),
            };
            return Err(ApiError::throttled(
                status,
                code,
                what,
                limit,
                retry_after_secs,
            ));
        }
    };
    let body = queue_deployment(state, who, req, acquired).await?;
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    Ok(r)
}

/// A model that may be deployed for this caller, and the figures of its validation.
pub(super) struct Deployable {
    pub model: Model,
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
}

/// The checks a deployment and a quote share: the model exists, the caller may deploy it
/// (owner, or a proven contributor), it is validated with a metric, and it has no token yet
/// (in our journal or the registry).
pub(super) async fn deployable(
    state: &ApiState,
    who: &Authenticated,
    model_id: &str,
    user_address: Address,
) -> Result<Deployable, ApiError> {
    let model = state.model(model_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            format!("no model `{model_id}` in the model registry"),
        )
    })?;
    who.may_deploy(user_address, &model)?;
    if !model.validated {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "MODEL_NOT_VALIDATED",
            format!("model `{model_id}` has not been validated yet"),
        ));
    }
    let Some((metric, baseline, current)) = model.metric.clone() else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "MODEL_NOT_VALIDATED",
            format!("model `{model_id}` has no validation metric with its baseline on its run"),
        ));
    };
    let registry = ModelRegistry::new(state.registry, &state.provider);
    let get_token = registry.getToken(model_id.to_owned());
    let (entry, registered) = tokio::join!(state.journal.load(model_id), get_token.call());
    let entry = entry.map_err(ApiError::redis)?;
    if let (Some(_), Some(token)) = (&entry.event, entry.token_address) {
        return Err(token_exists(model_id, Some(token)));
    }
    let registered = registered.map_err(|e| ApiError::upstream("the chain's RPC", e))?;
    if registered != Address::ZERO {
        return Err(token_exists(model_id, Some(registered)));
    }
    Ok(Deployable {
        model,
        metric,
        baseline,
        current,
    })
}

async fn queue_deployment(
    state: &ApiState,
    who: &Authenticated,
    req: &Checked,
    acquired: &Acquired,
) -> Result<DeployTokenResponse, ApiError> {
    let deployment_id = acquired.deployment_id.as_str();
    let Deployable {
        model,
        metric,
        baseline,
        current,
    } = deployable(state, who, &req.model_id, req.user_address).await?;
    Acquired::mark(&acquired.claim);
    claim_model(state, &req.model_id, deployment_id).await?;
    // The fees a worker would sign now, under the same cap: above it, nothing would be sent.
    let costs = quote::costs(state)?;
    let token_symbol = match &req.token_symbol {
        Some(s) => s.clone(),
        None => symbol::generated(
            &state.redis,
            &queue::symbols_key(&state.prefix),
            &req.model_id,
            true,
        )
        .await
        .map_err(ApiError::redis)?
        .ok_or_else(|| {
            ApiError::invalid(
                "token_symbol",
                "unique",
                "no free symbol could be generated for this model id; give a token_symbol",
            )
        })?,
    };

    // The same message the ML platform would send, validated by the same rules.
    let now = message::rfc3339(chrono::Utc::now());
    let improvement = if baseline != 0.0 {
        (current - baseline) / baseline.abs() * 100.0
    } else {
        0.0
    };
    let mut payload = json!({
        "model_id": req.model_id,
        "token_symbol": token_symbol,
        "metric_name": metric,
        "baseline_value": baseline,
        "current_value": current,
        "model_name": model.name,
        "model_version": model.version,
        "mlflow_run_id": model.run_id,
        "improvement_percentage": improvement,
        "contributor_address": req.user_address.to_checksum(None),
        "timestamp": now,
        "message_version": "1.0",
    });
    if let Some(n) = &req.token_name {
        payload["token_name"] = n.clone().into();
    }
    let msg = json!({
        "message_id": deployment_id,
        "message_type": message::MESSAGE_TYPE,
        "payload": payload,
        "timestamp": now,
        "retry_count": 0,
        "max_retries": state.settings.pipeline.max_retries,
    })
    .to_string();
    let parsed = match message::parse(msg.as_bytes(), &state.rules) {
        Ok(m) => m,
        Err(r) => {
            let field = r.field.trim_start_matches("payload.").to_owned();
            return Err(if r.code == "THRESHOLD_NOT_MET" {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "MODEL_NOT_VALIDATED",
                    r.message,
                )
                .details(json!({ "field": field, "rule": r.rule }))
            } else {
                ApiError::invalid(&field, &r.rule, r.message)
            });
        }
    };

    let body = DeployTokenResponse {
        success: true,
        deployment_id: deployment_id.to_owned(),
        model_id: req.model_id.clone(),
        estimated_confirmation_time: costs.confirmation_secs,
        estimated_gas_cost: costs.max_cost_wei().to_string(),
        status_url: format!(
            "{}/api/deployments/{deployment_id}/status",
            state.settings.api.public_url.trim_end_matches('/')
        ),
    };
    let record = vec![
        ("deployment_id", deployment_id.to_owned()),
        ("model_id", req.model_id.clone()),
        ("user_id", who.caller.user_id.clone()),
        ("user_address", req.user_address.to_checksum(None)),
        ("token_name", parsed.model.token_name.clone()),
        ("token_symbol", parsed.model.chain_symbol.clone()),
        (
            "created_at",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        (
            "response",
            serde_json::to_string(&body).expect("always serializes"),
        ),
    ];
    let ttl = (state.settings.api.deployment_ttl_days * 86_400) as i64;
    let key = state.key("deployment", deployment_id);
    let tx = state.redis.multi();
    Acquired::mark(&acquired.commit);
    let queued: Result<(), fred::error::Error> = async {
        let _: () = tx.hset(&key, record).await?;
        let _: () = tx.expire(&key, ttl, None).await?;
        let _: () = tx.lpush(&state.settings.queues.inbound, msg).await?;
        let _: () = tx.exec(true).await?;
        Ok(())
    }
    .await;
    queued.map_err(ApiError::redis)?;
    info!(deployment_id, model_id = %req.model_id, user = %who.caller.user_id, "deployment queued");
    Ok(body)
}

fn token_exists(model_id: &str, token: Option<Address>) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::CONFLICT,
        "TOKEN_EXISTS",
        format!("model `{model_id}` already has a token"),
    );
    if let Some(t) = token {
        e = e.details(json!({ "token_address": t.to_checksum(None) }));
    }
    e
}

/// Takes a model for one deployment at a time: a claim left by a deployment that failed is
/// taken over, one that is still going (or done) is `TOKEN_EXISTS`.
async fn claim_model(state: &ApiState, model_id: &str, id: &str) -> Result<(), ApiError> {
    let key = state.key("api-model", model_id);
    let ttl = Some(fred::types::Expiration::EX(
        (state.settings.api.deployment_ttl_days * 86_400) as i64,
    ));
    let earlier: Option<String> = state
        .redis
        .set(
            &key,
            id,
            ttl.clone(),
            Some(fred::types::SetOptions::NX),
            true,
        )
        .await
        .map_err(ApiError::redis)?;
    let Some(earlier) = earlier else {
        return Ok(());
    };
    let failed: i64 = state
        .redis
        .exists(queue::outcome_key(&state.prefix, &earlier))
        .await
        .map_err(ApiError::redis)?;
    if failed == 0 {
        return Err(token_exists(model_id, None).details(json!({ "deployment_id": earlier })));
    }
    // Compare-and-set, so two retries after a failure cannot both take the model.
    let took: i64 = state
        .redis
        .eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1 end return 0",
            vec![key],
            vec![
                earlier,
                id.to_owned(),
                (state.settings.api.deployment_ttl_days * 86_400).to_string(),
            ],
        )
        .await
        .map_err(ApiError::redis)?;
    if took == 1 {
        Ok(())
    } else {
        Err(token_exists(model_id, None))
    }
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
