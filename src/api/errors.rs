//! Error answers: seed 000's `{success: false, error: {code, message, details}}` under an HTTP
//! status. Every error answer is counted by code (`hokusai_api_errors_total{code}`), and every
//! refusal (401, 403, 409, 413, 422, 429) is one audit entry naming the code, the caller, the
//! client address and the model ([`Request::finish`]).

use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use tracing::warn;
use utoipa::ToSchema;

use super::ApiState;
use crate::telemetry::names;

/// Every code the API answers with: the label set of `hokusai_api_errors_total`.
pub const CODES: [&str; 15] = [
    "AUTH_FAILED",
    "VALIDATION_ERROR",
    "MODEL_NOT_FOUND",
    "MODEL_NOT_VALIDATED",
    "TOKEN_EXISTS",
    "INSUFFICIENT_GAS",
    "RATE_LIMIT_EXCEEDED",
    "DEPLOYMENTS_PAUSED",
    "CIRCUIT_BREAKER_OPEN",
    "IDEMPOTENCY_CONFLICT",
    "DEPLOYMENT_NOT_FOUND",
    "PAYLOAD_TOO_LARGE",
    "UPSTREAM_UNAVAILABLE",
    "TIMEOUT",
    "NOT_FOUND",
];

/// Statuses that are refusals of the caller (audited), as opposed to our own trouble.
const REFUSALS: [u16; 6] = [401, 403, 409, 413, 422, 429];

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
    /// `PAYLOAD_TOO_LARGE`, `UPSTREAM_UNAVAILABLE`, `TIMEOUT`, `NOT_FOUND`.
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// An error answer in the making.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) details: Option<serde_json::Value>,
    pub(super) headers: Vec<(HeaderName, String)>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(CODES.contains(&code), "{code} is not in CODES");
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            headers: vec![],
        }
    }
    pub(super) fn details(mut self, d: serde_json::Value) -> Self {
        self.details = Some(d);
        self
    }
    pub(super) fn auth() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTH_FAILED",
            "authentication failed: send a valid JWT as `Authorization: Bearer <token>` (or `auth_token`), or an `X-API-Key`",
        )
    }
    pub(super) fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "AUTH_FAILED", message)
    }
    pub(super) fn invalid(field: &str, rule: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", message)
            .details(json!({ "field": field, "rule": rule }))
    }
    pub(super) fn upstream(what: &str, e: impl std::fmt::Display) -> Self {
        warn!(error = %e, upstream = what, "upstream failed during a request");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UPSTREAM_UNAVAILABLE",
            format!("{what} is not answering; try again shortly"),
        )
    }
    pub(super) fn redis(e: impl std::fmt::Display) -> Self {
        Self::upstream("redis", e)
    }
    pub(super) fn timeout() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TIMEOUT",
            "the request took too long; it may be retried with the same Idempotency-Key",
        )
    }
    /// 429 with `Retry-After` (and the rate-limit headers) for `limit` per window.
    pub(super) fn throttled(
        status: StatusCode,
        code: &'static str,
        what: String,
        limit: u32,
        retry_after_secs: u64,
    ) -> Self {
        let mut e = ApiError::new(
            status,
            code,
            format!("{what}; retry in {retry_after_secs} s"),
        )
        .details(json!({ "retry_after_secs": retry_after_secs, "limit": limit }));
        e.headers = vec![
            (
                axum::http::header::RETRY_AFTER,
                retry_after_secs.to_string(),
            ),
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
        e
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

/// What one request has learnt about who asks and for what, for the audit of its refusal.
#[derive(Debug, Default)]
pub struct Request {
    /// The route, as matched (`/api/deployments`).
    pub route: &'static str,
    /// The client's address (see `authorization::client_ip`).
    pub client: String,
    /// `sub`, or `service:<key id>`, once authenticated.
    pub caller: Option<String>,
    pub model_id: Option<String>,
}

impl Request {
    pub fn new(route: &'static str, client: String) -> Request {
        Request {
            route,
            client,
            ..Default::default()
        }
    }

    /// The answer: an error is counted by code and, when it refuses the caller, audited (in a
    /// task of its own, so the answer does not wait for the audit stream).
    pub fn finish(self, state: &Arc<ApiState>, result: Result<Response, ApiError>) -> Response {
        let e = match result {
            Ok(r) => return r,
            Err(e) => e,
        };
        metrics::counter!(names::API_ERRORS, "code" => e.code).increment(1);
        if REFUSALS.contains(&e.status.as_u16()) {
            let audit = state.audit.clone();
            let mut fields = crate::audit::Fields::new();
            fields.insert("code", e.code.to_owned());
            fields.insert("status", e.status.as_u16().to_string());
            fields.insert("route", self.route.to_owned());
            fields.insert("client", self.client);
            fields.insert("caller", self.caller.unwrap_or_default());
            fields.insert("model_id", self.model_id.unwrap_or_default());
            tokio::spawn(async move { audit.record("api_refused", fields).await });
        }
        e.into_response()
    }
}
