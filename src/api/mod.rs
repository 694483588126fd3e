//! The HTTP deployment API of seed 000. `POST /api/deployments` checks the caller, the body
//! and the model, records the deployment and queues a `model_ready_to_deploy` message for the
//! same workers that serve the ML platform (one pipeline, two ways in). No chain transaction
//! happens inside a request.
//!
//! - [`routes`]: the router, its middleware (request ids, security headers, CORS, latency) and
//!   the OpenAPI document.
//! - [`credentials`]: JWTs and service keys.
//! - [`siwe`]: Sign-In with Ethereum proofs of an address.
//! - [`authorization`]: the client's address, authentication under the failed-auth limit, the
//!   rule that a contributor's address must be proven, single-use tokens and nonces.
//! - [`limits`]: rolling-window limits in Redis (deployment quota, failed authentication,
//!   reads).
//! - [`deployment`]: `POST /api/deployments`: the body, the caller's rights, what it takes
//!   once (and gives back when refused).
//! - [`queueing`]: what every accepted order shares: pause, quota, the model's checks and the
//!   queued message.
//! - [`symbol`]: generated token symbols, unique among those issued.
//! - [`status`]: `GET /api/deployments/{id}/status`.
//! - [`events`]: `GET /api/deployments/{id}/events`, the same status live (Server-Sent
//!   Events), woken by the workers' Redis Pub/Sub notifications through one subscriber per
//!   process.
//! - [`quote`]: `GET /api/deployments/quote`, the gas estimate before the click.
//! - [`webhooks`]: `POST /api/webhooks/model-registered`, the ML platform's signed
//!   announcement of a registered model, deployed as a service's POST would be.
//! - [`errors`]: error answers; each is counted, each refusal audited.
//!
//! The public port serves the API and `/health`, `/health/ready`; `/health/detailed` and
//! `/metrics` are on the ops listener (`ops.port`), as for the worker.

pub mod authorization;
pub mod credentials;
pub mod deployment;
pub mod errors;
pub mod events;
pub mod limits;
pub mod queueing;
pub mod quote;
pub mod routes;
pub mod siwe;
pub mod status;
pub mod symbol;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::providers::{DynProvider, Provider};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::chain;
use crate::config::Settings;
use crate::journal::Journal;
use crate::message::Rules;
use crate::mlflow::{Mlflow, Model};
use crate::ops::OpsState;
use crate::queue;
use credentials::Authenticator;
use errors::ApiError;
use limits::Limiter;

pub use routes::{openapi_document, router};

/// Fee figures refreshed in the background, so a request never waits for the chain.
#[derive(Debug, Clone, Default)]
struct Estimates {
    /// What the network asks per gas, as a worker would read it.
    market: Option<chain::Market>,
    block_time_secs: f64,
}

pub struct ApiState {
    settings: Settings,
    auth: Authenticator,
    siwe: siwe::Verifier,
    /// `api.trusted_proxies`, parsed.
    trusted_proxies: Vec<ipnet::IpNet>,
    limiter: Limiter,
    mlflow: Mlflow,
    redis: Client,
    journal: Journal,
    /// Refusals, as `api_refused` entries.
    audit: Audit,
    provider: DynProvider,
    registry: Address,
    rules: Rules,
    estimates: RwLock<Estimates>,
    models: Mutex<HashMap<String, (Instant, Option<Model>)>>,
    network: crate::config::Network,
    /// The chain's `chain.confirmations` (setting, else network table), for quotes.
    confirmations: u64,
    prefix: String,
    /// The progress channel's subscriber and its fan-out to the live status streams.
    notifications: events::Notifications,
}

impl ApiState {
    pub async fn new(settings: &Settings) -> anyhow::Result<Arc<ApiState>> {
        let auth = Authenticator::new(settings)?;
        let redis = queue::client(settings)?;
        redis.init().await?;
        let notifications =
            events::Notifications::start(&redis, &settings.queues.state_prefix).await?;
        let provider = chain::provider(settings)?;
        let chain_id = provider.get_chain_id().await?;
        let (registry, _) = settings.contract_addresses()?;
        let prefix = settings.queues.state_prefix.clone();
        let trusted_proxies = settings
            .api
            .trusted_proxies
            .iter()
            .map(|p| crate::config::parse_net(p))
            .collect::<Result<_, _>>()
            .map_err(|reason| anyhow::anyhow!("api.trusted_proxies: {reason}"))?;
        let state = Arc::new(ApiState {
            auth,
            siwe: siwe::Verifier::new(
                settings.api.siwe.clone(),
                chain_id,
                settings.api.jwt.leeway_secs,
            ),
            trusted_proxies,
            limiter: Limiter::new(redis.clone(), &prefix, settings.api.limits.clone()),
            mlflow: Mlflow::new(&settings.api.mlflow)?,
            journal: Journal::new(redis.clone(), &prefix, true),
            audit: Audit::new(redis.clone(), settings, "api"),
            redis,
            provider,
            registry,
            rules: Rules {
                max_message_bytes: settings.pipeline.max_message_bytes,
                min_improvement_percentage: settings.pipeline.min_improvement_percentage,
            },
            estimates: RwLock::new(Estimates::default()),
            models: Mutex::new(HashMap::new()),
            network: settings.network(chain_id),
            confirmations: settings.confirmations(chain_id),
            prefix,
            notifications,
            settings: settings.clone(),
        });
        state.refresh_estimates().await;
        Ok(state)
    }

    /// Reads fees and block time; keeps the last figures on failure.
    async fn refresh_estimates(&self) {
        let market =
            chain::Market::read(&self.provider, self.settings.chain.priority_fee_wei()).await;
        let head = self.provider.get_block_number().await;
        let block_time = match head {
            Ok(h) if h > 10 => {
                let (a, b) = tokio::join!(
                    self.provider.get_block_by_number((h - 10).into()),
                    self.provider.get_block_by_number(h.into())
                );
                match (a, b) {
                    (Ok(Some(a)), Ok(Some(b))) => {
                        (b.header.timestamp.saturating_sub(a.header.timestamp)) as f64 / 10.0
                    }
                    _ => 12.0,
                }
            }
            _ => 12.0,
        };
        let mut e = self.estimates.write().expect("never poisoned");
        if let Ok(m) = market {
            e.market = Some(m);
        }
        e.block_time_secs = block_time.max(0.1);
    }

    fn key(&self, what: &str, id: &str) -> String {
        format!("{}:{what}:{id}", self.prefix)
    }

    /// The MLflow client (its readiness probe shares it).
    pub fn mlflow(&self) -> Mlflow {
        self.mlflow.clone()
    }

    /// The model from MLflow, reused for `api.mlflow.cache_secs`.
    async fn model(&self, model_id: &str) -> Result<Option<Model>, ApiError> {
        if let Some((at, m)) = self
            .models
            .lock()
            .expect("never poisoned")
            .get(model_id)
            .cloned()
        {
            if at.elapsed() < Duration::from_secs(self.settings.api.mlflow.cache_secs) {
                return Ok(m);
            }
        }
        let m = self
            .mlflow
            .model(model_id)
            .await
            .map_err(|e| ApiError::upstream("the model registry (MLflow)", e))?;
        let mut cache = self.models.lock().expect("never poisoned");
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(model_id.to_owned(), (Instant::now(), m.clone()));
        Ok(m)
    }
}

/// Runs the API until `shutdown`, refreshing estimates in the background. `ops` serves the
/// public `/health` and `/health/ready`; its other routes are on the ops listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    ops: Arc<OpsState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    {
        let (state, stop) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => state.refresh_estimates().await,
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    {
        // Open live status streams end at shutdown; the graceful shutdown would wait for them.
        let (state, stop) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            state.notifications.close_streams();
        });
    }
    let app = router(state, ops);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// Binds the configured address; port 0 picks a free port.
pub async fn bind(settings: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
    crate::ops::listen(&settings.api.bind, settings.api.port, "the API").await
}
