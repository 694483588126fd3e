//! The HTTP deployment API of seed 000: `POST /api/deployments` checks the caller, the body
//! and the model, records the deployment and queues a `model_ready_to_deploy` message for the
//! same workers that serve the ML platform (one pipeline, two ways in); `GET
//! /api/deployments/{id}/status` reads the deployment's progress from the journal. No chain
//! transaction happens inside a request. `/health*` and `/metrics` are served here too, and
//! `/api/openapi.json` is generated from this code (utoipa).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::{info, warn};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Authenticator, Caller};
use crate::chain::{self, ModelRegistry};
use crate::config::Settings;
use crate::journal::Journal;
use crate::limits::{Decision, Limiter, Window};
use crate::message::{self, Rules, TokenDeployed};
use crate::mlflow::{Mlflow, Model};
use crate::ops::OpsState;
use crate::queue;

/// Registration gas when no estimate is at hand (measured: ~0.12 M).
const REGISTER_GAS: u64 = 150_000;
/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_TTL_SECS: i64 = 86_400;

/// Seed 000's request body. `auth_token` may carry the JWT instead of the header.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployTokenRequest {
    /// The model's id (its MLflow registered-model name).
    #[schema(example = "model_7", pattern = r"^[A-Za-z0-9_.\-]{1,128}$")]
    pub model_id: String,
    /// Ethereum address of the deploying user; must match the token's `address` claim.
    #[schema(
        example = "0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d",
        pattern = r"^0x[0-9a-fA-F]{40}$"
    )]
    pub user_address: String,
    /// Token name; default `Hokusai {model_id}`.
    #[schema(pattern = r"^[A-Za-z0-9._()\-][A-Za-z0-9 ._()\-]{0,159}$")]
    pub token_name: Option<String>,
    /// Token symbol (letters and digits, `-` between groups); default generated from the id.
    #[schema(max_length = 64, pattern = r"^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")]
    pub token_symbol: Option<String>,
    /// The JWT, when not sent as `Authorization: Bearer`.
    pub auth_token: Option<String>,
}

/// Seed 000's response to a deployment request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeployTokenResponse {
    pub success: bool,
    pub deployment_id: String,
    pub model_id: String,
    /// Seconds until the deployment is expected on chain.
    pub estimated_confirmation_time: u64,
    /// Wei, decimal: (deployment + registration gas) x the max fee per gas we would sign.
    pub estimated_gas_cost: String,
    pub status_url: String,
}

/// An error answer: `success` false and the seed's error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub success: bool,
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// `AUTH_FAILED`, `VALIDATION_ERROR`, `MODEL_NOT_FOUND`, `MODEL_NOT_VALIDATED`,
    /// `TOKEN_EXISTS`, `INSUFFICIENT_GAS`, `RATE_LIMIT_EXCEEDED`, `DEPLOYMENTS_PAUSED`,
    /// `CIRCUIT_BREAKER_OPEN`, `IDEMPOTENCY_CONFLICT`, `DEPLOYMENT_NOT_FOUND`,
    /// `PAYLOAD_TOO_LARGE`, `UPSTREAM_UNAVAILABLE`, `TIMEOUT`.
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Seed 000's status answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeploymentStatusResponse {
    pub deployment_id: String,
    /// `pending`, `deploying`, `registering`, `completed` or `failed`.
    pub status: String,
    pub model_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_address: Option<String>,
    pub token_name: String,
    pub token_symbol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_tx_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_tx_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_number: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explorer_url: Option<String>,
    /// Gas of deployment plus registration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<String>,
    /// The deployment's effective gas price (wei).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gas_price: Option<String>,
    /// Wei paid for both transactions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_cost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StatusError>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_hash: Option<String>,
}

/// An error answer in the making.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<serde_json::Value>,
    headers: Vec<(HeaderName, String)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            headers: vec![],
        }
    }
    fn details(mut self, d: serde_json::Value) -> Self {
        self.details = Some(d);
        self
    }
    fn auth() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_FAILED",
            "authentication failed: send a valid JWT as `Authorization: Bearer <token>` (or `auth_token`), or an `X-API-Key`",
        )
    }
    fn invalid(field: &str, rule: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
            .details(json!({ "field": field, "rule": rule }))
    }
    fn upstream(what: &str, e: impl std::fmt::Display) -> Self {
        warn!(error = %e, upstream = what, "upstream failed during a request");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            format!("{what} is not answering; try again shortly"),
        )
    }
    fn timeout() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            "the request took too long; it may be retried with the same Idempotency-Key",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            success: false,
            error: ErrorBody {
                code: self.code.into(),
                message: self.message,
                details: self.details,
            },
        };
        let mut r = (self.status, Json(body)).into_response();
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                r.headers_mut().insert(k, v);
            }
        }
        r
    }
}

/// Gas and fee figures refreshed in the background, so a request never waits for the chain.
#[derive(Debug, Clone, Default)]
struct Estimates {
    deploy_gas: u64,
    /// What the network asks per gas, as a worker would read it.
    market: Option<chain::Market>,
    block_time_secs: f64,
}

pub struct ApiState {
    settings: Settings,
    auth: Authenticator,
    limiter: Limiter,
    mlflow: Mlflow,
    redis: Client,
    journal: Journal,
    provider: DynProvider,
    registry: Address,
    manager: Address,
    rules: Rules,
    estimates: RwLock<Estimates>,
    models: Mutex<HashMap<String, (Instant, Option<Model>)>>,
    network: crate::config::Network,
    prefix: String,
}

impl ApiState {
    pub async fn new(settings: &Settings) -> anyhow::Result<Arc<ApiState>> {
        let auth = Authenticator::new(settings)?;
        let redis = queue::client(settings)?;
        redis.init().await?;
        let provider = chain::provider(settings)?;
        let chain_id = provider.get_chain_id().await?;
        let (registry, manager) = settings.contract_addresses()?;
        let prefix = settings.queues.state_prefix.clone();
        let state = Arc::new(ApiState {
            auth,
            limiter: Limiter::new(redis.clone(), &prefix, settings.api.limits.clone()),
            mlflow: Mlflow::new(&settings.api.mlflow)?,
            journal: Journal::new(redis.clone(), &prefix, true),
            redis,
            provider,
            registry,
            manager,
            rules: Rules {
                max_message_bytes: settings.pipeline.max_message_bytes,
                min_improvement_percentage: settings.pipeline.min_improvement_percentage,
            },
            estimates: RwLock::new(Estimates::default()),
            models: Mutex::new(HashMap::new()),
            network: settings.network(chain_id),
            prefix,
            settings: settings.clone(),
        });
        state.refresh_estimates().await;
        Ok(state)
    }

    /// Reads deployment gas, fees and block time; keeps the last figures on failure.
    async fn refresh_estimates(&self) {
        let code = chain::Chain::deploy_code("Hokusai estimate", "HK-EST", self.manager);
        let deploy = {
            use alloy::network::TransactionBuilder;
            alloy::rpc::types::TransactionRequest::default().with_deploy_code(code)
        };
        let gas = self.provider.estimate_gas(deploy).await;
        let market =
            chain::Market::read(&self.provider, self.settings.chain.priority_fee_wei()).await;
        let head = self.provider.get_block_number().await;
        let block_time = match head {
            Ok(h) if h > 10 => {
                let (a, b) = tokio::join!(
                    self.provider.get_block_by_number((h - 10).into()),
                    self.provider.get_block_by_number(h.into())
                );
                match (a, b) {
                    (Ok(Some(a)), Ok(Some(b))) => {
                        (b.header.timestamp.saturating_sub(a.header.timestamp)) as f64 / 10.0
                    }
                    _ => 12.0,
                }
            }
            _ => 12.0,
        };
        let mut e = self.estimates.write().expect("never poisoned");
        if let Ok(g) = gas {
            e.deploy_gas = chain::with_margin(g, self.settings.chain.gas_limit_margin_percent);
        }
        if let Ok(m) = market {
            e.market = Some(m);
        }
        e.block_time_secs = block_time.max(0.1);
    }

    fn key(&self, what: &str, id: &str) -> String {
        format!("{}:{what}:{id}", self.prefix)
    }

    /// The caller, from `Authorization: Bearer`, `X-API-Key` or the body's `auth_token` (the
    /// first present decides).
    fn caller(&self, headers: &HeaderMap, body_token: Option<&str>) -> Result<Caller, ApiError> {
        let refused = |e: crate::auth::Refused| {
            info!(reason = %e, "authentication refused");
            ApiError::auth()
        };
        if let Some(h) = headers.get(header::AUTHORIZATION) {
            let v = h.to_str().unwrap_or("");
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .ok_or_else(ApiError::auth)?;
            return self.auth.jwt(token.trim()).map_err(refused);
        }
        if let Some(k) = headers.get("x-api-key") {
            return self
                .auth
                .service_key(k.to_str().unwrap_or(""))
                .map_err(refused);
        }
        match body_token {
            Some(t) => self.auth.jwt(t.trim()).map_err(refused),
            None => Err(ApiError::auth()),
        }
    }

    /// The MLflow client (its readiness probe shares it).
    pub fn mlflow(&self) -> Mlflow {
        self.mlflow.clone()
    }

    /// The model from MLflow, reused for `api.mlflow.cache_secs`.
    async fn model(&self, model_id: &str) -> Result<Option<Model>, ApiError> {
        if let Some((at, m)) = self
            .models
            .lock()
            .expect("never poisoned")
            .get(model_id)
            .cloned()
        {
            if at.elapsed() < Duration::from_secs(self.settings.api.mlflow.cache_secs) {
                return Ok(m);
            }
        }
        let m = self
            .mlflow
            .model(model_id)
            .await
            .map_err(|e| ApiError::upstream("the model registry (MLflow)", e))?;
        let mut cache = self.models.lock().expect("never poisoned");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(model_id.to_owned(), (Instant::now(), m.clone()));
        Ok(m)
    }
}

/// The API router: deployments, status, OpenAPI, plus the ops routes.
pub fn router(state: Arc<ApiState>, ops: Arc<OpsState>) -> Router {
    let s = &state.settings.api;
    let cors = if s.cors_origins.is_empty() {
        CorsLayer::new()
    } else {
        let origins: Vec<HeaderValue> = s
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-api-key"),
            ])
            .max_age(Duration::from_secs(600))
    };
    let request_id = HeaderName::from_static("x-request-id");
    let security = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ),
        (
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=63072000; includeSubDomains",
        ),
    ];
    let mut api = Router::new()
        .route(
            "/api/deployments",
            post(create).layer(axum::extract::DefaultBodyLimit::max(s.max_body_bytes)),
        )
        .route("/api/deployments/{id}/status", get(status))
        .route("/api/openapi.json", get(openapi_json))
        .with_state(state.clone())
        .merge(crate::ops::router(ops))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
        });
    for (name, value) in security {
        api = api.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ));
    }
    api.layer(axum::middleware::from_fn(record_request))
        .layer(cors)
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
}

/// Records each request's latency by route and status (`hokusai_api_request_duration_seconds`).
async fn record_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let r = next.run(req).await;
    metrics::histogram!(
        crate::telemetry::names::API_DURATION,
        "route" => route,
        "method" => method,
        "status" => r.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    r
}

/// Runs the API until `shutdown`, refreshing estimates in the background.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    ops: Arc<OpsState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    {
        let (state, stop) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => state.refresh_estimates().await,
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let app = router(state, ops);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds the configured address; port 0 picks a free port.
pub async fn bind(settings: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
    crate::ops::listen(&settings.api.bind, settings.api.port, "the API").await
}

/// Runs a handler under `api.request_timeout_ms`.
async fn bounded<F>(state: &ApiState, fut: F) -> Response
where
    F: std::future::Future<Output = Result<Response, ApiError>>,
{
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::timeout().into_response(),
    }
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
        (status = 401, description = "AUTH_FAILED", body = ErrorResponse),
        (status = 403, description = "AUTH_FAILED: not the model's owner or contributor", body = ErrorResponse),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorResponse),
        (status = 409, description = "TOKEN_EXISTS or IDEMPOTENCY_CONFLICT", body = ErrorResponse),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorResponse),
        (status = 422, description = "MODEL_NOT_VALIDATED", body = ErrorResponse),
        (status = 429, description = "RATE_LIMIT_EXCEEDED", body = ErrorResponse),
        (status = 503, description = "DEPLOYMENTS_PAUSED, CIRCUIT_BREAKER_OPEN, INSUFFICIENT_GAS, UPSTREAM_UNAVAILABLE or TIMEOUT", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
async fn create(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // Over `api.max_body_bytes` the body extractor stops reading: answer in our format.
    let Ok(body) = body else {
        return too_large(&state).into_response();
    };
    create_inner(&state, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
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
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    if body.len() > state.settings.api.max_body_bytes {
        return Err(too_large(state));
    }
    let req = parse_request(body);
    // Authenticate first: an anonymous caller learns nothing about the body.
    let body_token = req.as_ref().ok().and_then(|r| r.auth_token.as_deref());
    let caller = state.caller(headers, body_token)?;
    let req = req?;
    let request = Checked::from(req, &caller)?;

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
            Some(state.key("idempotency", &format!("{}:{k}", caller.user_id)))
        }
    };
    let acquired = Arc::new(Acquired {
        deployment_id: uuid::Uuid::new_v4().to_string(),
        user_id: caller.user_id.clone(),
        model_id: request.model_id.clone(),
        idempotency_key: idem,
        key: AtomicBool::new(false),
        quota: AtomicBool::new(false),
        claim: AtomicBool::new(false),
        commit: AtomicBool::new(false),
    });
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let result = tokio::time::timeout(limit, create_checked(state, &caller, &request, &acquired))
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
    /// The Idempotency-Key was claimed for this deployment.
    key: AtomicBool,
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
        [&self.key, &self.quota, &self.claim, &self.commit]
            .into_iter()
            .any(Self::has)
    }

    /// Gives back what the refused request took: its Idempotency-Key (so the request can be
    /// retried), its quota slot (the quota counts deployments), its claim on the model. Keys and
    /// claims are deleted only while they still hold this deployment's id.
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
        if let (true, Some(key)) = (Self::has(&self.key), &self.idempotency_key) {
            if let Err(e) = queue::delete_if_holds(&state.redis, key, id).await {
                warn!(error = %e, "could not forget an Idempotency-Key; retries are refused until it expires");
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
        .map_err(|e| ApiError::upstream("redis", e))?;
    match (rec.get("response"), rec.get("model_id")) {
        (Some(r), Some(m)) if m == model_id => {
            let body: DeployTokenResponse =
                serde_json::from_str(r).map_err(|e| ApiError::upstream("redis", e))?;
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
    token_symbol: String,
}

impl Checked {
    fn from(r: DeployTokenRequest, caller: &Caller) -> Result<Checked, ApiError> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !id_ok(&r.model_id) {
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
        if let Some(a) = caller.address {
            if a != user_address {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "AUTH_FAILED",
                    "user_address is not the address your token was issued for",
                ));
            }
        }
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
                s.clone()
            }
            None => symbol_for(&r.model_id),
        };
        Ok(Checked {
            model_id: r.model_id,
            user_address,
            token_name: r.token_name,
            token_symbol,
        })
    }
}

/// Seed 000's auto-generated symbol: `HK-` and the model id's letters and digits (8 at most).
fn symbol_for(model_id: &str) -> String {
    let core: String = model_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_uppercase();
    if core.is_empty() {
        "HK-MODEL".into()
    } else {
        format!("HK-{core}")
    }
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
    caller: &Caller,
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
            .map_err(|e| ApiError::upstream("redis", e))?;
        if let Some(earlier) = claimed {
            // Another request's key: not ours to give back.
            Acquired::clear(&acquired.key);
            return replay(state, &earlier, &req.model_id).await;
        }
    }
    let paused: i64 = state
        .redis
        .exists(queue::pause_key(&state.prefix))
        .await
        .map_err(|e| ApiError::upstream("redis", e))?;
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
        .admit(&caller.user_id, caller.tier.as_deref(), deployment_id)
        .await
        .map_err(|e| ApiError::upstream("redis", e))?;
    let (limit, remaining) = match decision {
        Decision::Admitted {
            limit_hour,
            remaining_hour,
            ..
        } => (limit_hour, remaining_hour),
        Decision::Refused {
            window,
            limit,
            retry_after_secs,
        } => {
            // Nothing was recorded.
            Acquired::clear(&acquired.quota);
            let (status, code, what) = match window {
                Window::UserHour => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED", format!("at most {limit} deployments per hour")),
                Window::UserDay => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED", format!("at most {limit} deployments per day")),
                Window::Global => (StatusCode::SERVICE_UNAVAILABLE, "CIRCUIT_BREAKER_OPEN", format!("the service accepts at most {limit} deployments per hour from everyone together")),
            };
            let mut e = ApiError::new(
                status,
                code,
                format!("{what}; retry in {retry_after_secs} s"),
            )
            .details(json!({ "retry_after_secs": retry_after_secs, "limit": limit }));
            e.headers = vec![
                (header::RETRY_AFTER, retry_after_secs.to_string()),
                (
                    HeaderName::from_static("x-ratelimit-limit"),
                    limit.to_string(),
                ),
                (HeaderName::from_static("x-ratelimit-remaining"), "0".into()),
                (
                    HeaderName::from_static("x-ratelimit-reset"),
                    retry_after_secs.to_string(),
                ),
            ];
            return Err(e);
        }
    };
    let body = queue_deployment(state, caller, req, acquired).await?;
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    Ok(r)
}

async fn queue_deployment(
    state: &ApiState,
    caller: &Caller,
    req: &Checked,
    acquired: &Acquired,
) -> Result<DeployTokenResponse, ApiError> {
    let deployment_id = acquired.deployment_id.as_str();
    let model = state.model(&req.model_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            format!("no model `{}` in the model registry", req.model_id),
        )
    })?;
    let owns = caller.service
        || model.owner.as_deref() == Some(caller.user_id.as_str())
        || model.contributors.contains(&req.user_address);
    if !owns {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "AUTH_FAILED",
            "you are neither the owner nor a contributor of this model",
        ));
    }
    if !model.validated {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "MODEL_NOT_VALIDATED",
            format!("model `{}` has not been validated yet", req.model_id),
        ));
    }
    let Some((metric, baseline, current)) = model.metric.clone() else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "MODEL_NOT_VALIDATED",
            format!(
                "model `{}` has no validation metric with its baseline on its run",
                req.model_id
            ),
        ));
    };

    // No token yet: not in our journal, not in the registry, not being deployed.
    let registry = ModelRegistry::new(state.registry, &state.provider);
    let get_token = registry.getToken(req.model_id.clone());
    let (entry, registered) = tokio::join!(state.journal.load(&req.model_id), get_token.call());
    let entry = entry.map_err(|e| ApiError::upstream("redis", e))?;
    if let (Some(_), Some(token)) = (&entry.event, entry.token_address) {
        return Err(token_exists(&req.model_id, Some(token)));
    }
    let registered = registered.map_err(|e| ApiError::upstream("the chain's RPC", e))?;
    if registered != Address::ZERO {
        return Err(token_exists(&req.model_id, Some(registered)));
    }
    Acquired::mark(&acquired.claim);
    claim_model(state, &req.model_id, deployment_id).await?;

    let est = state.estimates.read().expect("never poisoned").clone();
    // The fees a worker would sign now, under the same cap: above it, nothing would be sent.
    let max_fee = match est
        .market
        .map(|m| m.fees(state.settings.chain.fee_cap_wei()))
    {
        Some(Ok(fees)) => fees.max_fee_per_gas(),
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "INSUFFICIENT_GAS",
                format!("{e}; try again later"),
            ));
        }
        None => 0,
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
        "token_symbol": req.token_symbol,
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

    let per_model_gas = est.deploy_gas + REGISTER_GAS;
    let body = DeployTokenResponse {
        success: true,
        deployment_id: deployment_id.to_owned(),
        model_id: req.model_id.clone(),
        estimated_confirmation_time: (est.block_time_secs * 2.0).ceil().max(1.0) as u64,
        estimated_gas_cost: (u128::from(per_model_gas) * max_fee).to_string(),
        status_url: format!(
            "{}/api/deployments/{deployment_id}/status",
            state.settings.api.public_url.trim_end_matches('/')
        ),
    };
    let record = vec![
        ("deployment_id", deployment_id.to_owned()),
        ("model_id", req.model_id.clone()),
        ("user_id", caller.user_id.clone()),
        ("user_address", req.user_address.to_checksum(None)),
        ("token_name", parsed.model.token_name.clone()),
        ("token_symbol", parsed.model.chain_symbol.clone()),
        ("created_at", now.clone()),
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
    queued.map_err(|e| ApiError::upstream("redis", e))?;
    info!(deployment_id, model_id = %req.model_id, user = %caller.user_id, "deployment queued");
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
        .map_err(|e| ApiError::upstream("redis", e))?;
    let Some(earlier) = earlier else {
        return Ok(());
    };
    let failed: i64 = state
        .redis
        .exists(queue::outcome_key(&state.prefix, &earlier))
        .await
        .map_err(|e| ApiError::upstream("redis", e))?;
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
        .map_err(|e| ApiError::upstream("redis", e))?;
    if took == 1 {
        Ok(())
    } else {
        Err(token_exists(model_id, None))
    }
}

#[utoipa::path(
    get,
    path = "/api/deployments/{id}/status",
    params(("id" = String, Path, description = "The deployment_id of the POST's answer")),
    responses(
        (status = 200, description = "The deployment's progress", body = DeploymentStatusResponse),
        (status = 401, description = "AUTH_FAILED", body = ErrorResponse),
        (status = 404, description = "DEPLOYMENT_NOT_FOUND (also for another user's deployment)", body = ErrorResponse),
        (status = 503, description = "UPSTREAM_UNAVAILABLE or TIMEOUT", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
async fn status(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    bounded(&state, status_inner(&state, &id, &headers)).await
}

async fn status_inner(
    state: &ApiState,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.caller(headers, None)?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "DEPLOYMENT_NOT_FOUND",
            format!(
                "no deployment `{}`",
                id.chars().take(64).collect::<String>()
            ),
        )
    };
    if id.len() > 64 {
        return Err(not_found());
    }
    let rec: HashMap<String, String> = state
        .redis
        .hgetall(state.key("deployment", id))
        .await
        .map_err(|e| ApiError::upstream("redis", e))?;
    let Some(model_id) = rec.get("model_id").cloned() else {
        return Err(not_found());
    };
    if !caller.service && rec.get("user_id") != Some(&caller.user_id) {
        return Err(not_found());
    }
    let created_at = rec.get("created_at").cloned().unwrap_or_default();
    let mut s = DeploymentStatusResponse {
        deployment_id: id.to_owned(),
        status: "pending".into(),
        model_id: model_id.clone(),
        token_address: None,
        token_name: rec.get("token_name").cloned().unwrap_or_default(),
        token_symbol: rec.get("token_symbol").cloned().unwrap_or_default(),
        deployment_tx_hash: None,
        registry_tx_hash: None,
        block_number: None,
        explorer_url: None,
        gas_used: None,
        gas_price: None,
        total_cost: None,
        error: None,
        updated_at: created_at.clone(),
        created_at,
    };
    let (entry, outcome) = tokio::join!(
        state.journal.load(&model_id),
        state
            .redis
            .get::<Option<String>, _>(queue::outcome_key(&state.prefix, id))
    );
    let entry = entry.map_err(|e| ApiError::upstream("redis", e))?;
    let outcome = outcome.map_err(|e| ApiError::upstream("redis", e))?;
    let ours = entry.message_id.as_deref() == Some(id);
    let explorer = |path: String| {
        (!state.network.explorer.is_empty())
            .then(|| format!("{}/{path}", state.network.explorer.trim_end_matches('/')))
    };
    if let (true, Some(event)) = (ours, &entry.event) {
        let e: TokenDeployed =
            serde_json::from_str(event).map_err(|e| ApiError::upstream("the journal", e))?;
        let num = |v: &str| v.parse::<u128>().unwrap_or(0);
        let cost = num(&e.gas_used) * num(&e.gas_price)
            + num(&e.registry_gas_used) * num(&e.registry_gas_price);
        s.status = "completed".into();
        s.explorer_url = explorer(format!("tx/{}", e.transaction_hash));
        s.token_address = Some(e.token_address);
        s.deployment_tx_hash = Some(e.transaction_hash);
        s.registry_tx_hash = Some(e.registry_transaction_hash).filter(|h| !h.is_empty());
        s.block_number = Some(e.block_number);
        s.gas_used = Some((num(&e.gas_used) + num(&e.registry_gas_used)).to_string());
        s.gas_price = Some(e.gas_price);
        s.total_cost = Some(cost.to_string());
        s.updated_at = e.deployment_timestamp;
    } else if let Some(o) = outcome {
        let f: message::DeploymentFailed =
            serde_json::from_str(&o).map_err(|e| ApiError::upstream("redis", e))?;
        s.status = "failed".into();
        s.updated_at = f.failed_at;
        s.error = Some(StatusError {
            code: f.error_code,
            message: f.error_message,
            transaction_hash: ours
                .then(|| entry.deploy.as_ref().map(|t| t.hash.to_string()))
                .flatten(),
        });
    } else if ours {
        if let Some(d) = &entry.deploy {
            s.status = "deploying".into();
            s.deployment_tx_hash = Some(d.hash.to_string());
            s.token_address = entry.token_address.map(|a| a.to_checksum(None));
            s.explorer_url = explorer(format!("tx/{}", d.hash));
        }
        if let Some(r) = &entry.register {
            s.status = "registering".into();
            s.registry_tx_hash = Some(r.hash.to_string());
        }
    }
    Ok((StatusCode::OK, Json(s)).into_response())
}

async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hokusai-deployer API",
        description = "Deploys an ERC-20 token for a validated model (seed 000). See docs/api.md.",
        version = "1.0.0"
    ),
    paths(create, status),
    components(schemas(
        DeployTokenRequest,
        DeployTokenResponse,
        DeploymentStatusResponse,
        StatusError,
        ErrorResponse,
        ErrorBody
    )),
    modifiers(&Security)
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        c.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The OpenAPI 3 document, pretty-printed (`docs/openapi.json` holds the same text).
pub fn openapi_document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the document serializes")
        + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_generated_from_the_model_id() {
        assert_eq!(symbol_for("model_7"), "HK-MODEL7");
        assert_eq!(symbol_for("a-very-long-model-name"), "HK-AVERYLON");
        assert_eq!(symbol_for("___"), "HK-MODEL");
    }

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

    /// `docs/openapi.json` is the document the code generates.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let committed = include_str!("../docs/openapi.json");
        let generated = openapi_document();
        if committed != generated {
            if std::env::var("UPDATE_OPENAPI").is_ok() {
                std::fs::write(
                    concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"),
                    &generated,
                )
                .unwrap();
            }
            panic!("docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test --lib openapi` and commit it");
        }
    }
}
