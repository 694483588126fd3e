//! The configuration's own tests: layers, secrets, errors that name their key.

use super::*;

#[test]
fn cluster_mode_refuses_keys_in_different_slots_and_names_the_tag() {
    let load = |env: &[(&str, &str)]| {
        Settings::load(Sources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    };
    let Err(e) = load(&[("HOKUSAI__REDIS__MODE", "cluster")]) else {
        panic!("the default names map to different slots");
    };
    let e = e.to_string();
    assert!(e.contains("configuration key `queues`"), "{e}");
    assert!(
        e.contains("queues.inbound") && e.contains("queues.state_prefix"),
        "{e}"
    );
    assert!(e.contains("{hokusai}:model_ready_queue"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    let tagged = [
        ("HOKUSAI__REDIS__URL", "redis-cluster://127.0.0.1:7000"),
        ("HOKUSAI__QUEUES__INBOUND", "{hokusai}:model_ready_queue"),
        (
            "HOKUSAI__QUEUES__PROCESSING",
            "{hokusai}:model_ready_queue:processing",
        ),
        ("HOKUSAI__QUEUES__DLQ", "{hokusai}:model_ready_queue:dlq"),
        (
            "HOKUSAI__QUEUES__OUTBOUND",
            "{hokusai}:token_deployed_queue",
        ),
        (
            "HOKUSAI__QUEUES__FAILURES",
            "{hokusai}:deployment_failed_queue",
        ),
        ("HOKUSAI__QUEUES__STATE_PREFIX", "{hokusai}:deployer"),
    ];
    let s = load(&tagged).expect("one tag, one slot");
    assert_eq!(s.redis.mode(), RedisMode::Cluster, "from the URL's scheme");
    // Standalone Redis does not care.
    assert!(load(&[]).is_ok());
    let e = load(&[("HOKUSAI__REDIS__MODE", "sentinel")])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("redis.sentinel_addresses"), "{e}");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(&path, format!("{}\n", crate::localstack::ANVIL_DEV_KEY)).unwrap();
    let p = path.to_str().unwrap();
    for (mode, ok) in [
        (0o600, true),
        (0o400, true),
        (0o640, true),
        (0o644, false),
        (0o606, false),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let s = load(&[("HOKUSAI__CHAIN__PRIVATE_KEY_FILE", p)]).unwrap();
        let r = s.private_keys();
        assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains("chain.private_key_file"), "{e}");
        }
    }
}

fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(Sources {
        file: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

#[test]
fn defaults_are_the_seed_queue_names() {
    let s = load(&[]).unwrap();
    assert_eq!(s.queues.inbound, "hokusai:model_ready_queue");
    assert_eq!(s.queues.processing, "hokusai:model_ready_queue:processing");
    assert_eq!(s.queues.dlq, "hokusai:model_ready_queue:dlq");
    assert_eq!(s.queues.outbound, "hokusai:token_deployed_queue");
}

#[test]
fn hokusai_variables_override_seed_aliases() {
    let s = load(&[
        ("REDIS_URL", "redis://alias:1"),
        ("HOKUSAI__REDIS__URL", "redis://direct:2"),
        ("WEB3_PROVIDER_URL", "http://a:1,http://b:2"),
        ("HOKUSAI__PIPELINE__CONCURRENCY", "7"),
    ])
    .unwrap();
    assert_eq!(s.redis.url, "redis://direct:2");
    assert_eq!(s.chain.rpc_urls, vec!["http://a:1", "http://b:2"]);
    assert_eq!(s.pipeline.concurrency, 7);
}

#[test]
fn errors_name_the_key() {
    let e = load(&[("HOKUSAI__PIPELINE__CONCURRENCY", "0")]).unwrap_err();
    assert!(e.to_string().contains("pipeline.concurrency"), "{e}");
    let e = load(&[("HOKUSAI__CHAIN__RPC_URLS", "ws://x")]).unwrap_err();
    assert!(e.to_string().contains("chain.rpc_urls"), "{e}");
    let s = load(&[]).unwrap();
    let e = s.contract_addresses().unwrap_err();
    assert!(
        e.to_string().contains("chain.model_registry_address"),
        "{e}"
    );
}

#[test]
fn key_in_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[chain]\nprivate_key = \"0xabc\"\n").unwrap();
    let e = Settings::load(Sources {
        file: Some(&p),
        env: vec![],
    })
    .unwrap_err();
    assert!(e.to_string().contains("chain.private_key"), "{e}");
}

#[test]
fn secrets_and_url_credentials_never_print() {
    let s = load(&[
        ("HOKUSAI__CHAIN__PRIVATE_KEY", "0xdeadbeefsecret"),
        ("HOKUSAI__REDIS__URL", "redis://user:hunter2@h:6379"),
        (
            "HOKUSAI__CHAIN__RPC_URLS",
            "https://mainnet.infura.io/v3/abcdef0123456789abcdef",
        ),
    ])
    .unwrap();
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("deadbeefsecret"));
    let json = serde_json::to_string(&s).unwrap();
    for secret in ["deadbeefsecret", "hunter2", "abcdef0123456789abcdef"] {
        assert!(!json.contains(secret), "{secret} leaked in {json}");
    }
}

#[test]
fn a_blank_secret_is_unset() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "0x01\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = file.display().to_string();
    let s = load(&[
        ("DEPLOYER_PRIVATE_KEY", " "),
        ("HOKUSAI__CHAIN__PRIVATE_KEY_FILE", &path),
        ("REDIS_PASSWORD", ""),
        ("JWT_SECRET", ""),
    ])
    .unwrap();
    assert_eq!(s.private_keys().unwrap().len(), 1, "the file's key");
    assert!(s.redis.password.is_none() && s.api.jwt.secret.is_none());
}

#[test]
#[cfg(not(feature = "aws-kms"))]
fn kms_keys_need_the_aws_kms_build() {
    let e = load(&[("HOKUSAI__CHAIN__AWS_KMS_KEY_IDS", "alias/hokusai-a")]).unwrap_err();
    assert!(e.to_string().contains("--features aws-kms"), "{e}");
}

#[test]
#[cfg(feature = "aws-kms")]
fn kms_keys_replace_private_keys_and_never_mix_with_them() {
    let s = load(&[(
        "HOKUSAI__CHAIN__AWS_KMS_KEY_IDS",
        "alias/hokusai-a,arn:aws:kms:eu-west-1:1:key/b",
    )])
    .unwrap();
    let keys = s.deployer_keys().unwrap();
    assert!(
        matches!(&keys[..], [DeployerKey::AwsKms(a), DeployerKey::AwsKms(b)]
            if a == "alias/hokusai-a" && b.ends_with("key/b")),
        "{keys:?}"
    );
    let e = load(&[
        ("HOKUSAI__CHAIN__AWS_KMS_KEY_IDS", "alias/hokusai-a"),
        ("DEPLOYER_PRIVATE_KEY", "0x01"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("not both"), "{e}");
}

#[test]
fn redis_tls_files_need_rediss_and_come_in_pairs() {
    let e = load(&[("HOKUSAI__REDIS__TLS_CA_FILE", "/ca.pem")]).unwrap_err();
    assert!(e.to_string().contains("redis.tls_ca_file"), "{e}");
    assert!(e.to_string().contains("rediss://"), "{e}");
    let e = load(&[
        ("HOKUSAI__REDIS__URL", "rediss://u@h:6380"),
        ("HOKUSAI__REDIS__TLS_CERT_FILE", "/c.pem"),
    ])
    .unwrap_err();
    assert!(e.to_string().contains("tls_key_file"), "{e}");
    let s = load(&[
        ("REDIS_URL", "rediss://hokusai-worker@h:6380"),
        ("REDIS_PASSWORD", "hunter2-hunter2-hunter2"),
    ])
    .unwrap();
    assert_eq!(
        s.redis.password.unwrap().expose(),
        "hunter2-hunter2-hunter2"
    );
}

#[test]
fn webhook_secrets_come_from_the_environment_only_and_rotate_in_pairs() {
    const A: &str = "inbound-secret-a-0123456789abcdef0123";
    const B: &str = "inbound-secret-b-0123456789abcdef0123";
    let s = load(&[]).unwrap();
    assert!(s.webhooks.inbound_secrets().is_empty(), "off by default");
    assert_eq!(s.webhooks.idempotency_ttl_secs, 86_400);
    let s = load(&[
        ("HOKUSAI__WEBHOOKS__INBOUND_SECRET", A),
        ("HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS", B),
    ])
    .unwrap();
    let secrets: Vec<&str> = s
        .webhooks
        .inbound_secrets()
        .iter()
        .map(|s| s.expose())
        .collect();
    assert_eq!(secrets, [A, B]);
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains(A) && !json.contains(B), "{json}");
    assert!(!format!("{s:?}").contains(A));

    let e = load(&[("HOKUSAI__WEBHOOKS__INBOUND_SECRET", "short")]).unwrap_err();
    assert!(e.to_string().contains("webhooks.inbound_secret"), "{e}");
    let e = load(&[("HOKUSAI__WEBHOOKS__INBOUND_SECRET_PREVIOUS", B)]).unwrap_err();
    assert!(
        e.to_string().contains("webhooks.inbound_secret_previous"),
        "{e}"
    );
    let e = load(&[("HOKUSAI__WEBHOOKS__IDEMPOTENCY_TTL_SECS", "99999999")]).unwrap_err();
    assert!(
        e.to_string().contains("webhooks.idempotency_ttl_secs"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, format!("[webhooks]\ninbound_secret = \"{A}\"\n")).unwrap();
    let e = Settings::load(Sources {
        file: Some(&p),
        env: vec![],
    })
    .unwrap_err();
    assert!(e.to_string().contains("webhooks.inbound_secret"), "{e}");
    assert!(!e.to_string().contains(A), "{e}");
    std::fs::write(&p, "[webhooks]\nidempotency_ttl_secs = 3600\n").unwrap();
    let s = Settings::load(Sources {
        file: Some(&p),
        env: vec![],
    })
    .unwrap();
    assert_eq!(s.webhooks.idempotency_ttl_secs, 3600);
}

#[test]
fn unknown_chain_is_named_by_id() {
    let s = load(&[]).unwrap();
    assert_eq!(s.network(137).name, "polygon");
    assert_eq!(s.network(999).name, "chain-999");
}
