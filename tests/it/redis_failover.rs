//! The service on highly available Redis (issue 19): a real Redis Cluster (three primaries, a
//! replica each) and a real Sentinel set ([`crate::redis_ha`]), with the primary serving the
//! service's keys SIGKILLed mid-run and the worker SIGKILLed twice; replica acknowledgements
//! (`redis.min_replica_acks`) with the replica frozen by SIGSTOP. Ground truth comes from the
//! chain (contract creations, the deployer's nonce) and from Redis.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use fred::prelude::*;
use hokusai_deployer::localstack::ANVIL_DEV_KEY;
use serde_json::Value;

use crate::harness::{model_message, Daemon, Stack, StackOpts};
use crate::redis_ha::{fred_client, RedisCluster, RedisSentinel, SERVICE_NAME};

const INBOUND: &str = "{hokusai}:model_ready_queue";
const OUTBOUND: &str = "{hokusai}:token_deployed_queue";
const DLQ: &str = "{hokusai}:model_ready_queue:dlq";
const PROCESSING: &str = "{hokusai}:model_ready_queue:processing:w1";
const AUDIT: &str = "{hokusai}:deployer:audit";

/// Every queue and the state prefix under one hash tag: one slot on a cluster.
const TAGGED: [(&str, &str); 6] = [
    ("HOKUSAI__QUEUES__INBOUND", INBOUND),
    (
        "HOKUSAI__QUEUES__PROCESSING",
        "{hokusai}:model_ready_queue:processing",
    ),
    ("HOKUSAI__QUEUES__DLQ", DLQ),
    ("HOKUSAI__QUEUES__OUTBOUND", OUTBOUND),
    (
        "HOKUSAI__QUEUES__FAILURES",
        "{hokusai}:deployment_failed_queue",
    ),
    ("HOKUSAI__QUEUES__STATE_PREFIX", "{hokusai}:deployer"),
];

fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut e: Vec<(&str, &str)> = TAGGED.to_vec();
    e.extend([
        ("HOKUSAI__PIPELINE__WORKER_ID", "w1"),
        ("HOKUSAI__PIPELINE__HEARTBEAT_TTL_SECS", "3"),
        ("HOKUSAI__CHAIN__PRIVATE_KEY", ANVIL_DEV_KEY),
    ]);
    e.extend_from_slice(extra);
    e
}

async fn push_models(client: &Client, prefix: &str, n: usize) {
    for i in 0..n {
        let m = model_message(
            &format!("{prefix}-{i}"),
            &format!("{prefix}_{i}"),
            &format!("{}{i}", prefix.to_uppercase()),
        );
        let _: i64 = client.lpush(INBOUND, m).await.expect("lpush");
    }
}

/// Retries a Redis read through a failover (the client reconnects by itself).
async fn read<T, F, Fut>(what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(Instant::now() < deadline, "{what}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The events on the outbound queue, by model.
async fn events(client: &Client) -> BTreeMap<String, Vec<String>> {
    let all: Vec<String> = read("lrange", || client.lrange(OUTBOUND, 0, -1)).await;
    let mut by = BTreeMap::<String, Vec<String>>::new();
    for e in all {
        let model = serde_json::from_str::<Value>(&e).unwrap()["model_id"]
            .as_str()
            .unwrap()
            .to_owned();
        by.entry(model).or_default().push(e);
    }
    by
}

/// Waits until `n` models have an event and nothing waits or is in flight.
async fn wait_all(client: &Client, n: usize) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let by = events(client).await;
        let busy: u64 = read("llen", || async {
            let a: u64 = client.llen(INBOUND).await?;
            let b: u64 = client.llen(PROCESSING).await?;
            Ok(a + b)
        })
        .await;
        if by.len() >= n && busy == 0 {
            return by;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} models published, {busy} messages waiting or in flight",
            by.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_events(client: &Client, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while events(client).await.len() < n {
        assert!(Instant::now() < deadline, "fewer than {n} events");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One token per model on chain, one event per model, nothing dead-lettered or left.
async fn assert_exactly_once(stack: &Stack, client: &Client, n: usize) {
    let by = wait_all(client, n).await;
    assert_eq!(stack.creations().await, n, "one token per model");
    assert_eq!(by.len(), n);
    for (model, copies) in &by {
        assert_eq!(copies.len(), 1, "{model} has one event: {copies:?}");
    }
    let dlq: u64 = read("llen", || client.llen(DLQ)).await;
    assert_eq!(dlq, 0, "nothing dead-lettered");
}

async fn failovers_audited(client: &Client) -> usize {
    let entries: Vec<(String, std::collections::HashMap<String, String>)> =
        read("xrange", || client.xrange(AUDIT, "-", "+", None)).await;
    entries
        .iter()
        .filter(|(_, f)| f.get("action").map(String::as_str) == Some("redis_failover"))
        .count()
}

/// The chaos run of the issue on a Redis Cluster: 30 models, the primary of the service's
/// slot SIGKILLed mid-run (its replica is promoted, then the old node comes back as a
/// replica), and two worker SIGKILLs; with `min_replica_acks = 1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_primary_failover_and_worker_kills_lose_and_double_nothing() {
    let n = 30;
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--block-time", "1"],
        ..Default::default()
    })
    .await;
    let mut cluster = RedisCluster::start().await;
    let client = fred_client(&cluster.seed_url());
    client.init().await.expect("the cluster answers");
    // `redis.mode = cluster` with a plain URL: the service discovers the nodes from one seed.
    let seed = format!("redis://127.0.0.1:{}", cluster.ports()[0]);
    let env = env(&[
        ("HOKUSAI__REDIS__URL", seed.as_str()),
        ("HOKUSAI__REDIS__MODE", "cluster"),
        ("HOKUSAI__REDIS__MIN_REPLICA_ACKS", "1"),
        ("HOKUSAI__PIPELINE__CONCURRENCY", "4"),
    ]);
    push_models(&client, "cl", n).await;
    let mut w: Daemon = stack.daemon("ha-cluster", &env, &[]);
    wait_events(&client, 3).await;
    w.sigkill().await;
    w = stack.daemon("ha-cluster", &env, &[]);
    wait_events(&client, 8).await;
    let old = cluster.primary_of("{hokusai}:x").await;
    let new = cluster.kill_primary_of("{hokusai}:x").await;
    eprintln!("cluster failover: {old} -> {new}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    w.sigkill().await;
    w = stack.daemon("ha-cluster", &env, &[]);
    cluster.restart_node(old).await;
    let (_, detailed) = w
        .until("/health/detailed", "the new primary in use", |_, v| {
            v["components"]["redis"]["primary"] == format!("127.0.0.1:{new}")
        })
        .await;
    assert_eq!(detailed["components"]["redis"]["mode"], "cluster");
    assert_exactly_once(&stack, &client, n).await;
    assert!(w.sigterm(Duration::from_secs(40)).await.success());
}

/// The same chaos run on Sentinel (`redis.mode = sentinel`, the sentinels' addresses and the
/// service name): the primary SIGKILLed, the sentinels promote the replica, the service
/// follows it; the old primary returns as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sentinel_a_primary_failover_and_worker_kills_lose_and_double_nothing() {
    let n = 30;
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--block-time", "1"],
        ..Default::default()
    })
    .await;
    let mut set = RedisSentinel::start().await;
    let client = fred_client(&set.sentinel_url());
    client.init().await.expect("the sentinels answer");
    let sentinels: Vec<String> = set
        .sentinel_ports()
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let sentinels = sentinels.join(",");
    let env = env(&[
        ("HOKUSAI__REDIS__URL", "redis://127.0.0.1:6379"),
        ("HOKUSAI__REDIS__MODE", "sentinel"),
        ("HOKUSAI__REDIS__SENTINEL_ADDRESSES", sentinels.as_str()),
        ("HOKUSAI__REDIS__SENTINEL_SERVICE_NAME", SERVICE_NAME),
        ("HOKUSAI__REDIS__MIN_REPLICA_ACKS", "1"),
        ("HOKUSAI__PIPELINE__CONCURRENCY", "4"),
    ]);
    push_models(&client, "se", n).await;
    let mut w: Daemon = stack.daemon("ha-sentinel", &env, &[]);
    wait_events(&client, 3).await;
    w.sigkill().await;
    w = stack.daemon("ha-sentinel", &env, &[]);
    wait_events(&client, 8).await;
    let old = set.primary_port().await;
    let new = set.kill_primary().await;
    eprintln!("sentinel failover: {old} -> {new}");
    set.restart_old_primary(old).await;
    w.until("/health/detailed", "the new primary in use", |_, v| {
        v["components"]["redis"]["primary"] == format!("127.0.0.1:{new}")
    })
    .await;
    assert_eq!(
        failovers_audited(&client).await,
        1,
        "the failover is audited"
    );
    let (_, metrics) = w.get("/metrics").await;
    assert!(
        metrics.contains("hokusai_redis_failovers_total 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.sigkill().await;
    w = stack.daemon("ha-sentinel", &env, &[]);
    assert_exactly_once(&stack, &client, n).await;
    assert!(w.sigterm(Duration::from_secs(40)).await.success());
}

/// With `min_replica_acks = 1` and the only replica frozen (SIGSTOP), the journal record of the
/// signed transaction cannot reach a replica, so nothing is broadcast (the deployer's nonce
/// stays 0) and no retry is spent; once the replica is back, the model deploys once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_holds_every_broadcast_until_it_returns() {
    let stack = Stack::start().await;
    let set = RedisSentinel::start().await;
    let primary = set.primary_port().await;
    let url = format!("redis://127.0.0.1:{primary}");
    let client = fred_client(&url);
    client.init().await.unwrap();
    let env = env(&[
        ("HOKUSAI__REDIS__URL", url.as_str()),
        ("HOKUSAI__REDIS__MIN_REPLICA_ACKS", "1"),
        ("HOKUSAI__REDIS__REPLICA_ACK_TIMEOUT_MS", "300"),
    ]);
    let w = stack.daemon("ha-frozen", &env, &[]);
    w.until("/health/ready", "ready", |s, _| s == 200).await;
    set.stop_replica();
    push_models(&client, "fz", 3).await;
    let dev =
        hokusai_deployer::chain::signer(&hokusai_deployer::config::Secret::new(ANVIL_DEV_KEY))
            .unwrap()
            .address();
    let p = stack.provider();
    let nonce_before = p.get_transaction_count(dev).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, detailed) = w.get_json("/health/detailed").await;
    assert_eq!(
        detailed["components"]["redis"]["replica_acks"], 0,
        "{detailed}"
    );
    assert_eq!(
        p.get_transaction_count(dev).await.unwrap(),
        nonce_before,
        "nothing broadcast while no replica holds the record"
    );
    assert_eq!(events(&client).await.len(), 0);
    let dlq: u64 = client.llen(DLQ).await.unwrap();
    assert_eq!(dlq, 0, "waiting for replicas spends no retries");
    set.cont_replica();
    assert_exactly_once(&stack, &client, 3).await;
    assert_eq!(
        p.get_transaction_count(dev).await.unwrap(),
        nonce_before + 3,
        "one transaction per model"
    );
    let (_, detailed) = w.get_json("/health/detailed").await;
    assert_eq!(detailed["components"]["redis"]["replica_acks"], 1);
}
