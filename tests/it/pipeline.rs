//! The core pipeline: message in, token deployed and registered, event out, message removed.

use alloy::primitives::Address;
use hokusai_deployer::chain::{HokusaiToken, ModelRegistry};
use serde_json::{json, Value};

use crate::harness::{model_message, Stack, StackOpts, Switch};

const SAMPLE: &str = include_str!("../data/producer-envelope.json");
const BARE: &str = include_str!("../data/seed-bare.json");
const OUT: &str = "hokusai:token_deployed_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";
const FAILURES: &str = "hokusai:deployment_failed_queue";
const PROCESSING: &str = "hokusai:model_ready_queue:processing:w1";

/// Seed 001's outbound example, field by field, with the JSON type each must have.
const SEED_EVENT_FIELDS: &[(&str, &str)] = &[
    ("event_type", "string"),
    ("model_id", "string"),
    ("token_address", "string"),
    ("token_symbol", "string"),
    ("token_name", "string"),
    ("transaction_hash", "string"),
    ("registry_transaction_hash", "string"),
    ("mlflow_run_id", "string"),
    ("model_name", "string"),
    ("model_version", "string"),
    ("deployment_timestamp", "string"),
    ("deployer_address", "string"),
    ("network", "string"),
    ("block_number", "number"),
    ("gas_used", "string"),
    ("gas_price", "string"),
    ("contributor_address", "string"),
    ("performance_metric", "string"),
    ("performance_improvement", "number"),
    ("message_version", "string"),
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn envelope(message_id: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v: Value = serde_json::from_str(SAMPLE).unwrap();
    v["message_id"] = message_id.into();
    edit(v["payload"].as_object_mut().unwrap());
    v.to_string()
}

/// Asserts the on-chain result of a deployment by the stack's deployer and returns the token
/// address.
async fn assert_deployed(
    stack: &Stack,
    event: &Value,
    model_id: &str,
    symbol: &str,
    name: &str,
    metric: &str,
) -> Address {
    assert_deployed_by(
        stack,
        stack.boot.deployer,
        event,
        model_id,
        symbol,
        name,
        metric,
    )
    .await
}

/// [`assert_deployed`] for a deployment signed by `deployer`.
pub(crate) async fn assert_deployed_by(
    stack: &Stack,
    deployer: Address,
    event: &Value,
    model_id: &str,
    symbol: &str,
    name: &str,
    metric: &str,
) -> Address {
    for (field, ty) in SEED_EVENT_FIELDS {
        let v = event
            .get(*field)
            .unwrap_or_else(|| panic!("event lacks `{field}`: {event}"));
        assert_eq!(kind(v), *ty, "`{field}` has the wrong type in {event}");
    }
    assert_eq!(event["event_type"], "token_deployed");
    assert_eq!(event["model_id"], model_id);
    assert_eq!(event["token_symbol"], symbol);
    assert_eq!(event["token_name"], name);
    assert_eq!(event["performance_metric"], metric);
    assert_eq!(event["network"], "anvil");
    assert_eq!(event["message_version"], "1.0");
    // One `deployToken` (clone, initialization, registration): seed 001's gas budget.
    let gas: u64 = event["gas_used"].as_str().unwrap().parse().unwrap();
    assert!(gas > 100_000 && gas <= 300_000, "{gas} gas");
    assert_eq!(
        event["registry_transaction_hash"],
        event["transaction_hash"]
    );
    assert_eq!(event["registry_gas_used"], event["gas_used"]);
    assert_eq!(event["registry_block_number"], event["block_number"]);
    assert!(
        event["gas_price"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
            > 0
    );
    assert_eq!(event["deployer_address"], deployer.to_checksum(None));

    let token: Address = event["token_address"].as_str().unwrap().parse().unwrap();
    let p = stack.provider();
    let t = HokusaiToken::new(token, &p);
    assert_eq!(t.name().call().await.unwrap(), name);
    assert_eq!(t.symbol().call().await.unwrap(), symbol);
    assert_eq!(t.decimals().call().await.unwrap(), 18);
    assert_eq!(
        t.controller().call().await.unwrap(),
        stack.boot.token_manager
    );
    let r = ModelRegistry::new(stack.boot.model_registry, &p);
    let m = r.getModel(model_id.to_owned()).call().await.unwrap();
    assert!(m.registered);
    assert_eq!(m.token, token);
    assert_eq!(m.performanceMetric, metric);
    token
}

/// Pushes the producer's sample, waits for its event and asserts its deployment by `deployer`.
pub(crate) async fn sample_deployed_by(stack: &Stack, deployer: Address) -> Value {
    stack.push(SAMPLE.trim_end()).await;
    let event = stack.next_json(OUT).await;
    assert_deployed_by(
        stack,
        deployer,
        &event,
        "model_7",
        "MSG-AI",
        "Hokusai model_7",
        "reply_rate",
    )
    .await;
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_envelope_is_deployed_registered_and_published() {
    let stack = Stack::start().await;
    let worker = stack.worker(&[]);
    let event = sample_deployed_by(&stack, stack.boot.deployer).await;
    assert_eq!(event["mlflow_run_id"], "run_x");
    assert_eq!(
        event["source_message_id"],
        "6f4c6a8e-69bf-4c53-9e60-fd3a28a2fc2a"
    );
    assert_eq!(
        event["contributor_address"],
        "0x742D35cC6634C0532925a3b844BC9E7595f82b3d"
    );
    // The event and the removal are one transaction: once the event is visible, the message is gone.
    assert_eq!(stack.len(PROCESSING).await, 0);
    assert_eq!(stack.len("hokusai:model_ready_queue").await, 0);
    assert_eq!(stack.len(DLQ).await, 0);
    worker.stop().await;
    assert_eq!(stack.creations().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_seed_message_is_deployed() {
    let stack = Stack::start().await;
    let worker = stack.worker(&[]);
    stack.push(BARE).await;
    let event = stack.next_json(OUT).await;
    assert_deployed(
        &stack,
        &event,
        "model_123",
        "HKAI-123",
        "Hokusai model_123",
        "accuracy",
    )
    .await;
    assert_eq!(event["performance_improvement"], 3.51);
    assert!(event["source_message_id"]
        .as_str()
        .unwrap()
        .starts_with("keccak:"));
    assert_eq!(stack.len(PROCESSING).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dead_lettered_and_valid_ones_still_deploy() {
    let stack = Stack::start().await;
    let worker = stack.worker(&[]);
    // (message, expected code, field, rule), interleaved with valid messages.
    let bad: Vec<(String, &str, &str, &str)> = vec![
        ("{not json".into(), "INVALID_MESSAGE", "$", "json"),
        (
            envelope("bad-1", |p| {
                p.remove("model_id");
            }),
            "INVALID_MESSAGE",
            "model_id",
            "required",
        ),
        (
            envelope("bad-2", |p| {
                p.insert("token_symbol".into(), json!("msg ai"));
            }),
            "INVALID_MESSAGE",
            "token_symbol",
            "format",
        ),
        (
            envelope("bad-3", |p| {
                p.insert("improvement_percentage".into(), json!(-2.5));
            }),
            "THRESHOLD_NOT_MET",
            "improvement_percentage",
            "above_threshold",
        ),
        (
            envelope("bad-4", |p| {
                p.insert(
                    "contributor_address".into(),
                    json!("0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d"),
                );
            }),
            "INVALID_MESSAGE",
            "contributor_address",
            "checksum",
        ),
        (
            envelope("bad-5", |p| {
                p.insert("message_version".into(), json!("2.0"));
            }),
            "UNSUPPORTED_VERSION",
            "message_version",
            "compatible",
        ),
        (
            envelope("bad-6", |p| {
                p.insert("current_value".into(), json!("0.9"));
            }),
            "INVALID_MESSAGE",
            "payload.current_value",
            "type",
        ),
        (
            format!("{{\"pad\": \"{}\"}}", "x".repeat(70_000)),
            "MESSAGE_TOO_LARGE",
            "$",
            "max_bytes",
        ),
    ];
    for (i, (raw, ..)) in bad.iter().enumerate() {
        stack.push(raw).await;
        let good = envelope(&format!("good-{i}"), |p| {
            p.insert("model_id".into(), json!(format!("model_ok_{i}")));
        });
        stack.push(&good).await;
    }
    // Concurrent workers may finish them in any order: match letters by their original text.
    let mut letters = std::collections::HashMap::new();
    for _ in 0..bad.len() {
        let letter = stack.next_json(DLQ).await;
        letters.insert(letter["original"].as_str().unwrap().to_owned(), letter);
        let failure = stack.next_json(FAILURES).await;
        assert_eq!(failure["event_type"], "token_deployment_failed");
    }
    for (raw, code, field, rule) in &bad {
        let letter = letters
            .get(raw)
            .unwrap_or_else(|| panic!("no DLQ entry keeps {raw:.60} verbatim"));
        assert_eq!(letter["error"]["code"], *code, "{letter}");
        assert_eq!(letter["error"]["field"], *field, "{letter}");
        assert_eq!(letter["error"]["rule"], *rule, "{letter}");
        assert!(!letter["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(letter["attempts"], 1);
    }
    let mut deployed = std::collections::BTreeSet::new();
    for _ in 0..bad.len() {
        deployed.insert(
            stack.next_json(OUT).await["model_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let want: std::collections::BTreeSet<String> =
        (0..bad.len()).map(|i| format!("model_ok_{i}")).collect();
    assert_eq!(deployed, want);
    assert_eq!(stack.len(PROCESSING).await, 0);
    worker.stop().await;
    assert_eq!(stack.creations().await, bad.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_model_gets_one_token_and_a_redelivery_the_same_event() {
    let stack = Stack::start().await;
    let worker = stack.worker(&[("HOKUSAI__PIPELINE__CONCURRENCY", "4")]);
    // Three messages for one model, in flight at once: whichever wins, one token, two refusals.
    let ids = ["dup-a", "dup-b", "dup-c"];
    for id in ids {
        stack.push(&envelope(id, |_| {})).await;
    }
    let event = stack.next(OUT).await;
    let winner = serde_json::from_str::<Value>(&event).unwrap()["source_message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = serde_json::from_str::<Value>(&event).unwrap()["token_address"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut refused = vec![];
    for _ in 0..2 {
        let letter = stack.next_json(DLQ).await;
        assert_eq!(letter["error"]["code"], "TOKEN_EXISTS", "{letter}");
        assert_eq!(letter["error"]["details"]["token_address"], token.as_str());
        refused.push(letter["message_id"].as_str().unwrap().to_owned());
    }
    refused.push(winner.clone());
    refused.sort();
    assert_eq!(refused, ids, "each message ends exactly once");

    // The winning message delivered again (at-least-once upstream): the identical event again.
    stack.push(&envelope(&winner, |_| {})).await;
    assert_eq!(
        stack.next(OUT).await,
        event,
        "a redelivered message re-publishes the identical event"
    );
    assert_eq!(stack.len(PROCESSING).await, 0);
    assert_eq!(stack.len(DLQ).await, 0);
    worker.stop().await;
    assert_eq!(stack.creations().await, 1, "one token for one model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_down_then_back_retries_and_deploys_once() {
    let stack = Stack::start().await;
    let switch = Switch::start(stack.anvil.port, true).await;
    let settings = stack.settings_with_rpc(
        &switch.url(),
        &[
            ("HOKUSAI__PIPELINE__MAX_RETRIES", "50"),
            ("HOKUSAI__CHAIN__RPC_TIMEOUT_MS", "1000"),
        ],
    );
    let worker = crate::harness::Worker::start(settings, Default::default());
    // A first message proves the worker is connected before the RPC goes away.
    stack
        .push(&envelope("warm", |p| {
            p.insert("model_id".into(), json!("warm_up"));
        }))
        .await;
    assert_eq!(stack.next_json(OUT).await["model_id"], "warm_up");
    switch.set_up(false);
    stack.push(SAMPLE.trim_end()).await;
    switch.refused_at_least(3).await;
    switch.set_up(true);
    let event = stack.next_json(OUT).await;
    assert_eq!(event["model_id"], "model_7");
    assert_eq!(stack.len(DLQ).await, 0);
    worker.stop().await;
    assert_eq!(stack.creations().await, 2, "warm_up and model_7, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_go_to_the_dlq_with_the_attempt_count() {
    let stack = Stack::start().await;
    let switch = Switch::start(stack.anvil.port, true).await;
    // With the chain's circuit breaker off (chain_faults.rs has it on): each attempt counts.
    let settings = stack.settings_with_rpc(
        &switch.url(),
        &[
            ("HOKUSAI__PIPELINE__MAX_RETRIES", "2"),
            ("HOKUSAI__CHAIN__BREAKER__FAILURES", "0"),
        ],
    );
    let worker = crate::harness::Worker::start(settings, Default::default());
    stack
        .push(&envelope("warm", |p| {
            p.insert("model_id".into(), json!("warm_up"));
        }))
        .await;
    stack.next(OUT).await;
    switch.set_up(false);
    stack.push(SAMPLE.trim_end()).await;
    let letter = stack.next_json(DLQ).await;
    assert_eq!(letter["error"]["code"], "RPC_ERROR", "{letter}");
    assert_eq!(letter["attempts"], 3, "the first try and two retries");
    assert_eq!(letter["original"], SAMPLE.trim_end());
    switch.set_up(true);
    worker.stop().await;
}

/// A journal that holds a transaction which does not call our token manager (the
/// two-transaction version's contract creation, or another manager's call) is not finished as
/// if it were ours: the message is dead-lettered `JOURNAL_CORRUPT` naming the transaction, and
/// nothing is sent or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_for_other_contracts_is_not_finished_as_ours() {
    use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
    use alloy::eips::eip2718::Encodable2718;
    use alloy::network::TxSignerSync;
    use fred::prelude::*;
    let stack = Stack::start().await;
    // An old-style contract creation, signed by the deployer key at a nonce never used.
    let key: alloy::signers::local::PrivateKeySigner =
        hokusai_deployer::localstack::ANVIL_DEV_KEY.parse().unwrap();
    let mut tx = TxEip1559 {
        chain_id: 31337,
        nonce: 9_999,
        gas_limit: 900_000,
        max_fee_per_gas: 1_000_000_000,
        to: alloy::primitives::TxKind::Create,
        ..Default::default()
    };
    let sig = key.sign_transaction_sync(&mut tx).unwrap();
    let env = TxEnvelope::Eip1559(tx.into_signed(sig));
    let fields = vec![
        ("message_id", "old-1".to_owned()),
        ("first_attempt_at", "2026-11-01T00:00:00Z".to_owned()),
        ("deploy_signer", key.address().to_string()),
        ("deploy_nonce", "9999".to_owned()),
        ("deploy_hash", env.tx_hash().to_string()),
        (
            "deploy_raw",
            alloy::primitives::Bytes::from(env.encoded_2718()).to_string(),
        ),
        ("token_address", Address::repeat_byte(7).to_string()),
    ];
    let _: () = stack
        .client
        .hset("hokusai:deployer:journal:model_7", fields)
        .await
        .unwrap();
    let worker = stack.worker(&[]);
    stack.push(&envelope("old-1", |_| {})).await;
    let letter = stack.next_json(DLQ).await;
    worker.stop().await;
    assert_eq!(letter["error"]["code"], "JOURNAL_CORRUPT", "{letter}");
    assert!(
        letter["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&env.tx_hash().to_string()),
        "{letter}"
    );
    assert_eq!(stack.len(OUT).await, 0);
    assert_eq!(stack.creations().await, 0);
}

/// Fees above the cap: the message waits (retried, not counted against `max_retries`), sends
/// nothing, and after `fee_cap_wait_secs` is dead-lettered `INSUFFICIENT_GAS`. Under a cap
/// that the network fits, it deploys and never pays more than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fees_above_the_cap_wait_then_dead_letter_and_a_higher_cap_deploys() {
    // anvil mines only on demand: the base fee starts at 50 gwei and drifts down slowly.
    let stack = Stack::start_with(StackOpts {
        anvil_args: &["--base-fee", "50000000000"],
        ..Default::default()
    })
    .await;
    let low = stack.worker(&[
        ("HOKUSAI__CHAIN__MAX_FEE_PER_GAS_GWEI", "10"),
        ("HOKUSAI__CHAIN__FEE_CAP_WAIT_SECS", "3"),
        ("HOKUSAI__PIPELINE__MAX_RETRIES", "1"),
    ]);
    let msg = model_message("fee-1", "fee_model", "fee");
    stack.push(&msg).await;
    let letter = stack.next_json(DLQ).await;
    low.stop().await;
    assert_eq!(letter["error"]["code"], "INSUFFICIENT_GAS", "{letter}");
    assert!(
        letter["attempts"].as_u64().unwrap() > 2,
        "waited past max_retries: {letter}"
    );
    assert!(
        letter["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cap of 10 gwei"),
        "{letter}"
    );
    assert_eq!(stack.creations().await, 0, "nothing was sent");

    let high = stack.worker(&[("HOKUSAI__CHAIN__MAX_FEE_PER_GAS_GWEI", "500")]);
    stack.push(&msg).await;
    let event = stack.next_json(OUT).await;
    high.stop().await;
    assert_eq!(event["model_id"], "fee_model");
    let price: u128 = event["gas_price"].as_str().unwrap().parse().unwrap();
    // Above the low cap (which could not have paid), within the high one.
    assert!(
        price > 10_000_000_000 && price <= 500_000_000_000,
        "{price}"
    );
    assert_eq!(stack.creations().await, 1);
}
