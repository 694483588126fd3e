//! The chain: contract bindings generated from `abi/`, a provider that fails over between RPC
//! URLs with a timeout on every request, and transactions signed before they are sent (by a
//! local key or AWS KMS) so that the journal can hold their exact bytes before the broadcast.
//!
//! - [`provider`]: the RPC transport (fallback over URLs, timeouts, latency by method).
//! - [`signer`]: deployer keys, local or in AWS KMS.
//! - [`fees`]: what the network asks per gas, fees for new and replacement transactions.
//! - [`transactions`]: [`Chain`], signing under the send lock, broadcast, waiting for
//!   receipts, replacement of stuck transactions.
//! - [`breaker`]: the circuit breaker that holds work back while no RPC URL answers.
//! - [`contracts`]: the token manager's one-transaction deployment, CREATE2 address
//!   prediction, role checks and the bootstrap of a fresh chain.

pub mod breaker;
pub mod contracts;
pub mod fees;
pub mod provider;
pub mod signer;
pub mod transactions;

use alloy::primitives::{Address, TxHash};
use alloy::sol;
use alloy::transports::{RpcError, TransportErrorKind};

pub use breaker::{Breaker, BreakerState};
pub use contracts::{bootstrap, Bootstrap};
pub use fees::{Fees, Market};
pub use provider::provider;
pub use signer::{signer, Wallet};
pub use transactions::{
    count_reorg, depth_bucket, Call, Chain, Funding, Header, Mined, SendError, Stuck, Waited,
};

sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    HokusaiToken,
    "abi/HokusaiToken.json"
);
sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    ModelRegistry,
    "abi/ModelRegistry.json"
);
sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    TokenManager,
    "abi/TokenManager.json"
);

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("rpc: {0}")]
    Rpc(#[from] RpcError<TransportErrorKind>),
    #[error("contract call: {0}")]
    Call(#[from] alloy::contract::Error),
    #[error("signing: {0}")]
    Sign(String),
    /// The remote signer (AWS KMS) failed or was unreachable: infrastructure, so retried.
    #[error("remote signer: {0}")]
    RemoteSigner(String),
    #[error("the node refused the transaction: {0}")]
    Refused(String),
    #[error("transaction {hash} reverted in block {block}")]
    Reverted { hash: TxHash, block: u64 },
    #[error("transaction {0} was not mined in time")]
    NotMined(TxHash),
    #[error("nonce {nonce} of {signer} is already used by another transaction")]
    NonceUsed { signer: Address, nonce: u64 },
    #[error("simulation reverted: {0}")]
    WouldRevert(RpcError<TransportErrorKind>),
    #[error("the rpc reports chain {actual}, configuration says {expected}")]
    WrongChain { expected: u64, actual: u64 },
    #[error("invalid deployer key: {0}")]
    BadKey(String),
    #[error("invalid rpc url {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("network fees need {needed_gwei:.3} gwei per gas, above the cap of {cap_gwei} gwei")]
    FeeAboveCap { needed_gwei: f64, cap_gwei: f64 },
    /// `chain.token_manager_address` does not answer as our TokenManager does.
    #[error("chain.token_manager_address {address} is not a TokenManager that deploys tokens (tokenImplementation/namespace: {reason}); deploy one with `hokusai-deployer contracts deploy`")]
    NotOurManager { address: Address, reason: String },
    /// `chain.model_registry_address` does not answer as our ModelRegistry.
    #[error("chain.model_registry_address {address} is not a ModelRegistry (registrars: {reason}); deploy one with `hokusai-deployer contracts deploy`")]
    NotOurRegistry { address: Address, reason: String },
    /// A role the worker needs is missing; the message says what grants it.
    #[error("{0}")]
    MissingRole(String),
}

impl ChainError {
    /// Reverts and configuration faults are permanent; everything else may pass.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChainError::Rpc(e) => !is_revert(e),
            ChainError::Call(alloy::contract::Error::TransportError(e)) => !is_revert(e),
            ChainError::Call(_) => false,
            ChainError::Reverted { .. }
            | ChainError::WouldRevert(_)
            | ChainError::WrongChain { .. }
            | ChainError::BadKey(_)
            | ChainError::BadUrl { .. }
            | ChainError::Config(_)
            | ChainError::NotOurManager { .. }
            | ChainError::NotOurRegistry { .. }
            | ChainError::MissingRole(_)
            | ChainError::Sign(_) => false,
            ChainError::Refused(_)
            | ChainError::NotMined(_)
            | ChainError::NonceUsed { .. }
            | ChainError::RemoteSigner(_) => true,
            // Waits for fees to fall, bounded by time rather than by attempts.
            ChainError::FeeAboveCap { .. } => true,
        }
    }
}

impl ChainError {
    /// No RPC URL answered: refused or reset connections, timeouts, HTTP 5xx or 429 (alloy's
    /// fallback layer has tried every URL by then). What the circuit breaker counts; an answer,
    /// even an error answer, means the chain is reachable.
    pub fn is_unreachable(&self) -> bool {
        let e = match self {
            ChainError::Rpc(e) => e,
            ChainError::Call(alloy::contract::Error::TransportError(e)) => e,
            _ => return false,
        };
        match e {
            RpcError::Transport(TransportErrorKind::HttpError(h)) => {
                h.status >= 500 || h.status == 429
            }
            RpcError::Transport(_) => true,
            _ => false,
        }
    }

    /// The token that already holds a model, when the manager or the registry refused a
    /// deployment for it.
    pub fn registered_elsewhere(&self) -> Option<Address> {
        let ChainError::WouldRevert(e) = self else {
            return None;
        };
        let resp = e.as_error_resp()?;
        // The manager's own check, or the registry's refusal bubbling up through it.
        if let Some(TokenManager::TokenManagerErrors::TokenExists(r)) =
            resp.as_decoded_interface_error::<TokenManager::TokenManagerErrors>()
        {
            return Some(r.token);
        }
        match resp.as_decoded_interface_error::<ModelRegistry::ModelRegistryErrors>()? {
            ModelRegistry::ModelRegistryErrors::ModelAlreadyRegistered(r) => Some(r.token),
            _ => None,
        }
    }

    /// The error code for the DLQ and failure events, decided with [`Self::is_retryable`].
    pub fn code(&self) -> &'static str {
        match self {
            ChainError::Rpc(_) | ChainError::Call(alloy::contract::Error::TransportError(_))
                if self.is_retryable() =>
            {
                "RPC_ERROR"
            }
            ChainError::Rpc(_)
            | ChainError::Call(_)
            | ChainError::Reverted { .. }
            | ChainError::WouldRevert(_) => "DEPLOYMENT_FAILED",
            ChainError::NotMined(_) => "TRANSACTION_TIMEOUT",
            ChainError::FeeAboveCap { .. } => "INSUFFICIENT_GAS",
            ChainError::Refused(_) | ChainError::NonceUsed { .. } => "RPC_ERROR",
            ChainError::RemoteSigner(_) => "SIGNER_UNAVAILABLE",
            ChainError::WrongChain { .. }
            | ChainError::BadKey(_)
            | ChainError::BadUrl { .. }
            | ChainError::Config(_)
            | ChainError::NotOurManager { .. }
            | ChainError::NotOurRegistry { .. }
            | ChainError::MissingRole(_)
            | ChainError::Sign(_) => "CONFIGURATION_ERROR",
        }
    }
}

fn is_revert(e: &RpcError<TransportErrorKind>) -> bool {
    match e {
        RpcError::ErrorResp(p) => {
            let m = p.message.to_lowercase();
            m.contains("revert") || p.code == 3
        }
        _ => false,
    }
}

/// Messages nodes (geth, anvil, reth, erigon) use for a transaction they already hold or mined.
fn is_already_known(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("already known") || m.contains("known transaction") || m.contains("already imported")
}

fn is_nonce_too_low(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("nonce too low") || m.contains("nonce is too low") || m.contains("invalid nonce")
}

/// The node holds another pending transaction of the signer at this nonce, priced at least
/// as high: sent by someone else with our key (we replace only our own, raising by more than
/// nodes require).
fn is_nonce_taken(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("replacement transaction underpriced") || m.contains("replacement underpriced")
}

/// A gas limit: the estimate plus `chain.gas_limit_margin_percent`.
pub fn with_margin(estimate: u64, percent: u64) -> u64 {
    estimate + estimate * percent / 100
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::rpc::json_rpc::ErrorPayload;

    /// anvil's answer to simulating a registration of a model that already has a token.
    #[test]
    fn a_registry_refusal_names_the_token_that_won() {
        let payload: ErrorPayload = serde_json::from_str(
            r#"{"code":3,"message":"execution reverted: custom error 0xf09e5e9d","data":"0xf09e5e9d00000000000000000000000000000000000000000000000000000000000000400000000000000000000000002279b7a0a67db372996a5fab50d91eaa73d2ebe600000000000000000000000000000000000000000000000000000000000000076368616f735f3200000000000000000000000000000000000000000000000000"}"#,
        )
        .unwrap();
        let e = ChainError::WouldRevert(RpcError::ErrorResp(payload));
        assert_eq!(
            e.registered_elsewhere(),
            Some(
                "0x2279b7a0a67db372996a5fab50d91eaa73d2ebe6"
                    .parse()
                    .unwrap()
            )
        );
        assert!(!e.is_retryable());
    }
}
