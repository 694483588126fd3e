//! Deployer keys in AWS KMS (`--features aws-kms`): a worker process with no private key signs
//! through alloy's AWS signer and the AWS SDK, and deploys on anvil.
//!
//! KMS itself is the one mock here: AWS cannot be reached from CI, and the only local KMS
//! emulator (moto) ignores `MessageType: DIGEST` and signs the SHA-256 of the base64 text, so
//! its signatures can never recover an Ethereum address. This stand-in speaks KMS's JSON 1.1
//! protocol for the two calls the signer makes (`GetPublicKey`, `Sign`) with a secp256k1 key,
//! and checks what a real KMS would: the digest type, the algorithm, a SigV4-signed request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use alloy::providers::Provider;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use k256::ecdsa::{signature::hazmat::PrehashSigner, Signature, SigningKey};
use k256::pkcs8::EncodePublicKey;
use serde_json::{json, Value};

use crate::harness::{Stack, OTHER_KEY};
use crate::pipeline::sample_deployed_by;

const KEY_ID: &str = "arn:aws:kms:us-east-1:000000000000:key/hokusai-test";

#[derive(Clone)]
struct FakeKms {
    key: SigningKey,
    /// Every request: (X-Amz-Target, Authorization header, body).
    seen: Arc<Mutex<Vec<(String, String, Value)>>>,
    /// How many `Sign` calls still fail with a 500 (KMS's own internal error).
    failing_signs: Arc<AtomicUsize>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

async fn kms(
    State(k): State<FakeKms>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    k.seen
        .lock()
        .unwrap()
        .push((target.clone(), auth, req.clone()));
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        "application/x-amz-json-1.1".parse().unwrap(),
    );
    let fail = |msg: &str| {
        let body = json!({ "__type": "ValidationException", "message": msg }).to_string();
        (StatusCode::BAD_REQUEST, body)
    };
    let (status, body) = if req["KeyId"] != KEY_ID {
        (
            StatusCode::BAD_REQUEST,
            json!({ "__type": "NotFoundException", "message": "no such key" }).to_string(),
        )
    } else if target == "TrentService.GetPublicKey" {
        let der = k.key.verifying_key().to_public_key_der().unwrap();
        let body = json!({
            "KeyId": KEY_ID,
            "PublicKey": b64().encode(der.as_bytes()),
            "KeySpec": "ECC_SECG_P256K1",
            "KeyUsage": "SIGN_VERIFY",
            "SigningAlgorithms": ["ECDSA_SHA_256"],
        });
        (StatusCode::OK, body.to_string())
    } else if target == "TrentService.Sign"
        && k.failing_signs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        let body = json!({ "__type": "KMSInternalException", "message": "try again" });
        (StatusCode::INTERNAL_SERVER_ERROR, body.to_string())
    } else if target == "TrentService.Sign" {
        let digest = b64()
            .decode(req["Message"].as_str().unwrap_or(""))
            .unwrap_or_default();
        if req["MessageType"] != "DIGEST" || req["SigningAlgorithm"] != "ECDSA_SHA_256" {
            fail("expected MessageType DIGEST and ECDSA_SHA_256")
        } else if digest.len() != 32 {
            fail("a DIGEST message is 32 bytes")
        } else {
            let sig: Signature = k.key.sign_prehash(&digest).unwrap();
            let body = json!({
                "KeyId": KEY_ID,
                "Signature": b64().encode(sig.to_der().as_bytes()),
                "SigningAlgorithm": "ECDSA_SHA_256",
            });
            (StatusCode::OK, body.to_string())
        }
    } else {
        fail("unsupported operation")
    };
    (status, h, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_key_is_in_kms_signs_only_through_kms_and_rides_out_its_errors() {
    let stack = Stack::start().await;
    // The KMS key is anvil's second development key: funded, and a registrar of the test
    // registry. The worker gets no private key at all.
    let key_bytes = alloy::hex::decode(OTHER_KEY).unwrap();
    let fake = FakeKms {
        key: SigningKey::from_slice(&key_bytes).unwrap(),
        seen: Arc::default(),
        // More than the AWS SDK's own three attempts: one signing fails at our level and the
        // worker's retry must carry the message through, with nothing dead-lettered.
        failing_signs: Arc::new(AtomicUsize::new(4)),
    };
    let kms_address = alloy::signers::utils::public_key_to_address(fake.key.verifying_key());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/", post(kms))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let daemon = stack.daemon(
        "kms-worker",
        &[
            ("HOKUSAI__CHAIN__PRIVATE_KEY", ""),
            ("HOKUSAI__CHAIN__AWS_KMS_KEY_IDS", KEY_ID),
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "AKIDHOKUSAITEST"),
            ("AWS_SECRET_ACCESS_KEY", "hokusai-test-secret"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        &[],
    );
    let (_, ready) = daemon
        .until("/health/ready", "ready with the KMS key", |s, _| s == 200)
        .await;
    assert_eq!(
        ready["components"]["worker"]["signer"]
            .as_str()
            .map(str::to_lowercase),
        Some(kms_address.to_string().to_lowercase()),
        "{ready}"
    );

    let event = sample_deployed_by(&stack, kms_address).await;
    for step in ["transaction_hash", "registry_transaction_hash"] {
        let hash = event[step].as_str().unwrap().parse().unwrap();
        let tx = stack
            .provider()
            .get_transaction_by_hash(hash)
            .await
            .unwrap()
            .expect("the transaction is on chain");
        assert_eq!(
            tx.inner.signer(),
            kms_address,
            "{step} signed by the KMS key"
        );
    }

    assert_eq!(stack.len("hokusai:model_ready_queue:dlq").await, 0);
    let metrics = daemon.get("/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hokusai_retries_total{") && l.contains("SIGNER_UNAVAILABLE")),
        "a KMS outage is a retry with its own code: {metrics}"
    );

    let seen = fake.seen.lock().unwrap().clone();
    let signs: Vec<_> = seen
        .iter()
        .filter(|(t, _, _)| t == "TrentService.Sign")
        .collect();
    assert!(
        signs.len() > 4,
        "one Sign per transaction, plus the failed ones: {seen:?}"
    );
    assert!(seen
        .iter()
        .any(|(t, _, _)| t == "TrentService.GetPublicKey"));
    for (_, auth, _) in &seen {
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDHOKUSAITEST/"),
            "SigV4-signed: {auth}"
        );
    }
}
