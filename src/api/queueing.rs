//! Queueing an accepted deployment order, shared by `POST /api/deployments` and the platform's
//! webhook: the pause flag, a slot of the quota, the model's checks (MLflow, the registry, the
//! symbol) and the `model_ready_to_deploy` message with its deployment record.

use alloy::primitives::Address;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fred::prelude::*;
use serde_json::json;
use tracing::info;

use super::authorization::Authenticated;
use super::errors::ApiError;
use super::limits::{Decision, Window};
use super::{quote, symbol, ApiState};
use crate::chain::ModelRegistry;
use crate::message;
use crate::mlflow::Model;
use crate::queue;

use super::deployment::{Acquired, Checked, DeployTokenResponse};

/// Which rolling windows a deployment counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Quota {
    /// The caller's hour and day, and the global hour (the circuit breaker).
    Caller,
    /// The global hour alone: the ML platform's webhook has no per-user quota.
    GlobalOnly,
}

/// The steps every deployment order shares once its caller is known: the pause flag, a slot
/// of the quota, then the model's checks and the queued message ([`queue_deployment`]).
/// Answers `202` with the deployment.
pub(super) async fn admit_and_queue(
    state: &ApiState,
    who: &Authenticated,
    req: &Checked,
    acquired: &Acquired,
    quota: Quota,
) -> Result<Response, ApiError> {
    let deployment_id = acquired.deployment_id.as_str();
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
    let decision = match quota {
        Quota::Caller => {
            state
                .limiter
                .admit(
                    &who.caller.user_id,
                    who.caller.tier.as_deref(),
                    deployment_id,
                )
                .await
        }
        Quota::GlobalOnly => state.limiter.admit_global(deployment_id).await,
    }
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
/// (owner, or a proven contributor; a service caller orders without an address), it is
/// validated with a metric, and it has no token yet (in our journal or the registry).
pub(super) async fn deployable(
    state: &ApiState,
    who: &Authenticated,
    model_id: &str,
    user_address: Option<Address>,
) -> Result<Deployable, ApiError> {
    let model = state.model(model_id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            format!("no model `{model_id}` in the model registry"),
        )
    })?;
    match user_address {
        Some(a) => who.may_deploy(a, &model)?,
        None if who.caller.service => {}
        None => {
            return Err(ApiError::forbidden(
                "only a service may deploy without naming the user's address",
            ))
        }
    }
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
        "timestamp": now,
        "message_version": "1.0",
    });
    if let Some(a) = req.user_address {
        payload["contributor_address"] = a.to_checksum(None).into();
    }
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
    let mut record = vec![
        ("deployment_id", deployment_id.to_owned()),
        ("model_id", req.model_id.clone()),
        ("user_id", who.caller.user_id.clone()),
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
    if let Some(a) = req.user_address {
        record.push(("user_address", a.to_checksum(None)));
    }
    if let Some(u) = &req.callback_url {
        record.push(("callback_url", u.clone()));
    }
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
