//! Outbound webhooks against a real HTTP receiver on loopback (reached through
//! `webhooks.allow_hosts`), real Redis and anvil, and real worker processes: signatures checked
//! by an independent HMAC (Python's `hmac`), retries with one event id, the webhook dead-letter
//! list and its `requeue`, the SSRF rules for callbacks, and deliveries that survive SIGKILL.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use fred::prelude::*;
use hokusai_deployer::localstack;
use serde_json::{json, Value};

use crate::api::{jwt, mlflow, post, seed_model, unique, OWNER, OWNER_ADDRESS};
use crate::harness::{model_message, Daemon, Stack};

const OUT: &str = "hokusai:token_deployed_queue";
const DEAD: &str = "hokusai:deployer:webhooks:dead";
const READY: &str = "hokusai:deployer:webhooks:ready";
const SCHEDULED: &str = "hokusai:deployer:webhooks:scheduled";
const AUDIT: &str = "hokusai:deployer:audit";
const SITE_SECRET: &str = "site-webhook-secret-0123456789abcdef-0001";
const SITE_OLD: &str = "site-webhook-secret-retiring-0123456789-02";
const OTHER_SECRET: &str = "other-webhook-secret-0123456789abcdef-003";
const CALLBACK_SECRET: &str = "callback-secret-0123456789abcdef-0123456";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver: `/ok` answers 200; `/flaky` 500 to the first three requests of each
/// event, then 200; `/down` 503 until [`Receiver::bring_up`]; `/slow` 200 after 800 ms;
/// `/gone` 410.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    up: Arc<AtomicBool>,
    port: u16,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            ..Receiver::default()
        };
        let app = axum::Router::new().fallback(answer).with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn bring_up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn at(&self, path: &str) -> Vec<Received> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` got at least `n` requests (each comes within seconds).
    async fn wait_for(&self, path: &str, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let got = self.at(path);
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path} got {} requests, not {n}: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn answer(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let got = Received {
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    let key = got.header("x-hokusai-idempotency-key").to_owned();
    let earlier = {
        let mut all = r.got.lock().unwrap();
        all.push(got.clone());
        all.iter()
            .filter(|x| x.path == got.path && x.header("x-hokusai-idempotency-key") == key)
            .count()
    };
    match got.path.as_str() {
        "/flaky" if earlier <= 3 => StatusCode::INTERNAL_SERVER_ERROR,
        "/down" if !r.up.load(Ordering::SeqCst) => StatusCode::SERVICE_UNAVAILABLE,
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(800)).await;
            StatusCode::OK
        }
        "/gone" => StatusCode::GONE,
        _ => StatusCode::OK,
    }
}

/// The signature of a delivery, computed by Python's `hmac` (not the server's Rust).
fn python_signature(secret: &str, r: &Received) -> String {
    let python = localstack::find_tool("python3", "HOKUSAI_PYTHON").expect("python3");
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import hmac, hashlib, sys; s, ts, n, b = sys.argv[1:5]; \
             print('sha256=' + hmac.new(s.encode(), f'{ts}.{n}.'.encode() + b.encode(), hashlib.sha256).hexdigest())",
            secret,
            r.header("x-hokusai-timestamp"),
            r.header("x-hokusai-nonce"),
            &r.body,
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A configuration file with the receiver's endpoints, fast retries, and the loopback host
/// allowed (the rule the SSRF test shows without it).
fn config_file(dir: &std::path::Path, receiver: &Receiver, endpoints: &str) -> String {
    let path = dir.join("webhooks.toml");
    let text = format!(
        r#"
[webhooks]
allow_hosts = ["127.0.0.1"]
max_attempts = 4
retry_initial_ms = 100
retry_multiplier = 2.0
retry_max_ms = 1000
timeout_ms = 5000
{}
"#,
        endpoints.replace("{base}", &receiver.url(""))
    );
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

async fn audit_entries(stack: &Stack, action: &str) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> =
        stack.client.xrange(AUDIT, "-", "+", None).await.unwrap();
    entries
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("action").map(String::as_str) == Some(action))
        .collect()
}

async fn wait_len(stack: &Stack, list: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.len(list).await != n {
        assert!(Instant::now() < deadline, "{list} never held {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(stack: &Stack, config: &str, args: &[&str]) -> std::process::Output {
    let env = stack.env(&[("HOKUSAI_CONFIG", config)]);
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hokusai-deployer"));
    c.args(args).env_clear().envs(env);
    c.output().expect("the binary runs")
}

/// Deliveries to three endpoints: signed (two secrets while rotating), retried with one id
/// until a 2xx, dead-lettered when attempts run out, then sent again by `webhooks requeue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_dead_lettered_and_requeued() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        &receiver,
        r#"
[[webhooks.endpoints]]
name = "site"
url = "{base}/ok"
secret_env = "SITE_SECRET"
previous_secret_env = "SITE_OLD"
headers = { "X-Team" = "web" }

[[webhooks.endpoints]]
name = "flaky"
url = "{base}/flaky"
secret_env = "OTHER_SECRET"
events = ["deployment.completed"]

[[webhooks.endpoints]]
name = "down"
url = "{base}/down"
secret_env = "OTHER_SECRET"
"#,
    );
    let env = [
        ("HOKUSAI_CONFIG", config.as_str()),
        ("SITE_SECRET", SITE_SECRET),
        ("SITE_OLD", SITE_OLD),
        ("OTHER_SECRET", OTHER_SECRET),
    ];
    let worker = stack.daemon("deliveries-signed", &env, &[]);
    stack
        .push(&model_message("wh-ok-1", "wh_ok_1", "WHOK1"))
        .await;
    let event: Value = serde_json::from_str(&stack.next(OUT).await).unwrap();
    stack.push(r#"{"message_id":"wh-bad-1","message_type":"model_ready_to_deploy","payload":{"model_id":"wh_bad_1"}}"#).await;

    // The site gets both outcomes, signed and carrying what was published.
    let site = receiver.wait_for("/ok", 2).await;
    let completed = site
        .iter()
        .find(|r| r.json()["event_type"] == "deployment.completed")
        .expect("deployment.completed");
    let body = completed.json();
    assert_eq!(
        body["data"], event,
        "the event carries the token_deployed payload"
    );
    assert_eq!(body["deployment_id"], "wh-ok-1");
    assert_eq!(
        completed.header("x-hokusai-idempotency-key"),
        body["event_id"]
    );
    assert_eq!(completed.header("x-hokusai-event"), "deployment.completed");
    assert_eq!(completed.header("content-type"), "application/json");
    assert_eq!(
        completed.header("x-team"),
        "web",
        "the endpoint's extra header"
    );
    assert_eq!(
        completed.header("x-hokusai-signature"),
        python_signature(SITE_SECRET, completed),
        "the signature verifies with an independent HMAC"
    );
    assert_eq!(
        completed.header("x-hokusai-signature-previous"),
        python_signature(SITE_OLD, completed),
        "the secret being rotated out signs beside"
    );
    let ts: i64 = completed.header("x-hokusai-timestamp").parse().unwrap();
    assert!((ts - chrono::Utc::now().timestamp()).abs() < 60);
    uuid::Uuid::parse_str(completed.header("x-hokusai-nonce")).expect("the nonce is a uuid");
    let failed = site
        .iter()
        .find(|r| r.json()["event_type"] == "deployment.failed")
        .expect("deployment.failed");
    assert_eq!(failed.json()["data"]["error_code"], "INVALID_MESSAGE");
    assert_eq!(failed.json()["data"]["message_id"], "wh-bad-1");

    // 500 three times, then 200: four deliveries of one event, one id, one body, new nonces.
    let flaky = receiver.wait_for("/flaky", 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flaky_now = receiver.at("/flaky");
    assert_eq!(
        flaky_now.len(),
        4,
        "no delivery after the 2xx: {flaky_now:?}"
    );
    for r in &flaky {
        assert_eq!(r.header("x-hokusai-idempotency-key"), body["event_id"]);
        assert_eq!(r.body, completed.body, "the same bytes every time");
        assert_eq!(
            r.header("x-hokusai-signature"),
            python_signature(OTHER_SECRET, r)
        );
    }
    let nonces: std::collections::BTreeSet<&str> =
        flaky.iter().map(|r| r.header("x-hokusai-nonce")).collect();
    assert_eq!(nonces.len(), 4, "a fresh nonce per attempt");
    let attempts: Vec<&str> = flaky
        .iter()
        .map(|r| r.header("x-hokusai-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);

    // A receiver that never answers 2xx: both events end in the webhook dead-letter list after
    // max_attempts (4) each, audited.
    wait_len(&stack, DEAD, 2).await;
    assert_eq!(receiver.at("/down").len(), 8);
    let dead_ids: std::collections::BTreeSet<String> = receiver
        .at("/down")
        .iter()
        .map(|r| r.header("x-hokusai-idempotency-key").to_owned())
        .collect();
    assert_eq!(dead_ids.len(), 2);
    assert_eq!(audit_entries(&stack, "webhook_dead").await.len(), 2);
    assert!(audit_entries(&stack, "webhook_delivered").await.len() >= 3);
    let (_, metrics) = worker.get("/metrics").await;
    for line in [
        r#"hokusai_webhook_deliveries_total{result="delivered"} 3"#,
        r#"hokusai_webhook_deliveries_total{result="retry"} 9"#,
        r#"hokusai_webhook_deliveries_total{result="dead"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(metrics.contains("hokusai_webhook_delivery_latency_seconds_count 3"));

    // The operator's commands: list, show, purge needs --yes, requeue sends them again.
    let list = cli(&stack, &config, &["webhooks", "list", "--json"]);
    assert!(list.status.success(), "{list:?}");
    let listed: Vec<Value> = String::from_utf8(list.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed
        .iter()
        .all(|j| j["target"] == "down" && j["attempts"] == 4));
    assert!(listed
        .iter()
        .all(|j| j["last_error"].as_str().unwrap().contains("503")));
    let show = cli(&stack, &config, &["webhooks", "show", "wh-ok-1"]);
    assert!(
        show.status.success()
            && String::from_utf8_lossy(&show.stdout).contains("deployment.completed")
    );
    let purge = cli(&stack, &config, &["webhooks", "purge"]);
    assert!(!purge.status.success() && String::from_utf8_lossy(&purge.stderr).contains("--yes"));
    receiver.bring_up();
    let requeue = cli(
        &stack,
        &config,
        &["webhooks", "requeue", "--all", "--operator", "test"],
    );
    assert!(requeue.status.success(), "{requeue:?}");
    let down = receiver.wait_for("/down", 10).await;
    let again: std::collections::BTreeSet<String> = down[8..]
        .iter()
        .map(|r| r.header("x-hokusai-idempotency-key").to_owned())
        .collect();
    assert_eq!(again, dead_ids, "requeued deliveries keep their event ids");
    wait_len(&stack, DEAD, 0).await;
    assert_eq!(stack.lens(&[READY, SCHEDULED]).await, [0, 0]);
    assert_eq!(audit_entries(&stack, "webhook_requeued").await.len(), 1);
    drop(worker);
}

/// A callback URL: refused when it points inside the network (without the allow-list), and,
/// allowed, sent once; a 410 switches it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_refuse_internal_addresses_and_stop_at_410() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let mlflow = mlflow().await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let strict = stack.api(
        "callbacks-strict",
        mlflow,
        &[("HOKUSAI__WEBHOOKS__CALLBACK_SECRET", CALLBACK_SECRET)],
    );
    let open = stack.api(
        "callbacks-open",
        mlflow,
        &[
            ("HOKUSAI__WEBHOOKS__CALLBACK_SECRET", CALLBACK_SECRET),
            ("HOKUSAI__WEBHOOKS__ALLOW_HOSTS", "127.0.0.1"),
        ],
    );
    crate::api::ready(&strict).await;
    crate::api::ready(&open).await;
    let model = seed_model(&unique("cb"), true).await;
    for url in [
        "https://127.0.0.1/hook".to_owned(),
        "https://169.254.169.254/latest/meta-data".to_owned(),
        "https://10.0.0.1/hook".to_owned(),
        "https://localhost/hook".to_owned(),
        receiver.url("/gone"),
    ] {
        let a = post(
            &strict,
            Some(&token),
            json!({ "model_id": model, "user_address": OWNER_ADDRESS, "callback_url": url }),
            &[],
        )
        .await;
        assert_eq!(a.status, 400, "{url}: {:?}", a.body);
        assert_eq!(a.body["error"]["code"], "VALIDATION_ERROR", "{url}");
        assert_eq!(a.body["error"]["details"]["field"], "callback_url", "{url}");
    }
    let worker = stack.daemon(
        "callbacks-worker",
        &[
            ("HOKUSAI__WEBHOOKS__CALLBACK_SECRET", CALLBACK_SECRET),
            ("HOKUSAI__WEBHOOKS__ALLOW_HOSTS", "127.0.0.1"),
        ],
        &[],
    );
    let a = post(
        &open,
        Some(&token),
        json!({ "model_id": model, "user_address": OWNER_ADDRESS, "callback_url": receiver.url("/gone") }),
        &[],
    )
    .await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    let id = a.body["deployment_id"].as_str().unwrap().to_owned();
    let got = receiver.wait_for("/gone", 1).await;
    let body = got[0].json();
    assert_eq!(body["event_type"], "deployment.completed");
    assert_eq!(body["deployment_id"], id.as_str());
    assert_eq!(
        got[0].header("x-hokusai-signature"),
        python_signature(CALLBACK_SECRET, &got[0])
    );
    // 410: no second attempt, and the deployment's callback is off.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.at("/gone").len(), 1);
    let gone: Option<String> = stack
        .client
        .hget(format!("hokusai:deployer:deployment:{id}"), "callback_gone")
        .await
        .unwrap();
    assert_eq!(gone.as_deref(), Some("1"));
    assert_eq!(audit_entries(&stack, "webhook_gone").await.len(), 1);
    drop((worker, strict, open));
}

/// Deliveries under way when the worker is SIGKILLed are sent again after its restart, with the
/// same id and body; across 20 deployments and two kills no event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_sigkill_with_the_same_id() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        &receiver,
        r#"
[[webhooks.endpoints]]
name = "slow"
url = "{base}/slow"
secret_env = "SITE_SECRET"
"#,
    );
    let env = [
        ("HOKUSAI_CONFIG", config.as_str()),
        ("SITE_SECRET", SITE_SECRET),
        ("HOKUSAI__PIPELINE__WORKER_ID", "wk"),
        ("HOKUSAI__WEBHOOKS__CONCURRENCY", "2"),
    ];
    let mut worker: Daemon = stack.daemon("deliveries-kill", &env, &[]);
    for i in 0..20 {
        stack
            .push(&model_message(
                &format!("wk-{i}"),
                &format!("wk_{i}"),
                &format!("WK{i}"),
            ))
            .await;
    }
    // Kill while requests are in flight (the receiver holds each for 800 ms), twice.
    for kill_after in [2usize, 8] {
        receiver.wait_for("/slow", kill_after).await;
        worker.sigkill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker = stack.daemon("deliveries-kill", &env, &[]);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let by_id = loop {
        let mut by_id: BTreeMap<String, Vec<Received>> = BTreeMap::new();
        for r in receiver.at("/slow") {
            let id = r.json()["deployment_id"].as_str().unwrap().to_owned();
            by_id.entry(id).or_default().push(r);
        }
        let idle = stack
            .lens(&[READY, SCHEDULED, "hokusai:deployer:webhooks:processing:wk"])
            .await
            .iter()
            .sum::<u64>()
            == 0;
        if by_id.len() == 20 && idle {
            break by_id;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 20 deployments reached the receiver; idle (nothing ready, scheduled or in \
             the worker's processing list): {idle}",
            by_id.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (id, copies) in &by_id {
        let key = copies[0].header("x-hokusai-idempotency-key");
        for c in copies {
            assert_eq!(
                c.header("x-hokusai-idempotency-key"),
                key,
                "{id}: one event id"
            );
            assert_eq!(c.body, copies[0].body, "{id}: one body");
        }
    }
    let resent = by_id.values().filter(|c| c.len() > 1).count();
    assert!(resent >= 1, "a delivery cut by SIGKILL was sent again");
    assert_eq!(stack.len(DEAD).await, 0);
    assert_eq!(stack.creations().await, 20, "one token per model");
    drop(worker);
}
