//! The binary as a user meets it: help, configuration errors, and the quick start itself.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_hokusai-deployer");

/// Runs the binary with only `PATH` and `env` in its environment.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the binary runs")
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["api", "--help"],
        vec!["healthcheck", "--help"],
        vec!["contracts", "--help"],
        vec!["contracts", "deploy", "--help"],
        vec!["local", "--help"],
        vec!["push", "--help"],
        vec!["check-config", "--help"],
        vec!["dlq", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "show", "--help"],
        vec!["dlq", "requeue", "--help"],
        vec!["dlq", "purge", "--help"],
        vec!["queue", "--help"],
        vec!["queue", "stats", "--help"],
        vec!["pause", "--help"],
        vec!["resume", "--help"],
        vec!["audit", "--help"],
        vec!["audit", "tail", "--help"],
        vec!["events", "--help"],
        vec!["events", "replay", "--help"],
        vec!["redis-acl", "--help"],
    ] {
        let out = run(&args, &[]);
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn healthcheck_fails_when_nothing_answers() {
    let port = hokusai_deployer::localstack::free_port().to_string();
    let out = run(
        &["healthcheck"],
        &[
            ("HOKUSAI__OPS__PORT", port.as_str()),
            ("HOKUSAI__API__PORT", port.as_str()),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
}

#[test]
fn check_config_names_the_bad_key_and_hides_secrets() {
    let out = run(
        &["check-config"],
        &[("HOKUSAI__PIPELINE__CONCURRENCY", "0")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pipeline.concurrency"));

    let out = run(
        &["check-config"],
        &[
            (
                "DEPLOYER_PRIVATE_KEY",
                hokusai_deployer::localstack::ANVIL_DEV_KEY,
            ),
            (
                "HOKUSAI__REDIS__URL",
                "redis://app:s3cr3t-pass@localhost:6379",
            ),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deployer key: configured"));
    assert!(!text.contains("s3cr3t-pass"), "{text}");
    assert!(
        !text.contains(&hokusai_deployer::localstack::ANVIL_DEV_KEY[2..]),
        "{text}"
    );
}

#[test]
fn run_refuses_to_start_without_contract_addresses() {
    let out = run(
        &["run"],
        &[(
            "DEPLOYER_PRIVATE_KEY",
            hokusai_deployer::localstack::ANVIL_DEV_KEY,
        )],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain.model_registry_address"));
}

#[test]
fn unusable_redis_tls_files_are_named_before_anything_connects() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let key = dir.path().join("client.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (missing, not_pem, key) = (
        dir.path().join("missing.pem").display().to_string(),
        not_pem.display().to_string(),
        key.display().to_string(),
    );
    let url = ("HOKUSAI__REDIS__URL", "rediss://hokusai-viewer@127.0.0.1:1");
    for (env, expect) in [
        (
            vec![url, ("HOKUSAI__REDIS__TLS_CA_FILE", missing.as_str())],
            "redis.tls_ca_file",
        ),
        (
            vec![url, ("HOKUSAI__REDIS__TLS_CA_FILE", not_pem.as_str())],
            "no PEM certificate",
        ),
        (
            vec![
                url,
                ("HOKUSAI__REDIS__TLS_CERT_FILE", not_pem.as_str()),
                ("HOKUSAI__REDIS__TLS_KEY_FILE", key.as_str()),
            ],
            "accessible to every user",
        ),
    ] {
        let out = run(&["queue", "stats"], &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?}");
        assert!(err.contains(expect), "{expect} in: {err}");
    }
}

/// The README's first command, minus the serving: a fresh local stack processes the sample.
#[test]
fn quick_start_processes_the_sample_message() {
    let out = Command::new(BIN)
        .args(["local", "--once"])
        .env("HOKUSAI__LOG__LEVEL", "warn")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is the event");
    assert_eq!(event["event_type"], "token_deployed");
    assert_eq!(event["model_id"], "model_7");
    assert_eq!(event["token_symbol"], "MSG-AI");
}
