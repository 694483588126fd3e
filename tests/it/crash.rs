//! Crash safety: SIGKILL at random moments, two replicas, Redis restarted, a dead RPC URL,
//! SIGTERM mid-deployment. The ground truth is read from the chain (contract creations,
//! registry entries) and from Redis (every list empty), never from the service's own word.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy::primitives::Address;
use fred::prelude::*;
use hokusai_deployer::chain::ModelRegistry;
use hokusai_deployer::localstack::{free_port, ANVIL_DEV_KEY};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::harness::{model_message, Stack, StackOpts, Worker, OTHER_KEY};

const OUT: &str = "hokusai:token_deployed_queue";
const IN: &str = "hokusai:model_ready_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";
/// The processing lists of the workers these tests run (`w1`, `w2`).
const PROCESSING: [&str; 2] = [
    "hokusai:model_ready_queue:processing:w1",
    "hokusai:model_ready_queue:processing:w2",
];

fn message(i: usize) -> String {
    model_message(
        &format!("chaos-{i}"),
        &format!("chaos_{i}"),
        &format!("c-{i}"),
    )
}

/// Waits until the inbound queue and every processing list are empty (read atomically), i.e.
/// every message was published or dead-lettered. This condition has no event of its own, so it
/// is polled, with a deadline.
async fn wait_idle(stack: &Stack) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let busy: u64 = stack
            .lens(&[IN, PROCESSING[0], PROCESSING[1]])
            .await
            .iter()
            .sum();
        if busy == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{busy} messages never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every model: exactly one registry entry, one token created, its events all identical and
/// naming the registered token; no message left anywhere.
async fn assert_exactly_once(stack: &Stack, n: usize, events: BTreeMap<String, Vec<String>>) {
    let creations = stack.creations_by(&[ANVIL_DEV_KEY, OTHER_KEY]).await;
    assert_eq!(
        creations, n,
        "one token per model, across both deployer keys"
    );
    assert_eq!(events.len(), n, "every model has an event");
    let p = stack.provider();
    let registry = ModelRegistry::new(stack.boot.model_registry, &p);
    for (model, copies) in &events {
        assert!(
            copies.iter().all(|c| c == &copies[0]),
            "copies of {model}'s event differ"
        );
        let ev: Value = serde_json::from_str(&copies[0]).unwrap();
        let token: Address = ev["token_address"].as_str().unwrap().parse().unwrap();
        let m = registry.getModel(model.clone()).call().await.unwrap();
        assert!(m.registered, "{model} is registered");
        assert_eq!(m.token, token, "{model}'s event names its registered token");
    }
    assert_eq!(stack.len(DLQ).await, 0, "nothing dead-lettered");
    assert_eq!(stack.len(IN).await, 0);
    for l in PROCESSING {
        assert_eq!(stack.len(l).await, 0, "{l} is empty");
    }
}

/// Pops events until `n` distinct models have one.
async fn collect_events(stack: &Stack, n: usize) -> BTreeMap<String, Vec<String>> {
    let mut events = BTreeMap::new();
    collect_more(stack, &mut events, n).await;
    events
}

async fn collect_more(stack: &Stack, events: &mut BTreeMap<String, Vec<String>>, n: usize) {
    while events.len() < n {
        let e = stack.next(OUT).await;
        let model = serde_json::from_str::<Value>(&e).unwrap()["model_id"]
            .as_str()
            .unwrap()
            .to_owned();
        events.entry(model).or_default().push(e);
    }
}

async fn drain_events(stack: &Stack, events: &mut BTreeMap<String, Vec<String>>) {
    let rest: Vec<String> = stack.client.lrange(OUT, 0, -1).await.unwrap();
    let _: i64 = stack.client.del(OUT).await.unwrap();
    for e in rest {
        let model = serde_json::from_str::<Value>(&e).unwrap()["model_id"]
            .as_str()
            .unwrap()
            .to_owned();
        events.entry(model).or_default().push(e);
    }
}

/// 50 messages; the daemon SIGKILLed at random moments six times and restarted; then two
/// replicas with their own keys, one of them killed twice. With the journal no transaction is
/// wasted: none reverts. Set `CHAOS_NO_JOURNAL=1` to run the daemons without the journal: the
/// chain still lets each model have one token (the token manager refuses a second), and the
/// test shows the duplicates it reverted and their gas instead; redeliveries of deployed
/// models then dead-letter as `TOKEN_EXISTS`, since nothing remembers they were ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_and_two_replicas_deploy_every_model_exactly_once() {
    let n = 50;
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--block-time", "1"],
        ..Default::default()
    })
    .await;
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (CHAOS_SEED={seed} replays the kill moments)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let no_journal = std::env::var("CHAOS_NO_JOURNAL").is_ok();
    let args: &[&str] = if no_journal {
        &["--unsafe-no-journal"]
    } else {
        &[]
    };
    let env1 = [
        ("HOKUSAI__PIPELINE__WORKER_ID", "w1"),
        ("HOKUSAI__CHAIN__PRIVATE_KEY", ANVIL_DEV_KEY),
        ("HOKUSAI__PIPELINE__HEARTBEAT_TTL_SECS", "3"),
    ];
    let env2 = [
        ("HOKUSAI__PIPELINE__WORKER_ID", "w2"),
        ("HOKUSAI__CHAIN__PRIVATE_KEY", OTHER_KEY),
        ("HOKUSAI__PIPELINE__HEARTBEAT_TTL_SECS", "3"),
    ];
    for i in 0..n {
        stack.push(&message(i)).await;
    }
    // The kill moments are random on purpose: each lands somewhere else in a deployment.
    for _ in 0..6 {
        let mut d = stack.daemon("chaos-w1", &env1, args);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        d.sigkill().await;
    }
    let mut a = stack.daemon("chaos-w1", &env1, args);
    for _ in 0..2 {
        let mut b = stack.daemon("chaos-w2", &env2, args);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        b.sigkill().await;
    }
    let mut b = stack.daemon("chaos-w2", &env2, args);

    // Every message ends somewhere (published or dead-lettered); then judge what happened.
    wait_idle(&stack).await;
    let mut events = BTreeMap::new();
    assert!(a.sigterm(Duration::from_secs(40)).await.success());
    assert!(b.sigterm(Duration::from_secs(40)).await.success());
    drain_events(&stack, &mut events).await;
    let keys = [ANVIL_DEV_KEY, OTHER_KEY];
    let (wasted, gas) = stack.wasted_by(&keys).await;
    eprintln!("wasted transactions: {wasted} reverted, {gas} gas");
    if no_journal {
        assert_eq!(
            stack.creations_by(&keys).await,
            n,
            "without the journal the chain still allows one token per model"
        );
        eprintln!(
            "without the journal: {} models published, {} dead letters",
            events.len(),
            stack.len(DLQ).await
        );
        return;
    }
    assert_eq!((wasted, gas), (0, 0), "no transaction reverted");
    assert_exactly_once(&stack, n, events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run_loses_nothing() {
    let n = 12;
    let mut stack = Stack::start_with(StackOpts {
        anvil_args: &["--block-time", "1"],
        redis_args: &["--appendonly", "yes", "--appendfsync", "always"],
        ..Default::default()
    })
    .await;
    let worker = stack.worker(&[("HOKUSAI__PIPELINE__MAX_RETRIES", "100")]);
    for i in 0..n {
        stack.push(&message(i)).await;
    }
    let mut events = collect_events(&stack, 2).await;
    stack.restart_redis().await;
    collect_more(&stack, &mut events, n).await;
    wait_idle(&stack).await;
    worker.stop().await;
    drain_events(&stack, &mut events).await;
    assert_exactly_once(&stack, n, events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rpc_url_fails_over_to_the_live_one() {
    let stack = Stack::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let urls = format!("{dead},{}", stack.anvil.url("http"));
    let worker = Worker::start(stack.settings_with_rpc(&urls, &[]), Default::default());
    let n = 5;
    for i in 0..n {
        stack.push(&message(i)).await;
    }
    let mut events = collect_events(&stack, n).await;
    wait_idle(&stack).await;
    worker.stop().await;
    drain_events(&stack, &mut events).await;
    assert_exactly_once(&stack, n, events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_deployment_exits_zero_and_the_message_completes() {
    sigterm_mid_deployment(false).await;
}

/// PID 1 gets no default signal actions: without its own SIGTERM handler the process would
/// ignore the orchestrator's SIGTERM and be SIGKILLed at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_pid_1_drains_and_exits_zero_too() {
    sigterm_mid_deployment(true).await;
}

async fn sigterm_mid_deployment(pid1: bool) {
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--block-time", "2"],
        ..Default::default()
    })
    .await;
    let env = [("HOKUSAI__PIPELINE__WORKER_ID", "w1")];
    let name = if pid1 { "sigterm-pid1" } else { "sigterm" };
    let mut d = stack.daemon_with(name, &env, &["--drain-secs", "20"], pid1);
    stack.push(&message(0)).await;
    // Wait for the deployment to be under way: its transaction is in the journal.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sent: bool = stack
            .client
            .hexists("hokusai:deployer:journal:chaos_0", "deploy_hash")
            .await
            .unwrap();
        if sent {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deployment never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    let status = d.sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    eprintln!("drained and exited in {:?}", started.elapsed());
    // Within the drain deadline the in-flight message finished: its event is there.
    let events = collect_events(&stack, 1).await;
    assert_exactly_once(&stack, 1, events).await;
}
