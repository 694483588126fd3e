//! Real Redis and anvil processes on free loopback ports, for the quick start and the tests.
//! Each child is killed when its handle drops; readiness is awaited on the child's own
//! "ready" line, never on a sleep.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// anvil's first development account: public knowledge, funded only on a local dev chain.
pub const ANVIL_DEV_KEY: &str =
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// How long a child may take to print its ready line (anvil cold start is well under 2 s).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("`{tool}` not found: install it with `make tools` (or set {env})")]
    Missing {
        tool: &'static str,
        env: &'static str,
    },
    #[error("starting {tool}: {source}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} did not become ready: {detail}")]
    NotReady { tool: &'static str, detail: String },
}

/// A running child process, killed on drop.
pub struct Service {
    pub port: u16,
    child: Child,
}

impl Service {
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }
    /// Kills the process now (SIGKILL) and waits for it to go.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A port that was free a moment ago (the OS picks it; a clash is retried by the callers).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding port 0 on loopback always works")
}

/// Finds a tool: `$ENV`, then `PATH`, then what `make tools` installs in the project:
/// `contracts/node_modules/.bin` (npm) and `.tools/venv/bin` (PyPI).
pub fn find_tool(tool: &'static str, env: &'static str) -> Result<PathBuf, StackError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(tool);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    for base in [Path::new(env!("CARGO_MANIFEST_DIR")), Path::new(".")] {
        for dir in ["contracts/node_modules/.bin", ".tools/venv/bin"] {
            let p = base.join(dir).join(tool);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(StackError::Missing { tool, env })
}

async fn spawn_until(
    tool: &'static str,
    mut cmd: Command,
    ready: impl Fn(&str) -> bool,
    port: u16,
) -> Result<Service, StackError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|source| StackError::Spawn { tool, source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let wait = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if ready(&line) {
                return true;
            }
            seen.push(line);
        }
        false
    };
    match tokio::time::timeout(READY_TIMEOUT, wait).await {
        Ok(true) => {
            // Keep draining output so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            if let Some(err) = child.stderr.take() {
                tokio::spawn(async move {
                    let mut l = BufReader::new(err).lines();
                    while let Ok(Some(_)) = l.next_line().await {}
                });
            }
            Ok(Service { port, child })
        }
        Ok(false) => Err(StackError::NotReady {
            tool,
            detail: format!("exited; output: {}", seen.join(" | ")),
        }),
        Err(_) => Err(StackError::NotReady {
            tool,
            detail: "timed out waiting for its ready line".into(),
        }),
    }
}

/// Starts `redis-server` on a free port with its files in `dir` (no persistence unless asked).
pub async fn redis(dir: &Path, extra: &[&str]) -> Result<Service, StackError> {
    redis_on(dir, free_port(), extra).await
}

/// Starts `redis-server` on a given port: a restarted server keeps its address.
pub async fn redis_on(dir: &Path, port: u16, extra: &[&str]) -> Result<Service, StackError> {
    let bin = find_tool("redis-server", "HOKUSAI_REDIS_SERVER")?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .arg("--dir")
    .arg(dir)
    .args(extra);
    spawn_until(
        "redis-server",
        cmd,
        |l| l.contains("Ready to accept connections"),
        port,
    )
    .await
}

/// Starts anvil on a free port; `extra` adds flags such as `--block-time 1`.
pub async fn anvil(extra: &[&str]) -> Result<Service, StackError> {
    let bin = find_tool("anvil", "HOKUSAI_ANVIL")?;
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .args(extra);
    spawn_until("anvil", cmd, |l| l.starts_with("Listening on"), port).await
}

/// Starts an MLflow tracking server (`mlflow server`, found by [`find_tool`]; `make pytools`
/// installs it) on a free port with its store in `dir`, and
/// returns its URL once `/health` answers. It runs in its own process group, which a watcher
/// terminates when this process is gone (the server's uvicorn child would outlive a plain kill).
pub async fn mlflow(dir: &Path) -> Result<String, StackError> {
    let bin = find_tool("mlflow", "HOKUSAI_MLFLOW")?;
    let port = free_port();
    let d = dir.display();
    let script = format!(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false '{bin}' server --host 127.0.0.1 --port {port} \
         --backend-store-uri 'sqlite:///{d}/mlflow.db' --default-artifact-root '{d}/artifacts' \
         --workers 1 >'{d}/mlflow.log' 2>&1 & \
         while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -TERM -$$",
        bin = bin.display(),
        parent = std::process::id(),
    );
    // Never waited for: the watcher outlives this call and ends with this process.
    #[allow(clippy::zombie_processes)]
    std::process::Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| StackError::Spawn {
            tool: "mlflow",
            source,
        })?;
    let url = format!("http://127.0.0.1:{port}");
    let http = alloy::transports::http::reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = http.get(format!("{url}/health")).send().await {
            if r.status().is_success() {
                return Ok(url);
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(StackError::NotReady {
                tool: "mlflow",
                detail: format!("no answer on {url}/health within 90 s; see {d}/mlflow.log"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A model in MLflow as the API expects it (docs/api.md): a run with `accuracy` 0.884 over
/// `baseline_accuracy` 0.854, a registered model `name` with the hokusai tags, a version.
pub async fn seed_model(
    mlflow: &str,
    name: &str,
    validated: bool,
    owner: &str,
    contributors: &[&str],
) -> anyhow::Result<()> {
    use serde_json::{json, Value};
    let http = alloy::transports::http::reqwest::Client::new();
    let post = |path: &str, body: Value| {
        let req = http
            .post(format!("{mlflow}/api/2.0/mlflow/{path}"))
            .header("content-type", "application/json")
            .body(body.to_string());
        let path = path.to_owned();
        async move {
            let r = req.send().await?;
            let status = r.status();
            let v: Value = serde_json::from_slice(&r.bytes().await?)?;
            anyhow::ensure!(status.is_success(), "mlflow {path}: {status} {v}");
            Ok::<Value, anyhow::Error>(v)
        }
    };
    let exp = post(
        "experiments/create",
        json!({ "name": format!("exp-{name}") }),
    )
    .await?;
    let run = post(
        "runs/create",
        json!({ "experiment_id": exp["experiment_id"] }),
    )
    .await?;
    let run_id = run["run"]["info"]["run_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let now = chrono::Utc::now().timestamp_millis();
    post(
        "runs/log-batch",
        json!({ "run_id": run_id, "metrics": [
            { "key": "accuracy", "value": 0.884, "timestamp": now, "step": 0 },
            { "key": "baseline_accuracy", "value": 0.854, "timestamp": now, "step": 0 },
        ]}),
    )
    .await?;
    let tag = |k: &str, v: &str| json!({ "key": k, "value": v });
    post(
        "registered-models/create",
        json!({ "name": name, "tags": [
            tag("hokusai.validated", if validated { "true" } else { "false" }),
            tag("hokusai.validated_at", "2026-11-20T10:00:00Z"),
            tag("hokusai.owner_user_id", owner),
            tag("hokusai.contributors", &contributors.join(",")),
            tag("hokusai.mlflow_run_id", &run_id),
            tag("hokusai.metric_name", "accuracy"),
        ]}),
    )
    .await?;
    post(
        "model-versions/create",
        json!({ "name": name, "source": format!("runs:/{run_id}/model"), "run_id": run_id }),
    )
    .await?;
    Ok(())
}
