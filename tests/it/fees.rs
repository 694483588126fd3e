//! Fees and stuck transactions on a real anvil whose blocks and base fee the test controls:
//! messages held back above the fee cap and released when the fee drops, a transaction priced
//! under the base fee replaced with higher fees, a nonce gap healed.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy::primitives::{B256, U256};
use alloy::providers::{DynProvider, Provider};
use hokusai_deployer::audit;
use hokusai_deployer::chain::ModelRegistry;

use crate::harness::{model_message, Stack, StackOpts};

const OUT: &str = "hokusai:token_deployed_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";
const AUDIT: &str = "hokusai:deployer:audit";
const GWEI: u64 = 1_000_000_000;

async fn rpc(p: &DynProvider, method: &'static str, params: serde_json::Value) {
    let _: serde_json::Value = p
        .raw_request(method.into(), params)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"));
}

/// Mines a block every 250 ms, each with `base_fee` when set: the test's stand-in for a
/// network whose fees it decides. Stops when dropped.
struct Miner(tokio::task::JoinHandle<()>);

impl Miner {
    fn start(p: DynProvider, base_fee: Option<u64>) -> Miner {
        Miner(tokio::spawn(async move {
            loop {
                if let Some(fee) = base_fee {
                    rpc(
                        &p,
                        "anvil_setNextBlockBaseFeePerGas",
                        serde_json::json!([U256::from(fee)]),
                    )
                    .await;
                }
                rpc(&p, "evm_mine", serde_json::json!([])).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }))
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the audit stream until `n` entries with `action` have arrived (blocking reads, no
/// polling) and returns them.
async fn audit_entries(stack: &Stack, action: &str, n: usize) -> Vec<BTreeMap<String, String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = "0-0".to_string();
    let mut found = Vec::new();
    while found.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} `{action}` audit entries did not arrive; saw {found:?}"
        );
        for r in audit::after(&stack.client, AUDIT, &last, 1000)
            .await
            .expect("xread")
        {
            last = r.id.clone();
            if r.fields.get("action").map(String::as_str) == Some(action) {
                found.push(r.fields);
            }
        }
    }
    found
}

/// Above the cap a message is held back, sends nothing, and shows in `/health/detailed` and
/// `/metrics`; when the base fee drops under the cap it deploys, paying no more than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fees_above_the_cap_hold_a_message_until_the_base_fee_drops() {
    // anvil mines on demand, starting at a base fee of 50 gwei.
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--base-fee", "50000000000"],
        ..Default::default()
    })
    .await;
    let mut daemon = stack.daemon(
        "fee-hold",
        &[
            ("HOKUSAI__CHAIN__MAX_FEE_PER_GAS_GWEI", "10"),
            ("HOKUSAI__PIPELINE__BACKOFF_MAX_MS", "1000"),
            ("HOKUSAI__PIPELINE__MAX_RETRIES", "1"),
        ],
        &[],
    );
    stack
        .push(&model_message("hold-1", "held_model", "held"))
        .await;
    let (_, health) = daemon
        .until(
            "/health/detailed",
            "the message waiting for fees",
            |_, j| j["worker"]["waiting_for_fees"] == 1,
        )
        .await;
    assert_eq!(health["worker"]["in_flight"], 1, "{health}");
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("hokusai_messages_waiting_for_fees 1"),
        "{metrics}"
    );
    let retries = audit_entries(&stack, "retry", 2).await;
    assert!(
        retries.iter().all(|r| r["code"] == "INSUFFICIENT_GAS"),
        "{retries:?}"
    );
    assert_eq!(stack.creations().await, 0, "nothing is sent above the cap");

    // The network calms down: the next block's base fee is 1 gwei.
    let p = stack.provider();
    rpc(
        &p,
        "anvil_setNextBlockBaseFeePerGas",
        serde_json::json!([U256::from(GWEI)]),
    )
    .await;
    rpc(&p, "evm_mine", serde_json::json!([])).await;

    let event = stack.next_json(OUT).await;
    assert_eq!(event["model_id"], "held_model");
    let price: u64 = event["gas_price"].as_str().unwrap().parse().unwrap();
    assert!(
        price <= 10 * GWEI,
        "paid {price} wei per gas over a 10 gwei cap"
    );
    daemon
        .until("/health/detailed", "no message waiting for fees", |_, j| {
            j["worker"]["waiting_for_fees"] == 0
        })
        .await;
    assert_eq!(stack.len(DLQ).await, 0, "held back, never given up on");
    assert_eq!(stack.creations().await, 1);
    daemon.sigterm(Duration::from_secs(30)).await;
}

/// A transaction the network's base fee outgrew is dropped by anvil (as a busy node would
/// leave it unmined): it is replaced with the same nonce and higher fees, the journal knows
/// every version, and the model is deployed exactly once by the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_priced_under_the_base_fee_is_replaced_and_deploys_once() {
    let stack = Stack::start().await;
    let p = stack.provider();
    rpc(&p, "evm_setAutomine", serde_json::json!([false])).await;
    let worker = stack.worker(&[
        ("HOKUSAI__CHAIN__REPLACE_AFTER_SECS", "2"),
        ("HOKUSAI__CHAIN__POLL_INTERVAL_MS", "100"),
    ]);
    stack
        .push(&model_message("stuck-1", "stuck_model", "stuck"))
        .await;
    let sent = audit_entries(&stack, "tx_sent", 1).await;
    let original = sent
        .iter()
        .find(|e| e["step"] == "deploy")
        .expect("deployment sent")["tx_hash"]
        .clone();
    // Every block from now on has a base fee of 200 gwei, far above what was signed.
    let miner = Miner::start(p.clone(), Some(200 * GWEI));

    let event = stack.next_json(OUT).await;
    drop(miner);
    worker.stop().await;
    let replaced = audit_entries(&stack, "tx_replaced", 1).await;
    let deploy_replacement = replaced
        .iter()
        .find(|e| e["step"] == "deploy")
        .expect("the deployment was replaced");
    assert_eq!(deploy_replacement["replaces"], original);
    assert!(
        ["slow", "dropped"].contains(&deploy_replacement["reason"].as_str()),
        "{deploy_replacement:?}"
    );
    assert_ne!(event["transaction_hash"], original.as_str(), "{event}");
    let price: u64 = event["gas_price"].as_str().unwrap().parse().unwrap();
    assert!(price >= 200 * GWEI, "{price}");
    assert_eq!(stack.creations().await, 1, "one token, by the replacement");
    let token = ModelRegistry::new(stack.boot.model_registry, &p)
        .getToken("stuck_model".into())
        .call()
        .await
        .unwrap();
    assert_eq!(token.to_checksum(None), event["token_address"]);
    let original: B256 = original.parse().unwrap();
    assert!(
        p.get_transaction_receipt(original).await.unwrap().is_none(),
        "the underpriced original never landed"
    );
}

/// The lowest of several pending nonces vanishes from the node's pool: every later
/// transaction of the signer would wait behind the gap. The worker re-broadcasts the same
/// bytes and all three models deploy, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_gap_is_healed_by_rebroadcasting_the_missing_transaction() {
    let stack = Stack::start().await;
    let p = stack.provider();
    rpc(&p, "evm_setAutomine", serde_json::json!([false])).await;
    let worker = stack.worker(&[("HOKUSAI__CHAIN__POLL_INTERVAL_MS", "100")]);
    for i in 0..3 {
        stack
            .push(&model_message(
                &format!("gap-{i}"),
                &format!("gap_model_{i}"),
                &format!("gap{i}"),
            ))
            .await;
    }
    let sent = audit_entries(&stack, "tx_sent", 3).await;
    let lowest = sent
        .iter()
        .min_by_key(|e| e["nonce"].parse::<u64>().unwrap())
        .unwrap();
    let dropped: B256 = lowest["tx_hash"].parse().unwrap();
    rpc(&p, "anvil_dropTransaction", serde_json::json!([dropped])).await;
    let miner = Miner::start(p.clone(), None);

    let mut models: Vec<String> = Vec::new();
    for _ in 0..3 {
        models.push(
            stack.next_json(OUT).await["model_id"]
                .as_str()
                .unwrap()
                .into(),
        );
    }
    drop(miner);
    worker.stop().await;
    models.sort();
    assert_eq!(models, ["gap_model_0", "gap_model_1", "gap_model_2"]);
    assert!(
        p.get_transaction_receipt(dropped).await.unwrap().is_some(),
        "the dropped transaction itself landed: re-broadcast, not rebuilt"
    );
    assert_eq!(stack.creations().await, 3);
}
