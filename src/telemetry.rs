//! Logging: tracing with JSON lines (containers) or a readable format (a terminal).

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogSettings;

/// Installs the global subscriber; `RUST_LOG`-style directives are accepted in `log.level`.
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match log.format.as_str() {
        "json" => true,
        "pretty" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.compact().try_init()
    };
    // A second init (tests, the local stack) keeps the first subscriber.
    let _ = result;
}

/// Metric names, in one place so producers and the docs agree. Base units, `_total` on
/// counters, one `hokusai_` prefix, and small fixed label sets (prometheus.io naming practices).
pub mod names {
    pub const BUILD_INFO: &str = "hokusai_build_info";
    pub const MESSAGES: &str = "hokusai_messages_total";
    pub const DEPLOYMENTS: &str = "hokusai_deployments_total";
    pub const DEPLOYMENT_DURATION: &str = "hokusai_deployment_duration_seconds";
    pub const RETRIES: &str = "hokusai_retries_total";
    pub const DLQ_MOVES: &str = "hokusai_dlq_moves_total";
    pub const GAS_USED: &str = "hokusai_gas_used_total";
    pub const FEES_PAID: &str = "hokusai_fees_paid_gwei_total";
    pub const RECOVERED: &str = "hokusai_recovered_messages_total";
    pub const QUEUE_DEPTH: &str = "hokusai_queue_depth";
    pub const WORKERS: &str = "hokusai_workers";
    pub const IN_FLIGHT: &str = "hokusai_in_flight_deployments";
    pub const PAUSED: &str = "hokusai_paused";
    pub const REDIS_UP: &str = "hokusai_redis_up";
    pub const RPC_DURATION: &str = "hokusai_rpc_request_duration_seconds";
    pub const REDIS_DURATION: &str = "hokusai_redis_command_duration_seconds";
    pub const AUDIT_WRITE_FAILURES: &str = "hokusai_audit_write_failures_total";
    pub const BALANCE: &str = "hokusai_deployer_balance_eth";
    pub const BASE_FEE: &str = "hokusai_base_fee_gwei";
    pub const REPLACEMENTS: &str = "hokusai_tx_replacements_total";
    pub const FEE_WAITING: &str = "hokusai_messages_waiting_for_fees";
    pub const API_DURATION: &str = "hokusai_api_request_duration_seconds";
    pub const API_ERRORS: &str = "hokusai_api_errors_total";
    pub const BACKPRESSURE: &str = "hokusai_backpressure";
    pub const BREAKER_STATE: &str = "hokusai_chain_breaker_state";
    pub const UNFUNDED: &str = "hokusai_deployer_unfunded";
    pub const REORGS: &str = "hokusai_reorgs_total";
    pub const REDIS_FAILOVERS: &str = "hokusai_redis_failovers_total";
    pub const REDIS_REPLICA_ACKS: &str = "hokusai_redis_replica_acks";
    pub const WEBHOOK_DELIVERIES: &str = "hokusai_webhook_deliveries_total";
    pub const WEBHOOK_LATENCY: &str = "hokusai_webhook_delivery_latency_seconds";
    pub const WEBHOOK_PENDING: &str = "hokusai_webhook_pending";
    pub const WEBHOOK_DEAD: &str = "hokusai_webhook_dead_letters";

    /// Every metric this process may expose (dashboards and rules are checked against it).
    pub const ALL: &[&str] = &[
        BUILD_INFO,
        MESSAGES,
        DEPLOYMENTS,
        DEPLOYMENT_DURATION,
        RETRIES,
        DLQ_MOVES,
        GAS_USED,
        FEES_PAID,
        RECOVERED,
        QUEUE_DEPTH,
        WORKERS,
        IN_FLIGHT,
        PAUSED,
        REDIS_UP,
        RPC_DURATION,
        REDIS_DURATION,
        AUDIT_WRITE_FAILURES,
        BALANCE,
        BASE_FEE,
        REPLACEMENTS,
        FEE_WAITING,
        API_DURATION,
        API_ERRORS,
        BACKPRESSURE,
        BREAKER_STATE,
        UNFUNDED,
        REORGS,
        REDIS_FAILOVERS,
        REDIS_REPLICA_ACKS,
        WEBHOOK_DELIVERIES,
        WEBHOOK_LATENCY,
        WEBHOOK_PENDING,
        WEBHOOK_DEAD,
    ];
}

static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle; the caller runs
/// [`PrometheusHandle::run_upkeep`](metrics_exporter_prometheus::PrometheusHandle) periodically.
pub fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    if let Some(h) = METRICS.get() {
        return Ok(h.clone());
    }
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let deployment = [
        0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::DEPLOYMENT_DURATION.into()),
            &deployment,
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::WEBHOOK_LATENCY.into()),
            &[
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
                21600.0, 86400.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_request_duration_seconds".into()),
            &latency,
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_command_duration_seconds".into()),
            &latency,
        )?
        .install_recorder()?;
    describe();
    metrics::gauge!(
        names::BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "revision" => env!("HOKUSAI_GIT_REVISION")
    )
    .set(1.0);
    Ok(METRICS.get_or_init(|| handle).clone())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(
        BUILD_INFO,
        "Always 1; labels carry the version and git revision."
    );
    describe_counter!(
        MESSAGES,
        "Messages taken off the inbound queue, by result: deployed, rejected (invalid input, to the DLQ), failed (gave up, to the DLQ)."
    );
    describe_counter!(
        DEPLOYMENTS,
        "Deployments by outcome: created (a new token), republished (already deployed, event sent again), failed."
    );
    describe_histogram!(
        DEPLOYMENT_DURATION,
        "Seconds from a message taken off the queue to its token_deployed event published."
    );
    describe_counter!(
        REDIS_FAILOVERS,
        "Times the Redis primary serving this process's keys changed (a failover)."
    );
    describe_gauge!(
        REDIS_REPLICA_ACKS,
        "Replicas that confirmed the last write that must survive a failover (WAIT; redis.min_replica_acks)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Outbound webhook requests by result: delivered (2xx), retry (another attempt is scheduled), dead (attempts spent, to the webhook dead-letter list), gone (410 from a callback, which is then disabled)."
    );
    describe_histogram!(
        WEBHOOK_LATENCY,
        "Seconds from an outbound event to the receiver's 2xx, retries included."
    );
    describe_gauge!(
        WEBHOOK_PENDING,
        "Outbound deliveries waiting: ready, scheduled for a retry, or being sent."
    );
    describe_gauge!(
        WEBHOOK_DEAD,
        "Outbound deliveries in the webhook dead-letter list (hokusai-deployer webhooks list)."
    );
    describe_counter!(
        RETRIES,
        "Failed attempts that will be retried, by error code."
    );
    describe_counter!(
        DLQ_MOVES,
        "Messages moved to the dead-letter queue, by error code."
    );
    describe_counter!(
        GAS_USED,
        "Gas used by mined transactions, by step (deploy, register)."
    );
    describe_counter!(
        FEES_PAID,
        "Fees paid by mined transactions in gwei (gas used x effective gas price), by step."
    );
    describe_counter!(
        RECOVERED,
        "Messages requeued from the processing lists of dead workers."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Length of each queue at the last scrape: inbound, processing (all workers), dlq, outbound, failures."
    );
    describe_gauge!(WORKERS, "Workers with a live heartbeat at the last scrape.");
    describe_gauge!(IN_FLIGHT, "Messages this process is working on.");
    describe_gauge!(
        BACKPRESSURE,
        "1 while this worker takes no new message because the outbound queue is over queues.outbound_max_len."
    );
    describe_gauge!(
        BREAKER_STATE,
        "The circuit breaker on chain operations: 0 closed, 1 open (no RPC URL answers; no message taken), 2 half-open (probing)."
    );
    describe_gauge!(
        UNFUNDED,
        "1 while this worker takes no message because its signer cannot pay for one deployment at the current fees."
    );
    describe_counter!(
        REORGS,
        "Reorganisations that moved or removed a transaction of ours, by depth_bucket (blocks from the head to the transaction's block when noticed: 1, 2-3, 4-15, 16+)."
    );
    describe_gauge!(
        PAUSED,
        "1 while the pause flag is set (workers take no new messages)."
    );
    describe_gauge!(
        REDIS_UP,
        "1 if Redis answered a PING at the last scrape, else 0."
    );
    describe_histogram!(RPC_DURATION, "Latency of JSON-RPC requests, by method.");
    describe_histogram!(
        API_DURATION,
        "Latency of HTTP API requests, by route, method and status."
    );
    describe_counter!(
        API_ERRORS,
        "HTTP API error answers by code (the fixed set of docs/api.md); refusals are also audited."
    );
    describe_histogram!(REDIS_DURATION, "Latency of Redis commands, by operation.");
    describe_gauge!(
        BALANCE,
        "Balance of this process's deployer key in ether, read at each scrape."
    );
    describe_gauge!(
        BASE_FEE,
        "The network's base fee per gas in gwei (the gas price on legacy chains), as last read for signing."
    );
    describe_counter!(
        REPLACEMENTS,
        "Stuck transactions by step and reason: slow and dropped were replaced with higher fees, capped could not be (the fee cap leaves no room)."
    );
    describe_gauge!(
        FEE_WAITING,
        "Messages of this process held back because network fees are above chain.max_fee_per_gas_gwei."
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        "Audit entries that could not be written to the Redis stream (they are still logged)."
    );
}
