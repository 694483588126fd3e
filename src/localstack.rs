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

/// Finds a tool: `$ENV`, then `PATH`, then `contracts/node_modules/.bin` (npm).
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
        let p = base.join("contracts/node_modules/.bin").join(tool);
        if p.is_file() {
            return Ok(p);
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
