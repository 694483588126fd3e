//! The worker: takes messages, deploys and registers their tokens (one `deployToken`
//! transaction each), publishes events, and sorts every outcome into exactly one of ack (event
//! published) or dead letter (with a reason).
//!
//! Each step can run again safely: the journal says what was already signed or mined, the
//! token manager on chain refuses a second token for a model, and the event is stored before it
//! is published so a redelivery re-publishes the identical event.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::audit::{Audit, Fields};
use crate::chain::{Call, Chain, ChainError, Mined, SendError, Stuck, Waited, Wallet};
use crate::config::{DeployerKey, Settings};
use crate::journal::{Entry, Journal, JournalError, TxRecord};
use crate::message::{
    self, DeadLetter, DeadLetterError, DeploymentFailed, Inbound, Rejection, Rules, TokenDeployed,
};
use crate::queue::{QueueError, Queues, Redis};
use crate::telemetry::names;

/// Why one attempt at a message failed, sorted once into retry or give up.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("model {0} is being deployed by another worker")]
    ModelBusy(String),
    #[error("model {model_id} already has token {token}")]
    TokenExists { model_id: String, token: Address },
    /// The model's journal holds a transaction that does not call our token manager (written
    /// by the two-transaction version or for other contracts): finishing it would publish an
    /// event for a token we did not deploy.
    #[error("the journal of model {model_id} holds transaction {hash}, which does not call chain.token_manager_address: check it and delete the journal (docs/runbook.md) before requeueing")]
    ForeignJournal {
        model_id: String,
        hash: alloy::primitives::TxHash,
    },
}

impl AttemptError {
    pub fn is_retryable(&self) -> bool {
        match self {
            AttemptError::Chain(e) => e.is_retryable(),
            AttemptError::Queue(e) => e.is_retryable(),
            AttemptError::Journal(JournalError::Redis(_)) => true,
            AttemptError::Journal(JournalError::Corrupt { .. }) => false,
            AttemptError::ModelBusy(_) => true,
            AttemptError::TokenExists { .. } | AttemptError::ForeignJournal { .. } => false,
        }
    }

    /// The error code seen in the DLQ and failure events (seed 000 §8 names where they fit).
    pub fn code(&self) -> &'static str {
        match self {
            AttemptError::TokenExists { .. } => "TOKEN_EXISTS",
            AttemptError::ModelBusy(_) => "MODEL_BUSY",
            AttemptError::Queue(_) | AttemptError::Journal(JournalError::Redis(_)) => {
                "REDIS_UNAVAILABLE"
            }
            AttemptError::Journal(JournalError::Corrupt { .. })
            | AttemptError::ForeignJournal { .. } => "JOURNAL_CORRUPT",
            AttemptError::Chain(e) => e.code(),
        }
    }

    fn details(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        if let AttemptError::TokenExists { token, .. } = self {
            d.insert("token_address".into(), token.to_checksum(None));
        }
        d
    }
}

impl<E: Into<AttemptError>> From<SendError<E>> for AttemptError {
    fn from(e: SendError<E>) -> Self {
        match e {
            SendError::Chain(c) => AttemptError::Chain(c),
            SendError::Journal(j) => j.into(),
        }
    }
}

/// Everything a worker needs, shared by its in-flight jobs.
pub struct Deployer {
    settings: Settings,
    pub queues: Queues,
    journal: Journal,
    chain: Chain,
    rules: Rules,
    lock_seq: AtomicU64,
    audit: Audit,
    status: Arc<WorkerStatus>,
}

/// A finished attempt: the event to publish, the model's token, and whether this attempt
/// created it (false: an earlier delivery did and the event is re-published).
struct Done {
    event: String,
    token: Address,
    created: bool,
}

/// Where a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Deployed,
    DeadLettered,
    /// Shutdown came first; the message stays in the processing list for recovery.
    Abandoned,
}

impl Deployer {
    pub fn new(
        settings: Settings,
        queues: Queues,
        journal: Journal,
        chain: Chain,
        status: Arc<WorkerStatus>,
    ) -> Deployer {
        let rules = Rules {
            max_message_bytes: settings.pipeline.max_message_bytes,
            min_improvement_percentage: settings.pipeline.min_improvement_percentage,
        };
        let audit = Audit::new(queues.client().clone(), &settings, queues.worker_id.clone());
        Deployer {
            audit,
            settings,
            queues,
            journal,
            chain,
            rules,
            lock_seq: AtomicU64::new(0),
            status,
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(
                self.settings.pipeline.backoff_initial_ms,
            ))
            .with_max_delay(Duration::from_millis(self.settings.pipeline.backoff_max_ms))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Handles one raw message to its end: deployed, dead-lettered, or left for recovery.
    pub async fn handle(&self, raw: &[u8], shutdown: &CancellationToken) -> Outcome {
        let started = Instant::now();
        let first_attempt_at = message::rfc3339(Utc::now());
        let msg = match message::parse(raw, &self.rules) {
            Ok(m) => m,
            Err(rejection) => {
                warn!(message_id = %message::fallback_id(raw), code = %rejection.code, field = %rejection.field, rule = %rejection.rule, "message rejected");
                let letter = self.letter_for_rejection(raw, &rejection, &first_attempt_at);
                return self.dead_letter(raw, letter, "rejected", shutdown).await;
            }
        };
        let span = tracing::info_span!(
            "message",
            message_id = %msg.message_id,
            model_id = %msg.model.model_id,
            mlflow_run_id = msg.model.mlflow_run_id.as_deref().unwrap_or(""),
        );
        async {
            let mut delays = self.backoff();
            let mut attempt: u32 = 0;
            let mut fee_wait = FeeWait::new(&self.status);
            loop {
                attempt += 1;
                // Every line of an attempt carries all correlation fields (one span, flat).
                let attempt_span = tracing::info_span!(
                    "attempt",
                    message_id = %msg.message_id,
                    model_id = %msg.model.model_id,
                    mlflow_run_id = msg.model.mlflow_run_id.as_deref().unwrap_or(""),
                    attempt,
                );
                self.audit
                    .record("attempt", self.fields(&msg.message_id, &msg.model.model_id, [("attempt", attempt.to_string())]))
                    .await;
                let result = self
                    .attempt(&msg, &first_attempt_at)
                    .instrument(attempt_span)
                    .await;
                fee_wait.set(matches!(
                    result,
                    Err(AttemptError::Chain(ChainError::FeeAboveCap { .. }))
                ));
                match result {
                    Ok(Done { event, token, created }) => {
                        let outcome = self.publish(raw, &event, shutdown).await;
                        if outcome == Outcome::Deployed {
                            let elapsed = started.elapsed();
                            info!(elapsed_ms = elapsed.as_millis() as u64, created, "token deployed and event published");
                            let how = if created { "created" } else { "republished" };
                            metrics::counter!(names::MESSAGES, "result" => "deployed").increment(1);
                            metrics::counter!(names::DEPLOYMENTS, "outcome" => how).increment(1);
                            metrics::histogram!(names::DEPLOYMENT_DURATION).record(elapsed.as_secs_f64());
                            self.audit
                                .record("deployed", self.fields(&msg.message_id, &msg.model.model_id, [
                                    ("attempt", attempt.to_string()),
                                    ("result", how.to_owned()),
                                    ("token_address", token.to_checksum(None)),
                                    ("elapsed_ms", elapsed.as_millis().to_string()),
                                ]))
                                .await;
                        }
                        return outcome;
                    }
                    Err(e) if self.should_retry(&e, attempt, started) => {
                        let delay = delays.next().unwrap_or(Duration::from_secs(1));
                        warn!(error = %e, code = e.code(), attempt, delay_ms = delay.as_millis() as u64, "attempt failed, retrying");
                        metrics::counter!(names::RETRIES, "code" => e.code()).increment(1);
                        self.audit
                            .record("retry", self.fields(&msg.message_id, &msg.model.model_id, [
                                ("attempt", attempt.to_string()),
                                ("code", e.code().to_owned()),
                                ("error", e.to_string()),
                            ]))
                            .await;
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => return Outcome::Abandoned,
                        }
                    }
                    Err(e) => {
                        error!(error = %e, code = e.code(), attempts = attempt, "giving up on message");
                        metrics::counter!(names::DEPLOYMENTS, "outcome" => "failed").increment(1);
                        let error = DeadLetterError {
                            code: e.code().into(),
                            field: None,
                            rule: None,
                            message: e.to_string(),
                            details: e.details(),
                        };
                        let letter = DeadLetter {
                            message_id: msg.message_id.clone(),
                            model_id: Some(msg.model.model_id.clone()),
                            producer_retry_count: msg.producer_retry_count,
                            producer_max_retries: msg.producer_max_retries,
                            ..DeadLetter::new(raw, error, attempt, &first_attempt_at, &self.queues.worker_id)
                        };
                        return self.dead_letter(raw, letter, "failed", shutdown).await;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Retry a retryable fault up to `pipeline.max_retries`; fees above the cap are waited
    /// out for `chain.fee_cap_wait_secs` however many attempts that takes.
    fn should_retry(&self, e: &AttemptError, attempt: u32, started: Instant) -> bool {
        if matches!(e, AttemptError::Chain(ChainError::FeeAboveCap { .. })) {
            return started.elapsed() < Duration::from_secs(self.settings.chain.fee_cap_wait_secs);
        }
        e.is_retryable() && attempt <= self.settings.pipeline.max_retries
    }

    fn letter_for_rejection(&self, raw: &[u8], r: &Rejection, at: &str) -> DeadLetter {
        // Best effort: a refused message may still say which model and message it was about.
        let loose: Option<serde_json::Value> = serde_json::from_slice(raw).ok();
        let pick = |k: &str| {
            loose.as_ref().and_then(|v| {
                v.get("payload")
                    .and_then(|p| p.get(k))
                    .or_else(|| v.get(k))
                    .and_then(|x| x.as_str())
                    .map(|s| s.chars().take(128).collect::<String>())
            })
        };
        let error = DeadLetterError {
            code: r.code.clone(),
            field: Some(r.field.clone()),
            rule: Some(r.rule.clone()),
            message: r.message.clone(),
            details: BTreeMap::new(),
        };
        let letter = DeadLetter::new(raw, error, 1, at, &self.queues.worker_id);
        DeadLetter {
            message_id: pick("message_id").unwrap_or(letter.message_id.clone()),
            model_id: pick("model_id"),
            ..letter
        }
    }

    /// Publishes and acks, retrying Redis until it answers or shutdown comes. A message whose
    /// publication is cut short by shutdown stays in the processing list; its event is in the
    /// journal, so the redelivery re-publishes the same event.
    async fn publish(&self, raw: &[u8], event: &str, shutdown: &CancellationToken) -> Outcome {
        self.redis_until_done(shutdown, || self.queues.ack_with_event(raw, event))
            .await
            .map(|_| Outcome::Deployed)
            .unwrap_or(Outcome::Abandoned)
    }

    /// Audit fields naming the message, plus `extra`.
    fn fields<const N: usize>(
        &self,
        message_id: &str,
        model_id: &str,
        extra: [(&'static str, String); N],
    ) -> Fields {
        let mut f = Fields::from(extra);
        f.insert("message_id", message_id.to_owned());
        f.insert("model_id", model_id.to_owned());
        f.insert("signer", self.chain.signer.to_checksum(None));
        f
    }

    /// `result` is the `hokusai_messages_total` label: `rejected` or `failed`.
    async fn dead_letter(
        &self,
        raw: &[u8],
        letter: DeadLetter,
        result: &'static str,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let entry = serde_json::to_string(&letter).expect("DeadLetter always serializes");
        let failure = serde_json::to_string(&DeploymentFailed::from_dead_letter(&letter))
            .expect("DeploymentFailed always serializes");
        let code = letter.error.code.clone();
        let r = self
            .redis_until_done(shutdown, || {
                self.queues
                    .dead_letter(raw, &letter.message_id, &entry, &failure)
            })
            .await;
        match r {
            Some(()) => {
                metrics::counter!(names::MESSAGES, "result" => result).increment(1);
                metrics::counter!(names::DLQ_MOVES, "code" => code.clone()).increment(1);
                let mut f = self.fields(
                    &letter.message_id,
                    letter.model_id.as_deref().unwrap_or(""),
                    [
                        ("result", result.to_owned()),
                        ("code", code),
                        ("attempts", letter.attempts.to_string()),
                        ("error", letter.error.message.clone()),
                    ],
                );
                f.insert("field", letter.error.field.clone().unwrap_or_default());
                f.insert("rule", letter.error.rule.clone().unwrap_or_default());
                self.audit.record("dead_lettered", f).await;
                Outcome::DeadLettered
            }
            None => Outcome::Abandoned,
        }
    }

    async fn redis_until_done<F, Fut>(&self, shutdown: &CancellationToken, op: F) -> Option<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), QueueError>>,
    {
        let mut delays = self.backoff();
        loop {
            match op().await {
                Ok(()) => return Some(()),
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    warn!(error = %e, "redis write failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// One attempt: under the model's lock, resume from the journal and return the event.
    /// Returns the event and whether this attempt created the token (false: re-published).
    async fn attempt(&self, msg: &Inbound, first_attempt_at: &str) -> Result<Done, AttemptError> {
        let model_id = &msg.model.model_id;
        let owner = format!(
            "{}|{}|{}",
            self.queues.worker_id,
            self.queues.instance,
            self.lock_seq.fetch_add(1, Ordering::Relaxed)
        );
        if !self
            .queues
            .lock_model(model_id, &owner, self.settings.pipeline.model_lock_ttl_secs)
            .await?
        {
            return Err(AttemptError::ModelBusy(model_id.clone()));
        }
        let result = self.attempt_locked(msg, first_attempt_at).await;
        if let Err(e) = self.queues.unlock_model(model_id, &owner).await {
            // The lock expires by itself; a dead owner's lock is taken over at once anyway.
            warn!(error = %e, "could not release model lock");
        }
        result
    }

    async fn attempt_locked(
        &self,
        msg: &Inbound,
        first_attempt_at: &str,
    ) -> Result<Done, AttemptError> {
        let model_id = &msg.model.model_id;
        let mut entry = self.journal.load(model_id).await?;
        if let Some(event) = &entry.event {
            if entry.message_id.as_deref() == Some(msg.message_id.as_str()) {
                info!("already deployed: re-publishing the journaled event");
                return Ok(Done {
                    event: event.clone(),
                    token: entry.token_address.unwrap_or_default(),
                    created: false,
                });
            }
            let token = entry.token_address.unwrap_or_default();
            return Err(AttemptError::TokenExists {
                model_id: model_id.clone(),
                token,
            });
        }
        if entry.message_id.is_none() {
            self.journal
                .begin(&msg.model, &msg.message_id, first_attempt_at)
                .await?;
            entry.message_id = Some(msg.message_id.clone());
            entry.model = Some(msg.model.clone());
            entry.first_attempt_at = Some(first_attempt_at.to_owned());
        }
        // An unfinished deployment started by another message is finished as it began.
        let model = entry.model.clone().unwrap_or_else(|| msg.model.clone());

        // One model id, one address (CREATE2): known before anything is signed.
        let token = self.chain.factory.predict(model_id);
        if let Some(registered) = self.chain.registered_token(model_id).await? {
            // Ours only if this journal holds the transaction that put it there: the journal
            // is written before every broadcast, so otherwise another message won the model.
            if registered != token || entry.deploy.is_none() {
                return Err(AttemptError::TokenExists {
                    model_id: model_id.clone(),
                    token: registered,
                });
            }
        }
        let call = self.chain.deploy_token_call(&model);
        let rec = self.send(&mut entry, model_id, call, token).await?;
        let message_id = entry.message_id.clone().unwrap_or_default();
        let mined = match self.mined(&message_id, model_id, &rec, token).await {
            Ok(m) => m,
            Err(e @ AttemptError::Chain(ChainError::Reverted { .. })) => {
                // Another message's deployToken took the model between our check and our block.
                return Err(match self.chain.registered_token(model_id).await? {
                    Some(winner) => AttemptError::TokenExists {
                        model_id: model_id.clone(),
                        token: winner,
                    },
                    None => e,
                });
            }
            Err(e) => return Err(e),
        };
        let event = self.event(&entry, &model, token, &mined);
        let event = serde_json::to_string(&event).expect("TokenDeployed always serializes");
        self.journal.record_event(model_id, &event).await?;
        Ok(Done {
            event,
            token,
            created: true,
        })
    }

    /// Makes sure the model's transaction is on its way and returns it: a journaled one that
    /// was mined or can still land (re-broadcast byte-identical), or else a new one, journaled
    /// before it is broadcast. Rebuilds only when the journaled nonce went to another
    /// transaction. A simulation the manager refuses because the model has a token is
    /// `TOKEN_EXISTS` with that token.
    async fn send(
        &self,
        entry: &mut Entry,
        model_id: &str,
        call: Call,
        token: Address,
    ) -> Result<TxRecord, AttemptError> {
        let message_id = entry.message_id.clone().unwrap_or_default();
        if let Some(rec) = entry
            .deploy
            .clone()
            .filter(|r| !self.chain.calls_our_manager(r))
        {
            warn!(hash = %rec.hash, "the journal holds a transaction for other contracts; it is not ours to finish");
            return Err(AttemptError::ForeignJournal {
                model_id: model_id.to_owned(),
                hash: rec.hash,
            });
        }
        if let Some(rec) = entry.deploy.clone() {
            if self.chain.landed(&rec).await?.is_some() {
                return Ok(rec);
            }
            if self.chain.can_still_land(&rec).await? {
                info!(hash = %rec.hash, nonce = rec.nonce, "re-broadcasting journaled transaction");
                self.audit_tx(&message_id, "tx_rebroadcast", model_id, &rec, [])
                    .await;
                match self.chain.broadcast(&rec).await {
                    Ok(()) | Err(ChainError::NonceUsed { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(rec);
            }
            warn!(hash = %rec.hash, nonce = rec.nonce, "journaled transaction can no longer land; rebuilding");
            self.journal.clear_tx(model_id).await?;
            entry.clear_tx();
        }
        let gas = self
            .chain
            .estimate(&call)
            .await
            .map_err(|e| token_exists_or(e.into(), model_id))?;
        let journal = &self.journal;
        let signed = self
            .chain
            .sign_and_send(&call, gas, |rec| async move {
                journal.record_tx(model_id, &rec, token).await?;
                Ok::<_, JournalError>(rec)
            })
            .await;
        let rec = match signed {
            Ok(rec) => rec,
            Err(SendError::Chain(e)) if matches!(e, ChainError::NonceUsed { .. }) => {
                // Never broadcast: forget it so the retry signs with a fresh nonce.
                self.journal.clear_tx(model_id).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        info!(hash = %rec.hash, nonce = rec.nonce, token = %token, "transaction sent");
        entry.set_tx(rec.clone(), token);
        self.audit_tx(&message_id, "tx_sent", model_id, &rec, [])
            .await;
        Ok(rec)
    }

    /// Waits for a sent transaction's receipt, replacing it with higher fees while it is stuck
    /// (each version journaled before broadcast; whichever lands counts). A revert is final:
    /// the journal forgets the transaction so that the next attempt starts this step over.
    async fn mined(
        &self,
        message_id: &str,
        model_id: &str,
        rec: &TxRecord,
        token: Address,
    ) -> Result<Mined, AttemptError> {
        let deadline = self.chain.receipt_deadline();
        let mut rec = rec.clone();
        let mut capped = false;
        loop {
            let replace_at = Instant::now() + self.chain.replace_after;
            match self.chain.wait_mined(&rec, deadline, replace_at).await {
                Ok(Waited::Mined(m)) => {
                    let fee_gwei =
                        (u128::from(m.gas_used) * m.effective_gas_price / 1_000_000_000) as u64;
                    metrics::counter!(names::GAS_USED, "step" => STEP).increment(m.gas_used);
                    metrics::counter!(names::FEES_PAID, "step" => STEP).increment(fee_gwei);
                    let extra = [
                        ("block_number", m.block_number.to_string()),
                        ("gas_used", m.gas_used.to_string()),
                        ("effective_gas_price", m.effective_gas_price.to_string()),
                        ("landed_hash", m.hash.to_string()),
                    ];
                    self.audit_tx(message_id, "tx_mined", model_id, &rec, extra)
                        .await;
                    return Ok(m);
                }
                Ok(Waited::Replace(why)) => {
                    let journal = &self.journal;
                    let replaced = self
                        .chain
                        .replace(&rec, |new| async move {
                            journal.record_tx(model_id, &new, token).await?;
                            Ok::<_, JournalError>(new)
                        })
                        .await;
                    match replaced {
                        Ok(Some(new)) => {
                            warn!(reason = why.label(), old = %rec.hash, hash = %new.hash, nonce = new.nonce, "stuck transaction replaced with higher fees");
                            metrics::counter!(names::REPLACEMENTS, "step" => STEP, "reason" => why.label())
                                .increment(1);
                            let extra = [
                                ("reason", why.label().to_owned()),
                                ("replaces", rec.hash.to_string()),
                            ];
                            self.audit_tx(message_id, "tx_replaced", model_id, &new, extra)
                                .await;
                            capped = false;
                            rec = new;
                        }
                        Ok(None) => {
                            if !capped {
                                warn!(hash = %rec.hash, "stuck transaction cannot be replaced: the fee cap leaves no room to raise its fees; waiting");
                                metrics::counter!(names::REPLACEMENTS, "step" => STEP, "reason" => "capped")
                                    .increment(1);
                                capped = true;
                            }
                            if why == Stuck::Dropped {
                                // Nothing to do until fees fall; don't ask every block.
                                tokio::time::sleep(
                                    self.chain.replace_after.min(Duration::from_secs(10)),
                                )
                                .await;
                            }
                        }
                        Err(SendError::Journal(e)) => return Err(e.into()),
                        Err(SendError::Chain(e)) => {
                            warn!(error = %e, hash = %rec.hash, "replacing a stuck transaction failed; waiting on")
                        }
                    }
                }
                Err(e @ ChainError::Reverted { .. }) => {
                    self.journal.clear_tx(model_id).await?;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn audit_tx<const N: usize>(
        &self,
        message_id: &str,
        action: &str,
        model_id: &str,
        rec: &TxRecord,
        extra: [(&'static str, String); N],
    ) {
        let mut f = self.fields(message_id, model_id, extra);
        f.insert("step", STEP.to_owned());
        f.insert("tx_hash", rec.hash.to_string());
        f.insert("nonce", rec.nonce.to_string());
        f.insert("signer", rec.signer.to_checksum(None));
        self.audit.record(action, f).await;
    }

    /// The `token_deployed` event of seed 001. Its registry fields name the same transaction
    /// as its deployment fields: `deployToken` deploys and registers at once.
    fn event(
        &self,
        entry: &Entry,
        model: &message::ModelReady,
        token: Address,
        mined: &Mined,
    ) -> TokenDeployed {
        let network = self.settings.network(self.chain.chain_id);
        TokenDeployed {
            event_type: "token_deployed".into(),
            model_id: model.model_id.clone(),
            token_address: token.to_checksum(None),
            token_symbol: model.chain_symbol.clone(),
            token_name: model.token_name.clone(),
            transaction_hash: mined.hash.to_string(),
            registry_transaction_hash: mined.hash.to_string(),
            mlflow_run_id: model.mlflow_run_id.clone(),
            model_name: model.model_name.clone(),
            model_version: model.model_version.clone(),
            deployment_timestamp: message::rfc3339(Utc::now()),
            deployer_address: entry
                .deploy
                .as_ref()
                .map(|d| d.signer)
                .unwrap_or(self.chain.signer)
                .to_checksum(None),
            network: network.name,
            block_number: mined.block_number,
            gas_used: mined.gas_used.to_string(),
            gas_price: mined.effective_gas_price.to_string(),
            contributor_address: model.contributor_address.map(|a| a.to_checksum(None)),
            performance_metric: model.metric_name.clone(),
            performance_improvement: model.improvement_percentage,
            message_version: message::EVENT_VERSION.into(),
            source_message_id: entry.message_id.clone().unwrap_or_default(),
            chain_id: self.chain.chain_id,
            registry_block_number: mined.block_number,
            registry_gas_used: mined.gas_used.to_string(),
            registry_gas_price: mined.effective_gas_price.to_string(),
        }
    }
}

/// What the ops server shows of a running worker; the worker updates it as it goes.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    phase: std::sync::Mutex<&'static str>,
    paused: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    fee_waiting: std::sync::atomic::AtomicUsize,
    worker_id: std::sync::OnceLock<String>,
    signer: std::sync::OnceLock<String>,
}

impl WorkerStatus {
    /// `starting`, `waiting_for_key`, `connecting_chain`, `running`, `draining` or `stopped`.
    pub fn phase(&self) -> &'static str {
        let p = *self.phase.lock().expect("never poisoned");
        if p.is_empty() {
            "starting"
        } else {
            p
        }
    }
    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().expect("never poisoned") = p;
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Messages held back because fees are above the cap.
    pub fn waiting_for_fees(&self) -> usize {
        self.fee_waiting.load(Ordering::Relaxed)
    }
    pub fn worker_id(&self) -> &str {
        self.worker_id.get().map(String::as_str).unwrap_or("")
    }
    pub fn signer(&self) -> Option<&str> {
        self.signer.get().map(String::as_str)
    }
}

/// Counts a message in [`WorkerStatus::waiting_for_fees`] while its last attempt found fees
/// above the cap, and no longer once it ends whichever way.
struct FeeWait<'a> {
    status: &'a WorkerStatus,
    counted: bool,
}

impl<'a> FeeWait<'a> {
    fn new(status: &'a WorkerStatus) -> Self {
        FeeWait {
            status,
            counted: false,
        }
    }

    fn set(&mut self, waiting: bool) {
        if waiting != self.counted {
            if waiting {
                self.status.fee_waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                self.status.fee_waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.counted = waiting;
        }
    }
}

impl Drop for FeeWait<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Options of a worker run that do not come from configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Off only in the test that shows the journal is what prevents double deployments.
    pub journal: bool,
    /// How long shutdown lets in-flight messages finish before leaving them for recovery.
    pub drain_deadline: Duration,
    /// Shared with the ops server.
    pub status: Arc<WorkerStatus>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            journal: true,
            drain_deadline: Duration::from_secs(30),
            status: Arc::default(),
        }
    }
}

/// Runs the worker until `shutdown` is cancelled; returns once in-flight work has drained.
/// Fails (for the orchestrator to restart it) if its signer lease is lost.
pub async fn run(
    settings: Settings,
    keys: Vec<DeployerKey>,
    opts: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(!keys.is_empty(), "no deployer key configured");
    let worker_id = settings
        .pipeline
        .worker_id
        .clone()
        .unwrap_or_else(default_worker_id);
    let status = opts.status.clone();
    let _ = status.worker_id.set(worker_id.clone());
    let redis = Redis::connect(&settings)?;
    let queues = Queues::new(redis.clone(), &settings, worker_id.clone());

    // Heartbeat first, so no other process mistakes us for dead while we start.
    let tasks = TaskTracker::new();
    let background = CancellationToken::new();
    let leased: Arc<tokio::sync::OnceCell<String>> = Arc::new(tokio::sync::OnceCell::new());
    let lease_lost = CancellationToken::new();
    let hb_every = Duration::from_secs(settings.pipeline.heartbeat_ttl_secs / 3);
    {
        let (q, stop, leased, lost) = (
            queues.clone(),
            background.clone(),
            leased.clone(),
            lease_lost.clone(),
        );
        tasks.spawn(async move {
            loop {
                if let Err(e) = q.heartbeat().await {
                    warn!(error = %e, "heartbeat failed");
                }
                if let Some(signer) = leased.get() {
                    match q.renew_signer(signer).await {
                        Ok(true) => {}
                        Ok(false) => {
                            error!(signer = %signer, "signer lease lost to another process: stopping at once");
                            lost.cancel();
                            return;
                        }
                        Err(e) => warn!(error = %e, "signer lease renewal failed"),
                    }
                }
                match q.reap().await {
                    Ok(n) if n > 0 => metrics::counter!(names::RECOVERED).increment(n),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "reaper failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(hb_every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let stop_background = || async {
        background.cancel();
        tasks.close();
        tasks.wait().await;
    };

    // Learn each key's address (a KMS key's public key is a network call away), then lease one
    // key of the pool; with none free, wait (another replica holds each).
    status.set_phase("waiting_for_key");
    let mut deployers = Vec::with_capacity(keys.len());
    loop {
        match Wallet::resolve_pool(&keys, &settings, &mut deployers).await {
            Ok(()) => break,
            Err(e) if e.is_retryable() => warn!(error = %e, "deployer key not reachable yet"),
            Err(e) => {
                stop_background().await;
                return Err(e.into());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => { stop_background().await; return Ok(()); }
        }
    }
    let key = loop {
        match lease_any(&queues, &deployers).await {
            Ok(Some(deployer)) => {
                let signer = deployer.address.to_string();
                let _ = status.signer.set(signer.clone());
                leased.set(signer).expect("leased once");
                break deployer;
            }
            Ok(None) => warn!(
                keys = keys.len(),
                "every deployer key is leased by another process; waiting"
            ),
            Err(e) => warn!(error = %e, "redis not reachable yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => { stop_background().await; return Ok(()); }
        }
    };
    status.set_phase("connecting_chain");
    let Some(chain) = connect_chain(&settings, &key, &shutdown).await? else {
        release(&queues, &leased).await;
        stop_background().await;
        return Ok(());
    };
    let journal = Journal::new(
        redis.commands.clone(),
        &settings.queues.state_prefix,
        opts.journal,
    );
    info!(worker_id = %worker_id, signer = %chain.signer, chain_id = chain.chain_id, registry = %chain.registry, "worker starting");
    let deployer = Arc::new(Deployer::new(
        settings.clone(),
        queues.clone(),
        journal,
        chain,
        status.clone(),
    ));

    loop {
        match queues.recover_own().await {
            Ok(n) => {
                if n > 0 {
                    warn!(
                        requeued = n,
                        "requeued messages a previous run of this worker left in flight"
                    );
                }
                break;
            }
            Err(e) => {
                warn!(error = %e, "redis not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => { release(&queues, &leased).await; stop_background().await; return Ok(()); }
                }
            }
        }
    }

    let permits = Arc::new(Semaphore::new(settings.pipeline.concurrency));
    // The raw messages our jobs hold: whatever else is in our processing list after a failed
    // BLMOVE was moved by the server without reaching us, and goes back to the queue.
    let in_flight: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
    let mut sweep_needed = false;
    let jobs = TaskTracker::new();
    let job_shutdown = CancellationToken::new();
    let mut redis_errors = 0u32;
    status.set_phase("running");
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
            _ = lease_lost.cancelled() => break,
        };
        if shutdown.is_cancelled() || lease_lost.is_cancelled() {
            break;
        }
        if sweep_needed {
            let held = in_flight
                .lock()
                .expect("never poisoned: no panics while held")
                .clone();
            match queues.sweep_orphans(held).await {
                Ok(n) => {
                    sweep_needed = false;
                    if n > 0 {
                        warn!(
                            requeued = n,
                            "requeued messages moved to us whose delivery was lost"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "sweeping our processing list failed; will retry"),
            }
        }
        // Paused: take nothing; a message taken in the instant the flag was set goes back.
        let paused = queues.paused().await.unwrap_or(false);
        if paused != status.is_paused() {
            status.paused.store(paused, Ordering::Relaxed);
            info!(paused, "pause flag changed");
        }
        if paused {
            drop(permit);
            tokio::select! {
                _ = tokio::time::sleep(PAUSE_POLL) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        match queues.take().await {
            Ok(Some(raw)) if queues.paused().await.unwrap_or(false) => {
                if let Err(e) = queues.put_back(&raw).await {
                    warn!(error = %e, "could not put back a message taken while pausing; it is swept later");
                    sweep_needed = true;
                }
            }
            Ok(Some(raw)) => {
                redis_errors = 0;
                in_flight.lock().expect("never poisoned").push(raw.clone());
                let (d, stop, held) = (deployer.clone(), job_shutdown.clone(), in_flight.clone());
                let st = status.clone();
                st.in_flight.fetch_add(1, Ordering::Relaxed);
                jobs.spawn(async move {
                    let _permit = permit;
                    d.handle(&raw, &stop).await;
                    st.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let mut held = held.lock().expect("never poisoned");
                    if let Some(i) = held.iter().position(|m| *m == raw) {
                        held.swap_remove(i);
                    }
                });
            }
            Ok(None) => {}
            Err(e) => {
                sweep_needed = true;
                redis_errors = redis_errors.saturating_add(1);
                let delay = Duration::from_millis(100 * 2u64.pow(redis_errors.min(6)));
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "taking a message failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }

    jobs.close();
    if lease_lost.is_cancelled() {
        // Another process signs with our key now: sending more would collide on nonces.
        job_shutdown.cancel();
        jobs.wait().await;
        stop_background().await;
        redis.quit().await;
        anyhow::bail!("signer lease lost; exiting so the orchestrator restarts this worker");
    }
    status.set_phase("draining");
    info!(
        in_flight = jobs.len(),
        "shutting down: no new messages; draining"
    );
    if tokio::time::timeout(opts.drain_deadline, jobs.wait())
        .await
        .is_err()
    {
        warn!("drain deadline passed; leaving unfinished messages for recovery");
        job_shutdown.cancel();
        jobs.wait().await;
    }
    stop_background().await;
    release(&queues, &leased).await;
    if let Err(e) = queues.retire().await {
        warn!(error = %e, "could not remove heartbeat");
    }
    redis.quit().await;
    status.set_phase("stopped");
    info!("worker stopped");
    Ok(())
}

/// A `deployToken` the manager refuses because the model has a token is `TOKEN_EXISTS` (the
/// revert names that token); anything else stays as it is.
fn token_exists_or(e: AttemptError, model_id: &str) -> AttemptError {
    match &e {
        AttemptError::Chain(c) => match c.registered_elsewhere() {
            Some(token) => AttemptError::TokenExists {
                model_id: model_id.to_owned(),
                token,
            },
            None => e,
        },
        _ => e,
    }
}

/// The `step` label of the transaction metrics: one transaction per model now.
const STEP: &str = "deploy";

/// How often a paused worker looks at the flag again.
const PAUSE_POLL: Duration = Duration::from_millis(250);

/// Leases the first free key of the pool.
async fn lease_any(queues: &Queues, deployers: &[Wallet]) -> Result<Option<Wallet>, AttemptError> {
    for d in deployers {
        if queues.lease_signer(&d.address.to_string()).await? {
            return Ok(Some(d.clone()));
        }
    }
    Ok(None)
}

async fn release(queues: &Queues, leased: &tokio::sync::OnceCell<String>) {
    if let Some(signer) = leased.get() {
        if let Err(e) = queues.release_signer(signer).await {
            warn!(error = %e, "could not release signer lease; it lapses by itself");
        }
    }
}

/// Connects to the chain, retrying while the RPC is unreachable; `None` if shutdown came first.
async fn connect_chain(
    settings: &Settings,
    key: &Wallet,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Chain>> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Chain::connect(settings, key).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "rpc not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(48)
        .collect();
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}
