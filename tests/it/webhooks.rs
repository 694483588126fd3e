//! The ML platform's webhook, `POST /api/webhooks/model-registered`, against real Redis, anvil
//! and MLflow.
//!
//! The platform's publisher cannot run here (it needs the platform's package and services), so
//! its request is reproduced byte for byte from its code: Python builds the body with
//! `json.dumps(…, separators=(",", ":"))` in the publisher's key order, the idempotency key with
//! `uuid.uuid5(uuid.NAMESPACE_DNS, "{model_id}:{token_symbol}:{run_id}:{version}")` and the
//! signature with `hmac.new(secret, body, hashlib.sha256).hexdigest()`, the same standard-library
//! calls the publisher makes. The signature is thereby computed independently of the server's
//! Rust, and the request carries the publisher's `User-Agent` and `Content-Type`.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use hokusai_deployer::localstack;
use hokusai_deployer::message::{self, Rules};
use serde_json::Value;

use crate::api::{expect, mlflow, ready, seed_model, unique, Answer};
use crate::harness::{Daemon, Stack};

/// The secret the platform signs with (`webhooks.inbound_secret`).
const SECRET: &str = "platform-webhook-secret-0123456789abcdef";
/// The secret being rotated out (`webhooks.inbound_secret_previous`).
const PREVIOUS: &str = "retired-webhook-secret-0123456789abcdef";
const INBOUND: &str = "hokusai:model_ready_queue";

/// One delivery as the platform's publisher makes it.
struct Delivery {
    body: Vec<u8>,
    key: String,
    signature: String,
}

/// The publisher's request for a registered model, built by Python (see the module's comment):
/// `platform_id` is the platform's own model id (only the key uses it), `name` the MLflow
/// registered-model name, `symbol` the token symbol; `api_schema_bytes` > 0 passes an API
/// schema of about that size through, as the publisher does with the model's.
fn platform_delivery(
    secret: &str,
    platform_id: &str,
    name: &str,
    symbol: &str,
    version: &str,
    run_id: &str,
    api_schema_bytes: usize,
) -> Delivery {
    const SCRIPT: &str = r#"
import hashlib, hmac, json, sys, uuid
from datetime import datetime, timezone
secret, model_id, name, symbol, version, run_id, pad = sys.argv[1:8]
key = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{model_id}:{symbol}:{run_id}:{version}"))
model = {"id": symbol.lower(), "name": name, "status": "registered", "version": version}
if run_id:
    model["run_id"] = run_id
if int(pad):
    model["api_schema"] = {"description": "x" * int(pad)}
# The publisher's timestamp: a naive UTC datetime's isoformat() + "Z".
now = datetime.now(timezone.utc).replace(tzinfo=None)
payload = {"event_type": "model_registered", "model": model,
           "timestamp": now.isoformat() + "Z", "source": "mlflow"}
body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
signature = "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
print(json.dumps({"body": body.decode("utf-8"), "key": key, "signature": signature}))
"#;
    let python = localstack::find_tool("python3", "HOKUSAI_PYTHON")
        .expect("python3 is installed (make pytools)");
    let out = std::process::Command::new(python)
        .args([
            "-c",
            SCRIPT,
            secret,
            platform_id,
            name,
            symbol,
            version,
            run_id,
        ])
        .arg(api_schema_bytes.to_string())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    Delivery {
        body: v["body"].as_str().unwrap().as_bytes().to_vec(),
        key: v["key"].as_str().unwrap().to_owned(),
        signature: v["signature"].as_str().unwrap().to_owned(),
    }
}

/// POSTs `body` to the webhook with the publisher's headers and `headers` (name, value).
async fn deliver(api: &Daemon, body: &[u8], headers: &[(&str, &str)]) -> Answer {
    let mut r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/api/webhooks/model-registered",
            api.ops_port
        ))
        .timeout(Duration::from_secs(10))
        .header("user-agent", "Hokusai-WebhookPublisher/1.0")
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    Answer::read(r.send().await.expect("the API answers")).await
}

/// A delivery as the publisher sends it: its key and signature headers.
async fn send(api: &Daemon, d: &Delivery) -> Answer {
    deliver(
        api,
        &d.body,
        &[
            ("x-hokusai-idempotency-key", &d.key),
            ("x-hokusai-signature", &d.signature),
        ],
    )
    .await
}

/// The registered model's latest version and its run, as MLflow has them.
async fn registered(mlflow: &str, name: &str) -> (String, String) {
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{mlflow}/api/2.0/mlflow/registered-models/get?name={name}"
        ))
        .send()
        .await
        .expect("mlflow answers")
        .json()
        .await
        .expect("mlflow answers JSON");
    let latest = &v["registered_model"]["latest_versions"][0];
    (
        latest["version"].as_str().unwrap().to_owned(),
        latest["run_id"].as_str().unwrap().to_owned(),
    )
}

/// The audit stream's `webhook_received` entries, once `n` are there (they are written beside
/// the answer).
async fn received(stack: &Stack, n: usize) -> Vec<HashMap<String, String>> {
    let mut last = vec![];
    for _ in 0..100 {
        let entries: Vec<(String, HashMap<String, String>)> = stack
            .client
            .xrange("hokusai:deployer:audit", "-", "+", None)
            .await
            .unwrap();
        last = entries
            .into_iter()
            .map(|(_, f)| f)
            .filter(|f| f.get("action").map(String::as_str) == Some("webhook_received"))
            .collect();
        if last.len() >= n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} webhooks audited: {last:?}");
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_signed_delivery_is_queued_once_and_anything_else_is_refused() {
    let stack = Stack::start().await;
    let mlflow = mlflow().await;
    let model = seed_model(&unique("wh"), true).await;
    let api = stack.api(
        "webhooks",
        mlflow,
        &[
            ("HOKUSAI__WEBHOOKS__INBOUND_SECRET", SECRET),
            ("HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS", PREVIOUS),
            // A model registered after a refusal is seen at once.
            ("HOKUSAI__API__MLFLOW__CACHE_SECS", "0"),
        ],
    );
    ready(&api).await;
    let (version, run_id) = registered(mlflow, &model).await;
    let symbol = model.replace('_', "-");
    let delivery = platform_delivery(SECRET, "platform-7", &model, &symbol, &version, &run_id, 0);
    let key = delivery.key.as_str();
    let body = String::from_utf8(delivery.body.clone()).unwrap();
    assert!(
        body.starts_with(&format!(
            r#"{{"event_type":"model_registered","model":{{"id":"{symbol}","name":"{model}","status":"registered","version":"{version}","run_id":"{run_id}"}},"timestamp":""#
        )) && body.ends_with(r#"Z","source":"mlflow"}"#),
        "the publisher's compact JSON: {body}"
    );

    // Forgeries and malformed deliveries: each refused, none queued.
    let forged = platform_delivery(
        "not-the-platform-secret-0123456789abcdef",
        "platform-7",
        &model,
        &symbol,
        &version,
        &run_id,
        0,
    );
    expect(&send(&api, &forged).await, 401, "AUTH_FAILED");
    let changed = body.replace(&format!(r#""id":"{symbol}""#), r#""id":"evil-coin""#);
    assert_ne!(changed, body);
    let a = deliver(
        &api,
        changed.as_bytes(),
        &[
            ("x-hokusai-idempotency-key", key),
            ("x-hokusai-signature", &delivery.signature),
        ],
    )
    .await;
    expect(&a, 401, "AUTH_FAILED");
    let a = deliver(&api, &delivery.body, &[("x-hokusai-idempotency-key", key)]).await;
    expect(&a, 401, "AUTH_FAILED");
    let stale = (now() - 3600).to_string();
    let a = deliver(
        &api,
        &delivery.body,
        &[
            ("x-hokusai-idempotency-key", key),
            ("x-hokusai-signature", &delivery.signature),
            ("x-hokusai-timestamp", &stale),
        ],
    )
    .await;
    expect(&a, 401, "AUTH_FAILED");
    // Signed by the platform, but over api.max_body_bytes (16 KiB).
    let big = platform_delivery(
        SECRET,
        "platform-7",
        &model,
        &symbol,
        &version,
        &run_id,
        20_000,
    );
    assert!(big.body.len() > 16_384);
    expect(&send(&api, &big).await, 413, "PAYLOAD_TOO_LARGE");
    let a = deliver(
        &api,
        &delivery.body,
        &[("x-hokusai-signature", &delivery.signature)],
    )
    .await;
    expect(&a, 400, "VALIDATION_ERROR");
    assert_eq!(
        a.body["error"]["details"]["field"],
        "X-Hokusai-Idempotency-Key"
    );
    assert_eq!(
        stack.len(INBOUND).await,
        0,
        "a refused delivery queued work"
    );

    // The delivery as the platform sends it, then its retry with the same key.
    let first = send(&api, &delivery).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["success"], true);
    assert_eq!(first.body["model_id"], model.as_str());
    let id = first.body["deployment_id"].as_str().unwrap().to_owned();
    assert_eq!(
        first.body["status_url"],
        format!("/api/deployments/{id}/status")
    );
    let again = send(&api, &delivery).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.body, first.body, "a repeat gets the first answer");
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        stack.len(INBOUND).await,
        1,
        "one message for two deliveries"
    );

    // The message is the one the platform would have pushed, and passes the worker's rules.
    let raw = stack.next(INBOUND).await;
    let m: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(m["message_type"], "model_ready_to_deploy");
    assert_eq!(m["message_id"], id.as_str());
    let p = &m["payload"];
    assert_eq!(p["model_id"], model.as_str());
    assert_eq!(p["token_symbol"], symbol.as_str());
    assert_eq!(p["model_name"], model.as_str());
    assert_eq!(p["model_version"], version.as_str());
    assert_eq!(p["mlflow_run_id"], run_id.as_str());
    assert_eq!(p["metric_name"], "accuracy");
    assert!(p.get("contributor_address").is_none(), "{p}");
    let parsed = message::parse(
        raw.as_bytes(),
        &Rules {
            max_message_bytes: 65_536,
            min_improvement_percentage: 0.0,
        },
    )
    .expect("the worker takes it");
    assert_eq!(parsed.model.chain_symbol, symbol.to_uppercase());

    // Accepted once, audited once, with its key and model.
    let audited = received(&stack, 1).await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    let e = &audited[0];
    assert_eq!(e["idempotency_key"], key);
    assert_eq!(e["model_id"], model);
    assert_eq!(e["token_symbol"], symbol);
    assert_eq!(e["deployment_id"], id);
    assert_eq!(e["run_id"], run_id);

    // Another version of the same model (a new key): its deployment is under way.
    let v2 = platform_delivery(SECRET, "platform-7", &model, &symbol, "2", &run_id, 0);
    assert_ne!(v2.key, delivery.key);
    let a = send(&api, &v2).await;
    expect(&a, 409, "TOKEN_EXISTS");

    // A model not registered yet: 404, and the refusal keeps no key, so the platform's retry
    // after the registration is deployed. Signed with the secret being rotated out, with a
    // fresh X-Hokusai-Timestamp.
    let later = unique("wh_later");
    let later_symbol = later.replace('_', "-");
    let d = platform_delivery(
        PREVIOUS,
        "platform-8",
        &later,
        &later_symbol,
        "1",
        "run-8",
        0,
    );
    let fresh = now().to_string();
    let headers = [
        ("x-hokusai-idempotency-key", d.key.as_str()),
        ("x-hokusai-signature", d.signature.as_str()),
        ("x-hokusai-timestamp", fresh.as_str()),
    ];
    expect(
        &deliver(&api, &d.body, &headers).await,
        404,
        "MODEL_NOT_FOUND",
    );
    seed_model(&later, true).await;
    let a = deliver(&api, &d.body, &headers).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(stack.len(INBOUND).await, 1);
    let m = stack.next_json(INBOUND).await;
    assert_eq!(m["payload"]["model_id"], later.as_str());
    assert_eq!(received(&stack, 2).await.len(), 2);

    // Without a secret the endpoint is off, like any unknown path.
    let off = stack.api("webhooks-off", mlflow, &[]);
    off.until("/health", "the API up", |code, _| code == 200)
        .await;
    expect(&send(&off, &delivery).await, 404, "NOT_FOUND");
    assert_eq!(stack.len(INBOUND).await, 0);
}
