//! `GET /api/deployments/{id}/status`: a deployment's progress, read from its record (written
//! by the POST), the model's journal (written by the worker) and the failure outcome. Only the
//! user who asked (or a service key) sees it; reads are limited per user. `updated_at` moves
//! at every transition: each step's time comes from the journal in milliseconds and never
//! goes back (see [`progress`]). The live stream (`/events`, [`super::events`]) opens through
//! the same [`authorized`] and re-reads through [`current`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, SecondsFormat, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::authorization::ClientIp;
use super::errors::{ApiError, ErrorResponse, Request};
use super::ApiState;
use crate::journal::Entry;
use crate::message::{self, TokenDeployed};
use crate::queue;

/// Seed 000's status answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeploymentStatusResponse {
    pub deployment_id: String,
    /// `pending`, `deploying`, `completed` or `failed` (`registering` is seed 000's, but one
    /// transaction deploys and registers, so it is never reported).
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
    /// Gas of the deployment (which registers too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<String>,
    /// The deployment's effective gas price (wei).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gas_price: Option<String>,
    /// Wei paid for the transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_cost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<StatusError>,
    pub created_at: String,
    /// When the deployment last changed status (RFC 3339, milliseconds); later at every
    /// transition.
    pub updated_at: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_hash: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/deployments/{id}/status",
    params(("id" = String, Path, description = "The deployment_id of the POST's answer")),
    responses(
        (status = 200, description = "The deployment's progress", body = DeploymentStatusResponse),
        (status = 401, description = "AUTH_FAILED", body = ErrorResponse),
        (status = 404, description = "DEPLOYMENT_NOT_FOUND (also for another user's deployment)", body = ErrorResponse),
        (status = 429, description = "RATE_LIMIT_EXCEEDED: status and quote requests per user, or failed authentications per client address", body = ErrorResponse),
        (status = 503, description = "UPSTREAM_UNAVAILABLE or TIMEOUT", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn status(
    State(state): State<Arc<ApiState>>,
    Extension(client): Extension<ClientIp>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut req = Request::new("/api/deployments/{id}/status", client.label());
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let result = tokio::time::timeout(limit, status_inner(&state, &mut req, &id, &headers))
        .await
        .unwrap_or_else(|_| Err(ApiError::timeout()));
    req.finish(&state, result)
}

async fn status_inner(
    state: &ApiState,
    log: &mut Request,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (s, _) = authorized(state, log, id, headers).await?;
    Ok((StatusCode::OK, Json(s)).into_response())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "DEPLOYMENT_NOT_FOUND",
        format!(
            "no deployment `{}`",
            id.chars().take(64).collect::<String>()
        ),
    )
}

/// What the status endpoint and the live stream (`/events`) share: authenticates the caller,
/// admits the read (`api.limits.status_per_minute`) and reads the caller's deployment: another
/// user's is `DEPLOYMENT_NOT_FOUND`, as an unknown one is. Also gives the credentials' expiry
/// (a JWT's `exp` in unix seconds, 0 for a service key), so a stream ends with its token.
pub(super) async fn authorized(
    state: &ApiState,
    log: &mut Request,
    id: &str,
    headers: &HeaderMap,
) -> Result<(DeploymentStatusResponse, u64), ApiError> {
    let who = state.authenticate(log, headers, None, None).await?;
    state.admit_read(&who.caller.user_id).await?;
    if id.len() > 64 {
        return Err(not_found(id));
    }
    let rec = record(state, id).await?;
    let Some(model_id) = rec.get("model_id").cloned() else {
        return Err(not_found(id));
    };
    log.model_id = Some(model_id);
    if !who.caller.service && rec.get("user_id") != Some(&who.caller.user_id) {
        return Err(not_found(id));
    }
    Ok((read(state, id, &rec).await?, who.caller.expires_at))
}

/// Deployment `id`'s status as it is now, without asking who wants it (the stream asked when
/// it opened); `None` once its record is gone (expired after `api.deployment_ttl_days`).
pub(super) async fn current(
    state: &ApiState,
    id: &str,
) -> Result<Option<DeploymentStatusResponse>, ApiError> {
    let rec = record(state, id).await?;
    if !rec.contains_key("model_id") {
        return Ok(None);
    }
    read(state, id, &rec).await.map(Some)
}

/// The deployment's record, written by the POST (empty when there is none).
async fn record(state: &ApiState, id: &str) -> Result<HashMap<String, String>, ApiError> {
    state
        .redis
        .hgetall(state.key("deployment", id))
        .await
        .map_err(ApiError::redis)
}

/// The status from the record, the model's journal and the failure outcome, read now.
async fn read(
    state: &ApiState,
    id: &str,
    rec: &HashMap<String, String>,
) -> Result<DeploymentStatusResponse, ApiError> {
    let model_id = rec.get("model_id").map(String::as_str).unwrap_or_default();
    let (entry, outcome) = tokio::join!(
        state.journal.load(model_id),
        state
            .redis
            .get::<Option<String>, _>(queue::outcome_key(&state.prefix, id))
    );
    let entry = entry.map_err(ApiError::redis)?;
    let outcome = outcome.map_err(ApiError::redis)?;
    progress(id, rec, &entry, outcome.as_deref(), &state.network.explorer)
        .map_err(|e| ApiError::upstream("the journal", e))
}

/// Parses an RFC 3339 time as the journal and events write it.
fn time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The status of deployment `id` from its record, the model's journal and its failure
/// outcome. `updated_at` is the current step's time, but at least a millisecond after the
/// step before it: times written in whole seconds (an event's, a failure's) would otherwise
/// seem to go back.
pub fn progress(
    id: &str,
    rec: &HashMap<String, String>,
    entry: &Entry,
    outcome: Option<&str>,
    explorer: &str,
) -> Result<DeploymentStatusResponse, serde_json::Error> {
    let created_at = rec.get("created_at").cloned().unwrap_or_default();
    let mut s = DeploymentStatusResponse {
        deployment_id: id.to_owned(),
        status: "pending".into(),
        model_id: rec.get("model_id").cloned().unwrap_or_default(),
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
    let ours = entry.message_id.as_deref() == Some(id);
    let link = |path: String| {
        (!explorer.is_empty()).then(|| format!("{}/{path}", explorer.trim_end_matches('/')))
    };
    // Each reached step's time, in order.
    let mut steps: Vec<Option<String>> = vec![Some(s.created_at.clone())];
    if ours {
        if let Some(d) = &entry.deploy {
            s.status = "deploying".into();
            s.deployment_tx_hash = Some(d.hash.to_string());
            // One transaction deploys and registers.
            s.registry_tx_hash = Some(d.hash.to_string());
            s.token_address = entry.token_address.map(|a| a.to_checksum(None));
            s.explorer_url = link(format!("tx/{}", d.hash));
            steps.push(entry.deploy_at.clone());
        }
    }
    if let (true, Some(event)) = (ours, &entry.event) {
        let e: TokenDeployed = serde_json::from_str(event)?;
        let num = |v: &str| v.parse::<u128>().unwrap_or(0);
        let cost = num(&e.gas_used) * num(&e.gas_price);
        s.status = "completed".into();
        s.explorer_url = link(format!("tx/{}", e.transaction_hash));
        s.token_address = Some(e.token_address);
        s.deployment_tx_hash = Some(e.transaction_hash);
        s.registry_tx_hash = Some(e.registry_transaction_hash).filter(|h| !h.is_empty());
        s.block_number = Some(e.block_number);
        s.gas_used = Some(e.gas_used.clone());
        s.gas_price = Some(e.gas_price);
        s.total_cost = Some(cost.to_string());
        steps.push(entry.event_at.clone().or(Some(e.deployment_timestamp)));
    } else if let Some(o) = outcome {
        let f: message::DeploymentFailed = serde_json::from_str(o)?;
        s.status = "failed".into();
        s.error = Some(StatusError {
            code: f.error_code,
            message: f.error_message,
            transaction_hash: ours
                .then(|| entry.deploy.as_ref().map(|t| t.hash.to_string()))
                .flatten(),
        });
        steps.push(Some(f.failed_at));
    }
    let mut last: Option<DateTime<Utc>> = None;
    for step in steps {
        let t = step.as_deref().and_then(time);
        last = match (last, t) {
            (Some(prev), Some(t)) => Some(t.max(prev + chrono::Duration::milliseconds(1))),
            (Some(prev), None) => Some(prev + chrono::Duration::milliseconds(1)),
            (None, t) => t,
        };
    }
    if let Some(t) = last {
        s.updated_at = t.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::TxRecord;

    fn tx(n: u8) -> TxRecord {
        TxRecord {
            signer: Default::default(),
            nonce: u64::from(n),
            hash: alloy::primitives::B256::repeat_byte(n),
            raw: Default::default(),
            replaced: vec![],
        }
    }

    /// Pending, deploying and the end (failed here): `updated_at` moves at each, even when the
    /// end's own time is written in whole seconds, earlier than the step before it in
    /// milliseconds.
    #[test]
    fn updated_at_moves_at_every_transition() {
        let rec: HashMap<String, String> = [
            ("model_id", "m"),
            ("created_at", "2026-12-02T05:00:01.100Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let mut entry = Entry::default();
        let seen = |entry: &Entry, outcome: Option<&str>| {
            let s = progress("d1", &rec, entry, outcome, "").unwrap();
            (s.status, s.updated_at)
        };
        let mut history = vec![seen(&entry, None)];
        entry.message_id = Some("d1".into());
        entry.deploy = Some(tx(1));
        entry.deploy_at = Some("2026-12-02T05:00:01.900Z".into());
        history.push(seen(&entry, None));
        let failed = serde_json::json!({
            "event_type": "token_deployment_failed", "message_id": "d1", "model_id": "m",
            "error_code": "DEPLOYMENT_FAILED", "error_message": "reverted", "attempts": 3,
            "failed_at": "2026-12-02T05:00:01Z", "message_version": "1.0",
        })
        .to_string();
        history.push(seen(&entry, Some(&failed)));
        let statuses: Vec<&str> = history.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(statuses, ["pending", "deploying", "failed"]);
        for pair in history.windows(2) {
            assert!(
                time(&pair[1].1) > time(&pair[0].1),
                "updated_at did not move: {history:?}"
            );
        }
        assert_eq!(history[0].1, "2026-12-02T05:00:01.100Z");
    }
}
