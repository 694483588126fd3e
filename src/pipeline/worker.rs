//! The worker loop: lease a key, connect to the chain (checking the contracts and roles),
//! requeue what a previous run of this worker left, take messages under the in-flight bound,
//! and drain at shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{AttemptError, Deployer, WorkerStatus};
use crate::chain::{Chain, Wallet};
use crate::config::{DeployerKey, Settings};
use crate::journal::Journal;
use crate::queue::{Queues, Redis};
use crate::telemetry::names;

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
    let durability = crate::topology::Durability::new(
        redis.commands.clone(),
        &settings,
        status.topology.clone(),
    );
    let queues = Queues::new(redis.clone(), &settings, worker_id.clone())
        .with_durability(durability.clone());

    // Heartbeat first, so no other process mistakes us for dead while we start.
    let tasks = TaskTracker::new();
    let background = CancellationToken::new();
    let leased: Arc<tokio::sync::OnceCell<String>> = Arc::new(tokio::sync::OnceCell::new());
    let lease_lost = CancellationToken::new();
    // Set by the heartbeat task when the Redis primary changed: writes the old one acknowledged
    // may be gone, so our processing list is swept for messages no job of ours holds.
    let failed_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hb_every = Duration::from_secs(settings.pipeline.heartbeat_ttl_secs / 3);
    {
        let (q, stop, leased, lost) = (
            queues.clone(),
            background.clone(),
            leased.clone(),
            lease_lost.clone(),
        );
        let topology = status.topology.clone();
        let failed_over = failed_over.clone();
        let state_prefix = settings.queues.state_prefix.clone();
        let audit = crate::audit::Audit::new(redis.commands.clone(), &settings, worker_id.clone());
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
                if let Some((from, to)) = topology.observe(q.client(), &state_prefix) {
                    failed_over.store(true, Ordering::Relaxed);
                    audit
                        .record(
                            "redis_failover",
                            crate::audit::Fields::from([("from", from), ("to", to)]),
                        )
                        .await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(hb_every) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    // Webhook deliveries (none configured: returns at once); they need no key or chain.
    tasks.spawn(crate::webhooks::delivery::run(
        settings.clone(),
        worker_id.clone(),
        background.clone(),
    ));
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
    )
    .with_durability(durability);
    info!(worker_id = %worker_id, signer = %chain.signer, chain_id = chain.chain_id, registry = %chain.registry, "worker starting");
    let deployer = Arc::new(Deployer::new(
        settings.clone(),
        queues.clone(),
        journal,
        chain,
        status.clone(),
    ));
    status.breaker.configure(
        settings
            .chain
            .breaker
            .threshold(settings.pipeline.max_retries),
        Duration::from_secs(settings.chain.breaker.cool_down_secs),
    );
    metrics::gauge!(names::BREAKER_STATE).set(0.0);
    // Nothing is taken before the signer is known to pay for a deployment.
    deployer.check_funds().await;
    tasks.spawn(deployer.clone().guard(background.clone()));
    tasks.spawn(deployer.clone().reorg_watch(background.clone()));

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

    let bound = deployer
        .chain
        .in_flight_bound(settings.pipeline.concurrency)
        .await;
    info!(
        in_flight = bound,
        cap = settings.pipeline.concurrency,
        "messages in flight at most: two blocks' worth of deployments, under pipeline.concurrency"
    );
    let permits = Arc::new(Semaphore::new(bound));
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
        if failed_over.swap(false, Ordering::Relaxed) {
            sweep_needed = true;
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
        // Paused, or the website's queue full: take nothing; a message taken in the instant
        // the flag was set goes back.
        let (paused, outbound) = queues.hold_state().await.unwrap_or((false, 0));
        if paused != status.is_paused() {
            status.paused.store(paused, Ordering::Relaxed);
            info!(paused, "pause flag changed");
        }
        let held = backpressure(&settings, status.backpressure(), outbound);
        if held != status.backpressure() {
            status.backpressure.store(held, Ordering::Relaxed);
            metrics::gauge!(names::BACKPRESSURE).set(if held { 1.0 } else { 0.0 });
            if held {
                warn!(
                    outbound,
                    max = settings.queues.outbound_max_len,
                    "the outbound queue is full: taking no new message until it drains"
                );
            } else {
                info!(
                    outbound,
                    "the outbound queue drained: taking messages again"
                );
            }
            deployer
                .audit
                .record(
                    if held {
                        "backpressure_on"
                    } else {
                        "backpressure_off"
                    },
                    crate::audit::Fields::from([("outbound", outbound.to_string())]),
                )
                .await;
        }
        if paused || held || deployer.chain_holds_back() {
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

/// Whether the worker holds back: over `queues.outbound_max_len` it starts, and it stops only
/// under the low-water mark, so it does not flap at the threshold.
fn backpressure(settings: &Settings, holding: bool, outbound: u64) -> bool {
    let q = &settings.queues;
    if q.outbound_max_len == 0 {
        return false;
    }
    if holding {
        outbound >= q.outbound_resume_len()
    } else {
        outbound > q.outbound_max_len
    }
}

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
