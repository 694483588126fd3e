//! The delivery loop each worker process runs beside its deployments (when anything is ever
//! delivered): take a ready job, send it, and sort the answer.
//!
//! - any 2xx: delivered; the job is forgotten;
//! - 410 from a callback: the receiver is gone; the deployment's callback is switched off;
//! - anything else (another status, a timeout, a refused or failed connection): another
//!   attempt after `retry_initial_ms` × `retry_multiplier`ⁿ (up to `retry_max_ms`, plus up to
//!   as much again at random), until `max_attempts`, then the webhook dead-letter list.
//!
//! Every attempt sends the job's stored body with its event id; only the timestamp, the nonce
//! and so the signature are new. A response body is read up to [`BODY_LIMIT`] bytes and only
//! [`LOGGED`] characters of it reach a log line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::transports::http::reqwest;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::events::{record_key, Job, CALLBACK};
use super::sign;
use super::store::Store;
use super::target::Guard;
use crate::audit::{Audit, Fields};
use crate::config::{EndpointSettings, Secret, Settings};
use crate::queue::Redis;
use crate::telemetry::names;

/// The most of a receiver's answer that is read.
pub const BODY_LIMIT: usize = 1024;
/// The most of it that is logged.
pub const LOGGED: usize = 200;

/// How one attempt ended.
#[derive(Debug)]
enum Answer {
    Delivered(u16),
    Gone,
    Failed {
        status: Option<u16>,
        error: String,
    },
    /// Can never be sent as it stands (its endpoint was removed from the configuration, or its
    /// URL is refused): straight to the dead-letter list.
    Undeliverable(String),
}

struct Deliverer {
    store: Store,
    http: reqwest::Client,
    guard: Guard,
    audit: Audit,
    endpoints: HashMap<String, EndpointSettings>,
    callback_secrets: Vec<Secret>,
    state_prefix: String,
    max_attempts: u32,
    backoff: ExponentialBuilder,
    /// The raw jobs being sent: what is in our processing list but not here was moved by a
    /// `BLMOVE` whose answer was lost, and is put back.
    in_flight: Mutex<Vec<String>>,
    /// At shutdown a Redis that does not answer is not waited for: the job stays in our
    /// processing list and is sent again after the restart.
    stop: CancellationToken,
}

/// Runs until `stop`, then lets the deliveries under way finish (each is bounded by
/// `webhooks.timeout_ms`). Returns at once when nothing is ever delivered.
pub async fn run(settings: Settings, worker_id: String, stop: CancellationToken) {
    let w = &settings.webhooks;
    if !w.outbound() {
        return;
    }
    let redis = match Redis::connect(&settings) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "webhook deliveries cannot connect to Redis");
            return;
        }
    };
    let guard = Guard::new(&w.allow_hosts);
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(w.timeout_ms))
        .connect_timeout(Duration::from_millis(w.timeout_ms.min(5_000)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(guard.clone()))
        .user_agent(concat!("hokusai-deployer/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "webhook deliveries cannot build their HTTP client");
            return;
        }
    };
    let d = Arc::new(Deliverer {
        store: Store::new(
            redis.commands.clone(),
            &settings.queues.state_prefix,
            &worker_id,
        ),
        http,
        guard,
        audit: Audit::new(redis.commands.clone(), &settings, worker_id.clone()),
        endpoints: w
            .endpoints
            .iter()
            .map(|e| (e.name.clone(), e.clone()))
            .collect(),
        callback_secrets: w
            .callback_secret
            .iter()
            .chain(&w.callback_secret_previous)
            .cloned()
            .collect(),
        state_prefix: settings.queues.state_prefix.clone(),
        max_attempts: w.max_attempts,
        backoff: ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(w.retry_initial_ms))
            .with_factor(w.retry_multiplier)
            .with_max_delay(Duration::from_millis(w.retry_max_ms))
            .with_jitter()
            .without_max_times(),
        in_flight: Mutex::default(),
        stop: stop.clone(),
    });
    // What a previous run of this worker was sending goes first.
    loop {
        match d.store.recover_own().await {
            Ok(n) => {
                if n > 0 {
                    warn!(requeued = n, "webhook deliveries a previous run of this worker left unfinished are sent again");
                }
                break;
            }
            Err(e) => warn!(error = %e, "redis not reachable yet (webhook deliveries)"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => { redis.quit().await; return; }
        }
    }
    let tasks = TaskTracker::new();
    // Due retries to the ready list, and the gauges.
    let tick = Duration::from_millis((w.retry_initial_ms / 2).clamp(100, 1_000));
    {
        let (d, stop) = (d.clone(), stop.clone());
        tasks.spawn(async move {
            let mut last_gauge = Instant::now() - Duration::from_secs(60);
            loop {
                if let Err(e) = d.store.promote(chrono::Utc::now().timestamp_millis()).await {
                    warn!(error = %e, "moving due webhook retries failed");
                }
                if last_gauge.elapsed() >= Duration::from_secs(5) {
                    last_gauge = Instant::now();
                    if let Ok(depths) = d.store.depths().await {
                        let sending = d.in_flight.lock().expect("never poisoned").len() as u64;
                        metrics::gauge!(names::WEBHOOK_PENDING)
                            .set((depths.ready + depths.scheduled + sending) as f64);
                        metrics::gauge!(names::WEBHOOK_DEAD).set(depths.dead as f64);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let permits = Arc::new(Semaphore::new(w.concurrency));
    let mut errors = 0u32;
    let mut sweep_needed = false;
    info!(
        endpoints = d.endpoints.len(),
        callbacks = !d.callback_secrets.is_empty(),
        "webhook deliveries running"
    );
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        if sweep_needed {
            let held: Vec<Vec<u8>> = d
                .in_flight
                .lock()
                .expect("never poisoned")
                .iter()
                .map(|j| j.as_bytes().to_vec())
                .collect();
            let processing = d.store.keys.processing(&worker_id);
            match crate::queue::sweep(&redis.commands, &processing, &d.store.keys.ready, held).await
            {
                Ok(_) => sweep_needed = false,
                Err(e) => {
                    warn!(error = %e, "sweeping the webhook processing list failed; will retry")
                }
            }
        }
        let taken = tokio::select! {
            t = d.store.take(&redis.blocking, 1.0) => t,
            _ = stop.cancelled() => break,
        };
        match taken {
            Ok(Some(raw)) => {
                errors = 0;
                d.in_flight
                    .lock()
                    .expect("never poisoned")
                    .push(raw.clone());
                let d = d.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    d.deliver(&raw).await;
                    let mut held = d.in_flight.lock().expect("never poisoned");
                    if let Some(i) = held.iter().position(|j| *j == raw) {
                        held.swap_remove(i);
                    }
                });
            }
            Ok(None) => {}
            Err(e) => {
                sweep_needed = true;
                errors = errors.saturating_add(1);
                let delay = Duration::from_millis(100 * 2u64.pow(errors.min(6)));
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "taking a webhook delivery failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    redis.quit().await;
}

impl Deliverer {
    /// Sends one job and files the outcome, retrying Redis until it answers (the job stays in
    /// our processing list meanwhile, so a crash only means it is sent again).
    async fn deliver(&self, raw: &str) {
        let job: Job = match serde_json::from_str(raw) {
            Ok(j) => j,
            Err(e) => {
                // Not one of ours: kept for an operator rather than dropped.
                error!(error = %e, "an unreadable webhook job goes to the webhook dead-letter list");
                let dead = Job {
                    job_id: String::new(),
                    event_id: String::new(),
                    event_type: String::new(),
                    target: String::new(),
                    url: None,
                    deployment_id: String::new(),
                    model_id: String::new(),
                    body: raw.chars().take(4096).collect(),
                    attempts: 0,
                    created_ms: 0,
                    last_status: None,
                    last_error: Some(format!("unreadable job: {e}")),
                    dead_at: Some(crate::message::rfc3339(chrono::Utc::now())),
                };
                self.until_done(|| self.store.dead(raw, &dead)).await;
                return;
            }
        };
        let started = Instant::now();
        let answer = self.send(&job).await;
        let mut next = job.clone();
        next.attempts += 1;
        let attempts = next.attempts;
        let fields = |result: &str| {
            Fields::from([
                ("job_id", job.job_id.clone()),
                ("event_id", job.event_id.clone()),
                ("event_type", job.event_type.clone()),
                ("target", job.target.clone()),
                ("deployment_id", job.deployment_id.clone()),
                ("model_id", job.model_id.clone()),
                ("attempts", attempts.to_string()),
                ("result", result.to_owned()),
            ])
        };
        let count = |result: &'static str| {
            metrics::counter!(names::WEBHOOK_DELIVERIES, "result" => result).increment(1);
        };
        match answer {
            Answer::Delivered(status) => {
                self.until_done(|| self.store.done(raw)).await;
                count("delivered");
                let waited = (chrono::Utc::now().timestamp_millis() - job.created_ms).max(0);
                metrics::histogram!(names::WEBHOOK_LATENCY).record(waited as f64 / 1000.0);
                info!(event_id = %job.event_id, target = %job.target, deployment_id = %job.deployment_id, status, attempts = next.attempts, elapsed_ms = started.elapsed().as_millis() as u64, "webhook delivered");
                let mut f = fields("delivered");
                f.insert("status", status.to_string());
                self.audit.record("webhook_delivered", f).await;
            }
            Answer::Gone => {
                let record = record_key(&self.state_prefix, &job.deployment_id);
                self.until_done(|| self.store.gone(raw, &record)).await;
                count("gone");
                warn!(event_id = %job.event_id, deployment_id = %job.deployment_id, "the callback answered 410 Gone: it is switched off for this deployment");
                self.audit.record("webhook_gone", fields("gone")).await;
            }
            Answer::Failed { status, error } if next.attempts < self.max_attempts => {
                let delay = self
                    .backoff
                    .build()
                    .nth(job.attempts as usize)
                    .unwrap_or(Duration::from_secs(60));
                next.last_status = status;
                next.last_error = Some(error.clone());
                let due = chrono::Utc::now().timestamp_millis() + delay.as_millis() as i64;
                self.until_done(|| self.store.retry(raw, &next, due)).await;
                count("retry");
                warn!(event_id = %job.event_id, target = %job.target, deployment_id = %job.deployment_id, status, error = %error, attempts = next.attempts, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed; retrying");
            }
            Answer::Failed { status, error } => {
                self.bury(raw, next, status, error, fields("dead")).await
            }
            Answer::Undeliverable(error) => self.bury(raw, next, None, error, fields("dead")).await,
        }
    }

    async fn bury(
        &self,
        raw: &str,
        mut next: Job,
        status: Option<u16>,
        error: String,
        mut f: Fields,
    ) {
        next.last_status = status;
        next.last_error = Some(error.clone());
        next.dead_at = Some(crate::message::rfc3339(chrono::Utc::now()));
        self.until_done(|| self.store.dead(raw, &next)).await;
        metrics::counter!(names::WEBHOOK_DELIVERIES, "result" => "dead").increment(1);
        error!(event_id = %next.event_id, target = %next.target, deployment_id = %next.deployment_id, status, error = %error, attempts = next.attempts, "webhook delivery gave up: in the webhook dead-letter list (hokusai-deployer webhooks list)");
        f.insert("status", status.map(|s| s.to_string()).unwrap_or_default());
        f.insert("error", error);
        self.audit.record("webhook_dead", f).await;
    }

    async fn send(&self, job: &Job) -> Answer {
        let (url, secrets, extra): (String, &[Secret], Vec<(String, String)>) =
            if job.target == CALLBACK {
                let Some(url) = job.url.clone() else {
                    return Answer::Undeliverable("a callback job without a URL".into());
                };
                (url, &self.callback_secrets, vec![])
            } else {
                let Some(e) = self.endpoints.get(&job.target) else {
                    return Answer::Undeliverable(format!(
                        "endpoint `{}` is no longer in webhooks.endpoints",
                        job.target
                    ));
                };
                let extra = e
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (e.url.clone(), &e.secrets, extra)
            };
        if secrets.is_empty() {
            return Answer::Undeliverable("no signing secret is configured for it".into());
        }
        // IP literals never reach the resolver: they are checked here.
        if let Err(e) = self.guard.check_static(&url) {
            return Answer::Undeliverable(format!("its URL is refused: {e}"));
        }
        let ts = chrono::Utc::now().timestamp();
        let nonce = uuid::Uuid::new_v4().to_string();
        let mut req = self
            .http
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Hokusai-Event", &job.event_type)
            .header("X-Hokusai-Idempotency-Key", &job.event_id)
            .header("X-Hokusai-Delivery", &job.job_id)
            .header("X-Hokusai-Attempt", (job.attempts + 1).to_string());
        for (k, v) in sign::headers(secrets, ts, &nonce, job.body.as_bytes()) {
            req = req.header(k, v);
        }
        for (k, v) in extra {
            req = req.header(k, v);
        }
        let mut resp = match req.body(job.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                return Answer::Failed {
                    status: None,
                    error: describe(&e),
                }
            }
        };
        let status = resp.status().as_u16();
        // A little of the answer, for the log of a failure; never the whole of it.
        let mut head = Vec::new();
        while head.len() < BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(c)) => head.extend_from_slice(&c[..c.len().min(BODY_LIMIT - head.len())]),
                _ => break,
            }
        }
        drop(resp);
        if (200..300).contains(&status) {
            Answer::Delivered(status)
        } else if status == 410 && job.target == CALLBACK {
            Answer::Gone
        } else {
            let text: String = String::from_utf8_lossy(&head)
                .chars()
                .filter(|c| !c.is_control())
                .take(LOGGED)
                .collect();
            Answer::Failed {
                status: Some(status),
                error: format!("HTTP {status}: {text}"),
            }
        }
    }

    async fn until_done<F, Fut>(&self, op: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), crate::queue::QueueError>>,
    {
        let mut delay = Duration::from_millis(100);
        while let Err(e) = op().await {
            if self.stop.is_cancelled() {
                warn!(error = %e, "redis write failed at shutdown; the delivery stays for the next run");
                return;
            }
            warn!(error = %e, "redis write failed (webhook delivery), retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// What went wrong with a request, in a line: the chain of causes, no URL query string.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut out = kind.to_owned();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out.chars().take(LOGGED * 2).collect()
}
