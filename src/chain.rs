//! The chain: contract bindings generated from `abi/`, a provider that fails over between RPC
//! URLs with a timeout on every request, and transactions signed locally so that the journal
//! can hold their exact bytes before they are broadcast.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use alloy::eips::eip2718::Encodable2718;
use alloy::eips::BlockId;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, Bytes, TxHash};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolCall, SolConstructor};
use alloy::transports::http::{reqwest, Http};
use alloy::transports::layers::FallbackLayer;
use alloy::transports::{RpcError, TransportError, TransportErrorKind, TransportFut};
use tokio::sync::Mutex;
use tower::ServiceBuilder;

use crate::config::{mask_url, Secret, Settings};
use crate::journal::TxRecord;

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
            | ChainError::Sign(_) => false,
            ChainError::Refused(_) | ChainError::NotMined(_) | ChainError::NonceUsed { .. } => true,
            // Waits for fees to fall, bounded by time rather than by attempts.
            ChainError::FeeAboveCap { .. } => true,
        }
    }
}

impl ChainError {
    /// The token that already holds a model, when the registry refused a registration for it.
    pub fn registered_elsewhere(&self) -> Option<Address> {
        let ChainError::WouldRevert(e) = self else {
            return None;
        };
        match e
            .as_error_resp()?
            .as_decoded_interface_error::<ModelRegistry::ModelRegistryErrors>()?
        {
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
            ChainError::WrongChain { .. }
            | ChainError::BadKey(_)
            | ChainError::BadUrl { .. }
            | ChainError::Config(_)
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

/// Builds a provider over every RPC URL: each request times out, and a failing or slow URL
/// yields to the next (alloy's fallback layer ranks them by success and latency).
pub fn provider(settings: &Settings) -> Result<DynProvider, ChainError> {
    let http = reqwest::Client::builder()
        .timeout(settings.rpc_timeout())
        .connect_timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| ChainError::BadUrl {
            url: "-".into(),
            reason: e.to_string(),
        })?;
    let mut transports = Vec::new();
    for u in &settings.chain.rpc_urls {
        let url = u.parse::<reqwest::Url>().map_err(|e| ChainError::BadUrl {
            url: mask_url(u),
            reason: e.to_string(),
        })?;
        transports.push(Http::with_client(http.clone(), url));
    }
    // Writes go to one transport at a time (sequential methods); reads race the best two.
    let active =
        NonZeroUsize::new(transports.len().min(2)).expect("validated: at least one RPC URL");
    let fallback = FallbackLayer::default()
        .with_active_transport_count(active)
        .with_sequential_method("eth_sendRawTransaction");
    let service = ServiceBuilder::new()
        .layer_fn(|inner| RpcTimed { inner })
        .layer(fallback)
        .service(transports);
    let client = RpcClient::builder().transport(service, false);
    Ok(ProviderBuilder::new()
        .disable_recommended_fillers()
        .connect_client(client)
        .erased())
}

/// Records each JSON-RPC request's latency by method (`hokusai_rpc_request_duration_seconds`).
#[derive(Clone)]
struct RpcTimed<S> {
    inner: S,
}

impl<S> tower::Service<RequestPacket> for RpcTimed<S>
where
    S: tower::Service<
            RequestPacket,
            Response = ResponsePacket,
            Error = TransportError,
            Future = TransportFut<'static>,
        > + Send,
{
    type Response = ResponsePacket;
    type Error = TransportError;
    type Future = TransportFut<'static>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: RequestPacket) -> Self::Future {
        let method = match &req {
            RequestPacket::Single(r) => r.method().to_owned(),
            RequestPacket::Batch(_) => "batch".to_owned(),
        };
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            metrics::histogram!(crate::telemetry::names::RPC_DURATION, "method" => method)
                .record(started.elapsed().as_secs_f64());
            r
        })
    }
}

pub fn signer(key: &Secret) -> Result<PrivateKeySigner, ChainError> {
    key.expose()
        .trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| ChainError::BadKey("not a 32-byte hex private key".into()))
}

/// Local nonce bookkeeping for one signer. Only one process uses a signer at a time.
#[derive(Default)]
struct Nonces {
    next: Option<u64>,
}

/// One signed transaction, ready to journal and broadcast.
pub struct Signed {
    pub record: TxRecord,
    /// For a deployment, the contract's address (sender and nonce decide it).
    pub contract_address: Option<Address>,
}

/// What a mined transaction tells the event.
#[derive(Debug, Clone)]
pub struct Mined {
    pub hash: TxHash,
    pub block_number: u64,
    pub gas_used: u64,
    pub effective_gas_price: u128,
    pub contract_address: Option<Address>,
}

/// The deployer's view of the chain.
pub struct Chain {
    pub provider: DynProvider,
    wallet: EthereumWallet,
    pub signer: Address,
    pub chain_id: u64,
    pub registry: Address,
    pub manager: Address,
    confirmations: u64,
    poll_interval: Duration,
    receipt_timeout: Duration,
    gas_margin_percent: u64,
    /// Held from nonce choice to broadcast so transactions leave in nonce order; receipts are
    /// awaited outside it, so many transactions are in flight at once.
    send_lock: Mutex<Nonces>,
    /// The last head read and when (see [`Chain::head`]).
    head: Mutex<Option<(Instant, u64)>>,
    /// `chain.max_fee_per_gas_gwei` in wei.
    fee_cap: Option<u128>,
}

/// How long an unmined transaction goes before the node is asked whether it still holds it.
const REBROADCAST_CHECK: Duration = Duration::from_secs(3);

/// A transaction to sign: a contract creation or a call.
#[derive(Clone)]
pub enum Call {
    Deploy(Bytes),
    Invoke { to: Address, data: Bytes },
}

impl Chain {
    /// Connects and checks the chain id; fails fast on a wrong chain or a bad key.
    pub async fn connect(settings: &Settings, key: &Secret) -> Result<Chain, ChainError> {
        let (registry, manager) = settings.contract_addresses()?;
        let provider = provider(settings)?;
        let signer = signer(key)?;
        let chain_id = provider.get_chain_id().await?;
        if let Some(expected) = settings.chain.chain_id {
            if expected != chain_id {
                return Err(ChainError::WrongChain {
                    expected,
                    actual: chain_id,
                });
            }
        }
        Ok(Chain {
            provider,
            signer: signer.address(),
            wallet: EthereumWallet::from(signer),
            chain_id,
            registry,
            manager,
            confirmations: settings.chain.confirmations.max(1),
            poll_interval: Duration::from_millis(settings.chain.poll_interval_ms),
            receipt_timeout: Duration::from_secs(settings.chain.receipt_timeout_secs),
            gas_margin_percent: settings.chain.gas_limit_margin_percent,
            send_lock: Mutex::new(Nonces::default()),
            head: Mutex::new(None),
            fee_cap: settings
                .chain
                .max_fee_per_gas_gwei
                .map(|g| (g * 1e9) as u128),
        })
    }

    /// The token a model is registered with, if any: the chain's final word on duplicates.
    pub async fn registered_token(&self, model_id: &str) -> Result<Option<Address>, ChainError> {
        let reg = ModelRegistry::new(self.registry, &self.provider);
        let token = reg.getToken(model_id.to_owned()).call().await?;
        Ok((token != Address::ZERO).then_some(token))
    }

    pub fn deploy_code(model_name: &str, symbol: &str, controller: Address) -> Bytes {
        let args = HokusaiToken::constructorCall {
            _name: model_name.to_owned(),
            _symbol: symbol.to_owned(),
            _controller: controller,
        }
        .abi_encode();
        let mut code = HokusaiToken::BYTECODE.to_vec();
        code.extend_from_slice(&args);
        code.into()
    }

    pub fn register_call(&self, model_id: &str, token: Address, metric: &str) -> Call {
        Call::Invoke {
            to: self.registry,
            data: ModelRegistry::registerModelCall {
                modelId: model_id.to_owned(),
                token,
                performanceMetric: metric.to_owned(),
            }
            .abi_encode()
            .into(),
        }
    }

    fn request(&self, call: &Call) -> TransactionRequest {
        let tx = TransactionRequest::default().with_from(self.signer);
        match call {
            Call::Deploy(code) => tx.with_deploy_code(code.clone()),
            Call::Invoke { to, data } => tx.with_to(*to).with_input(data.clone()),
        }
    }

    /// Gas limit from `eth_estimateGas` plus the configured margin; a revert here is permanent.
    pub async fn estimate(&self, call: &Call) -> Result<u64, ChainError> {
        let gas = self
            .provider
            .estimate_gas(self.request(call))
            .await
            .map_err(|e| {
                if is_revert(&e) {
                    ChainError::WouldRevert(e)
                } else {
                    ChainError::Rpc(e)
                }
            })?;
        Ok(gas + gas * self.gas_margin_percent / 100)
    }

    /// Signs with the next nonce, lets `journal` record it, then broadcasts, all under the send
    /// lock. A failed journal write leaves the nonce unused and the counter is re-read.
    pub async fn sign_and_send<F, Fut, E>(
        &self,
        call: &Call,
        gas: u64,
        journal: F,
    ) -> Result<Signed, SendError<E>>
    where
        F: FnOnce(Signed) -> Fut,
        Fut: std::future::Future<Output = Result<Signed, E>>,
    {
        let fees = self.fees().await.map_err(SendError::Chain)?;
        let mut nonces = self.send_lock.lock().await;
        let nonce = match nonces.next {
            Some(n) => n,
            None => self
                .provider
                .get_transaction_count(self.signer)
                .pending()
                .await
                .map_err(|e| SendError::Chain(e.into()))?,
        };
        let mut tx = self
            .request(call)
            .with_nonce(nonce)
            .with_gas_limit(gas)
            .with_chain_id(self.chain_id);
        tx = match fees {
            Fees::Eip1559 { max_fee, priority } => tx
                .with_max_fee_per_gas(max_fee)
                .with_max_priority_fee_per_gas(priority),
            Fees::Legacy { gas_price } => tx.with_gas_price(gas_price),
        };
        let envelope = tx
            .build(&self.wallet)
            .await
            .map_err(|e| SendError::Chain(ChainError::Sign(e.to_string())))?;
        let signed = Signed {
            record: TxRecord {
                signer: self.signer,
                nonce,
                hash: *envelope.tx_hash(),
                raw: envelope.encoded_2718().into(),
            },
            contract_address: matches!(call, Call::Deploy(_)).then(|| self.signer.create(nonce)),
        };
        let signed = match journal(signed).await {
            Ok(s) => s,
            Err(e) => {
                nonces.next = None;
                return Err(SendError::Journal(e));
            }
        };
        // The nonce is journaled: from here it belongs to this transaction, sent or not.
        nonces.next = Some(nonce + 1);
        match self.broadcast(&signed.record).await {
            Ok(()) => Ok(signed),
            Err(e @ ChainError::NonceUsed { .. }) => {
                nonces.next = None;
                Err(SendError::Chain(e))
            }
            Err(e) => Err(SendError::Chain(e)),
        }
    }

    /// Sends signed bytes; a node that already has them is success, not an error.
    pub async fn broadcast(&self, rec: &TxRecord) -> Result<(), ChainError> {
        match self.provider.send_raw_transaction(&rec.raw).await {
            Ok(_) => Ok(()),
            Err(RpcError::ErrorResp(p)) if is_already_known(&p.message) => Ok(()),
            Err(RpcError::ErrorResp(p)) if is_nonce_too_low(&p.message) => {
                Err(ChainError::NonceUsed {
                    signer: rec.signer,
                    nonce: rec.nonce,
                })
            }
            Err(RpcError::ErrorResp(p)) => Err(ChainError::Refused(p.message.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a journaled, unmined transaction can still land: false once the signer's mined
    /// nonce has passed it (then another transaction took the nonce, and rebuilding is safe).
    pub async fn can_still_land(&self, rec: &TxRecord) -> Result<bool, ChainError> {
        let mined_nonce = self
            .provider
            .get_transaction_count(rec.signer)
            .block_id(BlockId::latest())
            .await?;
        if mined_nonce <= rec.nonce {
            return Ok(true);
        }
        // Re-check after reading the nonce: it may have been ours that passed it.
        Ok(self
            .provider
            .get_transaction_receipt(rec.hash)
            .await?
            .is_some())
    }

    pub async fn receipt(&self, hash: TxHash) -> Result<Option<TransactionReceipt>, ChainError> {
        Ok(self.provider.get_transaction_receipt(hash).await?)
    }

    /// The latest block number, read at most once per poll interval however many
    /// transactions are being awaited: waiters share one reading.
    async fn head(&self) -> Result<u64, ChainError> {
        let mut h = self.head.lock().await;
        if let Some((at, n)) = *h {
            if at.elapsed() < self.poll_interval {
                return Ok(n);
            }
        }
        let n = self.provider.get_block_number().await?;
        *h = Some((Instant::now(), n));
        Ok(n)
    }

    /// Waits for a receipt and the configured confirmations; a revert is an error. The
    /// receipt is looked up once per new block. A transaction the node no longer holds
    /// (dropped from its pool) is re-broadcast with its exact bytes, so its nonce never
    /// stays a gap that stalls every later transaction of the signer.
    pub async fn wait_mined(&self, rec: &TxRecord) -> Result<Mined, ChainError> {
        let hash = rec.hash;
        let deadline = Instant::now() + self.receipt_timeout;
        let mut checked_at: Option<u64> = None;
        let mut pool_checked = Instant::now();
        loop {
            let head = self.head().await?;
            if checked_at != Some(head) {
                checked_at = Some(head);
                if let Some(r) = self.provider.get_transaction_receipt(hash).await? {
                    let block = r.block_number.unwrap_or_default();
                    if !r.status() {
                        return Err(ChainError::Reverted { hash, block });
                    }
                    if head + 1 >= block + self.confirmations {
                        return Ok(Mined {
                            hash,
                            block_number: block,
                            gas_used: r.gas_used,
                            effective_gas_price: r.effective_gas_price,
                            contract_address: r.contract_address,
                        });
                    }
                } else if pool_checked.elapsed() >= REBROADCAST_CHECK {
                    pool_checked = Instant::now();
                    if self.provider.get_transaction_by_hash(hash).await?.is_none() {
                        tracing::warn!(%hash, nonce = rec.nonce, "transaction missing from the node's pool; re-broadcasting it");
                        match self.broadcast(rec).await {
                            Ok(()) | Err(ChainError::NonceUsed { .. }) => {}
                            Err(e) => tracing::warn!(error = %e, %hash, "re-broadcast failed"),
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ChainError::NotMined(hash));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// EIP-1559 fees from fee history (alloy: max fee = 2 x base fee + priority fee), legacy gas
    /// price on chains without a base fee. Under a cap the max fee is lowered to the cap while
    /// base fee plus priority fee still fit; otherwise [`ChainError::FeeAboveCap`].
    async fn fees(&self) -> Result<Fees, ChainError> {
        let gwei = |wei: u128| wei as f64 / 1e9;
        match self.provider.estimate_eip1559_fees().await {
            Ok(f) => {
                let priority = f.max_priority_fee_per_gas;
                let base = f.max_fee_per_gas.saturating_sub(priority) / 2;
                let mut max_fee = f.max_fee_per_gas;
                if let Some(cap) = self.fee_cap {
                    if base + priority > cap {
                        return Err(ChainError::FeeAboveCap {
                            needed_gwei: gwei(base + priority),
                            cap_gwei: gwei(cap),
                        });
                    }
                    max_fee = max_fee.min(cap);
                }
                Ok(Fees::Eip1559 { max_fee, priority })
            }
            // A chain without EIP-1559 has no base fee: price the legacy way.
            Err(_) => {
                let gas_price = self.provider.get_gas_price().await?;
                match self.fee_cap {
                    Some(cap) if gas_price > cap => Err(ChainError::FeeAboveCap {
                        needed_gwei: gwei(gas_price),
                        cap_gwei: gwei(cap),
                    }),
                    _ => Ok(Fees::Legacy { gas_price }),
                }
            }
        }
    }
}

enum Fees {
    Eip1559 { max_fee: u128, priority: u128 },
    Legacy { gas_price: u128 },
}

/// Failure of [`Chain::sign_and_send`]: before the journal write, or after it.
#[derive(Debug)]
pub enum SendError<E> {
    Chain(ChainError),
    Journal(E),
}

/// Addresses of a fresh deployment of the registry and manager.
#[derive(Debug, serde::Serialize)]
pub struct Bootstrap {
    pub chain_id: u64,
    pub model_registry: Address,
    pub token_manager: Address,
    pub deployer: Address,
}

/// Deploys `ModelRegistry` and `TokenManager` and authorises `registrar` (if another address).
pub async fn bootstrap(
    settings: &Settings,
    key: &Secret,
    registrar: Option<Address>,
) -> Result<Bootstrap, ChainError> {
    let signer = signer(key)?;
    let deployer = signer.address();
    // The same transport as the worker's (failover, timeouts), with a wallet on top.
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer))
        .connect_provider(provider(settings)?);
    let chain_id = provider.get_chain_id().await?;
    let registry = ModelRegistry::deploy(&provider).await?;
    let manager = TokenManager::deploy(&provider, *registry.address()).await?;
    if let Some(r) = registrar.filter(|r| *r != deployer) {
        registry
            .setRegistrar(r, true)
            .send()
            .await?
            .get_receipt()
            .await
            .map_err(|e| ChainError::Refused(e.to_string()))?;
    }
    Ok(Bootstrap {
        chain_id,
        model_registry: *registry.address(),
        token_manager: *manager.address(),
        deployer,
    })
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
