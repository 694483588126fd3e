//! What public chains do that a quiet local anvil does not, produced for real: an RPC that
//! stops answering (a TCP switch), a key without funds (`anvil_setBalance`), reorganisations
//! (`anvil_reorg`), and a key that someone else signs with too (`cast send`).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::Provider;
use fred::prelude::*;
use serde_json::Value;

use crate::harness::{model_message, Daemon, Stack, Switch, OTHER_KEY};

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

/// anvil under the test's hand: it mines only when told (after the bootstrap).
struct Miner(alloy::providers::DynProvider);

impl Miner {
    async fn manual(stack: &Stack) -> Miner {
        let p = stack.provider();
        let _: () = p
            .raw_request("evm_setAutomine".into(), (false,))
            .await
            .expect("evm_setAutomine");
        Miner(p)
    }

    async fn mine(&self) -> u64 {
        let _: String = self
            .0
            .raw_request("evm_mine".into(), ())
            .await
            .expect("evm_mine");
        self.0.get_block_number().await.unwrap()
    }

    /// Replaces the last `depth` blocks with as many empty ones.
    async fn reorg(&self, depth: u64) {
        let none: Vec<Value> = Vec::new();
        let _: Value = self
            .0
            .raw_request("anvil_reorg".into(), (depth, none))
            .await
            .expect("anvil_reorg");
    }

    async fn block_of(&self, tx: alloy::primitives::B256) -> Option<u64> {
        self.0
            .get_transaction_receipt(tx)
            .await
            .unwrap()
            .and_then(|r| r.block_number)
    }

    /// Waits until the node holds this transaction unmined (sent, or sent again).
    async fn until_pending(&self, tx: alloy::primitives::B256) {
        for _ in 0..600 {
            if let Some(t) = self.0.get_transaction_by_hash(tx).await.unwrap() {
                if t.block_number.is_none() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("transaction {tx} never came (back) to the pool");
    }
}

/// The model's journaled transaction hash, once it is sent.
async fn sent_tx(stack: &Stack, model_id: &str) -> alloy::primitives::B256 {
    let key = format!("hokusai:deployer:journal:{model_id}");
    for _ in 0..600 {
        let h: Option<String> = stack.client.hget(&key, "deploy_hash").await.unwrap();
        if let Some(h) = h {
            return h.parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{model_id} never sent");
}

/// Exactly one token for the model on the canonical chain, at the event's address and in the
/// event's block: the registry names it, code is there, one `TokenDeployed` log.
async fn one_token_as_the_event_says(stack: &Stack, miner: &Miner, event: &Value) {
    let token: Address = event["token_address"].as_str().unwrap().parse().unwrap();
    let tx: alloy::primitives::B256 = event["transaction_hash"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        miner.block_of(tx).await,
        event["block_number"].as_u64(),
        "the event names the block its transaction is in: {event}"
    );
    assert!(
        !miner.0.get_code_at(token).await.unwrap().is_empty(),
        "the token exists"
    );
    let registry = hokusai_deployer::chain::ModelRegistry::new(stack.boot.model_registry, &miner.0);
    let model_id = event["model_id"].as_str().unwrap().to_owned();
    assert_eq!(registry.getToken(model_id).call().await.unwrap(), token);
    assert_eq!(
        stack.creations().await,
        1,
        "one token on the canonical chain"
    );
}

fn reorgs_counted(metrics: &str, bucket: &str) -> f64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "hokusai_reorgs_total{{depth_bucket=\"{bucket}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A depth-1 reorganisation while the worker waits for 2 confirmations: the block holding the
/// transaction is replaced by one without it. The worker notices, re-broadcasts the exact bytes,
/// and publishes one event, naming the block the transaction finally landed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_while_waiting_for_confirmations_publishes_the_final_block() {
    let stack = Stack::start().await;
    let miner = Miner::manual(&stack).await;
    let mut d = stack.daemon("reorg-wait", &[("HOKUSAI__CHAIN__CONFIRMATIONS", "2")], &[]);
    ready(&d).await;
    push_models(&stack, "rw", 1).await;
    let tx = sent_tx(&stack, "rw_0").await;
    miner.until_pending(tx).await;
    let first = miner.mine().await;
    assert_eq!(miner.block_of(tx).await, Some(first));
    // The worker sees it mined (it polls every 50 ms here), one confirmation short.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stack.len(OUT).await, 0, "not published on one confirmation");
    miner.reorg(1).await;
    assert_eq!(miner.block_of(tx).await, None, "the reorg took it out");
    // The worker sends the same bytes again; the next block takes them, the one after confirms.
    miner.until_pending(tx).await;
    let landed = miner.mine().await;
    miner.mine().await;
    let event = stack.next_json(OUT).await;
    assert_eq!(event["block_number"], landed, "{event}");
    assert!(
        event.get("reorged").is_none(),
        "published once, after the reorg: {event}"
    );
    one_token_as_the_event_says(&stack, &miner, &event).await;
    let (_, metrics) = d.get("/metrics").await;
    assert_eq!(reorgs_counted(&metrics, "1"), 1.0, "{metrics}");
    assert_eq!(stack.len(OUT).await, 0, "one event");
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}

/// A depth-3 reorganisation after the event was published (2 confirmations): the watch notices
/// the deployment's block is gone, deploys it again through the same path (the same bytes, so
/// the same token address), and publishes a second event with `"reorged": true` naming the new
/// block; counted and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_after_publication_deploys_again_and_says_so() {
    let stack = Stack::start().await;
    let miner = Miner::manual(&stack).await;
    let mut d = stack.daemon(
        "reorg-after",
        &[("HOKUSAI__CHAIN__CONFIRMATIONS", "2")],
        &[],
    );
    ready(&d).await;
    push_models(&stack, "ra", 1).await;
    let tx = sent_tx(&stack, "ra_0").await;
    miner.until_pending(tx).await;
    let block = miner.mine().await;
    miner.mine().await;
    let first = stack.next_json(OUT).await;
    assert_eq!(first["block_number"], block, "{first}");
    miner.mine().await;
    // The deployment's block and the two above it are replaced by empty blocks.
    miner.reorg(3).await;
    assert_eq!(miner.block_of(tx).await, None);
    miner.until_pending(tx).await;
    let landed = miner.mine().await;
    miner.mine().await;
    let second = stack.next_json(OUT).await;
    assert_eq!(second["reorged"], true, "{second}");
    assert_eq!(second["block_number"], landed, "{second}");
    assert_eq!(
        second["token_address"], first["token_address"],
        "the same address again"
    );
    one_token_as_the_event_says(&stack, &miner, &second).await;
    let (_, metrics) = d.get("/metrics").await;
    assert_eq!(reorgs_counted(&metrics, "2-3"), 1.0, "{metrics}");
    let audit = audit_actions(&stack).await;
    let reorg = audit
        .iter()
        .find(|f| f.get("action").map(String::as_str) == Some("reorg"))
        .expect("the reorg is audited");
    assert_eq!(reorg["model_id"], "ra_0");
    assert_eq!(reorg["block_number"], block.to_string());
    // The status the API reads is the new event.
    let stored: Option<String> = stack
        .client
        .hget("hokusai:deployer:journal:ra_0", "event")
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&stored.unwrap()).unwrap(),
        second
    );
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}

/// `cast` with the worker's key, as an operator would run it.
async fn cast_send(stack: &Stack, args: &[&str]) -> String {
    let bin =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts/node_modules/.bin/cast");
    let rpc = stack.anvil.url("http");
    let out = tokio::process::Command::new(bin)
        .args([
            "send",
            "--async",
            "--rpc-url",
            &rpc,
            "--private-key",
            hokusai_deployer::localstack::ANVIL_DEV_KEY,
        ])
        .args(args)
        .output()
        .await
        .expect("cast runs (make tools)");
    assert!(
        out.status.success(),
        "cast send: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Someone else signs with the worker's key mid-burst: one plain `cast send` (it takes the next
/// free nonce, the one the worker was about to use) and one priced to replace a pending
/// transaction of ours. Every model still deploys exactly once, nothing is dead-lettered, the
/// worker signs no new transaction for a nonce already used, and nothing of ours stays stuck
/// past one replacement interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_outside_the_service_mid_burst_still_deploys_every_model_once() {
    let stack = Stack::start().await;
    let miner = Miner::manual(&stack).await;
    let dev: Address = hokusai_deployer::chain::signer(&hokusai_deployer::config::Secret::new(
        hokusai_deployer::localstack::ANVIL_DEV_KEY,
    ))
    .unwrap()
    .address();
    let mut d = stack.daemon(
        "shared-key",
        &[("HOKUSAI__CHAIN__REPLACE_AFTER_SECS", "10")],
        &[],
    );
    ready(&d).await;
    let start = miner.0.get_transaction_count(dev).await.unwrap();
    push_models(&stack, "sk", 20).await;
    // All 20 signed and waiting in the pool.
    let mut pending = miner.0.get_transaction_count(dev).pending().await.unwrap();
    for _ in 0..600 {
        if pending >= start + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        pending = miner.0.get_transaction_count(dev).pending().await.unwrap();
    }
    assert_eq!(pending, start + 20, "the burst is in the pool");
    // The next free nonce, which the worker would take next, and one of ours replaced at
    // twice its price.
    let plain = cast_send(
        &stack,
        &[
            "--nonce",
            &pending.to_string(),
            "0x0000000000000000000000000000000000000001",
            "--value",
            "1",
        ],
    )
    .await;
    let victim = start + 10;
    let replacing = cast_send(
        &stack,
        &[
            "--nonce",
            &victim.to_string(),
            "--gas-price",
            "200gwei",
            "--priority-gas-price",
            "100gwei",
            "0x0000000000000000000000000000000000000002",
        ],
    )
    .await;
    push_models(&stack, "sk2", 5).await;
    let mining = {
        let p = miner.0.clone();
        tokio::spawn(async move {
            loop {
                // Slower than the retries' backoff: a conflict must be waited out, not retried
                // until the DLQ.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _: Result<String, _> = p.raw_request("evm_mine".into(), ()).await;
            }
        })
    };
    let began = std::time::Instant::now();
    let mut models = events(&stack, 25).await;
    let took = began.elapsed();
    mining.abort();
    models.retain(|m| m.starts_with("sk"));
    assert_eq!(models.len(), 25);
    assert!(
        took < Duration::from_secs(20),
        "nothing stuck beyond one replacement interval (10 s): took {took:?}"
    );
    assert_eq!(stack.len(DLQ).await, 0);
    for h in [&plain, &replacing] {
        let h: alloy::primitives::B256 = h.parse().unwrap();
        assert!(
            miner.block_of(h).await.is_some(),
            "the outside transaction {h} landed"
        );
    }
    assert_eq!(stack.creations().await, 25, "each model once");
    // Every transaction the worker signed fresh had a nonce of its own.
    let audit = audit_actions(&stack).await;
    let mut nonces = BTreeSet::new();
    for f in audit
        .iter()
        .filter(|f| f.get("action").map(String::as_str) == Some("tx_sent"))
    {
        assert!(
            nonces.insert(f["nonce"].clone()),
            "nonce {} signed twice: {f:?}",
            f["nonce"]
        );
    }
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}
