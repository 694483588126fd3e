//! The API's authorization and hardening on real Redis, anvil and MLflow: a contributor's
//! address counts only when proven (JWT claim or a SIWE message), tokens with a `jti` and SIWE
//! nonces serve one deployment, failed authentication is throttled per client address and
//! reads per user (exactly, across two API processes), every refusal is audited and counted,
//! the public port serves no metrics, quotes spend nothing, and generated symbols are unique.

use std::collections::HashMap;

use alloy::primitives::Address;
use alloy::signers::{local::PrivateKeySigner, SignerSync};
use base64::Engine;
use fred::prelude::*;
use serde_json::{json, Value};

use crate::api::{
    claims, expect, jwt, jwt_with, mlflow, now, post, ready, request, seed_model, unique, Answer,
    CONTRIBUTOR, JWT_SECRET, OWNER, OWNER_ADDRESS,
};
use crate::harness::{Daemon, Stack};

/// anvil's fourth development key: the test models' contributor (`CONTRIBUTOR`).
const CONTRIBUTOR_KEY: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
const DOMAIN: &str = "app.hokus.ai";

fn contributor() -> PrivateKeySigner {
    let k: PrivateKeySigner = CONTRIBUTOR_KEY.parse().unwrap();
    assert_eq!(k.address(), CONTRIBUTOR.parse::<Address>().unwrap());
    k
}

fn rfc3339(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A SIWE message for `address`, as a wallet would show it.
fn siwe_message(address: &str, domain: &str, nonce: &str, issued: u64, expires: u64) -> String {
    format!(
        "{domain} wants you to sign in with your Ethereum account:\n{address}\n\nDeploy a token for my model.\n\nURI: https://{domain}/deploy\nVersion: 1\nChain ID: 31337\nNonce: {nonce}\nIssued At: {}\nExpiration Time: {}",
        rfc3339(issued),
        rfc3339(expires)
    )
}

/// The body fields of a SIWE proof signed by `key`.
fn proof(key: &PrivateKeySigner, message: String) -> (String, String) {
    let sig = key.sign_message_sync(message.as_bytes()).unwrap();
    (message, format!("0x{}", hex::encode(sig.as_bytes())))
}

fn with_proof(model: &str, address: &str, (message, signature): (String, String)) -> Value {
    json!({
        "model_id": model, "user_address": address,
        "siwe_message": message, "siwe_signature": signature,
    })
}

/// A token for `sub` with no address claim.
fn no_address(sub: &str) -> String {
    let mut c = claims(sub, OWNER_ADDRESS);
    c.as_object_mut().unwrap().remove("address");
    jwt_with(c, jsonwebtoken::Algorithm::HS256, JWT_SECRET.as_bytes())
}

/// The audit stream's `api_refused` entries.
async fn refusals(stack: &Stack) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> = stack
        .client
        .xrange("hokusai:deployer:audit", "-", "+", None)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("action").map(String::as_str) == Some("api_refused"))
        .collect()
}

/// Waits for the audit to hold `n` refusals (they are written beside the answer).
async fn until_refusals(stack: &Stack, n: usize) -> Vec<HashMap<String, String>> {
    for _ in 0..100 {
        let r = refusals(stack).await;
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "fewer than {n} refusals audited: {:?}",
        refusals(stack).await
    );
}

fn api_with(stack: &Stack, name: &str, mlflow: &str, extra: &[(&str, &str)]) -> Daemon {
    let mut env = vec![("HOKUSAI__API__SIWE__DOMAIN", DOMAIN)];
    env.extend_from_slice(extra);
    stack.api(name, mlflow, &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contributor_address_counts_only_when_proven() {
    let stack = Stack::start().await;
    let models: Vec<String> = futures::future::join_all(
        (0..3).map(|i| async move { seed_model(&unique(&format!("proof{i}")), true).await }),
    )
    .await;
    let api = api_with(&stack, "api-proof", mlflow().await, &[]);
    ready(&api).await;
    let stranger = no_address("user-7");
    let key = contributor();
    let t = now();

    // A signed-in user naming a contributor's public address proves nothing.
    let a = post(
        &api,
        Some(&stranger),
        json!({ "model_id": models[0], "user_address": CONTRIBUTOR }),
        &[],
    )
    .await;
    expect(&a, 403, "AUTH_FAILED");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SIWE"),
        "{}",
        a.body
    );

    // Refused proofs: wrong domain, expired, signed by another key.
    let other = PrivateKeySigner::random();
    let bad = [
        (
            "wrong domain",
            proof(
                &key,
                siwe_message(CONTRIBUTOR, "evil.example", "nonce0001", t, t + 300),
            ),
        ),
        (
            "expired",
            proof(
                &key,
                siwe_message(CONTRIBUTOR, DOMAIN, "nonce0002", t - 400, t - 100),
            ),
        ),
        (
            "another key",
            proof(
                &other,
                siwe_message(CONTRIBUTOR, DOMAIN, "nonce0003", t, t + 300),
            ),
        ),
    ];
    for (what, p) in bad {
        let a = post(
            &api,
            Some(&stranger),
            with_proof(&models[0], CONTRIBUTOR, p),
            &[],
        )
        .await;
        assert_eq!(
            (a.status, a.body["error"]["code"].as_str()),
            (401, Some("AUTH_FAILED")),
            "{what}: {}",
            a.body
        );
    }

    // The same request with a valid proof for that address is accepted.
    let good = proof(
        &key,
        siwe_message(CONTRIBUTOR, DOMAIN, "nonce0004", t, t + 300),
    );
    let a = post(
        &api,
        Some(&stranger),
        with_proof(&models[0], CONTRIBUTOR, good.clone()),
        &[],
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    // Its nonce was used: the same proof for another model is refused.
    let a = post(
        &api,
        Some(&stranger),
        with_proof(&models[1], CONTRIBUTOR, good),
        &[],
    )
    .await;
    expect(&a, 401, "AUTH_FAILED");
    // The proof may come as headers too.
    let (m, s) = proof(
        &key,
        siwe_message(CONTRIBUTOR, DOMAIN, "nonce0005", t, t + 300),
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(m);
    let a = post(
        &api,
        Some(&stranger),
        json!({ "model_id": models[1], "user_address": CONTRIBUTOR }),
        &[("x-siwe-message", &b64), ("x-siwe-signature", &s)],
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    // The owner needs no proven address.
    let a = post(&api, Some(&no_address(OWNER)), request(&models[2]), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);

    // Every refusal is audited with its code, caller, client and model, and counted.
    let audited = until_refusals(&stack, 5).await;
    assert_eq!(audited.len(), 5, "{audited:?}");
    let first = &audited[0];
    assert_eq!(first["code"], "AUTH_FAILED");
    assert_eq!(first["status"], "403");
    assert_eq!(first["caller"], "user-7");
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["model_id"], models[0]);
    let (_, metrics) = api.get_ops("/metrics").await;
    assert!(
        metrics.contains(r#"hokusai_api_errors_total{code="AUTH_FAILED"} 5"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_jti_serves_one_deployment_across_two_api_processes() {
    let stack = Stack::start().await;
    let a_model = seed_model(&unique("jti_a"), true).await;
    let b_model = seed_model(&unique("jti_b"), true).await;
    let unvalidated = seed_model(&unique("jti_unvalidated"), false).await;
    let apis = [
        api_with(&stack, "api-jti-a", mlflow().await, &[]),
        api_with(
            &stack,
            "api-jti-b",
            mlflow().await,
            &[("HOKUSAI__API__JWT__REQUIRE_JTI", "true")],
        ),
    ];
    for a in &apis {
        ready(a).await;
    }
    let mut c = claims(OWNER, OWNER_ADDRESS);
    c["jti"] = uuid::Uuid::new_v4().to_string().into();
    let once = jwt_with(c, jsonwebtoken::Algorithm::HS256, JWT_SECRET.as_bytes());
    // A refused request does not use the token up.
    let a = post(&apis[0], Some(&once), request(&unvalidated), &[]).await;
    expect(&a, 422, "MODEL_NOT_VALIDATED");
    let a = post(&apis[0], Some(&once), request(&a_model), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    // Its second deployment request, through the other process, is refused.
    let a = post(&apis[1], Some(&once), request(&b_model), &[]).await;
    expect(&a, 401, "AUTH_FAILED");
    // With api.jwt.require_jti, a token without one is refused.
    let a = post(
        &apis[1],
        Some(&jwt(OWNER, OWNER_ADDRESS)),
        request(&b_model),
        &[],
    )
    .await;
    expect(&a, 401, "AUTH_FAILED");
    assert_eq!(stack.len("hokusai:model_ready_queue").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_throttled_per_client_and_reads_per_user() {
    let stack = Stack::start().await;
    let model = seed_model(&unique("throttle"), true).await;
    let env = [
        ("HOKUSAI__API__LIMITS__AUTH_FAILURES_PER_MINUTE", "5"),
        ("HOKUSAI__API__LIMITS__STATUS_PER_MINUTE", "3"),
        ("HOKUSAI__API__TRUSTED_PROXIES", "127.0.0.1"),
    ];
    let apis = [
        api_with(&stack, "api-throttle-a", mlflow().await, &env),
        api_with(&stack, "api-throttle-b", mlflow().await, &env),
    ];
    for a in &apis {
        ready(a).await;
    }
    // 12 concurrent failures from one client through two processes: exactly 5 are checked.
    let answers: Vec<Answer> = futures::future::join_all((0..12).map(|i| {
        let api = &apis[i % 2];
        let model = model.clone();
        async move {
            post(
                api,
                Some("not-a-token"),
                request(&model),
                &[("x-forwarded-for", "198.51.100.9, 203.0.113.7")],
            )
            .await
        }
    }))
    .await;
    let count = |code: u16| answers.iter().filter(|a| a.status == code).count();
    assert_eq!(
        (count(401), count(429)),
        (5, 7),
        "{:?}",
        answers.iter().map(|a| &a.body).collect::<Vec<_>>()
    );
    let limited = answers.iter().find(|a| a.status == 429).unwrap();
    assert_eq!(limited.body["error"]["code"], "RATE_LIMIT_EXCEEDED");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Even a valid token from that client waits; another client does not.
    let good = jwt(OWNER, OWNER_ADDRESS);
    let a = post(
        &apis[0],
        Some(&good),
        request(&model),
        &[("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    expect(&a, 429, "RATE_LIMIT_EXCEEDED");
    let a = post(
        &apis[1],
        Some("not-a-token"),
        request(&model),
        &[("x-forwarded-for", "203.0.113.8")],
    )
    .await;
    expect(&a, 401, "AUTH_FAILED");
    let audited = until_refusals(&stack, 14).await;
    assert!(
        audited
            .iter()
            .any(|f| f["code"] == "RATE_LIMIT_EXCEEDED" && f["client"] == "203.0.113.7"),
        "{audited:?}"
    );

    // Status reads: 3 a minute per user, across both processes; another user is not held up.
    let id = uuid::Uuid::new_v4().to_string();
    let mut codes = Vec::new();
    for i in 0..4 {
        codes.push(crate::api::status_of(&apis[i % 2], &good, &id).await.0);
    }
    assert_eq!(codes, [404, 404, 404, 429]);
    let other = jwt("user-2", "0x000000000000000000000000000000000000dEaD");
    assert_eq!(crate::api::status_of(&apis[0], &other, &id).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_serves_the_api_and_health_and_the_ops_port_the_rest() {
    let stack = Stack::start().await;
    let api = api_with(&stack, "api-ports", mlflow().await, &[]);
    ready(&api).await;
    for (path, code) in [
        ("/health", 200),
        ("/health/ready", 200),
        ("/metrics", 404),
        ("/health/detailed", 404),
    ] {
        assert_eq!(api.get(path).await.0, code, "public {path}");
    }
    let (code, detailed) = api.get_ops("/health/detailed").await;
    assert_eq!(code, 200, "{detailed}");
    // A refusal, so the error counter has a sample.
    let a = post(&api, None, request("m"), &[]).await;
    expect(&a, 401, "AUTH_FAILED");
    let (code, text) = api.get_ops("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.contains(r#"hokusai_api_errors_total{code="AUTH_FAILED"} 1"#),
        "{text}"
    );
    crate::harness::promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quote_spends_nothing_and_generated_symbols_are_unique() {
    let stack = Stack::start().await;
    // Two ids that share their first 8 letters and digits.
    let stem = unique("symbolstem");
    let (first, second) = (format!("{stem}_1"), format!("{stem}_2"));
    seed_model(&first, true).await;
    seed_model(&second, true).await;
    let api = api_with(&stack, "api-quote", mlflow().await, &[]);
    ready(&api).await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let quote = |model: String| {
        let (api, token) = (&api, token.clone());
        async move {
            let r = reqwest::Client::new()
                .get(format!(
                    "http://127.0.0.1:{}/api/deployments/quote?model_id={model}",
                    api.ops_port
                ))
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (code, q) = quote(first.clone()).await;
    assert_eq!(code, 200, "{q}");
    let gas: u128 = q["estimated_gas"].as_str().unwrap().parse().unwrap();
    let max: u128 = q["max_cost_wei"].as_str().unwrap().parse().unwrap();
    let expected: u128 = q["expected_cost_wei"].as_str().unwrap().parse().unwrap();
    assert!(
        gas > 200_000 && gas < 400_000 && max >= expected && expected > 0,
        "{q}"
    );
    assert!(q["max_cost_eth"].as_str().unwrap().starts_with("0."), "{q}");
    assert!(q["estimated_confirmation_time"].as_u64().unwrap() >= 1);
    // Nothing spent, nothing queued, nothing reserved.
    assert_eq!(stack.len("hokusai:model_ready_queue").await, 0);
    let symbols: HashMap<String, String> = stack
        .client
        .hgetall("hokusai:deployer:symbols")
        .await
        .unwrap();
    assert!(symbols.is_empty(), "{symbols:?}");
    // The same checks as the POST: unknown model, someone else's model.
    assert_eq!(quote("no_such_model".into()).await.0, 404);

    let a = post(&api, Some(&token), request(&first), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(
        a.headers["x-ratelimit-remaining"], "4",
        "the quote took no quota slot"
    );

    // Generated symbols: different for ids that share a prefix, and a symbol issued to
    // another model is never handed out again.
    let sym = |model: &str| hokusai_deployer::api::symbol::candidates(model);
    let taken = sym(&second)[0].clone();
    let _: () = stack
        .client
        .hset("hokusai:deployer:symbols", (taken.as_str(), "someone_else"))
        .await
        .unwrap();
    let (_, q2) = quote(second.clone()).await;
    assert_eq!(q2["token_symbol"], sym(&second)[1], "{q2}");
    let b = post(&api, Some(&token), request(&second), &[]).await;
    assert_eq!(b.status, 202, "{}", b.body);
    let symbols: HashMap<String, String> = stack
        .client
        .hgetall("hokusai:deployer:symbols")
        .await
        .unwrap();
    assert_eq!(symbols.get(&sym(&first)[0]), Some(&first), "{symbols:?}");
    assert_eq!(symbols.get(&sym(&second)[1]), Some(&second), "{symbols:?}");
    assert_ne!(sym(&first)[0], sym(&second)[1]);
}
