//! One attempt at a valid message, under the model's lock: resume from the journal, send the
//! model's one `deployToken` transaction (journaled before broadcast), wait for its receipt
//! (replacing it while stuck), and build the event.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use chrono::Utc;
use tracing::{info, warn};

use super::{AttemptError, Deployer, Done, STEP};
use crate::chain::{Call, ChainError, Mined, SendError, Stuck, Waited};
use crate::journal::{Entry, JournalError, TxRecord};
use crate::message::{self, Inbound, TokenDeployed};
use crate::telemetry::names;

impl Deployer {
    /// One attempt: under the model's lock, resume from the journal and return the event.
    /// Returns the event and whether this attempt created the token (false: re-published).
    /// `reorged`: the deployment is made again because a reorganisation removed it; the event
    /// says so.
    pub(super) async fn attempt(
        &self,
        msg: &Inbound,
        first_attempt_at: &str,
        reorged: bool,
    ) -> Result<Done, AttemptError> {
        let model_id = &msg.model.model_id;
        let owner = self.lock(model_id).await?;
        let result = self.attempt_locked(msg, first_attempt_at, reorged).await;
        self.unlock(model_id, &owner).await;
        result
    }

    /// Takes the model's lock (one worker at a time works on a model); returns the owner tag
    /// to release it with.
    pub(super) async fn lock(&self, model_id: &str) -> Result<String, AttemptError> {
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
            return Err(AttemptError::ModelBusy(model_id.to_owned()));
        }
        Ok(owner)
    }

    pub(super) async fn unlock(&self, model_id: &str, owner: &str) {
        if let Err(e) = self.queues.unlock_model(model_id, owner).await {
            // The lock expires by itself; a dead owner's lock is taken over at once anyway.
            warn!(error = %e, "could not release model lock");
        }
    }

    async fn attempt_locked(
        &self,
        msg: &Inbound,
        first_attempt_at: &str,
        reorged: bool,
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
                    block: entry.event_block,
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
        let mut event = self.event(&entry, &model, token, &mined);
        event.reorged = reorged;
        let event = serde_json::to_string(&event).expect("TokenDeployed always serializes");
        self.journal
            .record_event(
                model_id,
                &event,
                rec.signer,
                mined.block_number,
                mined.block_hash,
            )
            .await?;
        Ok(Done {
            event,
            token,
            created: true,
            block: Some((mined.block_number, mined.block_hash)),
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
                // A record written before a failed replica wait (or by a process that died)
                // may sit on the primary alone: our lock, written after it on this connection,
                // reaches the replicas only after it, so waiting for the lock covers it.
                self.journal.durable().await?;
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
            reorged: false,
        }
    }
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
