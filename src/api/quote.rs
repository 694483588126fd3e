//! `GET /api/deployments/quote?model_id=…`: what a deployment would cost, before the click
//! (seed 000: "Estimated gas costs shown before confirmation"). It runs the POST's
//! authentication and model checks (a SIWE proof is checked, its nonce looked at, not taken)
//! but takes no quota slot, no claim and no symbol, and queues nothing. Figures come from the
//! estimates refreshed in the background, so a quote never waits for the chain.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{utils::format_ether, Address, U256};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::authorization::{self, ClientIp};
use super::errors::{ApiError, ErrorResponse, Request};
use super::queueing::deployable;
use super::{symbol, ApiState};
use crate::chain::Market;
use crate::queue;

/// What a deployment would cost now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuoteResponse {
    pub success: bool,
    pub model_id: String,
    /// The symbol a deployment without `token_symbol` would get now.
    pub token_symbol: String,
    /// Gas of the one transaction that deploys and registers, with the configured margin.
    pub estimated_gas: String,
    /// Wei per gas: the most we would sign (2 x base fee + priority fee, under the cap).
    pub max_fee_per_gas: String,
    /// Wei per gas we expect to pay (base fee + priority fee).
    pub expected_fee_per_gas: String,
    /// Wei: `estimated_gas` x `max_fee_per_gas` (what the POST answers as
    /// `estimated_gas_cost`).
    pub max_cost_wei: String,
    pub max_cost_eth: String,
    /// Wei: `estimated_gas` x `expected_fee_per_gas`.
    pub expected_cost_wei: String,
    pub expected_cost_eth: String,
    /// Seconds until the deployment is expected on chain.
    pub estimated_confirmation_time: u64,
}

/// Gas and fees for one deployment at the current market.
#[derive(Debug, Clone, Copy)]
pub(super) struct Costs {
    pub gas: u64,
    pub max_fee: u128,
    pub expected_fee: u128,
    pub confirmation_secs: u64,
}

impl Costs {
    pub fn max_cost_wei(&self) -> u128 {
        u128::from(self.gas) * self.max_fee
    }
    pub fn expected_cost_wei(&self) -> u128 {
        u128::from(self.gas) * self.expected_fee
    }
}

/// The costs of one deployment from the latest estimates: `INSUFFICIENT_GAS` when the fees
/// are above `chain.max_fee_per_gas_gwei` (a worker would send nothing).
pub(super) fn costs(state: &ApiState) -> Result<Costs, ApiError> {
    let est = state.estimates.read().expect("never poisoned").clone();
    let (max_fee, expected_fee) = match est.market {
        None => (0, 0),
        Some(m) => match m.fees(state.settings.chain.fee_cap_wei()) {
            Ok(fees) => (
                fees.max_fee_per_gas(),
                match m {
                    Market::Eip1559 { base, priority } => base + priority,
                    Market::Legacy { gas_price } => gas_price,
                },
            ),
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "INSUFFICIENT_GAS",
                    format!("{e}; try again later"),
                ));
            }
        },
    };
    Ok(Costs {
        gas: crate::chain::with_margin(
            crate::chain::contracts::DEPLOY_TOKEN_GAS,
            state.settings.chain.gas_limit_margin_percent,
        ),
        max_fee,
        expected_fee: expected_fee.min(max_fee),
        // The block that takes the transaction, then each confirmation.
        confirmation_secs: (est.block_time_secs * (1 + state.confirmations) as f64)
            .ceil()
            .max(1.0) as u64,
    })
}

fn eth(wei: u128) -> String {
    format_ether(U256::from(wei))
}

#[utoipa::path(
    get,
    path = "/api/deployments/quote",
    params(
        ("model_id" = String, Query, description = "The model to deploy"),
        ("user_address" = Option<String>, Query, description = "The deploying user's address, as the POST would name it; default: the address the caller proved"),
        ("X-SIWE-Message" = Option<String>, Header, description = "A SIWE message proving user_address, base64 (its nonce is not taken)"),
        ("X-SIWE-Signature" = Option<String>, Header, description = "The SIWE message's signature, hex"),
    ),
    responses(
        (status = 200, description = "What a deployment would cost now", body = QuoteResponse),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorResponse),
        (status = 401, description = "AUTH_FAILED", body = ErrorResponse),
        (status = 403, description = "AUTH_FAILED: not the model's owner or a proven contributor", body = ErrorResponse),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorResponse),
        (status = 409, description = "TOKEN_EXISTS", body = ErrorResponse),
        (status = 422, description = "MODEL_NOT_VALIDATED", body = ErrorResponse),
        (status = 429, description = "RATE_LIMIT_EXCEEDED: status and quote requests per user, or failed authentications per client address", body = ErrorResponse),
        (status = 503, description = "INSUFFICIENT_GAS, UPSTREAM_UNAVAILABLE or TIMEOUT", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn quote(
    State(state): State<Arc<ApiState>>,
    Extension(client): Extension<ClientIp>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut req = Request::new("/api/deployments/quote", client.label());
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let result = tokio::time::timeout(
        limit,
        quote_inner(&state, &mut req, query.as_deref(), &headers),
    )
    .await
    .unwrap_or_else(|_| Err(ApiError::timeout()));
    req.finish(&state, result)
}

async fn quote_inner(
    state: &ApiState,
    log: &mut Request,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let proof = authorization::proof(headers, None)?;
    let who = state.authenticate(log, headers, None, proof).await?;
    state.admit_read(&who.caller.user_id).await?;
    let (mut model_id, mut user_address) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "model_id" => model_id = Some(v.into_owned()),
            "user_address" => user_address = Some(v.into_owned()),
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown_field",
                    format!("unknown query parameter `{other}`"),
                ))
            }
        }
    }
    let model_id = model_id
        .ok_or_else(|| ApiError::invalid("model_id", "required", "the query needs a model_id"))?;
    if !super::deployment::model_id_ok(&model_id) {
        return Err(ApiError::invalid(
            "model_id",
            "format",
            "model_id must be 1 to 128 letters, digits, `-`, `_` or `.`",
        ));
    }
    log.model_id = Some(model_id.clone());
    let user_address = match user_address {
        Some(a) => {
            let a: Address = a.trim().parse().map_err(|_| {
                ApiError::invalid(
                    "user_address",
                    "address",
                    "user_address must be a 0x-prefixed 20-byte hex address",
                )
            })?;
            who.may_name(a)?;
            a
        }
        // The address the caller proved; none proven leaves only the owner's right.
        None => who
            .siwe
            .as_ref()
            .map(|p| p.address)
            .or(who.caller.address)
            .unwrap_or(Address::ZERO),
    };
    if let Some(p) = &who.siwe {
        state.nonce_unused(p).await?;
    }
    deployable(state, &who, &model_id, Some(user_address)).await?;
    let c = costs(state)?;
    let token_symbol = symbol::generated(
        &state.redis,
        &queue::symbols_key(&state.prefix),
        &model_id,
        false,
    )
    .await
    .map_err(ApiError::redis)?
    .unwrap_or_default();
    let body = QuoteResponse {
        success: true,
        model_id,
        token_symbol,
        estimated_gas: c.gas.to_string(),
        max_fee_per_gas: c.max_fee.to_string(),
        expected_fee_per_gas: c.expected_fee.to_string(),
        max_cost_wei: c.max_cost_wei().to_string(),
        max_cost_eth: eth(c.max_cost_wei()),
        expected_cost_wei: c.expected_cost_wei().to_string(),
        expected_cost_eth: eth(c.expected_cost_wei()),
        estimated_confirmation_time: c.confirmation_secs,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}
