//! CloudWatch Embedded Metric Format: a worker and an API process with `ops.cloudwatch_emf`
//! on write EMF lines on stdout; after a few deployments, a rejected message and refused
//! requests, every line is checked against the EMF specification and the sums against what
//! happened.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{log_path, model_message, Stack};

const OUT: &str = "hokusai:token_deployed_queue";
const DLQ: &str = "hokusai:model_ready_queue:dlq";

/// CloudWatch's units (MetricDatum.Unit).
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// Checks one line against the EMF specification and returns its document.
fn valid_emf(line: &str) -> Value {
    let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let root = doc.as_object().expect("an object");
    let aws = root["_aws"].as_object().expect("_aws is an object");
    assert!(aws["Timestamp"].is_i64(), "Timestamp in ms: {line}");
    let directives = aws["CloudWatchMetrics"]
        .as_array()
        .expect("CloudWatchMetrics array");
    assert!(!directives.is_empty());
    for d in directives {
        let ns = d["Namespace"].as_str().expect("Namespace");
        assert!(!ns.is_empty() && ns.len() <= 1024);
        let sets = d["Dimensions"].as_array().expect("Dimensions array");
        for set in sets {
            let set = set.as_array().expect("a dimension set is an array");
            assert!(set.len() <= 30, "at most 30 dimensions: {line}");
            for name in set {
                let name = name.as_str().expect("dimension names are strings");
                assert!(
                    root.get(name).is_some_and(Value::is_string),
                    "dimension {name} is a string member: {line}"
                );
            }
        }
        let metrics = d["Metrics"].as_array().expect("Metrics array");
        assert!(metrics.len() <= 100, "at most 100 metrics per directive");
        for m in metrics {
            let name = m["Name"].as_str().expect("Name");
            if let Some(unit) = m.get("Unit") {
                assert!(
                    UNITS.contains(&unit.as_str().unwrap()),
                    "unit {unit}: {line}"
                );
            }
            match &root.get(name) {
                Some(Value::Number(_)) => {}
                Some(Value::Array(vs)) => {
                    assert!(vs.len() <= 100, "at most 100 values: {line}");
                    assert!(vs.iter().all(Value::is_number), "{line}");
                }
                other => panic!(
                    "metric {name} is a member with a number or numbers, not {other:?}: {line}"
                ),
            }
        }
    }
    doc
}

/// Sum of `metric` over the documents whose dimensions match `dims` exactly.
fn sum(docs: &[Value], metric: &str, dims: &[(&str, &str)]) -> f64 {
    docs.iter()
        .filter(|d| {
            let set = &d["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0];
            set.as_array().unwrap().len() == 2 + dims.len() && dims.iter().all(|(k, v)| d[*k] == *v)
        })
        .filter_map(|d| match &d[metric] {
            Value::Number(n) => n.as_f64(),
            Value::Array(vs) => Some(vs.len() as f64),
            _ => None,
        })
        .sum()
}

fn read_emf(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log_path(name).with_extension("out")).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(valid_emf)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_api_write_valid_emf_with_the_counts() {
    let stack = Stack::start().await;
    for name in ["emf-worker", "emf-api"] {
        let _ = std::fs::remove_file(log_path(name).with_extension("out"));
    }
    let emf = [
        ("HOKUSAI__OPS__CLOUDWATCH_EMF", "true"),
        ("HOKUSAI__OPS__CLOUDWATCH_EMF_INTERVAL_SECS", "1"),
        ("HOKUSAI__OPS__ENVIRONMENT", "staging"),
    ];
    let mut w = stack.daemon("emf-worker", &emf, &[]);
    w.until("/health/ready", "ready", |c, _| c == 200).await;
    let mut api = stack.api("emf-api", "http://127.0.0.1:9", &emf);
    api.until("/health", "up", |c, _| c == 200).await;

    for i in 0..3 {
        stack
            .push(&model_message(
                &format!("emf-{i}"),
                &format!("emf_{i}"),
                &format!("emf-{i}"),
            ))
            .await;
    }
    stack.push("{not json").await;
    let mut gas = 0.0;
    for _ in 0..3 {
        let e = stack.next_json(OUT).await;
        gas += e["gas_used"].as_str().unwrap().parse::<f64>().unwrap();
    }
    stack.next(DLQ).await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let r = http
            .post(format!("http://127.0.0.1:{}/api/deployments", api.ops_port))
            .json(&serde_json::json!({"model_id": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // Two intervals pass, then shutdown writes the last report.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(w.sigterm(Duration::from_secs(30)).await.success());
    assert!(api.sigterm(Duration::from_secs(30)).await.success());

    let worker = read_emf("emf-worker");
    assert!(!worker.is_empty(), "the worker wrote EMF lines");
    for d in &worker {
        assert_eq!(
            d["_aws"]["CloudWatchMetrics"][0]["Namespace"],
            "Hokusai/Contracts"
        );
        assert_eq!(d["Environment"], "staging");
        assert_eq!(d["Role"], "worker");
    }
    let by = |m, dims: &[(&str, &str)]| sum(&worker, m, dims);
    assert_eq!(by("Deployments", &[("Outcome", "created")]), 3.0);
    assert_eq!(by("Messages", &[("Result", "deployed")]), 3.0);
    assert_eq!(by("Messages", &[("Result", "rejected")]), 1.0);
    assert_eq!(by("DlqMoves", &[("Code", "INVALID_MESSAGE")]), 1.0);
    assert_eq!(by("GasUsed", &[]), gas, "the gas of the three deployments");
    assert!(
        ["inbound", "processing", "dlq", "outbound", "failures"]
            .iter()
            .all(|q| worker
                .iter()
                .any(|d| d["Queue"] == *q && d["QueueDepth"].is_number())),
        "every queue's depth is reported"
    );
    assert!(worker.iter().any(|d| d.get("RpcLatency").is_some()));
    assert!(worker.iter().any(|d| d.get("DeploymentDuration").is_some()));

    let api_docs = read_emf("emf-api");
    assert!(api_docs.iter().all(|d| d["Role"] == "api"));
    let by = |m, dims: &[(&str, &str)]| sum(&api_docs, m, dims);
    assert_eq!(by("ApiErrors", &[("Code", "AUTH_FAILED")]), 3.0);
    assert_eq!(
        by("ApiRequests", &[("Route", "/api/deployments")]),
        3.0,
        "three POSTs: {api_docs:?}"
    );
    assert_eq!(by("ApiServerErrors", &[]), 0.0);
    let latency: HashMap<String, usize> = api_docs
        .iter()
        .filter(|d| d.get("ApiLatency").is_some() && d.get("Route").is_some())
        .map(|d| {
            (
                d["Route"].as_str().unwrap().to_owned(),
                d["ApiLatency"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(latency.get("/api/deployments"), Some(&3), "{latency:?}");
}
