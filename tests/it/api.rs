//! The HTTP deployment API against real Redis, anvil and an MLflow tracking server (PyPI
//! `mlflow`, installed by `make pytools`; one server per test binary, a fresh model per test):
//! the whole flow from POST to `completed`, every error code from a real condition, exact
//! rate limits across two API processes, and schemathesis against `docs/openapi.json`.

use std::time::Duration;

use fred::prelude::*;
use futures::StreamExt;
use hokusai_deployer::chain::ModelRegistry;
use hokusai_deployer::localstack;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use crate::harness::{Daemon, Stack};

/// The HS256 secret the test API processes are configured with.
pub const JWT_SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
pub(crate) const OWNER: &str = "user-1";
pub(crate) const OWNER_ADDRESS: &str = "0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d";
pub(crate) const CONTRIBUTOR: &str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";

static MLFLOW: OnceCell<String> = OnceCell::const_new();

/// The test binary's MLflow server, started once (it ends with the test process).
pub(crate) async fn mlflow() -> &'static str {
    MLFLOW
        .get_or_init(|| async {
            let dir = tempfile::tempdir().expect("temp dir").keep();
            localstack::mlflow(&dir)
                .await
                .expect("mlflow starts (make pytools)")
        })
        .await
}

/// A registered model with its run and the tags of docs/api.md. Returns the model id.
pub(crate) async fn seed_model(name: &str, validated: bool) -> String {
    localstack::seed_model(
        mlflow().await,
        name,
        validated,
        OWNER,
        &[OWNER_ADDRESS, CONTRIBUTOR],
    )
    .await
    .expect("mlflow takes the model");
    name.to_owned()
}

pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn jwt_with(claims: Value, alg: Algorithm, secret: &[u8]) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

pub(crate) fn claims(sub: &str, address: &str) -> Value {
    json!({
        "sub": sub, "address": address, "exp": now() + 600,
        "iss": "https://hokus.ai", "aud": "hokusai-deployer",
    })
}

pub(crate) fn jwt(sub: &str, address: &str) -> String {
    jwt_with(
        claims(sub, address),
        Algorithm::HS256,
        JWT_SECRET.as_bytes(),
    )
}

pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// Status, headers and the JSON body (null when there is none).
    pub(crate) async fn read(r: reqwest::Response) -> Answer {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }
}

pub(crate) async fn post(
    api: &Daemon,
    token: Option<&str>,
    body: Value,
    extra: &[(&str, &str)],
) -> Answer {
    let mut r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/deployments", api.ops_port))
        .timeout(Duration::from_secs(10))
        .json(&body);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    Answer::read(r.send().await.expect("the API answers")).await
}

pub(crate) async fn status_of(api: &Daemon, token: &str, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/deployments/{id}/status",
            api.ops_port
        ))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("the API answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls the status until `pred` holds (the deployment runs in a worker, seconds away).
pub(crate) async fn until_status(
    api: &Daemon,
    token: &str,
    id: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, v) = status_of(api, token, id).await;
        assert_eq!(code, 200, "{v}");
        if pred(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "status stuck at {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn ready(api: &Daemon) {
    api.until("/health/ready", "the API ready", |code, _| code == 200)
        .await;
}

/// The answer is an error with this status and seed code.
#[track_caller]
pub(crate) fn expect(a: &Answer, status: u16, code: &str) {
    assert_eq!(
        (a.status, a.body["error"]["code"].as_str().unwrap_or("")),
        (status, code),
        "{}",
        a.body
    );
}

pub(crate) fn request(model: &str) -> Value {
    json!({ "model_id": model, "user_address": OWNER_ADDRESS })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validated_model_is_deployed_through_the_api_and_its_status_completes() {
    let stack = Stack::start().await;
    let model = seed_model(&unique("api_e2e"), true).await;
    let api = stack.api("api-e2e", mlflow().await, &[]);
    ready(&api).await;
    let (_, r) = api.get_json("/health/ready").await;
    assert_eq!(r["components"]["mlflow"]["status"], "up", "{r}");
    let worker = stack.worker(&[]);
    let token = jwt(OWNER, OWNER_ADDRESS);

    let started = std::time::Instant::now();
    let a = post(&api, Some(&token), request(&model), &[]).await;
    let took = started.elapsed();
    assert_eq!(a.status, 202, "{}", a.body);
    assert!(a.headers.contains_key("x-request-id"));
    assert_eq!(a.headers["x-content-type-options"], "nosniff");
    assert_eq!(a.body["success"], true);
    assert_eq!(a.body["model_id"], model.as_str());
    let id = a.body["deployment_id"].as_str().unwrap().to_owned();
    assert_eq!(
        a.body["status_url"],
        format!("/api/deployments/{id}/status")
    );
    assert!(
        a.body["estimated_gas_cost"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .unwrap()
            > 0
    );
    assert!(a.body["estimated_confirmation_time"].as_u64().unwrap() >= 1);
    assert!(
        took < Duration::from_millis(500),
        "seed 000: under 500 ms, took {took:?}"
    );

    let s = until_status(&api, &token, &id, |v| v["status"] == "completed").await;
    worker.stop().await;
    assert_eq!(s["model_id"], model.as_str());
    let symbol = s["token_symbol"].as_str().unwrap();
    let core = "HK-".to_owned() + &model.replace('_', "").to_uppercase()[..8] + "-";
    assert!(
        symbol.starts_with(&core) && symbol.len() == core.len() + 4,
        "{symbol}"
    );
    assert_eq!(s["token_name"], format!("Hokusai {model}"));
    let token_address = s["token_address"].as_str().unwrap();
    let on_chain = ModelRegistry::new(stack.boot.model_registry, stack.provider())
        .getToken(model.clone())
        .call()
        .await
        .unwrap();
    assert_eq!(on_chain.to_checksum(None), token_address);
    assert_eq!(s["deployment_tx_hash"].as_str().unwrap().len(), 66, "{s}");
    // One transaction deploys and registers.
    assert_eq!(s["registry_tx_hash"], s["deployment_tx_hash"]);
    let gas: u128 = s["gas_used"].as_str().unwrap().parse().unwrap();
    let cost: u128 = s["total_cost"].as_str().unwrap().parse().unwrap();
    assert!(gas > 100_000 && gas <= 300_000 && cost > 0, "{s}");
    assert!(s["block_number"].as_u64().unwrap() > 0);
    assert_eq!(stack.creations().await, 1);

    // The same model again: it has its token now.
    let again = post(&api, Some(&token), request(&model), &[]).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.body["error"]["code"], "TOKEN_EXISTS");
    assert_eq!(
        again.body["error"]["details"]["token_address"],
        token_address
    );

    // Requests are measured by route.
    let (_, metrics) = api.get_ops("/metrics").await;
    assert!(
        metrics.contains(r#"hokusai_api_request_duration_seconds_count{route="/api/deployments",method="POST",status="202"} 1"#),
        "{metrics}"
    );

    // The image's HEALTHCHECK command finds the API's port.
    let hc = crate::cli::run(
        &["healthcheck"],
        &[
            ("HOKUSAI__OPS__PORT", &localstack::free_port().to_string()),
            ("HOKUSAI__API__PORT", &api.ops_port.to_string()),
        ],
    );
    assert!(
        hc.status.success(),
        "{}",
        String::from_utf8_lossy(&hc.stderr)
    );

    // The served OpenAPI document is the committed one.
    let (code, served) = api.get("/api/openapi.json").await;
    assert_eq!(code, 200);
    assert_eq!(served, include_str!("../../docs/openapi.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_carries_the_seed_error_code() {
    let stack = Stack::start().await;
    let validated = seed_model(&unique("api_ok"), true).await;
    let unvalidated = seed_model(&unique("api_unvalidated"), false).await;
    let api = stack.api("api-errors", mlflow().await, &[]);
    ready(&api).await;
    let token = jwt(OWNER, OWNER_ADDRESS);

    // Authentication: missing, forged, expired, wrong audience, unsigned, wrong algorithm.
    let mut expired = claims(OWNER, OWNER_ADDRESS);
    expired["exp"] = (now() - 3600).into();
    let mut foreign = claims(OWNER, OWNER_ADDRESS);
    foreign["aud"] = "someone-else".into();
    use base64::Engine;
    let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(OWNER, OWNER_ADDRESS).to_string().as_bytes())
    );
    let tokens = [
        ("no token", None),
        (
            "forged",
            Some(jwt_with(
                claims(OWNER, OWNER_ADDRESS),
                Algorithm::HS256,
                b"not-the-secret-not-the-secret-!!",
            )),
        ),
        (
            "expired",
            Some(jwt_with(expired, Algorithm::HS256, JWT_SECRET.as_bytes())),
        ),
        (
            "wrong audience",
            Some(jwt_with(foreign, Algorithm::HS256, JWT_SECRET.as_bytes())),
        ),
        ("alg none", Some(unsigned)),
        (
            "HS512 not accepted",
            Some(jwt_with(
                claims(OWNER, OWNER_ADDRESS),
                Algorithm::HS512,
                JWT_SECRET.as_bytes(),
            )),
        ),
    ];
    for (what, t) in tokens {
        let a = post(&api, t.as_deref(), request(&validated), &[]).await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (401, Some("AUTH_FAILED")),
            "{what}: {}",
            a.body
        );
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains("expired") && !msg.contains("signature"),
            "leaks the reason: {msg}"
        );
    }
    // The token in the body, as seed 000 shows it, works like the header.
    let mut body_auth = request(&validated);
    body_auth["auth_token"] = "garbage".into();
    assert_eq!(post(&api, None, body_auth, &[]).await.status, 401);

    // Body rules name the field.
    let a = post(
        &api,
        Some(&token),
        json!({ "model_id": validated, "user_address": "0x12" }),
        &[],
    )
    .await;
    expect(&a, 400, "VALIDATION_ERROR");
    assert_eq!(a.body["error"]["details"]["field"], "user_address");
    let a = post(
        &api,
        Some(&token),
        json!({ "user_address": OWNER_ADDRESS }),
        &[],
    )
    .await;
    assert_eq!(
        a.body["error"]["details"]["field"], "model_id",
        "{}",
        a.body
    );
    // Another user's address than the token's.
    let a = post(
        &api,
        Some(&token),
        json!({ "model_id": validated, "user_address": CONTRIBUTOR }),
        &[],
    )
    .await;
    expect(&a, 403, "AUTH_FAILED");

    // The model: unknown, not validated, not the caller's.
    let a = post(&api, Some(&token), request("no_such_model"), &[]).await;
    expect(&a, 404, "MODEL_NOT_FOUND");
    let a = post(&api, Some(&token), request(&unvalidated), &[]).await;
    expect(&a, 422, "MODEL_NOT_VALIDATED");
    let stranger = "0x000000000000000000000000000000000000dEaD";
    let a = post(
        &api,
        Some(&jwt("user-2", stranger)),
        json!({ "model_id": validated, "user_address": stranger }),
        &[],
    )
    .await;
    expect(&a, 403, "AUTH_FAILED");
    // A contributor may deploy it.
    let key = [("idempotency-key", "k-1")];
    let first = post(
        &api,
        Some(&jwt("user-3", CONTRIBUTOR)),
        json!({ "model_id": validated, "user_address": CONTRIBUTOR }),
        &key,
    )
    .await;
    assert_eq!(first.status, 202, "{}", first.body);
    // The same Idempotency-Key: the same deployment, queued once.
    let replay = post(
        &api,
        Some(&jwt("user-3", CONTRIBUTOR)),
        json!({ "model_id": validated, "user_address": CONTRIBUTOR }),
        &key,
    )
    .await;
    assert_eq!(replay.status, 200, "{}", replay.body);
    assert_eq!(replay.body["deployment_id"], first.body["deployment_id"]);
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(stack.len("hokusai:model_ready_queue").await, 1);
    // A second deployment of a model being deployed.
    let a = post(&api, Some(&token), request(&validated), &[]).await;
    expect(&a, 409, "TOKEN_EXISTS");
    assert_eq!(
        a.body["error"]["details"]["deployment_id"],
        first.body["deployment_id"]
    );
    // Another user cannot read its status.
    let id = first.body["deployment_id"].as_str().unwrap();
    let (c, v) = status_of(&api, &jwt("user-9", stranger), id).await;
    assert_eq!(
        (c, v["error"]["code"].as_str()),
        (404, Some("DEPLOYMENT_NOT_FOUND"))
    );
    let (c, v) = status_of(&api, &jwt("user-3", CONTRIBUTOR), id).await;
    assert_eq!((c, v["status"].as_str()), (200, Some("pending")), "{v}");

    // Paused by an operator.
    let _: () = stack
        .client
        .set("hokusai:deployer:paused", "{}", None, None, false)
        .await
        .unwrap();
    let another = seed_model(&unique("api_paused"), true).await;
    let a = post(&api, Some(&token), request(&another), &[]).await;
    expect(&a, 503, "DEPLOYMENTS_PAUSED");
    let _: i64 = stack.client.del("hokusai:deployer:paused").await.unwrap();

    // Fees above the cap (an API whose cap is far under anvil's base fee).
    let capped = stack.api(
        "api-capped",
        mlflow().await,
        &[("HOKUSAI__CHAIN__MAX_FEE_PER_GAS_GWEI", "0.000001")],
    );
    ready(&capped).await;
    let a = post(&capped, Some(&token), request(&another), &[]).await;
    expect(&a, 503, "INSUFFICIENT_GAS");
    // A refused request gives its quota slot back: this user has made no deployment yet.
    let a = post(&api, Some(&token), request(&another), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.headers["x-ratelimit-remaining"], "4");

    // MLflow down: the API is not ready, and a deployment request says which upstream failed.
    let no_mlflow = stack.api(
        "api-no-mlflow",
        &format!("http://127.0.0.1:{}", localstack::free_port()),
        &[],
    );
    let (_, r) = no_mlflow
        .until("/health/ready", "mlflow down", |code, v| {
            code == 503 && v["components"]["mlflow"]["status"] == "down"
        })
        .await;
    assert_eq!(r["components"]["redis"]["status"], "up", "{r}");
    let later = seed_model(&unique("api_later"), true).await;
    let a = post(&no_mlflow, Some(&token), request(&later), &[]).await;
    expect(&a, 503, "UPSTREAM_UNAVAILABLE");
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("MLflow"));

    // Too large a body.
    let big = json!({ "model_id": "x".repeat(20_000), "user_address": OWNER_ADDRESS });
    let a = post(&api, Some(&token), big, &[]).await;
    expect(&a, 413, "PAYLOAD_TOO_LARGE");
}

/// A request that times out (its MLflow accepts the connection and never answers) gives back
/// what it took, as a refused one does: its quota slot and its Idempotency-Key, so the retry
/// the TIMEOUT answer invites, with the same key and through another API process, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_gives_back_its_quota_slot_and_idempotency_key() {
    let stack = Stack::start().await;
    let model = seed_model(&unique("api_timeout"), true).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let holder = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        })
    };
    let slow = stack.api(
        "api-timeout",
        &silent_url,
        &[("HOKUSAI__API__REQUEST_TIMEOUT_MS", "500")],
    );
    // Not `ready`: its MLflow never answers the readiness probe either.
    slow.until("/health", "the API up", |code, _| code == 200)
        .await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let key = [("idempotency-key", "k-timeout")];
    let a = post(&slow, Some(&token), request(&model), &key).await;
    expect(&a, 503, "TIMEOUT");
    // It timed out asking MLflow for the model: after it took the key and a quota slot.
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    let api = stack.api("api-after-timeout", mlflow().await, &[]);
    ready(&api).await;
    let retry = post(&api, Some(&token), request(&model), &key).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
    assert_eq!(retry.headers["x-ratelimit-remaining"], "4");
    holder.abort();
}

/// A deployment the chain refuses (the worker's key lost its deployer role after start-up)
/// ends `failed` with `DEPLOYMENT_FAILED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_the_chain_refuses_reports_deployment_failed() {
    let stack = Stack::start().await;
    let model = seed_model(&unique("api_refused"), true).await;
    let api = stack.api("api-refused", mlflow().await, &[]);
    ready(&api).await;
    let status = std::sync::Arc::new(hokusai_deployer::pipeline::WorkerStatus::default());
    let worker = crate::harness::Worker::start(
        stack.settings(&[]),
        hokusai_deployer::pipeline::RunOptions {
            status: status.clone(),
            ..Default::default()
        },
    );
    // Running: past its start-up checks, which would refuse a key without the role.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while status.phase() != "running" {
        assert!(std::time::Instant::now() < deadline, "the worker never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The owner revokes the worker's role (owner and worker share the dev key here).
    let owner = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(
            localstack::ANVIL_DEV_KEY
                .parse::<alloy::signers::local::PrivateKeySigner>()
                .unwrap(),
        ))
        .connect_http(stack.anvil.url("http").parse().unwrap());
    let dev = hokusai_deployer::chain::signer(&hokusai_deployer::config::Secret::new(
        localstack::ANVIL_DEV_KEY,
    ))
    .unwrap()
    .address();
    hokusai_deployer::chain::TokenManager::new(stack.boot.token_manager, &owner)
        .setDeployer(dev, false)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let token = jwt(OWNER, OWNER_ADDRESS);
    let a = post(&api, Some(&token), request(&model), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["deployment_id"].as_str().unwrap().to_owned();
    let s = until_status(&api, &token, &id, |v| v["status"] == "failed").await;
    worker.stop().await;
    assert_eq!(s["error"]["code"], "DEPLOYMENT_FAILED", "{s}");
    assert!(!s["error"]["message"].as_str().unwrap().is_empty());
    // The failed deployment does not hold the model: a new request may try again.
    let retry = post(&api, Some(&token), request(&model), &[]).await;
    assert_eq!(retry.status, 202, "{}", retry.body);
}

/// 50 concurrent POSTs by one user, spread over two API processes: exactly 5 accepted (seed
/// 000: 5 per hour), 45 refused with 429 and `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_posts_admit_exactly_five_across_two_api_processes() {
    let stack = Stack::start().await;
    let models: Vec<String> = futures::stream::iter(0..50)
        .map(|i| async move { seed_model(&unique(&format!("api_rate{i}")), true).await })
        .buffer_unordered(8)
        .collect()
        .await;
    let apis = [
        stack.api("api-rate-a", mlflow().await, &[]),
        stack.api("api-rate-b", mlflow().await, &[]),
    ];
    for a in &apis {
        ready(a).await;
    }
    let token = jwt(OWNER, OWNER_ADDRESS);
    let answers = futures::future::join_all(models.iter().enumerate().map(|(i, m)| {
        let (api, token) = (&apis[i % 2], token.clone());
        async move { post(api, Some(&token), request(m), &[]).await }
    }))
    .await;
    let accepted = answers.iter().filter(|a| a.status == 202).count();
    let limited: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(
        accepted,
        5,
        "{:?}",
        answers
            .iter()
            .map(|a| (a.status, &a.body))
            .collect::<Vec<_>>()
    );
    assert_eq!(limited.len(), 45);
    for a in limited {
        assert_eq!(a.body["error"]["code"], "RATE_LIMIT_EXCEEDED");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry > 3500 && retry <= 3600, "{retry}");
        assert_eq!(a.headers["x-ratelimit-remaining"], "0");
    }
    assert_eq!(stack.len("hokusai:model_ready_queue").await, 5);
}

/// schemathesis (PyPI) generates requests from docs/openapi.json against the live API: no
/// server error, and every answer fits the documented schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let stack = Stack::start().await;
    // Limits high enough that the generated requests reach the logic behind them.
    let api = stack.api(
        "api-fuzz",
        mlflow().await,
        &[
            ("HOKUSAI__API__LIMITS__AUTH_FAILURES_PER_MINUTE", "100000"),
            ("HOKUSAI__API__LIMITS__STATUS_PER_MINUTE", "100000"),
        ],
    );
    ready(&api).await;
    let bin = localstack::find_tool("schemathesis", "HOKUSAI_SCHEMATHESIS")
        .expect("schemathesis is installed (make pytools)");
    let out = tokio::process::Command::new(bin)
        .args([
            "--no-color",
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"),
            "--url",
            &format!("http://127.0.0.1:{}", api.ops_port),
            "--header",
            // No address claim: generated addresses are not refused as someone else's.
            &format!(
                "Authorization: Bearer {}",
                jwt_with(
                    json!({ "sub": OWNER, "exp": now() + 600, "iss": "https://hokus.ai", "aud": "hokusai-deployer" }),
                    Algorithm::HS256,
                    JWT_SECRET.as_bytes()
                )
            ),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--workers",
            "1",
            "--max-examples",
            "40",
            "--seed",
            "1",
        ])
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("NO_COLOR", "1")
        .output()
        .await
        .expect("schemathesis runs (make pytools)");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    // It got past authentication to the body rules and the model checks.
    assert!(!report.contains("Authentication failed"), "{report}");
}

/// A full run (a queued message and an API deployment, through an RPC URL with credentials, a
/// dead one among them) leaves no secret in the logs, events, audit trail, status, health
/// pages or metrics: not the deployer key, the RPC password, the JWT secret or a service key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_events_health_or_metrics() {
    let stack = Stack::start().await;
    let model = seed_model(&unique("api_leak"), true).await;
    const RPC_PASSWORD: &str = "rpc-pass-7f3a9c";
    const SERVICE_KEY: &str = "svc-key-0b1e55ed-4242";
    let dead = localstack::free_port();
    let rpc = format!(
        "http://deployer:{RPC_PASSWORD}@127.0.0.1:{dead},http://deployer:{RPC_PASSWORD}@127.0.0.1:{}",
        stack.anvil.port
    );
    let env = [
        ("HOKUSAI__CHAIN__RPC_URLS", rpc.as_str()),
        ("HOKUSAI__API__API_KEYS", SERVICE_KEY),
    ];
    let mut worker = stack.daemon("leak-worker", &env, &[]);
    let mut api = stack.api("leak-api", mlflow().await, &env);
    ready(&api).await;
    stack
        .push(&crate::harness::model_message(
            "leak-1",
            "leak_queue_model",
            "leak",
        ))
        .await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let a = post(&api, Some(&token), request(&model), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["deployment_id"].as_str().unwrap().to_owned();
    let status = until_status(&api, &token, &id, |v| v["status"] == "completed").await;
    let mut seen = vec![status.to_string(), a.body.to_string()];
    for d in [&worker, &api] {
        for path in ["/health", "/health/ready", "/health/detailed", "/metrics"] {
            seen.push(d.get_ops(path).await.1);
        }
    }
    // Both deployments publish; the queued message's may come after the API's.
    for _ in 0..2 {
        seen.push(stack.next("hokusai:token_deployed_queue").await);
    }
    assert_eq!(
        stack.len("hokusai:token_deployed_queue").await,
        0,
        "both deployments published, once each"
    );
    let audit: Vec<(String, std::collections::HashMap<String, String>)> = stack
        .client
        .xrange("hokusai:deployer:audit", "-", "+", None)
        .await
        .unwrap();
    seen.extend(audit.into_iter().map(|(_, f)| format!("{f:?}")));
    worker.sigterm(Duration::from_secs(30)).await;
    api.sigterm(Duration::from_secs(30)).await;
    for name in ["leak-worker", "leak-api"] {
        seen.push(std::fs::read_to_string(crate::harness::log_path(name)).unwrap());
    }
    let all = seen.join("\n");
    // The URLs are shown (health, config), their credentials masked.
    assert!(
        all.contains("http://***@127.0.0.1"),
        "masked RPC URLs are shown"
    );
    let key = localstack::ANVIL_DEV_KEY.trim_start_matches("0x");
    for (what, secret) in [
        ("the deployer key", key),
        ("the RPC password", RPC_PASSWORD),
        ("the JWT secret", JWT_SECRET),
        ("a service key", SERVICE_KEY),
    ] {
        assert!(!all.contains(secret), "{what} leaked into the output");
    }
}
