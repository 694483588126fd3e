//! A real stack per test: redis-server and anvil on free ports, contracts bootstrapped, the
//! worker running in-process (or as a child process), plus helpers to read chain and queues.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::Provider;
use alloy::sol_types::SolEvent;
use fred::prelude::*;
use hokusai_deployer::chain::{self, Bootstrap};
use hokusai_deployer::config::{Secret, Settings, Sources};
use hokusai_deployer::localstack::{self, Service, ANVIL_DEV_KEY};
use hokusai_deployer::pipeline::{self, RunOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for an event that should come in well under a second on anvil.
pub const EVENT_WAIT_SECS: f64 = 60.0;

/// anvil's second development account (public test key), authorised as a second registrar.
pub const OTHER_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

pub struct Stack {
    pub redis: Service,
    pub anvil: Service,
    pub boot: Bootstrap,
    pub client: Client,
    redis_args: Vec<String>,
    /// Settings every Redis client of this stack gets (harness and daemons), before extras.
    redis_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

/// What a test needs beyond the defaults.
#[derive(Default)]
pub struct StackOpts<'a> {
    pub anvil_args: &'a [&'a str],
    pub redis_args: &'a [&'a str],
    /// Start Redis on this port (a test that must name it in `redis_args`, e.g. `--tls-port`).
    pub redis_port: Option<u16>,
    /// How every client reaches this Redis when a plain `redis://` URL won't do: a
    /// `rediss://` URL with a user, TLS files.
    pub redis_env: &'a [(&'a str, &'a str)],
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(StackOpts::default()).await
    }

    pub async fn start_with(opts: StackOpts<'_>) -> Stack {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = opts.redis_port.unwrap_or_else(localstack::free_port);
        let redis = localstack::redis_on(dir.path(), port, opts.redis_args)
            .await
            .expect("redis-server must start (make tools)");
        let redis_env: Vec<(String, String)> = opts
            .redis_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let anvil = localstack::anvil(opts.anvil_args)
            .await
            .expect("anvil must start (make tools)");
        let base = settings_for(&redis.url("redis"), &anvil.url("http"), None, &[]);
        let other = chain::signer(&Secret::new(OTHER_KEY)).unwrap().address();
        let boot = chain::bootstrap(
            &base,
            &Secret::new(ANVIL_DEV_KEY),
            &[other],
            chain::contracts::NO_NAMESPACE,
        )
        .await
        .expect("contracts deploy on a fresh anvil");
        let as_str: Vec<(&str, &str)> = redis_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let admin = settings_for(&redis.url("redis"), &anvil.url("http"), None, &as_str);
        let client = hokusai_deployer::queue::client(&admin).expect("client");
        client.init().await.expect("redis answers");
        Stack {
            redis,
            anvil,
            boot,
            client,
            redis_args: opts.redis_args.iter().map(|a| a.to_string()).collect(),
            redis_env,
            dir,
        }
    }

    /// SIGKILLs redis-server and starts it again on the same port and data directory.
    pub async fn restart_redis(&mut self) {
        self.stop_redis().await;
        self.start_redis().await;
    }

    /// SIGKILLs redis-server (a crash, not a shutdown).
    pub async fn stop_redis(&mut self) {
        self.redis.kill().await;
    }

    /// Starts redis-server again on its port and data directory.
    pub async fn start_redis(&mut self) {
        let args: Vec<&str> = self.redis_args.iter().map(String::as_str).collect();
        self.redis = localstack::redis_on(self.dir.path(), self.redis.port, &args)
            .await
            .expect("redis-server restarts on its port");
    }

    /// The environment a daemon child process gets for this stack.
    pub fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        env_for(
            &self.redis.url("redis"),
            &self.anvil.url("http"),
            Some(&self.boot),
            &self.with_redis_env(extra),
        )
    }

    /// The stack's Redis settings, then `extra` (which wins).
    fn with_redis_env<'s>(&'s self, extra: &[(&'s str, &'s str)]) -> Vec<(&'s str, &'s str)> {
        let mut all: Vec<(&str, &str)> = self
            .redis_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(extra);
        all
    }

    /// Starts `hokusai-deployer run` as a child process; its log is appended to
    /// `<tmp>/<name>.log` and its ops server listens on a free port.
    pub fn daemon(&self, name: &str, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Daemon {
        self.daemon_with(name, extra_env, extra_args, false)
    }

    /// Like [`Stack::daemon`]; with `pid1` the binary runs as PID 1 of a new PID namespace
    /// (`unshare --pid --fork`), as in a container without an init: the kernel then drops
    /// every signal the process has no handler for.
    pub fn daemon_with(
        &self,
        name: &str,
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
        pid1: bool,
    ) -> Daemon {
        self.spawn("run", "HOKUSAI__OPS", name, extra_env, extra_args, pid1)
    }

    /// Starts `hokusai-deployer api` on a free port; its `ops_port` is the API's port (which
    /// serves `/health` too). The API reads models from `mlflow`.
    pub fn api(&self, name: &str, mlflow: &str, extra_env: &[(&str, &str)]) -> Daemon {
        let mut env: Vec<(&str, &str)> = vec![
            // Tests poll status fast; the per-user read limit has a test of its own.
            ("HOKUSAI__API__LIMITS__STATUS_PER_MINUTE", "100000"),
            ("HOKUSAI__API__MLFLOW__URL", mlflow),
            ("HOKUSAI__API__JWT__SECRET", crate::api::JWT_SECRET),
            ("HOKUSAI__API__JWT__AUDIENCE", "hokusai-deployer"),
            ("HOKUSAI__API__JWT__ISSUER", "https://hokus.ai"),
        ];
        env.extend_from_slice(extra_env);
        self.spawn("api", "HOKUSAI__API", name, &env, &[], false)
    }

    fn spawn(
        &self,
        subcommand: &str,
        port_section: &str,
        name: &str,
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
        pid1: bool,
    ) -> Daemon {
        let ops_port = localstack::free_port();
        // The API's own ops listener (/health/detailed, /metrics); a worker's is `ops_port`.
        let metrics_port = if port_section == "HOKUSAI__OPS" {
            ops_port
        } else {
            localstack::free_port()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(name))
            .expect("log file");
        let bin = env!("CARGO_BIN_EXE_hokusai-deployer");
        let mut cmd = if pid1 {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child", bin]);
            c
        } else {
            tokio::process::Command::new(bin)
        };
        cmd.arg(subcommand)
            .args(extra_args)
            .env_clear()
            .envs(self.env(extra_env))
            .env("HOKUSAI__LOG__FORMAT", "json")
            .env("HOKUSAI__LOG__LEVEL", "info")
            .env(format!("{port_section}__PORT"), ops_port.to_string())
            .env(format!("{port_section}__BIND"), "127.0.0.1")
            .env("HOKUSAI__OPS__PORT", metrics_port.to_string())
            .env("HOKUSAI__OPS__BIND", "127.0.0.1")
            .stdout(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log_path(name).with_extension("out"))
                    .expect("stdout file"),
            )
            .stderr(log)
            .kill_on_drop(true);
        Daemon {
            child: cmd.spawn().expect("the binary starts"),
            ops_port,
            metrics_port,
            pid1,
        }
    }

    /// Settings pointing at this stack, with test-friendly timings and the given overrides.
    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        self.settings_with_rpc(&self.anvil.url("http"), extra)
    }

    pub fn settings_with_rpc(&self, rpc: &str, extra: &[(&str, &str)]) -> Settings {
        settings_for(
            &self.redis.url("redis"),
            rpc,
            Some(&self.boot),
            &self.with_redis_env(extra),
        )
    }

    pub fn worker(&self, extra: &[(&str, &str)]) -> Worker {
        Worker::start(self.settings(extra), RunOptions::default())
    }

    pub async fn push(&self, raw: &str) {
        let _: u64 = self
            .client
            .lpush("hokusai:model_ready_queue", raw)
            .await
            .expect("lpush");
    }

    /// Waits for the next item of a list: a real blocking pop, in slices shorter than the
    /// client's command timeout, retried across a Redis restart, until `EVENT_WAIT_SECS`.
    pub async fn next(&self, list: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(EVENT_WAIT_SECS);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing arrived on {list} within {EVENT_WAIT_SECS} s"
            );
            match self
                .client
                .brpop::<Option<(String, String)>, _>(list, 2.0)
                .await
            {
                Ok(Some((_, v))) => return v,
                Ok(None) => {}
                // fred reports an empty BRPOP as a timeout; a restarting Redis as other errors.
                Err(e) if *e.kind() == fred::error::ErrorKind::Timeout => {}
                Err(_) => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        self.client.wait_for_connect(),
                    )
                    .await;
                }
            }
        }
    }

    /// Lengths of these lists read in one transaction: an atomic snapshot, so a message moving
    /// between two of them is never missed.
    pub async fn lens(&self, lists: &[&str]) -> Vec<u64> {
        let tx = self.client.multi();
        for l in lists {
            let _: () = tx.llen(*l).await.expect("queued");
        }
        tx.exec(true).await.expect("exec")
    }

    pub async fn next_json(&self, list: &str) -> serde_json::Value {
        serde_json::from_str(&self.next(list).await).expect("list items are JSON")
    }

    pub async fn len(&self, list: &str) -> u64 {
        self.client.llen(list).await.expect("llen")
    }

    pub fn provider(&self) -> alloy::providers::DynProvider {
        chain::provider(&self.settings(&[])).expect("provider")
    }

    /// Tokens created by the dev account, counted on chain: the ground truth for "one token
    /// per model" (registry entries alone would hide an orphan token).
    pub async fn creations(&self) -> usize {
        self.creations_by(&[ANVIL_DEV_KEY]).await
    }

    /// Tokens created by transactions of any of these keys: the manager's `TokenDeployed`
    /// events in their successful transactions, plus any contract they created themselves
    /// beyond the bootstrap's three (an orphan token).
    pub async fn creations_by(&self, keys: &[&str]) -> usize {
        let (mut created, mut creates) = (0, 0);
        for (tx, receipt) in self.transactions_by(keys).await {
            use alloy::consensus::Transaction;
            if tx.inner.kind().is_create() {
                creates += 1;
            }
            created += receipt
                .inner
                .logs()
                .iter()
                .filter(|l| {
                    l.address() == self.boot.token_manager
                        && l.topics().first()
                            == Some(&chain::TokenManager::TokenDeployed::SIGNATURE_HASH)
                })
                .count();
        }
        // The implementation, the registry and the manager are the bootstrap's creations.
        let bootstrap = if keys.contains(&ANVIL_DEV_KEY) { 3 } else { 0 };
        created + creates - bootstrap
    }

    /// Transactions of these keys that reverted, and the gas they burnt: a duplicate
    /// `deployToken` the chain refused is wasted money.
    pub async fn wasted_by(&self, keys: &[&str]) -> (usize, u64) {
        let mut n = 0;
        let mut gas = 0;
        for (_, receipt) in self.transactions_by(keys).await {
            if !receipt.status() {
                n += 1;
                gas += receipt.gas_used;
            }
        }
        (n, gas)
    }

    /// Every mined transaction sent by one of these keys, with its receipt.
    async fn transactions_by(
        &self,
        keys: &[&str],
    ) -> Vec<(
        alloy::rpc::types::Transaction,
        alloy::rpc::types::TransactionReceipt,
    )> {
        let p = self.provider();
        let senders: Vec<Address> = keys
            .iter()
            .map(|k| chain::signer(&Secret::new(*k)).unwrap().address())
            .collect();
        let head = p.get_block_number().await.expect("block number");
        let mut out = Vec::new();
        for b in 0..=head {
            let block = p
                .get_block_by_number(b.into())
                .full()
                .await
                .expect("block")
                .expect("block exists");
            for tx in block.transactions.txns() {
                if senders.contains(&tx.inner.signer()) {
                    let receipt = p
                        .get_transaction_receipt(*tx.inner.tx_hash())
                        .await
                        .expect("receipt")
                        .expect("a mined transaction has a receipt");
                    out.push((tx.clone(), receipt));
                }
            }
        }
        out
    }
}

/// The producer's sample envelope with its ids changed: a valid message for a new model.
pub fn model_message(message_id: &str, model_id: &str, symbol: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("../data/producer-envelope.json")).unwrap();
    v["message_id"] = message_id.into();
    v["payload"]["model_id"] = model_id.into();
    v["payload"]["token_symbol"] = symbol.into();
    v.to_string()
}

pub fn settings_for(
    redis: &str,
    rpc: &str,
    boot: Option<&Bootstrap>,
    extra: &[(&str, &str)],
) -> Settings {
    let env = env_for(redis, rpc, boot, extra);
    Settings::load(Sources { file: None, env }).expect("test settings are valid")
}

/// The environment of a worker on this stack: test-friendly timings, the dev key, overrides last.
pub fn env_for(
    redis: &str,
    rpc: &str,
    boot: Option<&Bootstrap>,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("HOKUSAI__REDIS__URL".into(), redis.into()),
        ("HOKUSAI__CHAIN__RPC_URLS".into(), rpc.into()),
        ("HOKUSAI__CHAIN__POLL_INTERVAL_MS".into(), "50".into()),
        ("HOKUSAI__CHAIN__RPC_TIMEOUT_MS".into(), "3000".into()),
        ("HOKUSAI__CHAIN__PRIVATE_KEY".into(), ANVIL_DEV_KEY.into()),
        ("HOKUSAI__PIPELINE__BACKOFF_INITIAL_MS".into(), "50".into()),
        ("HOKUSAI__PIPELINE__BACKOFF_MAX_MS".into(), "500".into()),
        ("HOKUSAI__PIPELINE__WORKER_ID".into(), "w1".into()),
        ("HOKUSAI__LOG__LEVEL".into(), "warn".into()),
    ];
    if let Some(b) = boot {
        env.push((
            "HOKUSAI__CHAIN__MODEL_REGISTRY_ADDRESS".into(),
            b.model_registry.to_string(),
        ));
        env.push((
            "HOKUSAI__CHAIN__TOKEN_MANAGER_ADDRESS".into(),
            b.token_manager.to_string(),
        ));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Where a daemon named `name` logs (appended to across restarts).
pub fn log_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"))
}

/// A worker running as a child process (a real `hokusai-deployer run`).
pub struct Daemon {
    child: tokio::process::Child,
    /// A worker's ops port; an API's public port.
    pub ops_port: u16,
    /// The ops listener (`/health/detailed`, `/metrics`): for a worker the same as `ops_port`.
    pub metrics_port: u16,
    pid1: bool,
}

impl Daemon {
    /// GETs a path of the ops server (an API's public port): status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.get_at(self.ops_port, path).await
    }

    /// GETs a path of the ops listener (an API's `ops.port`).
    pub async fn get_ops(&self, path: &str) -> (u16, String) {
        self.get_at(self.metrics_port, path).await
    }

    async fn get_at(&self, port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{port}{path}");
        let r = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.get(path).await;
        let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        (status, v)
    }

    /// Polls `path` until `pred` holds on its answer (the ops server is up within seconds);
    /// a state that never comes fails the test after 60 s.
    pub async fn until<F>(&self, path: &str, what: &str, pred: F) -> (u16, serde_json::Value)
    where
        F: Fn(u16, &serde_json::Value) -> bool,
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let url = format!("http://127.0.0.1:{}{path}", self.ops_port);
            if let Ok(r) = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
            {
                let status = r.status().as_u16();
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    if pred(status, &v) {
                        return (status, v);
                    }
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{path} never showed {what}; last answer {status} {v}"
                    );
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn sigkill(&mut self) {
        self.child.kill().await.expect("SIGKILL is delivered");
    }

    /// The pid to signal: the binary itself, also when `unshare` is its parent.
    fn pid(&self) -> u32 {
        let pid = self.child.id().expect("still running");
        if !self.pid1 {
            return pid;
        }
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("unshare's children are listed in /proc");
        children
            .split_whitespace()
            .next()
            .expect("unshare has forked the binary")
            .parse()
            .expect("a pid")
    }

    /// SIGTERM, then the exit status within `within` (a hang fails the test).
    pub async fn sigterm(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.pid();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(ok.success());
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the daemon exits within its drain deadline")
            .expect("wait works")
    }
}

/// An in-process worker, stopped (and awaited) by [`Worker::stop`].
pub struct Worker {
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub fn start(settings: Settings, opts: RunOptions) -> Worker {
        let keys = settings.deployer_keys().unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(pipeline::run(settings, keys, opts, stop.clone()));
        Worker { stop, handle }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("worker stops within its drain deadline")
            .expect("worker task does not panic")
            .expect("worker exits cleanly");
    }
}

/// A TCP forwarder that can be switched off: while off it accepts and drops connections,
/// which is what a client sees of an RPC node that is down. Real sockets, no mock.
pub struct Switch {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Tells open tunnels to close when the switch goes down (keep-alive would outlive it).
    state: tokio::sync::watch::Sender<bool>,
    refused: Arc<AtomicUsize>,
    refused_notify: Arc<Notify>,
}

impl Switch {
    pub async fn start(target_port: u16, up: bool) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Switch {
            port,
            state: tokio::sync::watch::channel(up).0,
            up: Arc::new(AtomicBool::new(up)),
            refused: Arc::new(AtomicUsize::new(0)),
            refused_notify: Arc::new(Notify::new()),
        };
        let (up, refused, notify) = (s.up.clone(), s.refused.clone(), s.refused_notify.clone());
        let state = s.state.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up.load(Ordering::SeqCst) {
                    drop(inbound);
                    refused.fetch_add(1, Ordering::SeqCst);
                    notify.notify_waiters();
                    continue;
                }
                let mut down = state.subscribe();
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                            _ = down.wait_for(|up| !*up) => {}
                        }
                    }
                });
            }
        });
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        self.state.send_replace(up);
    }

    /// Waits until at least `n` connections were refused while down.
    pub async fn refused_at_least(&self, n: usize) {
        loop {
            let notified = self.refused_notify.notified();
            if self.refused.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::timeout(Duration::from_secs(60), notified)
                .await
                .expect("the worker keeps trying the RPC");
        }
    }
}

/// `promtool check metrics` passes on a scrape (lint and parse).
#[track_caller]
pub fn promtool_check(text: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).unwrap();
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .expect("promtool is installed (make tools)");
    assert!(
        check.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
