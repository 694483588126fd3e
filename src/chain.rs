//! The chain: contract bindings generated from `abi/`, a provider that fails over between RPC
//! URLs with a timeout on every request, and transactions signed before they are sent (by a
//! local key or AWS KMS) so that the journal can hold their exact bytes before the broadcast.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use alloy::consensus::{Transaction as _, TxEnvelope};
use alloy::eips::eip2718::{Decodable2718, Encodable2718};
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

use crate::config::{mask_url, DeployerKey, Secret, Settings};
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
            ChainError::RemoteSigner(_) => "SIGNER_UNAVAILABLE",
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

/// A deployer key made usable: its address and a wallet that signs with it.
#[derive(Clone)]
pub struct Wallet {
    pub address: Address,
    wallet: EthereumWallet,
    /// Signs over the network (KMS): its failures are retried, not the message's fault.
    remote: bool,
}

impl Wallet {
    /// Resolves the pool's keys in order, going on after those already in `done` (so a retry
    /// after a KMS failure keeps what it had). A local key is parsed; a KMS key's public key is
    /// fetched (one `GetPublicKey`), with one AWS client for the whole pool.
    pub async fn resolve_pool(
        keys: &[DeployerKey],
        settings: &Settings,
        done: &mut Vec<Wallet>,
    ) -> Result<(), ChainError> {
        let mut kms = None;
        for key in &keys[done.len().min(keys.len())..] {
            let wallet = match key {
                DeployerKey::Local(secret) => {
                    let s = signer(secret)?;
                    Wallet {
                        address: s.address(),
                        wallet: EthereumWallet::from(s),
                        remote: false,
                    }
                }
                DeployerKey::AwsKms(id) => aws_kms(id, settings, &mut kms).await?,
            };
            done.push(wallet);
        }
        Ok(())
    }
}

#[cfg(feature = "aws-kms")]
type KmsClient = alloy::signers::aws::aws_sdk_kms::Client;
#[cfg(not(feature = "aws-kms"))]
type KmsClient = ();

/// AWS KMS through alloy's signer. Region, credentials and endpoint come from the AWS
/// environment (`AWS_REGION`, the ECS task role, IRSA, `AWS_ENDPOINT_URL`, ...), loaded once
/// into `client`; every KMS call is bounded by `chain.rpc_timeout_ms`, after the SDK's own
/// retries.
#[cfg(feature = "aws-kms")]
async fn aws_kms(
    id: &str,
    settings: &Settings,
    client: &mut Option<KmsClient>,
) -> Result<Wallet, ChainError> {
    use alloy::network::TxSigner;
    use alloy::signers::aws::{aws_config, AwsSigner};

    let kms = match client {
        Some(c) => c.clone(),
        None => {
            let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(settings.rpc_timeout())
                        .build(),
                )
                .load()
                .await;
            client.insert(KmsClient::new(&conf)).clone()
        }
    };
    let signer = AwsSigner::new(kms, id.to_owned(), None)
        .await
        .map_err(|e| ChainError::RemoteSigner(format!("AWS KMS key {id}: {}", error_chain(&e))))?;
    Ok(Wallet {
        address: TxSigner::address(&signer),
        wallet: EthereumWallet::from(signer),
        remote: true,
    })
}

/// Configuration refuses KMS keys in a build without the feature; this is never reached.
#[cfg(not(feature = "aws-kms"))]
async fn aws_kms(id: &str, _: &Settings, _: &mut Option<KmsClient>) -> Result<Wallet, ChainError> {
    Err(ChainError::BadKey(format!(
        "chain.aws_kms_key_ids names {id}, but this build has no AWS KMS support"
    )))
}

/// The journal's record of a signed transaction.
fn record(signer: Address, nonce: u64, envelope: &TxEnvelope, replaced: Vec<TxHash>) -> TxRecord {
    TxRecord {
        signer,
        nonce,
        hash: *envelope.tx_hash(),
        raw: envelope.encoded_2718().into(),
        replaced,
    }
}

/// An error and its sources, `: `-joined: the AWS SDK's top-level message alone is terse
/// ("service error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
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
    /// Signs this process's transactions (its `address` is [`Chain::signer`]).
    wallet: Wallet,
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
    /// `chain.priority_fee_gwei` in wei; unset asks `eth_feeHistory`.
    priority_fee: Option<u128>,
    /// The network's fees, read once per head (see [`Chain::market`]).
    market: Mutex<Option<(u64, Market)>>,
    /// `chain.replace_after_secs`.
    pub replace_after: Duration,
    /// `chain.replacement_bump_percent`.
    bump_percent: u128,
}

/// What the network asks per gas right now.
#[derive(Debug, Clone, Copy)]
pub enum Market {
    Eip1559 { base: u128, priority: u128 },
    Legacy { gas_price: u128 },
}

impl Market {
    /// Base fee and priority fee (`priority_fee` in wei, else the 20th percentile of recent
    /// tips from `eth_feeHistory`), or the legacy gas price on chains without a base fee.
    pub async fn read(
        provider: &DynProvider,
        priority_fee: Option<u128>,
    ) -> Result<Market, ChainError> {
        Ok(match priority_fee {
            Some(priority) => {
                let latest = provider
                    .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
                    .await?;
                match latest.and_then(|b| b.header.base_fee_per_gas) {
                    Some(base) => Market::Eip1559 {
                        base: u128::from(base),
                        priority,
                    },
                    None => Market::Legacy {
                        gas_price: provider.get_gas_price().await?,
                    },
                }
            }
            None => match provider.estimate_eip1559_fees().await {
                // alloy's estimate is 2 x base fee + priority fee.
                Ok(f) => Market::Eip1559 {
                    base: f.max_fee_per_gas.saturating_sub(f.max_priority_fee_per_gas) / 2,
                    priority: f.max_priority_fee_per_gas,
                },
                // A chain without EIP-1559 has no base fee: price the legacy way.
                Err(_) => Market::Legacy {
                    gas_price: provider.get_gas_price().await?,
                },
            },
        })
    }

    /// The base fee (the gas price on legacy chains).
    pub fn base(self) -> u128 {
        match self {
            Market::Eip1559 { base, .. } => base,
            Market::Legacy { gas_price } => gas_price,
        }
    }

    /// Fees for a new transaction: max fee = 2 x base fee + priority fee (room for six full
    /// blocks of base fee rises). Under `cap` the max fee is lowered to the cap while base fee
    /// plus priority fee still fit; otherwise [`ChainError::FeeAboveCap`].
    pub fn fees(self, cap: Option<u128>) -> Result<Fees, ChainError> {
        let gwei = |wei: u128| wei as f64 / 1e9;
        match self {
            Market::Eip1559 { base, priority } => {
                let mut max_fee = 2 * base + priority;
                if let Some(cap) = cap {
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
            Market::Legacy { gas_price } => match cap {
                Some(cap) if gas_price > cap => Err(ChainError::FeeAboveCap {
                    needed_gwei: gwei(gas_price),
                    cap_gwei: gwei(cap),
                }),
                _ => Ok(Fees::Legacy { gas_price }),
            },
        }
    }
}

/// How waiting for a transaction ended, short of an error.
#[derive(Debug)]
pub enum Waited {
    Mined(Mined),
    /// Time to replace it with higher fees: it waited `chain.replace_after_secs`, or the node
    /// dropped it and refused it back at its price.
    Replace(Stuck),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stuck {
    /// Not mined within `chain.replace_after_secs`.
    Slow,
    /// Gone from the node's pool and refused when re-broadcast (priced under the base fee).
    Dropped,
}

impl Stuck {
    pub fn label(self) -> &'static str {
        match self {
            Stuck::Slow => "slow",
            Stuck::Dropped => "dropped",
        }
    }
}

/// The node is asked whether it still holds an unmined transaction once per new block (after
/// the one current when the wait began), and no more often than this.
const POOL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A transaction to sign: a contract creation or a call.
#[derive(Clone)]
pub enum Call {
    Deploy(Bytes),
    Invoke { to: Address, data: Bytes },
}

impl Chain {
    /// Connects and checks the chain id; fails fast on a wrong chain or a bad key.
    pub async fn connect(settings: &Settings, deployer: &Wallet) -> Result<Chain, ChainError> {
        let (registry, manager) = settings.contract_addresses()?;
        let provider = provider(settings)?;
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
            signer: deployer.address,
            wallet: deployer.clone(),
            chain_id,
            registry,
            manager,
            confirmations: settings.chain.confirmations.max(1),
            poll_interval: Duration::from_millis(settings.chain.poll_interval_ms),
            receipt_timeout: Duration::from_secs(settings.chain.receipt_timeout_secs),
            gas_margin_percent: settings.chain.gas_limit_margin_percent,
            send_lock: Mutex::new(Nonces::default()),
            head: Mutex::new(None),
            fee_cap: settings.chain.fee_cap_wei(),
            priority_fee: settings.chain.priority_fee_wei(),
            market: Mutex::new(None),
            replace_after: Duration::from_secs(settings.chain.replace_after_secs),
            bump_percent: u128::from(settings.chain.replacement_bump_percent),
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
        Ok(with_margin(gas, self.gas_margin_percent))
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
        let tx = self
            .request(call)
            .with_nonce(nonce)
            .with_gas_limit(gas)
            .with_chain_id(self.chain_id);
        let envelope = self.sign(tx, fees).await.map_err(SendError::Chain)?;
        let signed = Signed {
            record: record(self.signer, nonce, &envelope, Vec::new()),
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

    /// Signs a transaction with these fees (locally, or by a KMS call).
    async fn sign(&self, tx: TransactionRequest, fees: Fees) -> Result<TxEnvelope, ChainError> {
        let tx = match fees {
            Fees::Eip1559 { max_fee, priority } => tx
                .with_max_fee_per_gas(max_fee)
                .with_max_priority_fee_per_gas(priority),
            Fees::Legacy { gas_price } => tx.with_gas_price(gas_price),
        };
        tx.build(&self.wallet.wallet).await.map_err(|e| {
            if self.wallet.remote {
                ChainError::RemoteSigner(error_chain(&e))
            } else {
                ChainError::Sign(e.to_string())
            }
        })
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
        Ok(self.landed(rec).await?.is_some())
    }

    /// The receipt of whichever version of a transaction was mined, if one was.
    pub async fn landed(&self, rec: &TxRecord) -> Result<Option<TransactionReceipt>, ChainError> {
        for hash in rec.hashes() {
            if let Some(r) = self.provider.get_transaction_receipt(hash).await? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Whether the node holds any version of a transaction (pending or mined).
    async fn known(&self, rec: &TxRecord) -> Result<bool, ChainError> {
        for hash in rec.hashes() {
            if self.provider.get_transaction_by_hash(hash).await?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
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

    /// Waits for a receipt of any version of a transaction and the configured confirmations,
    /// until `deadline` (then [`ChainError::NotMined`]); a revert is an error. Receipts are
    /// looked up twice per new block. From the second block on, a transaction the node no
    /// longer holds is re-broadcast with its exact bytes, so its nonce never stays a gap that
    /// stalls every later transaction of the signer; when the node refuses it back (priced
    /// under the base fee), or at `replace_at`, the caller is told to replace it.
    pub async fn wait_mined(
        &self,
        rec: &TxRecord,
        deadline: Instant,
        replace_at: Instant,
    ) -> Result<Waited, ChainError> {
        // (head, lookups at it): a receipt is looked up when a block appears and once more a
        // poll later, for nodes that announce a block before its receipts can be read.
        let mut checked: Option<(u64, u8)> = None;
        let mut heads = 0u32;
        let mut pool_checked = Instant::now();
        loop {
            let head = self.head().await?;
            let lookups = match checked {
                Some((h, n)) if h == head => n,
                _ => 0,
            };
            if lookups < 2 {
                if lookups == 0 {
                    heads += 1;
                }
                checked = Some((head, lookups + 1));
                if let Some(r) = self.landed(rec).await? {
                    let block = r.block_number.unwrap_or_default();
                    if !r.status() {
                        return Err(ChainError::Reverted {
                            hash: r.transaction_hash,
                            block,
                        });
                    }
                    if head + 1 >= block + self.confirmations {
                        return Ok(Waited::Mined(Mined {
                            hash: r.transaction_hash,
                            block_number: block,
                            gas_used: r.gas_used,
                            effective_gas_price: r.effective_gas_price,
                            contract_address: r.contract_address,
                        }));
                    }
                } else if Instant::now() >= replace_at {
                    return Ok(Waited::Replace(Stuck::Slow));
                } else if heads > 1 && pool_checked.elapsed() >= POOL_CHECK_EVERY {
                    pool_checked = Instant::now();
                    if !self.known(rec).await? {
                        tracing::warn!(hash = %rec.hash, nonce = rec.nonce, "transaction missing from the node's pool; re-broadcasting it");
                        match self.broadcast(rec).await {
                            Ok(()) => {}
                            Err(e @ ChainError::NonceUsed { .. }) => {
                                // Taken by a transaction that is none of ours (checked above):
                                // this one can never land; the next attempt rebuilds it.
                                if self.landed(rec).await?.is_none() {
                                    return Err(e);
                                }
                            }
                            Err(ChainError::Refused(reason)) => {
                                tracing::warn!(hash = %rec.hash, %reason, "the node refused the re-broadcast; replacing the transaction");
                                return Ok(Waited::Replace(Stuck::Dropped));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, hash = %rec.hash, "re-broadcast failed")
                            }
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(ChainError::NotMined(rec.hash));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// When an attempt's wait for receipts gives up.
    pub fn receipt_deadline(&self) -> Instant {
        Instant::now() + self.receipt_timeout
    }

    /// Signs a replacement of a stuck transaction: same nonce, gas and call, both fees raised
    /// by `chain.replacement_bump_percent` or to the network's current price if that is higher,
    /// never above the cap. `journal` records it (with the hashes it replaces) before it is
    /// broadcast. `None`: under the cap the fees cannot be raised enough to replace it.
    /// A refused broadcast is logged, not returned: the journaled version is what the caller
    /// waits for, and the earlier versions still count if one of them lands.
    pub async fn replace<F, Fut, E>(
        &self,
        rec: &TxRecord,
        journal: F,
    ) -> Result<Option<TxRecord>, SendError<E>>
    where
        F: FnOnce(TxRecord) -> Fut,
        Fut: std::future::Future<Output = Result<TxRecord, E>>,
    {
        let old = TxEnvelope::decode_2718(&mut rec.raw.as_ref())
            .map_err(|e| SendError::Chain(ChainError::Sign(format!("journaled bytes: {e}"))))?;
        let market = self.market().await.map_err(SendError::Chain)?;
        let Some(fees) = replacement_fees(&old, market, self.bump_percent, self.fee_cap) else {
            return Ok(None);
        };
        let tx = TransactionRequest::from_transaction(old).with_from(self.signer);
        let envelope = self.sign(tx, fees).await.map_err(SendError::Chain)?;
        let mut replaced = rec.replaced.clone();
        replaced.push(rec.hash);
        let new = record(rec.signer, rec.nonce, &envelope, replaced);
        let new = journal(new).await.map_err(SendError::Journal)?;
        match self.broadcast(&new).await {
            // Taken: by an earlier version (its receipt ends the wait) or by another
            // transaction (the wait finds out and the attempt rebuilds).
            Ok(()) | Err(ChainError::NonceUsed { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, hash = %new.hash, "the node refused the replacement; it is re-broadcast while the wait goes on")
            }
        }
        Ok(Some(new))
    }

    /// The network's fees ([`Market::read`]), read at most once per head whoever asks.
    async fn market(&self) -> Result<Market, ChainError> {
        let head = self.head().await?;
        let mut cached = self.market.lock().await;
        if let Some((at, m)) = *cached {
            if at == head {
                return Ok(m);
            }
        }
        let m = Market::read(&self.provider, self.priority_fee).await?;
        metrics::gauge!(crate::telemetry::names::BASE_FEE).set(m.base() as f64 / 1e9);
        *cached = Some((head, m));
        Ok(m)
    }

    /// Fees for a new transaction under `chain.max_fee_per_gas_gwei` ([`Market::fees`]).
    async fn fees(&self) -> Result<Fees, ChainError> {
        self.market().await?.fees(self.fee_cap)
    }
}

/// A gas limit: the estimate plus `chain.gas_limit_margin_percent`.
pub fn with_margin(estimate: u64, percent: u64) -> u64 {
    estimate + estimate * percent / 100
}

/// Fees for replacing `old`: each raised by `bump_percent` (what nodes require of a
/// replacement) or to the current market if that is higher, within `cap`. `None` when the cap
/// leaves no room for the raise.
fn replacement_fees(
    old: &TxEnvelope,
    market: Market,
    bump_percent: u128,
    cap: Option<u128>,
) -> Option<Fees> {
    let bump = |x: u128| x + (x * bump_percent).div_ceil(100);
    let cap = cap.unwrap_or(u128::MAX);
    if old.is_dynamic_fee() {
        let (base, tip) = match market {
            Market::Eip1559 { base, priority } => (base, priority),
            Market::Legacy { gas_price } => (gas_price, 0),
        };
        let min_tip = bump(old.max_priority_fee_per_gas().unwrap_or(0));
        let min_max = bump(old.max_fee_per_gas());
        let priority = min_tip.max(tip);
        let max_fee = min_max.max(2 * base + priority).min(cap);
        let priority = priority.min(max_fee);
        (max_fee >= min_max && priority >= min_tip).then_some(Fees::Eip1559 { max_fee, priority })
    } else {
        let current = match market {
            Market::Eip1559 { base, priority } => base + priority,
            Market::Legacy { gas_price } => gas_price,
        };
        let min_price = bump(old.gas_price().unwrap_or_default());
        let gas_price = min_price.max(current).min(cap);
        (gas_price >= min_price).then_some(Fees::Legacy { gas_price })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fees {
    Eip1559 { max_fee: u128, priority: u128 },
    Legacy { gas_price: u128 },
}

impl Fees {
    /// The most a transaction with these fees pays per gas.
    pub fn max_fee_per_gas(self) -> u128 {
        match self {
            Fees::Eip1559 { max_fee, .. } => max_fee,
            Fees::Legacy { gas_price } => gas_price,
        }
    }
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

    fn signed_1559(max_fee: u128, tip: u128) -> TxEnvelope {
        use alloy::consensus::{SignableTransaction, TxEip1559};
        use alloy::network::TxSignerSync;
        let mut tx = TxEip1559 {
            chain_id: 31337,
            nonce: 7,
            gas_limit: 900_000,
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: tip,
            ..Default::default()
        };
        let key = PrivateKeySigner::random();
        let sig = key.sign_transaction_sync(&mut tx).unwrap();
        TxEnvelope::Eip1559(tx.into_signed(sig))
    }

    const GWEI: u128 = 1_000_000_000;

    #[test]
    fn a_replacement_raises_both_fees_by_the_bump_or_to_the_market() {
        let old = signed_1559(100 * GWEI, 2 * GWEI);
        // The market is cheaper than the old transaction: the bump decides.
        let calm = Market::Eip1559 {
            base: 10 * GWEI,
            priority: GWEI,
        };
        assert_eq!(
            replacement_fees(&old, calm, 15, None),
            Some(Fees::Eip1559 {
                max_fee: 115 * GWEI,
                priority: 2_300_000_000,
            })
        );
        // The base fee ran away: the market decides (2 x base + tip).
        let busy = Market::Eip1559 {
            base: 100 * GWEI,
            priority: 3 * GWEI,
        };
        assert_eq!(
            replacement_fees(&old, busy, 15, None),
            Some(Fees::Eip1559 {
                max_fee: 203 * GWEI,
                priority: 3 * GWEI,
            })
        );
        // Under a cap: lowered to it while the bump still fits, refused when it does not.
        assert_eq!(
            replacement_fees(&old, busy, 15, Some(150 * GWEI)),
            Some(Fees::Eip1559 {
                max_fee: 150 * GWEI,
                priority: 3 * GWEI,
            })
        );
        assert_eq!(replacement_fees(&old, busy, 15, Some(110 * GWEI)), None);
    }

    #[test]
    fn a_legacy_replacement_raises_the_gas_price() {
        use alloy::consensus::{SignableTransaction, TxLegacy};
        use alloy::network::TxSignerSync;
        let mut tx = TxLegacy {
            chain_id: Some(137),
            nonce: 3,
            gas_price: 40 * GWEI,
            gas_limit: 900_000,
            ..Default::default()
        };
        let sig = PrivateKeySigner::random()
            .sign_transaction_sync(&mut tx)
            .unwrap();
        let old = TxEnvelope::Legacy(tx.into_signed(sig));
        let market = Market::Legacy {
            gas_price: 30 * GWEI,
        };
        assert_eq!(
            replacement_fees(&old, market, 13, None),
            Some(Fees::Legacy {
                gas_price: 45_200_000_000
            })
        );
        assert_eq!(replacement_fees(&old, market, 13, Some(45 * GWEI)), None);
    }

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
