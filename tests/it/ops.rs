//! Operations: health and readiness against real faults (Redis SIGKILLed, the RPC cut), the
//! Prometheus exposition checked by `promtool` and against what the test did, correlated logs,
//! the audit trail, the DLQ round trip and pause/resume through the real CLI.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use fred::prelude::*;
use serde_json::Value;

use crate::harness::{model_message, Stack, Switch};

const BIN: &str = env!("CARGO_BIN_EXE_hokusai-deployer");
const IN: &str = "hokusai:model_ready_queue";
const OUT: &str = "hokusai:token_deployed_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";
const PROCESSING: &str = "hokusai:model_ready_queue:processing:w1";

/// Runs the CLI against the stack; returns (success, stdout, stderr).
async fn cli(stack: &Stack, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(stack.env(env))
        .env("USER", "ops-test")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn component<'a>(v: &'a Value, name: &str) -> &'a str {
    v["components"][name]["status"].as_str().unwrap_or("?")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_and_the_rpc_while_liveness_stays_up() {
    let mut stack = Stack::start().await;
    let switch = Switch::start(stack.anvil.port, true).await;
    let mut d = stack.daemon(
        "ops-readiness",
        &[
            ("HOKUSAI__CHAIN__RPC_URLS", &switch.url()),
            ("HOKUSAI__OPS__PROBE_TIMEOUT_MS", "500"),
        ],
        &[],
    );

    let (_, ready) = d.until("/health/ready", "200 ready", |s, _| s == 200).await;
    assert_eq!(ready["status"], "ready");
    for c in ["redis", "chain", "registry", "worker"] {
        assert_eq!(component(&ready, c), "up", "{c}: {ready}");
    }
    assert_eq!(ready["components"]["chain"]["chain_id"], 31337);
    assert_eq!(ready["components"]["worker"]["phase"], "running");

    // Redis crashes: liveness stays 200, readiness turns 503 naming Redis, the rest stays up.
    stack.stop_redis().await;
    let (status, v) = d
        .until("/health/ready", "503 with redis down", |s, v| {
            s == 503 && component(v, "redis") == "down"
        })
        .await;
    assert_eq!(status, 503);
    assert_eq!(v["status"], "not_ready");
    assert!(v["components"]["redis"]["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert_eq!(component(&v, "chain"), "up");
    let (status, live) = d.get_json("/health").await;
    assert_eq!((status, live["status"].as_str()), (200, Some("ok")));
    let (status, detailed) = d.get_json("/health/detailed").await;
    assert_eq!(status, 200);
    assert_eq!(detailed["status"], "not_ready");
    assert!(
        detailed["queues"].is_null(),
        "no depths without Redis: {detailed}"
    );

    // Redis returns: ready again, and the worker still works (no crash loop).
    stack.start_redis().await;
    d.until("/health/ready", "200 after redis returned", |s, _| s == 200)
        .await;
    stack
        .push(&model_message("after-redis", "ops_after_redis", "oar"))
        .await;
    assert_eq!(stack.next_json(OUT).await["model_id"], "ops_after_redis");

    // The RPC goes away: 503 naming the chain; back: 200.
    switch.set_up(false);
    let (_, v) = d
        .until("/health/ready", "503 with the rpc down", |s, v| {
            s == 503 && component(v, "chain") == "down"
        })
        .await;
    assert_eq!(component(&v, "registry"), "down");
    assert_eq!(component(&v, "redis"), "up");
    switch.set_up(true);
    d.until("/health/ready", "200 after the rpc returned", |s, _| {
        s == 200
    })
    .await;

    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}

/// A Prometheus sample: name with labels as written, and value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_what_happened() {
    let stack = Stack::start().await;
    let log = crate::harness::log_path("ops-metrics");
    let _ = std::fs::remove_file(&log);
    let mut d = stack.daemon(
        "ops-metrics",
        &[("HOKUSAI__PIPELINE__MIN_IMPROVEMENT_PERCENTAGE", "5")],
        &[],
    );

    // Three deployments, two malformed messages, one below the threshold.
    for i in 0..3 {
        stack
            .push(&model_message(
                &format!("m-{i}"),
                &format!("metrics_{i}"),
                &format!("mt-{i}"),
            ))
            .await;
    }
    stack.push("{not json").await;
    stack.push(r#"{"model_id": "no_symbol"}"#).await;
    let mut low: Value = serde_json::from_str(&model_message("low", "metrics_low", "ml")).unwrap();
    low["payload"]["improvement_percentage"] = 1.0.into();
    stack.push(&low.to_string()).await;

    let mut gas_deploy = 0u64;
    for _ in 0..3 {
        let e = stack.next_json(OUT).await;
        gas_deploy += e["gas_used"].as_str().unwrap().parse::<u64>().unwrap();
        // One transaction deploys and registers.
        assert_eq!(e["registry_gas_used"], e["gas_used"]);
    }
    let mut codes = BTreeMap::new();
    for _ in 0..3 {
        let letter = stack.next_json(DLQ).await;
        *codes
            .entry(letter["error"]["code"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
        // Put it back so the depth gauge has something to count.
        let _: u64 = stack.client.lpush(DLQ, letter.to_string()).await.unwrap();
    }
    assert_eq!(
        codes,
        BTreeMap::from([
            ("INVALID_MESSAGE".into(), 2),
            ("THRESHOLD_NOT_MET".into(), 1)
        ])
    );

    let (status, text) = d.get("/metrics").await;
    assert_eq!(status, 200);
    crate::harness::promtool_check(&text);

    let m = samples(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };
    assert_eq!(get(r#"hokusai_messages_total{result="deployed"}"#), 3.0);
    assert_eq!(get(r#"hokusai_messages_total{result="rejected"}"#), 3.0);
    assert_eq!(get(r#"hokusai_deployments_total{outcome="created"}"#), 3.0);
    assert_eq!(
        get(r#"hokusai_dlq_moves_total{code="INVALID_MESSAGE"}"#),
        2.0
    );
    assert_eq!(
        get(r#"hokusai_dlq_moves_total{code="THRESHOLD_NOT_MET"}"#),
        1.0
    );
    assert_eq!(
        get(r#"hokusai_gas_used_total{step="deploy"}"#),
        gas_deploy as f64
    );
    assert!(get(r#"hokusai_fees_paid_gwei_total{step="deploy"}"#) > 0.0);
    assert_eq!(get("hokusai_deployment_duration_seconds_count"), 3.0);
    assert_eq!(
        get(r#"hokusai_deployment_duration_seconds_bucket{le="+Inf"}"#),
        3.0
    );
    assert_eq!(get(r#"hokusai_queue_depth{queue="dlq"}"#), 3.0);
    assert_eq!(get(r#"hokusai_queue_depth{queue="inbound"}"#), 0.0);
    assert_eq!(get("hokusai_workers"), 1.0);
    assert_eq!(get("hokusai_paused"), 0.0);
    assert_eq!(get("hokusai_redis_up"), 1.0);
    assert_eq!(get("hokusai_in_flight_deployments"), 0.0);
    let balance = get("hokusai_deployer_balance_eth");
    assert!(
        balance > 9000.0 && balance < 10000.0,
        "anvil funds 10000 ether: {balance}"
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with(r#"hokusai_build_info{version="0.1.0""#)));
    assert!(
        get(r#"hokusai_rpc_request_duration_seconds_count{method="eth_sendRawTransaction"}"#)
            >= 3.0
    );
    assert!(get(r#"hokusai_redis_command_duration_seconds_count{op="ack"}"#) >= 3.0);

    // The audit trail has each transaction and outcome, with who, model and hash.
    let (ok, out, err) = cli(&stack, &["audit", "tail", "-n", "100", "--json"], &[]).await;
    assert!(ok, "{err}");
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |action: &str| {
        entries
            .iter()
            .filter(|e| e["fields"]["action"] == action)
            .map(|e| e["fields"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(of("deployed").len(), 3);
    assert_eq!(of("tx_mined").len(), 3, "one transaction per model");
    assert_eq!(of("dead_lettered").len(), 3);
    for e in of("tx_mined") {
        assert_eq!(e["actor"], "w1");
        assert!(e["tx_hash"].as_str().unwrap().starts_with("0x"), "{e}");
        assert!(e["gas_used"].as_str().unwrap().parse::<u64>().unwrap() > 0);
        assert!(e["model_id"].as_str().unwrap().starts_with("metrics_"));
    }

    assert!(d.sigterm(Duration::from_secs(30)).await.success());

    // Every log line written inside an attempt carries the correlation fields.
    let text = std::fs::read_to_string(&log).unwrap();
    let sent: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "transaction sent")
        .collect();
    assert_eq!(sent.len(), 3, "one transaction per model: {text}");
    for v in sent {
        let span = &v["span"];
        assert!(
            span["model_id"].as_str().unwrap().starts_with("metrics_"),
            "{v}"
        );
        assert!(
            span["message_id"].as_str().unwrap().starts_with("m-"),
            "{v}"
        );
        assert_eq!(span["mlflow_run_id"], "run_x", "{v}");
        assert_eq!(span["attempt"], 1, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_fixed_by_configuration_is_requeued_by_the_cli_and_deploys() {
    let stack = Stack::start().await;
    // A threshold the model misses: dead-lettered.
    let strict = stack.worker(&[("HOKUSAI__PIPELINE__MIN_IMPROVEMENT_PERCENTAGE", "50")]);
    stack
        .push(&model_message("fixable", "ops_fixable", "fix"))
        .await;
    let letter = stack.next_json(DLQ).await;
    let _: u64 = stack.client.lpush(DLQ, letter.to_string()).await.unwrap();
    assert_eq!(letter["error"]["code"], "THRESHOLD_NOT_MET");
    strict.stop().await;

    let (ok, out, _) = cli(&stack, &["dlq", "list"], &[]).await;
    assert!(
        ok && out.contains("fixable") && out.contains("THRESHOLD_NOT_MET"),
        "{out}"
    );
    let (ok, out, _) = cli(&stack, &["dlq", "show", "fixable"], &[]).await;
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["model_id"], "ops_fixable");
    let (ok, _, err) = cli(&stack, &["dlq", "requeue", "no-such-id"], &[]).await;
    assert!(!ok && err.contains("no-such-id"), "{err}");

    // The configuration is fixed (the default threshold), the operator requeues, it deploys.
    let (ok, out, err) = cli(&stack, &["dlq", "requeue", "fixable", "--json"], &[]).await;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["requeued"], 1);
    assert_eq!(stack.lens(&[DLQ, IN]).await, vec![0, 1]);
    let fixed = stack.worker(&[]);
    let event = stack.next_json(OUT).await;
    assert_eq!(event["model_id"], "ops_fixable");
    assert_eq!(event["source_message_id"], "fixable");
    fixed.stop().await;
    assert_eq!(stack.lens(&[DLQ, IN, PROCESSING]).await, vec![0, 0, 0]);

    let (ok, out, _) = cli(&stack, &["audit", "tail", "--json"], &[]).await;
    assert!(ok);
    assert!(
        out.lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["fields"]["action"] == "dlq_requeued" && v["fields"]["actor"] == "operator:ops-test"
        }),
        "{out}"
    );

    // Purge refuses without --yes, then empties the DLQ.
    let _: u64 = stack.client.lpush(DLQ, letter.to_string()).await.unwrap();
    let (ok, _, err) = cli(&stack, &["dlq", "purge"], &[]).await;
    assert!(!ok && err.contains("--yes"), "{err}");
    assert_eq!(stack.len(DLQ).await, 1);
    let (ok, out, _) = cli(&stack, &["dlq", "purge", "--yes"], &[]).await;
    assert!(ok && out.contains("purged 1"), "{out}");
    assert_eq!(stack.len(DLQ).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_requeue_all_move_each_dead_letter_exactly_once() {
    let stack = Stack::start().await;
    const N: usize = 400;
    let letters: Vec<String> = (0..N)
        .map(|i| {
            serde_json::json!({
                "dlq_version": "1",
                "message_id": format!("race-{i}"),
                "model_id": format!("race_{i}"),
                "error": {"code": "RPC_ERROR", "field": null, "rule": null, "message": "test"},
                "attempts": 4,
                "first_attempt_at": "2026-01-01T00:00:00Z",
                "failed_at": "2026-01-01T00:00:01Z",
                "worker_id": "w1",
                "producer_retry_count": null,
                "producer_max_retries": null,
                "original": model_message(&format!("race-{i}"), &format!("race_{i}"), "r"),
            })
            .to_string()
        })
        .collect();
    let _: u64 = stack.client.lpush(DLQ, letters).await.unwrap();

    let a = cli(&stack, &["dlq", "requeue", "--all", "--json"], &[]);
    let b = cli(&stack, &["dlq", "requeue", "--all", "--json"], &[]);
    let ((ok_a, out_a, err_a), (ok_b, out_b, err_b)) = tokio::join!(a, b);
    assert!(ok_a && ok_b, "{err_a} {err_b}");
    let moved = |o: &str| {
        serde_json::from_str::<Value>(o).unwrap()["requeued"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(moved(&out_a) + moved(&out_b), N as u64, "{out_a} {out_b}");

    let inbound: Vec<String> = stack.client.lrange(IN, 0, -1).await.unwrap();
    assert_eq!(inbound.len(), N);
    let ids: BTreeSet<String> = inbound
        .iter()
        .map(|m| {
            serde_json::from_str::<Value>(m).unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), N, "every message exactly once");
    assert_eq!(stack.len(DLQ).await, 0);
    // Oldest first: the first dead letter is the next message a worker takes.
    let next: Option<String> = stack.client.lindex(IN, -1).await.unwrap();
    assert!(next.unwrap().contains("\"race-0\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_new_work_within_a_second_and_resume_restarts_it() {
    let stack = Stack::start().await;
    let mut d = stack.daemon("ops-pause", &[], &[]);
    d.until("/health/ready", "ready", |s, _| s == 200).await;

    let (ok, out, err) = cli(&stack, &["pause", "--reason", "chain maintenance"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("paused by ops-test"), "{out}");
    let (_, v) = d
        .until("/health/detailed", "the worker paused", |_, v| {
            v["worker"]["paused"] == true
        })
        .await;
    assert_eq!(v["paused"]["reason"], "chain maintenance");
    assert_eq!(v["paused"]["by"], "ops-test");
    let (_, text) = d.get("/metrics").await;
    assert_eq!(samples(&text)["hokusai_paused"], 1.0);
    let (ok, out, _) = cli(&stack, &["queue", "stats", "--json"], &[]).await;
    assert!(ok);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["paused"]["reason"], "chain maintenance");
    assert_eq!(stats["workers"][0]["worker_id"], "w1");
    assert_eq!(stats["workers"][0]["alive"], true);

    // While paused, a message waits on the queue. Absence has no event to await: give the
    // worker several of its pause polls (250 ms) and BLMOVE waits (1 s) to get it wrong.
    stack
        .push(&model_message("paused-1", "ops_paused", "op"))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(stack.lens(&[IN, PROCESSING, OUT]).await, vec![1, 0, 0]);

    let (ok, out, _) = cli(&stack, &["resume"], &[]).await;
    assert!(ok && out.contains("resumed"), "{out}");
    assert_eq!(stack.next_json(OUT).await["model_id"], "ops_paused");
    let (_, v) = d
        .until("/health/detailed", "the worker resumed", |_, v| {
            v["worker"]["paused"] == false
        })
        .await;
    assert!(v["paused"].is_null());
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}

/// A deployer balance under `chain.min_balance_eth` is a readiness warning (`balance: low`,
/// still 200, the reason given) and the balance gauge, before any deployment fails for gas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_deployer_balance_warns_in_readiness_and_metrics() {
    let stack = Stack::start().await;
    // anvil's dev account holds 10,000 ETH (less the bootstrap's gas): under a million.
    let mut d = stack.daemon(
        "low-balance",
        &[("HOKUSAI__CHAIN__MIN_BALANCE_ETH", "1000000")],
        &[],
    );
    let (code, ready) = d
        .until(
            "/health/ready",
            "the balance warning on a running worker",
            |_, v| {
                v["components"]["balance"]["status"] == "low"
                    && v["components"]["worker"]["status"] == "up"
            },
        )
        .await;
    assert_eq!(code, 200, "a warning, not out of service: {ready}");
    assert_eq!(ready["status"], "ready");
    let why = ready["components"]["balance"]["error"].as_str().unwrap();
    assert!(why.contains("chain.min_balance_eth"), "{why}");
    let eth = ready["components"]["balance"]["balance_eth"]
        .as_f64()
        .unwrap();
    assert!(eth > 9_000.0 && eth < 10_000.0, "{eth}");
    let (_, metrics) = d.get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hokusai_deployer_balance_eth ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    d.sigterm(Duration::from_secs(30)).await;
}

/// `events replay` re-publishes stored events with `"replayed": true` (by model, since a time,
/// or onto another list), changes nothing on chain, and its audit entry names the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_are_replayed_by_model_since_a_time_and_onto_another_list() {
    let stack = Stack::start().await;
    let before = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let worker = stack.worker(&[]);
    for i in 0..2 {
        stack
            .push(&model_message(
                &format!("replay-{i}"),
                &format!("replay_{i}"),
                &format!("rp-{i}"),
            ))
            .await;
    }
    let mut originals = BTreeMap::new();
    for _ in 0..2 {
        let e = stack.next_json(OUT).await;
        originals.insert(e["model_id"].as_str().unwrap().to_owned(), e);
    }
    worker.stop().await;
    let tokens_before = stack.creations().await;

    let (ok, out, err) = cli(
        &stack,
        &["events", "replay", "--model", "replay_1", "--model", "nope"],
        &[],
    )
    .await;
    assert!(ok && out.contains("replayed 1"), "{out}{err}");
    assert!(err.contains("nope"), "{err}");
    let again = stack.next_json(OUT).await;
    assert_eq!(again["replayed"], true);
    let mut stripped = again.clone();
    stripped.as_object_mut().unwrap().remove("replayed");
    assert_eq!(
        stripped, originals["replay_1"],
        "the stored event, word for word"
    );

    let (ok, out, _) = cli(
        &stack,
        &[
            "events",
            "replay",
            "--since",
            &before,
            "--to-queue",
            "website:replay",
        ],
        &[],
    )
    .await;
    assert!(ok && out.contains("replayed 2"), "{out}");
    assert_eq!(stack.len(OUT).await, 0);
    assert_eq!(stack.len("website:replay").await, 2);
    let (ok, out, _) = cli(
        &stack,
        &["events", "replay", "--since", "2999-01-01T00:00:00Z"],
        &[],
    )
    .await;
    assert!(ok && out.contains("replayed 0"), "{out}");
    let (ok, _, err) = cli(&stack, &["events", "replay", "--since", "yesterday"], &[]).await;
    assert!(!ok && err.contains("RFC 3339"), "{err}");

    assert_eq!(stack.creations().await, tokens_before, "nothing on chain");
    let (_, out, _) = cli(&stack, &["audit", "tail", "--json"], &[]).await;
    assert!(
        out.lines().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["fields"]["action"] == "events_replayed"
                && v["fields"]["actor"] == "operator:ops-test"
                && v["fields"]["models"] == "replay_1"
        }),
        "{out}"
    );
}

/// The website stops consuming: past `queues.outbound_max_len` waiting events the worker takes
/// no new message (health, metric and audit say so), in-flight work finishes, and once the
/// queue drains under the low-water mark every message deploys. Nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbound_queue_holds_the_worker_back_until_it_drains() {
    let stack = Stack::start().await;
    let mut d = stack.daemon(
        "backpressure",
        &[
            ("HOKUSAI__QUEUES__OUTBOUND_MAX_LEN", "3"),
            ("HOKUSAI__QUEUES__OUTBOUND_RESUME_LEN", "1"),
        ],
        &[],
    );
    d.until("/health/ready", "the worker ready", |code, _| code == 200)
        .await;
    let push = |range: std::ops::Range<usize>| async {
        for i in range {
            stack
                .push(&model_message(
                    &format!("bp-{i}"),
                    &format!("bp_{i}"),
                    &format!("bp-{i}"),
                ))
                .await;
        }
    };
    // Nobody consumes: the first messages fill the outbound queue past 3.
    push(0..4).await;
    let (_, v) = d
        .until("/health/detailed", "held back", |_, v| {
            v["worker"]["backpressure"] == true
        })
        .await;
    assert_eq!(v["worker"]["in_flight"], 0, "in-flight work finished: {v}");
    push(4..8).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stack.len(IN).await, 4, "nothing new taken while held back");
    let (_, metrics) = d.get("/metrics").await;
    assert!(metrics.contains("\nhokusai_backpressure 1\n"), "{metrics}");
    let (_, ready) = d.get_json("/health/ready").await;
    assert_eq!(
        ready["components"]["worker"]["backpressure"], true,
        "{ready}"
    );

    // The website catches up: every event arrives, once.
    let mut models = BTreeSet::new();
    while models.len() < 8 {
        let e = stack.next_json(OUT).await;
        assert!(
            models.insert(e["model_id"].as_str().unwrap().to_owned()),
            "{e}"
        );
    }
    d.until("/health/detailed", "released", |_, v| {
        v["worker"]["backpressure"] == false
    })
    .await;
    assert_eq!(stack.lens(&[IN, DLQ]).await, vec![0, 0]);
    let (_, out, _) = cli(&stack, &["audit", "tail", "-n", "200", "--json"], &[]).await;
    for action in ["backpressure_on", "backpressure_off"] {
        assert!(
            out.lines()
                .any(|l| serde_json::from_str::<Value>(l).unwrap()["fields"]["action"] == action),
            "{action} audited: {out}"
        );
    }
    assert!(d.sigterm(Duration::from_secs(30)).await.success());
}
