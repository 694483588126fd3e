//! The operations HTTP server (default port 9091): liveness, readiness, a detailed status page
//! and Prometheus metrics. It has its own Redis connection and RPC provider and bounds every
//! probe, so it answers while Redis or the chain are down; `/health` does no I/O at all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::{json, Value as Json_};
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Stats};
use crate::config::{mask_url, Settings};
use crate::pipeline::WorkerStatus;
use crate::telemetry::names;

/// What the handlers share.
pub struct OpsState {
    settings: Settings,
    redis: Client,
    admin: Admin,
    provider: Option<DynProvider>,
    registry: Option<Address>,
    started: Instant,
    metrics: Option<PrometheusHandle>,
    worker: Option<Arc<WorkerStatus>>,
    /// The API process's model source, probed for readiness; set only in the API process.
    mlflow: Option<crate::mlflow::Mlflow>,
    /// The API process: its Redis user reads only the inbound queue and state keys, so its
    /// metrics report only those.
    api: bool,
    timeout: Duration,
}

impl OpsState {
    /// Builds the state and starts its Redis connection in the background.
    pub fn new(
        settings: &Settings,
        metrics: Option<PrometheusHandle>,
        worker: Option<Arc<WorkerStatus>>,
    ) -> anyhow::Result<Arc<OpsState>> {
        Self::build(settings, metrics, worker, None)
    }

    /// The API process's state: readiness also asks MLflow (`mlflow` component).
    pub fn for_api(
        settings: &Settings,
        metrics: Option<PrometheusHandle>,
        mlflow: crate::mlflow::Mlflow,
    ) -> anyhow::Result<Arc<OpsState>> {
        Self::build(settings, metrics, None, Some(mlflow))
    }

    fn build(
        settings: &Settings,
        metrics: Option<PrometheusHandle>,
        worker: Option<Arc<WorkerStatus>>,
        mlflow: Option<crate::mlflow::Mlflow>,
    ) -> anyhow::Result<Arc<OpsState>> {
        let redis = crate::queue::client(settings)?;
        redis.connect();
        Ok(Arc::new(OpsState {
            admin: Admin::new(redis.clone(), settings, "ops"),
            redis,
            provider: crate::chain::provider(settings).ok(),
            registry: settings.contract_addresses().ok().map(|(r, _)| r),
            settings: settings.clone(),
            started: Instant::now(),
            metrics,
            worker,
            api: mlflow.is_some(),
            mlflow,
            timeout: Duration::from_millis(settings.ops.probe_timeout_ms),
        }))
    }

    pub async fn close(&self) {
        let _ = self.redis.quit().await;
    }
}

/// The routes the API's public port serves too: what a load balancer needs.
pub fn public_router(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .with_state(state)
}

/// The ops listener's routes (`ops.port`), for the worker and the API process alike.
pub fn router(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/health/detailed", get(detailed))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Binds the configured address; port 0 picks a free port.
pub async fn bind(settings: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
    listen(&settings.ops.bind, settings.ops.port, "the ops server").await
}

/// Binds `ip:port` for `what` (named in the error); port 0 picks a free port.
pub(crate) async fn listen(
    ip: &str,
    port: u16,
    what: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    let ip: std::net::IpAddr = ip.parse()?;
    let addr = SocketAddr::new(ip, port);
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {what} to {addr}: {e}"))
}

/// Serves until `shutdown`, running the metrics upkeep beside it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<OpsState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Some(handle) = state.metrics.clone() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    let emf = (state.settings.ops.cloudwatch_emf && state.metrics.is_some())
        .then(|| tokio::spawn(emit_emf(state.clone(), shutdown.clone())));
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Some(emf) = emf {
        // Its last report, written once shutdown is asked.
        let _ = emf.await;
    }
    served
}

async fn health() -> Json<Json_> {
    Json(json!({ "status": "ok", "timestamp": crate::message::rfc3339(chrono::Utc::now()) }))
}

/// One component's probe result.
#[derive(Debug, Clone, Serialize)]
struct Component {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    info: serde_json::Map<String, Json_>,
}

impl Component {
    fn up(started: Instant, info: serde_json::Map<String, Json_>) -> Component {
        Component {
            status: "up",
            latency_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            error: None,
            info,
        }
    }
    fn down(error: String) -> Component {
        Component {
            status: "down",
            latency_ms: None,
            error: Some(error),
            info: Default::default(),
        }
    }
    /// Up, or a warning (`low`) that does not take the process out of service.
    fn is_up(&self) -> bool {
        self.status == "up" || self.status == "low"
    }
}

impl OpsState {
    /// Runs `fut` under the probe timeout; errors are redacted of credentials.
    async fn probe<F, E>(&self, what: &str, fut: F) -> Component
    where
        F: std::future::Future<Output = Result<serde_json::Map<String, Json_>, E>>,
        E: std::fmt::Display,
    {
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(info)) => Component::up(started, info),
            Ok(Err(e)) => Component::down(self.redact(e.to_string())),
            Err(_) => Component::down(format!(
                "{what} did not answer within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    /// Replaces every configured URL (as written and as normalised) by its masked form.
    fn redact(&self, mut s: String) -> String {
        for u in self
            .settings
            .chain
            .rpc_urls
            .iter()
            .chain([&self.settings.redis.url, &self.settings.api.mlflow.url])
            .filter(|u| !u.is_empty())
        {
            let masked = mask_url(u);
            if let Ok(parsed) = url::Url::parse(u) {
                if parsed.as_str() == masked {
                    // Nothing to hide; replacing would only add a `/` after the host.
                    continue;
                }
                s = s.replace(parsed.as_str(), &masked);
            }
            s = s.replace(u.as_str(), &masked);
        }
        s
    }

    async fn mlflow_probe(&self) -> Option<Component> {
        let m = self.mlflow.as_ref()?;
        Some(
            self.probe("mlflow", async {
                m.ping().await?;
                Ok::<_, crate::mlflow::MlflowError>(Default::default())
            })
            .await,
        )
    }

    /// A PING, and what is known of the topology: the mode, the primary serving our keys,
    /// and (in a worker) the replicas that confirmed its last write that waits for them.
    async fn redis_probe(&self) -> Component {
        let prefix = &self.settings.queues.state_prefix;
        self.probe("redis", async {
            let _: String = self.redis.ping(None).await?;
            let mut m = serde_json::Map::new();
            m.insert("mode".into(), self.settings.redis.mode().as_str().into());
            if let Some(p) = crate::topology::primary_in_use(&self.redis, prefix) {
                m.insert("primary".into(), p.into());
            }
            m.insert(
                "min_replica_acks".into(),
                self.settings.redis.min_replica_acks.into(),
            );
            if let Some(w) = &self.worker {
                let acks = w
                    .topology
                    .replica_acks
                    .load(std::sync::atomic::Ordering::Relaxed);
                if acks >= 0 {
                    m.insert("replica_acks".into(), acks.into());
                }
            }
            Ok::<_, fred::error::Error>(m)
        })
        .await
    }

    async fn chain_probe(&self) -> Component {
        let Some(p) = &self.provider else {
            return Component::down("no usable RPC URL configured".into());
        };
        let expected = self.settings.chain.chain_id;
        self.probe("rpc", async {
            let (id, block) = tokio::try_join!(p.get_chain_id(), p.get_block_number())
                .map_err(|e| e.to_string())?;
            if let Some(want) = expected.filter(|w| *w != id) {
                return Err(format!("rpc reports chain {id}, configuration says {want}"));
            }
            let mut m = serde_json::Map::new();
            m.insert("chain_id".into(), id.into());
            m.insert("block_number".into(), block.into());
            m.insert("network".into(), self.settings.network(id).name.into());
            Ok(m)
        })
        .await
    }

    async fn registry_probe(&self) -> Component {
        let (Some(p), Some(registry)) = (&self.provider, self.registry) else {
            return Component::down("chain.model_registry_address is not configured".into());
        };
        let signer = self
            .worker
            .as_ref()
            .and_then(|w| w.signer()?.parse::<Address>().ok());
        self.probe("rpc", async {
            let code = p.get_code_at(registry).await.map_err(|e| e.to_string())?;
            if code.is_empty() {
                return Err(format!("no contract at {registry}"));
            }
            // A worker's roles: revoked ones show here before a deployment fails on them.
            if let (Some(signer), Ok((_, manager))) = (signer, self.settings.contract_addresses()) {
                crate::chain::contracts::check_roles(p, registry, manager, signer)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let mut m = serde_json::Map::new();
            m.insert("address".into(), registry.to_checksum(None).into());
            Ok(m)
        })
        .await
    }

    fn worker_component(&self) -> Option<Component> {
        let w = self.worker.as_ref()?;
        let phase = w.phase();
        let mut info = serde_json::Map::new();
        info.insert("phase".into(), phase.into());
        info.insert("worker_id".into(), w.worker_id().into());
        if let Some(s) = w.signer() {
            info.insert("signer".into(), s.into());
        }
        info.insert("backpressure".into(), w.backpressure().into());
        info.insert("breaker".into(), w.breaker.state().label().into());
        let unfunded = w.unfunded();
        info.insert("funded".into(), unfunded.is_none().into());
        Some(if let (Some(why), "running") = (unfunded, phase) {
            // Running, taking nothing until the key is funded: not ready, with the reason.
            Component {
                status: "down",
                latency_ms: None,
                error: Some(why),
                info,
            }
        } else if phase == "running" {
            Component {
                status: "up",
                latency_ms: None,
                error: None,
                info,
            }
        } else {
            Component {
                status: "down",
                latency_ms: None,
                error: Some(format!("worker is {phase}")),
                info,
            }
        })
    }

    async fn readiness(&self) -> (bool, serde_json::Map<String, Json_>) {
        let (redis, chain, registry, mlflow, balance) = tokio::join!(
            self.redis_probe(),
            self.chain_probe(),
            self.registry_probe(),
            self.mlflow_probe(),
            self.balance_component()
        );
        let chain = match &self.worker {
            // The worker's breaker knows better than one probe: it counted failed attempts.
            Some(w) if w.breaker.is_open() => Component {
                status: "open",
                latency_ms: None,
                error: Some(format!(
                    "circuit breaker {} after {} attempts in a row found no RPC URL answering; a probe every {} s (chain.breaker.cool_down_secs) closes it",
                    w.breaker.state().label(),
                    w.breaker.failures(),
                    w.breaker.cool_down().as_secs()
                )),
                info: Default::default(),
            },
            _ => chain,
        };
        let mut components = vec![("redis", redis), ("chain", chain), ("registry", registry)];
        if let Some(m) = mlflow {
            components.push(("mlflow", m));
        }
        if let Some(w) = self.worker_component() {
            components.push(("worker", w));
        }
        if let Some(b) = balance {
            components.push(("balance", b));
        }
        let ok = components.iter().all(|(_, c)| c.is_up());
        let map = components
            .into_iter()
            .map(|(k, c)| (k.to_owned(), serde_json::to_value(c).expect("serializable")))
            .collect();
        (ok, map)
    }

    /// The balance of the signer this process leased (if it has one yet), in ether; sets the
    /// balance gauge.
    async fn balance(&self) -> Option<f64> {
        let signer = self
            .worker
            .as_ref()
            .and_then(|w| w.signer()?.parse::<Address>().ok())?;
        let p = self.provider.as_ref()?;
        let wei = tokio::time::timeout(self.timeout, p.get_balance(signer))
            .await
            .ok()?
            .ok()?;
        let eth: f64 = alloy::primitives::utils::format_ether(wei)
            .parse()
            .unwrap_or(0.0);
        metrics::gauge!(names::BALANCE).set(eth);
        Some(eth)
    }

    /// `low` under `chain.min_balance_eth`: a warning before deployments fail for want of gas,
    /// not a reason to stop serving.
    async fn balance_component(&self) -> Option<Component> {
        let eth = self.balance().await?;
        let min = self.settings.chain.min_balance_eth;
        let mut info = serde_json::Map::new();
        info.insert("balance_eth".into(), eth.into());
        info.insert("min_balance_eth".into(), min.into());
        Some(Component {
            status: if eth < min { "low" } else { "up" },
            latency_ms: None,
            error: (eth < min).then(|| {
                format!(
                    "the deployer holds {eth} ETH, under chain.min_balance_eth = {min}: fund it"
                )
            }),
            info,
        })
    }

    /// Queue depths and workers, as this process's Redis user may read them; sets the queue
    /// gauges. `hokusai_redis_up` is set from a PING, so a depth this user may not read (the
    /// API's) does not make Redis look down.
    async fn stats(&self) -> Option<Depths> {
        let (ping, depths) = tokio::join!(self.redis_probe(), async {
            let r = if self.api {
                tokio::time::timeout(self.timeout, self.inbound_depths())
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                tokio::time::timeout(self.timeout, self.admin.stats())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(Depths::All)
            };
            r
        });
        metrics::gauge!(names::REDIS_UP).set(if ping.is_up() { 1.0 } else { 0.0 });
        match &depths {
            Some(Depths::All(s)) => {
                for (q, n) in [
                    ("inbound", s.inbound),
                    ("processing", s.processing),
                    ("dlq", s.dlq),
                    ("outbound", s.outbound),
                    ("failures", s.failures),
                ] {
                    metrics::gauge!(names::QUEUE_DEPTH, "queue" => q).set(n as f64);
                }
                metrics::gauge!(names::WORKERS)
                    .set(s.workers.iter().filter(|w| w.alive).count() as f64);
                metrics::gauge!(names::PAUSED).set(if s.paused.is_some() { 1.0 } else { 0.0 });
            }
            Some(Depths::Inbound { inbound, paused }) => {
                metrics::gauge!(names::QUEUE_DEPTH, "queue" => "inbound").set(*inbound as f64);
                metrics::gauge!(names::PAUSED).set(if *paused { 1.0 } else { 0.0 });
            }
            None => {}
        }
        depths
    }

    /// What the API's Redis user may read (the `hokusai-api` ACL role): the inbound queue and
    /// the pause flag.
    async fn inbound_depths(&self) -> Result<Depths, fred::error::Error> {
        let p = self.redis.pipeline();
        let _: () = p.llen(&self.settings.queues.inbound).await?;
        let _: () = p
            .exists(crate::queue::pause_key(&self.settings.queues.state_prefix))
            .await?;
        let (inbound, paused): (u64, i64) = p.all().await?;
        Ok(Depths::Inbound {
            inbound,
            paused: paused > 0,
        })
    }
}

/// Queue depths as one process may read them.
enum Depths {
    /// A worker's (or operator's) view: every queue and worker.
    All(Stats),
    /// The API's view.
    Inbound { inbound: u64, paused: bool },
}

impl Depths {
    fn queues(&self) -> Json_ {
        match self {
            Depths::All(st) => json!({
                "inbound": st.inbound,
                "processing": st.processing,
                "dlq": st.dlq,
                "outbound": st.outbound,
                "failures": st.failures,
            }),
            Depths::Inbound { inbound, .. } => json!({ "inbound": inbound }),
        }
    }
}

async fn ready(State(s): State<Arc<OpsState>>) -> Response {
    let (ok, components) = s.readiness().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "timestamp": crate::message::rfc3339(chrono::Utc::now()),
        "components": components,
    });
    (code, Json(body)).into_response()
}

async fn detailed(State(s): State<Arc<OpsState>>) -> Response {
    let ((ok, components), stats) = tokio::join!(s.readiness(), s.stats());
    let memory = memory();
    let worker = s.worker.as_ref().map(|w| {
        json!({
            "worker_id": w.worker_id(),
            "phase": w.phase(),
            "signer": w.signer(),
            "paused": w.is_paused(),
            "backpressure": w.backpressure(),
            "in_flight": w.in_flight(),
            "waiting_for_fees": w.waiting_for_fees(),
        })
    });
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "timestamp": crate::message::rfc3339(chrono::Utc::now()),
        "version": env!("CARGO_PKG_VERSION"),
        "revision": env!("HOKUSAI_GIT_REVISION"),
        "uptime_secs": s.started.elapsed().as_secs(),
        "memory": memory,
        "components": components,
        "queues": stats.as_ref().map(Depths::queues),
        "workers": match &stats { Some(Depths::All(st)) => Some(&st.workers), _ => None },
        "paused": match &stats {
            Some(Depths::All(st)) => json!(st.paused),
            Some(Depths::Inbound { paused, .. }) => json!(paused),
            None => Json_::Null,
        },
        "worker": worker,
        "config": s.settings,
    });
    // Informational: always 200; `status` says whether the process is ready.
    (StatusCode::OK, Json(body)).into_response()
}

async fn metrics_text(State(s): State<Arc<OpsState>>) -> Response {
    match s.render_metrics().await {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n",
        )
            .into_response(),
    }
}

impl OpsState {
    /// The Prometheus exposition, with the gauges read at scrape time brought up to date.
    pub async fn render_metrics(&self) -> Option<String> {
        let handle = self.metrics.as_ref()?;
        tokio::join!(self.stats(), self.balance());
        if let Some(w) = &self.worker {
            metrics::gauge!(names::IN_FLIGHT).set(w.in_flight() as f64);
            metrics::gauge!(names::FEE_WAITING).set(w.waiting_for_fees() as f64);
            metrics::gauge!(names::BACKPRESSURE).set(if w.backpressure() { 1.0 } else { 0.0 });
        }
        Some(handle.render())
    }
}

/// Writes the metrics as CloudWatch EMF lines on stdout every `ops.cloudwatch_emf_interval_secs`
/// until `stop`, and once more then (what the last interval counted is not lost).
pub async fn emit_emf(state: Arc<OpsState>, stop: CancellationToken) {
    use std::io::Write;
    let role = if state.api { "api" } else { "worker" };
    let mut emitter = crate::emf::Emitter::new(&state.settings.ops.environment, role);
    let every = Duration::from_secs(state.settings.ops.cloudwatch_emf_interval_secs);
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = stop.cancelled() => true,
        };
        if let Some(text) = state.render_metrics().await {
            let lines = emitter.lines(&text, chrono::Utc::now().timestamp_millis());
            let mut out = std::io::stdout().lock();
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
        }
        if stopping {
            return;
        }
    }
}

/// Resident and peak memory of this process, from `/proc/self/status` (Linux).
fn memory() -> Json_ {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    json!({ "rss_bytes": kb("VmRSS:"), "peak_rss_bytes": kb("VmHWM:") })
}
