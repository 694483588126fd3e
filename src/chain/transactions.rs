//! Transactions: [`Chain`] signs each one under the send lock (nonce order), hands it to the
//! journal before the broadcast, waits for its receipt and confirmations, re-broadcasts what
//! the node dropped and replaces what is stuck with higher fees.

use std::time::{Duration, Instant};

use alloy::consensus::TxEnvelope;
use alloy::eips::eip2718::{Decodable2718, Encodable2718};
use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::{NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, Bytes, TxHash, B256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::transports::RpcError;
use tokio::sync::Mutex;

use super::fees::{replacement_fees, Fees, Market};
use super::signer::{error_chain, Wallet};
use super::{
    is_already_known, is_nonce_taken, is_nonce_too_low, is_revert, provider, with_margin,
    ChainError,
};
use crate::config::Settings;
use crate::journal::TxRecord;

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

/// Local nonce bookkeeping for one signer. Only one process uses a signer at a time.
#[derive(Default)]
struct Nonces {
    next: Option<u64>,
}

/// What a mined transaction tells the event.
#[derive(Debug, Clone)]
pub struct Mined {
    pub hash: TxHash,
    pub block_number: u64,
    /// The block's hash, canonical when the confirmations were counted: the reorg watch
    /// compares it with the chain later.
    pub block_hash: B256,
    pub gas_used: u64,
    pub effective_gas_price: u128,
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
    /// The manager's token implementation and namespace: predicts each model's token address.
    pub factory: super::contracts::TokenFactory,
    confirmations: u64,
    poll_interval: Duration,
    receipt_timeout: Duration,
    gas_margin_percent: u64,
    /// Held from nonce choice to broadcast so transactions leave in nonce order; receipts are
    /// awaited outside it, so many transactions are in flight at once.
    send_lock: Mutex<Nonces>,
    /// The last head read and when (see [`Chain::head`]).
    head: Mutex<Option<(Instant, Header)>>,
    /// Block hashes by height read since the instant, for one poll interval
    /// ([`Chain::canonical_hash`]).
    hashes: Mutex<(Instant, std::collections::HashMap<u64, B256>)>,
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

/// A transaction to sign: a call of one of our contracts.
#[derive(Clone)]
pub struct Call {
    pub to: Address,
    pub data: Bytes,
}

impl Chain {
    /// Connects and checks the chain id, that the manager is ours and that the roles are in
    /// place (the manager a registrar, the signer a deployer); fails fast, naming what is
    /// wrong, on any of them.
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
        let factory = super::contracts::TokenFactory::read(&provider, manager).await?;
        super::contracts::check_roles(&provider, registry, manager, deployer.address).await?;
        Ok(Chain {
            factory,
            provider,
            signer: deployer.address,
            wallet: deployer.clone(),
            chain_id,
            registry,
            manager,
            confirmations: settings.confirmations(chain_id),
            poll_interval: Duration::from_millis(settings.chain.poll_interval_ms),
            receipt_timeout: Duration::from_secs(settings.chain.receipt_timeout_secs),
            gas_margin_percent: settings.chain.gas_limit_margin_percent,
            send_lock: Mutex::new(Nonces::default()),
            head: Mutex::new(None),
            hashes: Mutex::new((Instant::now(), Default::default())),
            fee_cap: settings.chain.fee_cap_wei(),
            priority_fee: settings.chain.priority_fee_wei(),
            market: Mutex::new(None),
            replace_after: Duration::from_secs(settings.chain.replace_after_secs),
            bump_percent: u128::from(settings.chain.replacement_bump_percent),
        })
    }

    fn request(&self, call: &Call) -> TransactionRequest {
        TransactionRequest::default()
            .with_from(self.signer)
            .with_to(call.to)
            .with_input(call.data.clone())
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
    ) -> Result<TxRecord, SendError<E>>
    where
        F: FnOnce(TxRecord) -> Fut,
        Fut: std::future::Future<Output = Result<TxRecord, E>>,
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
        let signed = match journal(record(self.signer, nonce, &envelope, Vec::new())).await {
            Ok(s) => s,
            Err(e) => {
                nonces.next = None;
                return Err(SendError::Journal(e));
            }
        };
        // The nonce is journaled: from here it belongs to this transaction, sent or not.
        nonces.next = Some(nonce + 1);
        match self.broadcast(&signed).await {
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

    /// Whether a journaled transaction calls this process's token manager: a journal written
    /// for other contracts (an earlier version's, or another `chain.token_manager_address`)
    /// describes no transaction of ours.
    pub fn calls_our_manager(&self, rec: &TxRecord) -> bool {
        use alloy::consensus::Transaction as _;
        TxEnvelope::decode_2718(&mut rec.raw.as_ref()).is_ok_and(|tx| tx.to() == Some(self.manager))
    }

    /// Sends signed bytes; a node that already has them is success, not an error.
    pub async fn broadcast(&self, rec: &TxRecord) -> Result<(), ChainError> {
        match self.provider.send_raw_transaction(&rec.raw).await {
            Ok(_) => Ok(()),
            Err(RpcError::ErrorResp(p)) if is_already_known(&p.message) => Ok(()),
            Err(RpcError::ErrorResp(p))
                if is_nonce_too_low(&p.message) || is_nonce_taken(&p.message) =>
            {
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
    /// Its hash tells a block replaced at the same height (a one-block reorganisation); the
    /// reorg watch follows the chain from the same reading.
    pub async fn head(&self) -> Result<Header, ChainError> {
        let mut h = self.head.lock().await;
        if let Some((at, n)) = *h {
            if at.elapsed() < self.poll_interval {
                return Ok(n);
            }
        }
        let latest = self
            .header(BlockNumberOrTag::Latest)
            .await?
            .ok_or(ChainError::Rpc(RpcError::NullResp))?;
        *h = Some((Instant::now(), latest));
        Ok(latest)
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
        let mut checked: Option<(Header, u8)> = None;
        let mut heads = 0u32;
        let mut pool_checked = Instant::now();
        // The block (number, hash) the transaction was last seen in.
        let mut seen: Option<(u64, B256)> = None;
        let mut pool_due = false;
        let mut pool_head: Option<Header> = None;
        loop {
            let head_block = self.head().await?;
            let head = head_block.number;
            let lookups = match checked {
                Some((h, n)) if h == head_block => n,
                _ => 0,
            };
            if lookups < 2 {
                if lookups == 0 {
                    heads += 1;
                }
                checked = Some((head_block, lookups + 1));
                let receipt = self.landed(rec).await?;
                let now_in = receipt.as_ref().map(|r| {
                    (
                        r.block_number.unwrap_or_default(),
                        r.block_hash.unwrap_or_default(),
                    )
                });
                if let Some((block, block_hash)) = seen.filter(|s| Some(*s) != now_in) {
                    // The block that held it was replaced: it is back in a pool, in another
                    // block, or gone (then re-broadcast below once the node no longer has it).
                    tracing::warn!(hash = %rec.hash, block, %block_hash, now = ?now_in, "reorganisation: the block holding the transaction was replaced; waiting for it again");
                    count_reorg(head.saturating_sub(block) + 1);
                    // Ask the node at once whether it still holds it.
                    pool_due = true;
                }
                seen = now_in;
                if let Some(r) = receipt {
                    let block = r.block_number.unwrap_or_default();
                    if !r.status() {
                        return Err(ChainError::Reverted {
                            hash: r.transaction_hash,
                            block,
                        });
                    }
                    let block_hash = r.block_hash.unwrap_or_default();
                    if head + 1 >= block + self.confirmations {
                        // Counted only while its block is the chain's at that height (the
                        // head's own hash when it is the head: no call).
                        let canonical = if block == head {
                            Some(head_block.hash)
                        } else {
                            self.canonical_hash(block).await?
                        };
                        if canonical == Some(block_hash) {
                            return Ok(Waited::Mined(Mined {
                                hash: r.transaction_hash,
                                block_number: block,
                                block_hash,
                                gas_used: r.gas_used,
                                effective_gas_price: r.effective_gas_price,
                            }));
                        }
                        tracing::warn!(hash = %rec.hash, block, "the receipt's block is no longer the chain's at its height; waiting");
                    }
                } else if Instant::now() >= replace_at {
                    return Ok(Waited::Replace(Stuck::Slow));
                }
            }
            // Unmined at this head: once per head, at most once per POOL_CHECK_EVERY (at once
            // after a reorganisation took it out), ask the node whether it still holds it.
            if seen.is_none()
                && heads > 1
                && pool_head != Some(head_block)
                && (pool_due || pool_checked.elapsed() >= POOL_CHECK_EVERY)
            {
                pool_head = Some(head_block);
                pool_checked = Instant::now();
                pool_due = false;
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
            if Instant::now() >= deadline {
                return Err(ChainError::NotMined(rec.hash));
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// The hash of the chain's block at this height now, if there is one.
    /// Waiters confirming in the same block share one reading per poll interval.
    pub async fn canonical_hash(&self, number: u64) -> Result<Option<B256>, ChainError> {
        // Held while reading: waiters confirming in one block make one call, not one each.
        let mut c = self.hashes.lock().await;
        if c.0.elapsed() >= self.poll_interval {
            *c = (Instant::now(), std::collections::HashMap::new());
        }
        if let Some(h) = c.1.get(&number) {
            return Ok(Some(*h));
        }
        let h = self
            .header(BlockNumberOrTag::Number(number))
            .await?
            .map(|h| h.hash);
        if let Some(h) = h {
            c.1.insert(number, h);
        }
        Ok(h)
    }

    /// A block's number, hash and parent hash.
    pub async fn header(&self, at: BlockNumberOrTag) -> Result<Option<Header>, ChainError> {
        let b = self.provider.get_block_by_number(at).await?;
        Ok(b.map(|b| Header {
            number: b.header.number,
            hash: b.header.hash,
            parent: b.header.parent_hash,
        }))
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
        let head = self.head().await?.number;
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

    /// Whether the signer can pay for one deployment at the current fees: `deployToken`'s gas
    /// limit times the max fee per gas a new transaction would offer.
    pub async fn funding(&self) -> Result<Funding, ChainError> {
        let per_gas = match self.fees().await? {
            Fees::Eip1559 { max_fee, .. } => max_fee,
            Fees::Legacy { gas_price } => gas_price,
        };
        let gas = with_margin(super::contracts::DEPLOY_TOKEN_GAS, self.gas_margin_percent);
        let balance = self.provider.get_balance(self.signer).await?;
        Ok(Funding {
            signer: self.signer,
            balance_wei: u128::try_from(balance).unwrap_or(u128::MAX),
            needed_wei: u128::from(gas) * per_gas,
        })
    }

    /// Fees for a new transaction under `chain.max_fee_per_gas_gwei` ([`Market::fees`]).
    async fn fees(&self) -> Result<Fees, ChainError> {
        self.market().await?.fees(self.fee_cap)
    }
}

/// What the reorg watch needs of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub number: u64,
    pub hash: B256,
    pub parent: B256,
}

/// The `depth_bucket` of `hokusai_reorgs_total`: how many blocks deep the transaction was
/// (its block to the head, both counted) when the reorganisation was noticed.
pub fn depth_bucket(depth: u64) -> &'static str {
    match depth {
        0 | 1 => "1",
        2..=3 => "2-3",
        4..=15 => "4-15",
        _ => "16+",
    }
}

/// Counts a reorganisation that moved or removed one of our transactions.
pub fn count_reorg(depth: u64) {
    metrics::counter!(crate::telemetry::names::REORGS, "depth_bucket" => depth_bucket(depth))
        .increment(1);
}

/// The signer's balance against what one deployment may cost ([`Chain::funding`]).
#[derive(Debug, Clone, Copy)]
pub struct Funding {
    pub signer: Address,
    pub balance_wei: u128,
    pub needed_wei: u128,
}

impl Funding {
    pub fn enough(&self) -> bool {
        self.balance_wei >= self.needed_wei
    }

    /// Why the worker takes no message, for readiness and the log.
    pub fn shortfall(&self) -> Option<String> {
        let eth =
            |w: u128| alloy::primitives::utils::format_ether(alloy::primitives::U256::from(w));
        (!self.enough()).then(|| {
            format!(
                "the deployer {} holds {} ETH; one deployment may cost {} ETH at the current fees: fund it (messages wait in the queue)",
                self.signer,
                eth(self.balance_wei),
                eth(self.needed_wei)
            )
        })
    }
}

/// Failure of [`Chain::sign_and_send`]: before the journal write, or after it.
#[derive(Debug)]
pub enum SendError<E> {
    Chain(ChainError),
    Journal(E),
}
