//! Redis over TLS with ACL users (issue 8): a real redis-server with `--tls-port`, client
//! certificates required, and the ACL file `hokusai-deployer redis-acl` writes. A deployment
//! runs through it as `hokusai-worker`; the CLI needs credentials and a viewer cannot write.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fred::prelude::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::api;
use crate::cli::run;
use crate::harness::{Stack, StackOpts};
use crate::pipeline::sample_deployed_by;

/// PEM files of a private CA, a server certificate for localhost and a client certificate.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str, secret: bool) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    if secret {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

fn pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hokusai test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["hokusai-worker".into()]);
    Pki {
        ca: write(dir, "ca.pem", &ca.pem(), false),
        server_cert: write(dir, "server.pem", &server_cert, false),
        server_key: write(dir, "server.key", &server_key, true),
        client_cert: write(dir, "client.pem", &client_cert, false),
        client_key: write(dir, "client.key", &client_key, true),
    }
}

fn password(user: &str) -> String {
    format!("{user}-pw-0123456789abcdef")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_runs_over_tls_as_acl_users_and_the_cli_needs_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());

    // The ACL file comes from the binary itself.
    let out = run(
        &["redis-acl"],
        &[
            ("HOKUSAI_ACL_WORKER_PASSWORD", &password("hokusai-worker")),
            (
                "HOKUSAI_ACL_OPERATOR_PASSWORD",
                &password("hokusai-operator"),
            ),
            ("HOKUSAI_ACL_VIEWER_PASSWORD", &password("hokusai-viewer")),
            ("HOKUSAI_ACL_API_PASSWORD", &password("hokusai-api")),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let acl = String::from_utf8(out.stdout).unwrap();
    assert!(!acl.contains("-pw-"), "no clear-text password in the file");
    let acl_path = write(dir.path(), "users.acl", &acl, true);

    let port = hokusai_deployer::localstack::free_port();
    let port_s = port.to_string();
    let p = |path: &PathBuf| path.display().to_string();
    let (ca, cert, key) = (p(&pki.ca), p(&pki.client_cert), p(&pki.client_key));
    let url = |user: &str| format!("rediss://{user}:{}@localhost:{port}", password(user));
    let operator_url = url("hokusai-operator");
    let tls_env = [
        ("HOKUSAI__REDIS__TLS_CA_FILE", ca.as_str()),
        ("HOKUSAI__REDIS__TLS_CERT_FILE", cert.as_str()),
        ("HOKUSAI__REDIS__TLS_KEY_FILE", key.as_str()),
    ];
    let mut operator_env = vec![("HOKUSAI__REDIS__URL", operator_url.as_str())];
    operator_env.extend_from_slice(&tls_env);
    let stack = Stack::start_with(StackOpts {
        redis_port: Some(port),
        redis_args: &[
            "--port",
            "0",
            "--tls-port",
            &port_s,
            "--tls-cert-file",
            &p(&pki.server_cert),
            "--tls-key-file",
            &p(&pki.server_key),
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
            "--aclfile",
            &p(&acl_path),
        ],
        // The harness itself (pushing, reading events) is an operator.
        redis_env: &operator_env,
        ..Default::default()
    })
    .await;

    // A worker process as hokusai-worker over TLS deploys the sample and publishes its event.
    let worker_url = url("hokusai-worker");
    let daemon = stack.daemon("tls-worker", &[("HOKUSAI__REDIS__URL", &worker_url)], &[]);
    let (_, ready) = daemon
        .until("/health/ready", "ready over TLS", |s, _| s == 200)
        .await;
    assert_eq!(ready["components"]["redis"]["status"], "up", "{ready}");
    sample_deployed_by(&stack, stack.boot.deployer).await;
    let health = daemon.get("/health/detailed").await.1;
    let log = std::fs::read_to_string(crate::harness::log_path("tls-worker")).unwrap();
    let client_key = std::fs::read_to_string(&pki.client_key).unwrap();
    let key_body = client_key.lines().nth(1).unwrap();
    for (what, text) in [("health", &health), ("log", &log)] {
        assert!(
            !text.contains(&password("hokusai-worker")) && !text.contains(key_body),
            "the {what} hides the Redis password and TLS key: {text}"
        );
    }

    // The worker's user reaches nothing outside the service's keys and no dangerous command.
    let worker =
        hokusai_deployer::queue::client(&stack.settings(&[("HOKUSAI__REDIS__URL", &worker_url)]))
            .unwrap();
    worker.init().await.unwrap();
    let foreign: Result<Option<String>, _> = worker.get("other-app:secret").await;
    let e = foreign.expect_err("a key outside the namespace is refused");
    assert!(e.to_string().contains("NOPERM"), "{e}");
    let flush: Result<(), _> = worker.flushall(false).await;
    assert!(flush.unwrap_err().to_string().contains("NOPERM"));
    let _ = worker.quit().await;

    // The CLI: no credentials, a viewer, an operator.
    let cli = |user: Option<&str>, args: &[&str]| {
        let u = match user {
            Some(u) => url(u),
            None => format!("rediss://localhost:{port}"),
        };
        let mut env = vec![("HOKUSAI__REDIS__URL", u.as_str()), ("USER", "alice")];
        env.extend_from_slice(&tls_env);
        run(args, &env)
    };
    let anonymous = cli(None, &["queue", "stats"]);
    assert!(!anonymous.status.success());
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(err.contains("NOAUTH") || err.contains("NOPERM"), "{err}");

    let stats = cli(Some("hokusai-viewer"), &["queue", "stats", "--json"]);
    assert!(stats.status.success(), "{stats:?}");
    let viewer_pause = cli(Some("hokusai-viewer"), &["pause", "--reason", "try"]);
    assert!(!viewer_pause.status.success(), "a viewer cannot pause");
    let err = String::from_utf8_lossy(&viewer_pause.stderr);
    assert!(err.contains("NOPERM"), "{err}");

    let pause = cli(Some("hokusai-operator"), &["pause", "--reason", "tls test"]);
    assert!(pause.status.success(), "{pause:?}");
    let audit = cli(
        Some("hokusai-viewer"),
        &["audit", "tail", "--json", "-n", "1"],
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&audit.stdout).trim()).unwrap();
    let entry = &line["fields"];
    assert_eq!(entry["action"], "paused", "{line}");
    assert_eq!(entry["actor"], "operator:alice");
    assert_eq!(
        entry["redis_user"], "hokusai-operator",
        "who Redis authenticated"
    );

    // The API user cannot touch dead letters, but the API queues a deployment as it, which the
    // worker completes.
    let api_dlq = cli(Some("hokusai-api"), &["dlq", "list"]);
    let err = String::from_utf8_lossy(&api_dlq.stderr);
    assert!(err.contains("NOPERM"), "{err}");
    assert!(cli(Some("hokusai-operator"), &["resume"]).status.success());
    let model = api::seed_model(&api::unique("tls_api"), true).await;
    let api_url = url("hokusai-api");
    let api = stack.api(
        "tls-api",
        api::mlflow().await,
        &[("HOKUSAI__REDIS__URL", &api_url)],
    );
    api::ready(&api).await;
    let token = api::jwt(api::OWNER, api::OWNER_ADDRESS);
    let a = api::post(&api, Some(&token), api::request(&model), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["deployment_id"].as_str().unwrap();
    let s = api::until_status(&api, &token, id, |v| v["status"] == "completed").await;
    assert_eq!(s["model_id"], model.as_str());
    // Its metrics say Redis is up, and report only the depths its user may read.
    let (code, metrics) = api.get_ops("/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("\nhokusai_redis_up 1\n"), "{metrics}");
    assert!(
        metrics.contains(r#"hokusai_queue_depth{queue="inbound"} 0"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"queue="dlq""#), "{metrics}");

    // TLS is enforced: a client without a certificate is turned away by the server.
    let no_cert = run(
        &["queue", "stats"],
        &[
            ("HOKUSAI__REDIS__URL", &operator_url),
            ("HOKUSAI__REDIS__TLS_CA_FILE", &ca),
        ],
    );
    assert!(!no_cert.status.success(), "{no_cert:?}");
}
