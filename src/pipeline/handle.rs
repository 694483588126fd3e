//! One message from taken to acked or dead-lettered: parsing and validation, the retry
//! decision with backoff, publishing the event and acknowledging in one step, dead letters.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::{AttemptError, Deployer, Done, FeeWait, Outcome, WorkerStatus};
use crate::audit::{Audit, Fields};
use crate::chain::{Chain, ChainError};
use crate::config::Settings;
use crate::journal::{Journal, JournalError};
use crate::message::{self, DeadLetter, DeadLetterError, DeploymentFailed, Rejection, Rules};
use crate::queue::{QueueError, Queues};
use crate::telemetry::names;

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
            reorg_window: settings.reorg_watch_blocks(chain.chain_id),
            watched: Default::default(),
            outbox: crate::webhooks::Outbox::new(&settings),
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

    pub(super) fn backoff(&self) -> impl Iterator<Item = Duration> {
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
                    .attempt(&msg, &first_attempt_at, false)
                    .instrument(attempt_span)
                    .await;
                fee_wait.set(matches!(
                    result,
                    Err(AttemptError::Chain(ChainError::FeeAboveCap { .. }))
                ));
                self.breaker_count(&result).await;
                match result {
                    Ok(Done { event, token, created, block }) => {
                        let outcome = self.publish(raw, &msg.message_id, &event, shutdown).await;
                        if outcome == Outcome::Deployed {
                            if let Some((number, hash)) = block {
                                self.watch_published(&msg.model.model_id, number, hash);
                            }
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
                    Err(e) if e.is_unreachable() && self.status.breaker.is_open() => {
                        // The chain is out of reach for everyone: wait for the breaker to close
                        // and try again without spending one of this message's retries.
                        warn!(error = %e, attempt, "no RPC URL answers: waiting for the chain breaker to close; this attempt does not count");
                        attempt -= 1;
                        if !self.breaker_closed(shutdown).await {
                            return Outcome::Abandoned;
                        }
                    }
                    Err(AttemptError::Journal(JournalError::NotReplicated(e))) => {
                        // Too few replicas hold the transaction's record: it is not sent, and
                        // the wait for them spends none of this message's retries (a replica
                        // catching up, or a new one after a failover, is a matter of time).
                        attempt -= 1;
                        let delay = delays.next().unwrap_or(Duration::from_secs(1));
                        warn!(error = %e, delay_ms = delay.as_millis() as u64, "waiting for Redis replicas before broadcasting; this attempt does not count");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => return Outcome::Abandoned,
                        }
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
        // Someone else signed with our key at our nonce: their transaction lands or is dropped
        // within a block or two, and then ours is rebuilt or goes through. Bounded by time, as
        // a transaction's wait for its receipt is.
        if matches!(e, AttemptError::Chain(ChainError::NonceUsed { .. }))
            && started.elapsed() < Duration::from_secs(self.settings.chain.receipt_timeout_secs)
        {
            return true;
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
    async fn publish(
        &self,
        raw: &[u8],
        message_id: &str,
        event: &str,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let acked = self
            .redis_until_done(shutdown, || async {
                let webhooks = self.webhooks(message_id, event, true).await?;
                self.queues.ack_with_event(raw, event, &webhooks).await
            })
            .await;
        if acked.is_none() {
            return Outcome::Abandoned;
        }
        // Done once replicas hold it (redis.min_replica_acks); shutdown meanwhile still leaves
        // it published on the primary.
        self.redis_until_done(shutdown, || self.queues.durable())
            .await;
        Outcome::Deployed
    }

    /// The webhook deliveries of a published outcome (`completed`: a `token_deployed` event,
    /// else a `deployment_failed` one): none unless webhooks are configured; the deployment's
    /// callback is read from the API's record only when callbacks are on.
    pub(super) async fn webhooks(
        &self,
        message_id: &str,
        event: &str,
        completed: bool,
    ) -> Result<Vec<String>, QueueError> {
        if !self.outbox.enabled() {
            return Ok(vec![]);
        }
        let callback = self
            .outbox
            .callback(self.queues.client(), message_id)
            .await?;
        Ok(if completed {
            self.outbox
                .completed(message_id, event, callback.as_deref())
        } else {
            self.outbox.failed(message_id, event, callback.as_deref())
        })
    }

    /// Audit fields naming the message, plus `extra`.
    pub(super) fn fields<const N: usize>(
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
            .redis_until_done(shutdown, || async {
                let webhooks = self.webhooks(&letter.message_id, &failure, false).await?;
                self.queues
                    .dead_letter(raw, &letter.message_id, &entry, &failure, &webhooks)
                    .await
            })
            .await;
        if r.is_some() {
            self.redis_until_done(shutdown, || self.queues.durable())
                .await;
        }
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
}
