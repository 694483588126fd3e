//! The reorg watch: a published deployment stays watched for `chain.reorg_watch_blocks`
//! blocks. The watch follows the chain's blocks by hash (one header read per tick); when a
//! block that holds one of our deployments is replaced, the deployment is checked under the
//! model's lock and, if its transaction left the canonical chain, made again through the same
//! path (the journaled bytes re-broadcast, or a new transaction to the same CREATE2 address),
//! then published again with `"reorged": true`.
//!
//! What is watched lives in Redis (`<state_prefix>:reorg_watch:<signer>`, written with the
//! event) so a restart picks it up; the worker that leases the signer watches it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::B256;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{Deployer, Done};
use crate::chain::{count_reorg, Header};
use crate::message::{self, Inbound};
use crate::telemetry::names;

/// Deployments under watch, by the block their event names.
pub(super) type Watched = BTreeMap<u64, Vec<(String, B256)>>;

/// The chain's block hashes by height, as the watch has followed them.
#[derive(Default)]
struct Tracked(BTreeMap<u64, B256>);

impl Deployer {
    /// Puts a published deployment under this worker's watch (it is in Redis already).
    pub(super) fn watch_published(&self, model_id: &str, block: u64, hash: B256) {
        if self.reorg_window == 0 {
            return;
        }
        let mut w = self.watched.lock().expect("never poisoned");
        let models = w.entry(block).or_default();
        models.retain(|(m, _)| m != model_id);
        models.push((model_id.to_owned(), hash));
    }

    /// The watch task: loads what the signer's earlier runs left under watch, then each tick
    /// follows the head and re-checks every deployment whose block was replaced.
    pub(super) async fn reorg_watch(self: Arc<Self>, stop: CancellationToken) {
        let window = self.reorg_window;
        if window == 0 {
            return;
        }
        let tick = self.chain_poll().max(Duration::from_millis(250));
        let jobs = TaskTracker::new();
        let mut tracked = Tracked::default();
        let mut loaded = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.cancelled() => break,
            }
            let latest = match self.chain.head().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "reorg watch: head not read");
                    continue;
                }
            };
            if !loaded {
                match self.load_watch(latest.number, window).await {
                    Ok(unfinished) => {
                        loaded = true;
                        for model_id in unfinished {
                            jobs.spawn(self.clone().redeploy(model_id, None, 0, stop.clone()));
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "reorg watch: could not load what is watched; retrying");
                        continue;
                    }
                }
            }
            if let Err(e) = self.follow(&mut tracked, latest, window).await {
                tracing::debug!(error = %e, "reorg watch: blocks not read");
                continue;
            }
            let floor = latest.number.saturating_sub(window);
            for (model_id, block) in self.replaced(&mut tracked, latest.number, floor).await {
                let depth = latest.number.saturating_sub(block) + 1;
                jobs.spawn(
                    self.clone()
                        .redeploy(model_id, Some(block), depth, stop.clone()),
                );
            }
            if let Err(e) = self.journal.unwatch_below(self.chain.signer, floor).await {
                tracing::debug!(error = %e, "reorg watch: old entries not removed");
            }
        }
        jobs.close();
        jobs.wait().await;
    }

    fn chain_poll(&self) -> Duration {
        Duration::from_millis(self.settings.chain.poll_interval_ms)
    }

    /// Loads the signer's watched deployments; returns those whose event a redeployment cut
    /// short had cleared (they are made again at once).
    async fn load_watch(&self, head: u64, window: u64) -> Result<Vec<String>, super::AttemptError> {
        let entries = self
            .journal
            .watched(self.chain.signer, head.saturating_sub(window))
            .await?;
        let mut unfinished = Vec::new();
        for (model_id, _) in entries {
            match self.journal.load(&model_id).await?.event_block {
                Some((block, hash)) => self.watch_published(&model_id, block, hash),
                None => unfinished.push(model_id),
            }
        }
        if !unfinished.is_empty() {
            warn!(models = ?unfinished, "deployments a reorganisation removed were not made again before the last stop: making them now");
        }
        Ok(unfinished)
    }

    /// Follows the chain to `latest`: reads back from it until a block whose parent is the
    /// hash already known at that height (at most `window` blocks), so a replaced block is
    /// noticed at whatever height. Drops heights above `latest` (a shorter chain) and below
    /// the window.
    async fn follow(
        &self,
        tracked: &mut Tracked,
        latest: Header,
        window: u64,
    ) -> Result<(), crate::chain::ChainError> {
        let t = &mut tracked.0;
        if t.get(&latest.number) != Some(&latest.hash) {
            let mut fetched = vec![latest];
            let mut cur = latest;
            for _ in 0..window {
                let Some(p) = cur.number.checked_sub(1) else {
                    break;
                };
                match t.get(&p) {
                    Some(h) if *h == cur.parent => break,
                    None if t.range(..p).next_back().is_none() => break,
                    _ => match self.chain.header(BlockNumberOrTag::Number(p)).await? {
                        Some(h) => {
                            fetched.push(h);
                            cur = h;
                        }
                        None => break,
                    },
                }
            }
            t.split_off(&(latest.number + 1));
            for h in fetched {
                t.insert(h.number, h.hash);
            }
        }
        let floor = latest.number.saturating_sub(window);
        *t = t.split_off(&floor);
        Ok(())
    }

    /// Takes out of the watch every deployment whose block hash is not the chain's at its
    /// height any more, and returns them with their blocks. Forgets those under `floor`.
    async fn replaced(&self, tracked: &mut Tracked, head: u64, floor: u64) -> Vec<(String, u64)> {
        let mut unknown = Vec::new();
        let mut out = Vec::new();
        {
            let mut w = self.watched.lock().expect("never poisoned");
            *w = w.split_off(&floor);
            for (block, models) in w.range_mut(..=head) {
                match tracked.0.get(block) {
                    Some(h) => {
                        let (gone, kept): (Vec<_>, Vec<_>) =
                            models.drain(..).partition(|(_, mh)| mh != h);
                        *models = kept;
                        out.extend(gone.into_iter().map(|(m, _)| (m, *block)));
                    }
                    None => unknown.push(*block),
                }
            }
            w.retain(|_, models| !models.is_empty());
        }
        // Blocks older than what the watch has followed (loaded at start): one read each,
        // then followed like the others.
        for block in unknown {
            let Ok(Some(h)) = self.chain.canonical_hash(block).await else {
                continue;
            };
            tracked.0.insert(block, h);
            let mut w = self.watched.lock().expect("never poisoned");
            if let Some(models) = w.get_mut(&block) {
                let (gone, kept): (Vec<_>, Vec<_>) = models.drain(..).partition(|(_, mh)| *mh != h);
                *models = kept;
                out.extend(gone.into_iter().map(|(m, _)| (m, block)));
            }
        }
        out
    }

    /// Checks a deployment whose block was replaced and, if its transaction left the chain,
    /// makes it again and publishes the new event with `"reorged": true`. Retries until done
    /// or shutdown (then the cleared event makes the next start do it).
    async fn redeploy(
        self: Arc<Self>,
        model_id: String,
        block: Option<u64>,
        depth: u64,
        stop: CancellationToken,
    ) {
        let mut delays = self.backoff();
        loop {
            match self.redeploy_once(&model_id, block, depth).await {
                Ok(()) => return,
                Err(e) if e.is_retryable() => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    warn!(model_id, error = %e, "re-deploying after a reorganisation failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                Err(e) => {
                    error!(model_id, error = %e, code = e.code(), "re-deploying after a reorganisation failed for good: see docs/runbook.md");
                    self.audit
                        .record(
                            "reorg_redeploy_failed",
                            self.fields(
                                "",
                                &model_id,
                                [("code", e.code().to_owned()), ("error", e.to_string())],
                            ),
                        )
                        .await;
                    return;
                }
            }
        }
    }

    async fn redeploy_once(
        &self,
        model_id: &str,
        block: Option<u64>,
        depth: u64,
    ) -> Result<(), super::AttemptError> {
        // Under the lock: is the recorded block really gone? (Another worker, or a redelivered
        // message, may have seen to it already.)
        let owner = self.lock(model_id).await?;
        let checked = async {
            let entry = self.journal.load(model_id).await?;
            if let Some((b, h)) = entry.event_block {
                if self.chain.canonical_hash(b).await? == Some(h) {
                    self.watch_published(model_id, b, h);
                    return Ok(None);
                }
                let tx = entry.deploy.as_ref().map(|d| d.hash.to_string()).unwrap_or_default();
                warn!(model_id, block = b, depth, tx_hash = %tx, "reorganisation: the block of a published deployment left the chain; deploying it again");
                count_reorg(depth.max(1));
                self.audit
                    .record(
                        "reorg",
                        self.fields(
                            entry.message_id.as_deref().unwrap_or(""),
                            model_id,
                            [
                                ("block_number", b.to_string()),
                                ("block_hash", h.to_string()),
                                ("tx_hash", tx),
                                ("depth", depth.to_string()),
                                ("depth_bucket", crate::chain::depth_bucket(depth).to_owned()),
                            ],
                        ),
                    )
                    .await;
                // Watched as of the head until the new event replaces it: a crash from here on
                // leaves the model to be found and deployed again by the next start.
                let head = self.chain.head().await?.number;
                self.journal.rewatch(self.chain.signer, model_id, head).await?;
                self.journal.clear_event(model_id).await?;
            } else if block.is_some() {
                // Watched in memory, yet no event: a redeployment is already under way.
                return Ok(None);
            }
            Ok::<_, super::AttemptError>(Some(entry))
        }
        .await;
        self.unlock(model_id, &owner).await;
        let Some(entry) = checked? else {
            return Ok(());
        };
        let (Some(message_id), Some(model)) = (entry.message_id.clone(), entry.model.clone())
        else {
            return Ok(());
        };
        let msg = Inbound {
            message_id,
            model,
            producer_retry_count: None,
            producer_max_retries: None,
        };
        let first = entry
            .first_attempt_at
            .clone()
            .unwrap_or_else(|| message::rfc3339(Utc::now()));
        let Done {
            event,
            token,
            block,
            ..
        } = self.attempt(&msg, &first, true).await?;
        let webhooks = self.webhooks(&msg.message_id, &event, true).await?;
        self.queues.publish(&event, &webhooks).await?;
        if let Some((number, hash)) = block {
            self.watch_published(model_id, number, hash);
        }
        info!(model_id, token = %token, block = ?block.map(|b| b.0), "deployed again after a reorganisation and published");
        metrics::counter!(names::DEPLOYMENTS, "outcome" => "reorged").increment(1);
        self.audit
            .record(
                "deployed",
                self.fields(
                    &msg.message_id,
                    model_id,
                    [
                        ("result", "reorged".to_owned()),
                        ("token_address", token.to_checksum(None)),
                        (
                            "block_number",
                            block.map(|b| b.0.to_string()).unwrap_or_default(),
                        ),
                    ],
                ),
            )
            .await;
        Ok(())
    }
}
