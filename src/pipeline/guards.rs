//! What holds a worker back besides the pause flag and backpressure: the circuit breaker on
//! chain operations and the signer's funds. Both are shown in readiness; each change of
//! state is logged, audited and set in a gauge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AttemptError, Deployer};
use crate::chain::BreakerState;
use crate::telemetry::names;

/// How often the guard task looks at the breaker.
const TICK: Duration = Duration::from_millis(250);
/// How often the signer's funds are checked (a balance and the fee market, both cheap).
const FUNDS_EVERY: Duration = Duration::from_secs(10);
/// How often while the signer cannot pay: funding it should unblock the worker quickly.
const FUNDS_EVERY_UNFUNDED: Duration = Duration::from_secs(2);

impl Deployer {
    /// Whether the worker takes no new message for the chain's sake (breaker open, no funds).
    pub(super) fn chain_holds_back(&self) -> bool {
        self.status.breaker.is_open() || self.status.unfunded().is_some()
    }

    /// Counts an attempt's result in the breaker: a failure when no RPC URL answered, a
    /// success when the chain answered (whatever it said). Redis faults count neither way.
    pub(super) async fn breaker_count(&self, result: &Result<super::Done, AttemptError>) {
        let moved = match result {
            Err(e) if e.is_unreachable() => self.status.breaker.failure(),
            Ok(_) | Err(AttemptError::Chain(_) | AttemptError::TokenExists { .. }) => {
                self.status.breaker.success()
            }
            Err(_) => None,
        };
        if let Some(to) = moved {
            self.breaker_moved(to).await;
        }
    }

    /// Waits while the breaker is open; false if shutdown came first.
    pub(super) async fn breaker_closed(&self, shutdown: &CancellationToken) -> bool {
        while self.status.breaker.is_open() {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
        true
    }

    async fn breaker_moved(&self, to: BreakerState) {
        metrics::gauge!(names::BREAKER_STATE).set(f64::from(to as u8));
        let b = &self.status.breaker;
        match to {
            BreakerState::Open => warn!(
                failures = b.failures(),
                cool_down_secs = b.cool_down().as_secs(),
                "chain circuit breaker open: no RPC URL answers; taking no message, in-flight ones wait"
            ),
            BreakerState::HalfOpen => info!("chain circuit breaker half-open: probing the RPC"),
            BreakerState::Closed => info!("chain circuit breaker closed: the RPC answers again"),
        }
        self.audit
            .record(
                match to {
                    BreakerState::Open => "chain_breaker_open",
                    BreakerState::HalfOpen => "chain_breaker_half_open",
                    BreakerState::Closed => "chain_breaker_closed",
                },
                crate::audit::Fields::from([
                    ("failures", b.failures().to_string()),
                    ("signer", self.chain.signer.to_checksum(None)),
                ]),
            )
            .await;
    }

    /// The half-open probe: one cheap read after the cool-down; closes or re-opens.
    async fn probe_breaker(&self) {
        if !self.status.breaker.try_half_open() {
            return;
        }
        self.breaker_moved(BreakerState::HalfOpen).await;
        let ok = tokio::time::timeout(
            self.settings.rpc_timeout(),
            self.chain.provider.get_block_number(),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if let Some(to) = self.status.breaker.probed(ok) {
            self.breaker_moved(to).await;
        }
    }

    /// Checks that the signer can pay for one deployment at the current fees; records the
    /// answer for the loop and readiness. An unreachable RPC leaves the last answer standing.
    pub(super) async fn check_funds(&self) {
        let funding = match self.chain.funding().await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "funds not checked");
                return;
            }
        };
        let why = funding.shortfall();
        if self.status.set_unfunded(why.clone()) {
            match &why {
                Some(reason) => {
                    warn!(%reason, "the deployer cannot pay for a deployment: taking no message")
                }
                None => info!("the deployer can pay again: taking messages"),
            }
            metrics::gauge!(names::UNFUNDED).set(if why.is_some() { 1.0 } else { 0.0 });
            self.audit
                .record(
                    if why.is_some() {
                        "funds_low"
                    } else {
                        "funds_ok"
                    },
                    crate::audit::Fields::from([
                        ("signer", self.chain.signer.to_checksum(None)),
                        ("balance_wei", funding.balance_wei.to_string()),
                        ("needed_wei", funding.needed_wei.to_string()),
                    ]),
                )
                .await;
        }
    }

    /// The guard task: probes the open breaker after its cool-down and re-checks funds.
    pub(super) async fn guard(self: Arc<Self>, stop: CancellationToken) {
        let mut funds_checked = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => return,
            }
            self.probe_breaker().await;
            let every = if self.status.unfunded().is_some() {
                FUNDS_EVERY_UNFUNDED
            } else {
                FUNDS_EVERY
            };
            if funds_checked.elapsed() >= every && !self.status.breaker.is_open() {
                funds_checked = Instant::now();
                self.check_funds().await;
            }
        }
    }
}
