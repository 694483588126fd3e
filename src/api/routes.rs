//! The router: routes, the middleware every answer passes (request id, security headers,
//! CORS, the client's address, latency by route), and the OpenAPI document generated from the
//! handlers (utoipa; `docs/openapi.json` holds the same text).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi;

use super::deployment::{self, DeployTokenRequest, DeployTokenResponse};
use super::errors::{ApiError, ErrorBody, ErrorResponse};
use super::events;
use super::quote::{self, QuoteResponse};
use super::status::{self, DeploymentStatusResponse, StatusError};
use super::webhooks::{self, ModelRegisteredEvent, RegisteredModel};
use super::{authorization, ApiState};
use crate::ops::OpsState;

/// The API router: deployments, quotes, status and its live stream, the platform's webhook,
/// OpenAPI, and the public `/health` and `/health/ready` of the ops state.
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
                // EventSource's reconnections (the live status stream).
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("x-siwe-message"),
                HeaderName::from_static("x-siwe-signature"),
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
            post(deployment::create).layer(axum::extract::DefaultBodyLimit::max(s.max_body_bytes)),
        )
        .route("/api/deployments/quote", get(quote::quote))
        .route("/api/deployments/{id}/status", get(status::status))
        // A stream: the handler bounds its opening by `api.request_timeout_ms` (there is no
        // timeout layer) and its life by `api.events_max_secs`.
        .route(events::ROUTE, get(events::events))
        .route(
            webhooks::ROUTE,
            post(webhooks::model_registered)
                .layer(axum::extract::DefaultBodyLimit::max(s.max_body_bytes)),
        )
        .route("/api/openapi.json", get(openapi_json))
        .with_state(state.clone())
        .merge(crate::ops::public_router(ops))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint")
        });
    for (name, value) in security {
        api = api.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ));
    }
    api.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        authorization::with_client_ip,
    ))
    .layer(axum::middleware::from_fn(record_request))
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
    paths(
        deployment::create,
        quote::quote,
        status::status,
        events::events,
        webhooks::model_registered
    ),
    components(schemas(
        DeployTokenRequest,
        DeployTokenResponse,
        ModelRegisteredEvent,
        RegisteredModel,
        QuoteResponse,
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

    /// `docs/openapi.json` is the document the code generates.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let committed = include_str!("../../docs/openapi.json");
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
