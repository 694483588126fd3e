//! The RPC transport: every configured URL behind alloy's fallback layer, a timeout on each
//! request, and each request's latency recorded by method.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::rpc::json_rpc::{RequestPacket, ResponsePacket};
use alloy::transports::http::{reqwest, Http};
use alloy::transports::layers::FallbackLayer;
use alloy::transports::{TransportError, TransportFut};
use tower::ServiceBuilder;

use super::ChainError;
use crate::config::{mask_url, Settings};

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
