//! What public chains do that a quiet local anvil does not, produced for real: an RPC that
//! stops answering (a TCP switch), a key without funds (`anvil_setBalance`), reorganisations
//! (`anvil_reorg`), and a key that someone else signs with too (`cast send`).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use fred::prelude::*;
use serde_json::Value;

use crate::harness::{model_message, Daemon, Stack, StackOpts, Switch, OTHER_KEY};

const IN: &str = "hokusai:model_ready_queue";
const OUT: &str = "hokusai:token_deployed_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";
const AUDIT: &str = "hokusai:deployer:audit";

/// The audit entries' `action` fields, oldest first.
async fn audit_actions(stack: &Stack) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> = stack
        .client
        .xrange(AUDIT, "-", "+", None)
        .await
        .expect("xrange");
    entries.into_iter().map(|(_, f)| f).collect()
}

fn has_action(entries: &[HashMap<String, String>], action: &str) -> bool {
    entries
        .iter()
        .any(|f| f.get("action").map(String::as_str) == Some(action))
}

async fn push_models(stack: &Stack, prefix: &str, n: usize) {
    for i in 0..n {
        stack
            .push(&model_message(
                &format!("{prefix}-{i}"),
                &format!("{prefix}_{i}"),
                &format!("{prefix}-{i}"),
            ))
            .await;
    }
}

/// Collects `n` events and returns their model ids (each must arrive once).
async fn events(stack: &Stack, n: usize) -> BTreeSet<String> {
    let mut models = BTreeSet::new();
    while models.len() < n {
        let e = stack.next_json(OUT).await;
        assert!(
            models.insert(e["model_id"].as_str().unwrap().to_owned()),
            "one event per model: {e}"
        );
    }
    models
}

async fn ready(d: &Daemon) {
    d.until("/health/ready", "the worker ready", |code, _| code == 200)
        .await;
}

/// The only RPC URL is cut for longer than `max_retries` x the backoff while 20 messages
/// arrive. After `chain.breaker.failures` failed attempts the breaker opens: readiness says
/// `chain: open`, the worker takes nothing more and in-flight messages wait without spending
/// retries; a probe after the cool-down closes it once the RPC is back, and all 20 deploy with
/// an empty DLQ. (With the breaker off the same cut dead-letters: see
/// `pipeline::retries_exhausted_go_to_the_dlq_with_the_attempt_count`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_rpc_opens_the_breaker_and_every_message_deploys_after() {
    let stack = Stack::start().await;
    let switch = Switch::start(stack.anvil.port, true).await;
    let rpc = switch.url();
    let mut d = stack.daemon(
        "breaker",
        &[
            ("HOKUSAI__CHAIN__RPC_URLS", &rpc),
            ("HOKUSAI__CHAIN__RPC_TIMEOUT_MS", "1000"),
            ("HOKUSAI__PIPELINE__MAX_RETRIES", "2"),
            ("HOKUSAI__PIPELINE__BACKOFF_INITIAL_MS", "50"),
            ("HOKUSAI__PIPELINE__BACKOFF_MAX_MS", "200"),
            ("HOKUSAI__CHAIN__BREAKER__FAILURES", "3"),
            ("HOKUSAI__CHAIN__BREAKER__COOL_DOWN_SECS", "1"),
        ],
        &[],
    );
    ready(&d).await;
    push_models(&stack, "warm", 1).await;
    events(&stack, 1).await;

    switch.set_up(false);
    push_models(&stack, "cut", 20).await;
    let (code, v) = d
        .until("/health/ready", "chain: open", |_, v| {
            v["components"]["chain"]["status"] == "open"
        })
        .await;
    assert_eq!(code, 503, "{v}");
    // Three retries with this backoff take well under a second: wait several times that.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stack.len(DLQ).await, 0, "no retry burned into the DLQ");
    let (_, metrics) = d.get("/metrics").await;
    let state = metrics
        .lines()
        .find(|l| l.starts_with("hokusai_chain_breaker_state "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        state.ends_with(" 1") || state.ends_with(" 2"),
        "open or probing: {state}"
    );
    assert!(
        stack.len(IN).await > 0,
        "the worker stopped taking messages while the breaker is open"
    );

    switch.set_up(true);
    let models = events(&stack, 20).await;
    assert_eq!(models.len(), 20);
    assert_eq!(stack.len(DLQ).await, 0);
    d.until("/health/ready", "chain up again", |code, _| code == 200)
        .await;
    let audit = audit_actions(&stack).await;
    for action in [
        "chain_breaker_open",
        "chain_breaker_half_open",
        "chain_breaker_closed",
    ] {
        assert!(has_action(&audit, action), "{action} audited");
    }
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
    assert_eq!(stack.creations().await, 21, "each model once");
}

/// A key that cannot pay for one deployment at the current fees: the worker runs but is not
/// ready, says why, takes no message and spends nothing; funded, it deploys what waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfunded_key_keeps_the_worker_unready_and_spends_nothing() {
    let stack = Stack::start().await;
    let p = stack.provider();
    let other: Address =
        hokusai_deployer::chain::signer(&hokusai_deployer::config::Secret::new(OTHER_KEY))
            .unwrap()
            .address();
    let set_balance = |wei: U256| {
        let p = p.clone();
        async move {
            let _: () = p
                .raw_request("anvil_setBalance".into(), (other, wei))
                .await
                .expect("anvil_setBalance");
        }
    };
    set_balance(U256::from(1_000u64)).await;
    let mut d = stack.daemon(
        "unfunded",
        &[("HOKUSAI__CHAIN__PRIVATE_KEY", OTHER_KEY)],
        &[],
    );
    let (code, v) = d
        .until("/health/ready", "not ready for want of funds", |_, v| {
            v["components"]["worker"]["funded"] == false
        })
        .await;
    assert_eq!(code, 503, "{v}");
    let why = v["components"]["worker"]["error"].as_str().unwrap();
    assert!(
        why.contains("fund it") && why.contains(&other.to_string()),
        "{why}"
    );

    push_models(&stack, "poor", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stack.len(IN).await, 1, "nothing taken");
    assert_eq!(
        p.get_transaction_count(other).await.unwrap(),
        0,
        "nothing spent"
    );

    set_balance(U256::from(10u128.pow(20))).await;
    assert_eq!(events(&stack, 1).await.len(), 1);
    ready(&d).await;
    assert_eq!(stack.len(DLQ).await, 0);
    let audit = audit_actions(&stack).await;
    assert!(has_action(&audit, "funds_low") && has_action(&audit, "funds_ok"));
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}

#[allow(dead_code)]
fn _uses(_: StackOpts, _: Value) {}
