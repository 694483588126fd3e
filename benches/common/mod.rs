//! What the benchmarks share: knobs from the environment, percentiles, a child's resource use,
//! and the real binary started as a child process.

/// True under `cargo bench`; under `cargo test` (which builds and runs benches without
/// `--bench`) it says how to run bench `name` and the bench does nothing.
pub fn bench_only(name: &str) -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("{name} bench: run with `cargo bench --bench {name}`");
    }
    bench
}

/// `$name` as a number, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// (peak RSS bytes, CPU seconds) of a live process, from /proc.
pub fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the name), in clock ticks.
    (hwm, (ticks(11) + ticks(12)) / 100.0)
}

/// Starts `hokusai-deployer <subcommand>` with exactly `env` (plus any `HOKUSAI__*` variable of
/// the bench's own environment, to tune a run), its log in `<tmp>/hokusai-bench-<log>.log`.
pub fn spawn(
    subcommand: &str,
    mut env: Vec<(String, String)>,
    log: &str,
) -> anyhow::Result<tokio::process::Child> {
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("HOKUSAI__")));
    Ok(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_hokusai-deployer"))
            .arg(subcommand)
            .env_clear()
            .envs(env)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(
                std::env::temp_dir().join(format!("hokusai-bench-{log}.log")),
            )?)
            .kill_on_drop(true)
            .spawn()?,
    )
}

/// A bench's chain and queue: redis-server and anvil (with `anvil_args`) on free ports, the
/// contracts deployed with anvil's first key, and the environment that reaches them.
pub struct Stack {
    pub redis: hokusai_deployer::localstack::Service,
    pub anvil: hokusai_deployer::localstack::Service,
    pub env: Vec<(String, String)>,
}

pub async fn stack(dir: &std::path::Path, anvil_args: &[&str]) -> anyhow::Result<Stack> {
    use hokusai_deployer::config::{Secret, Settings, Sources};
    use hokusai_deployer::{chain, localstack};

    let redis = localstack::redis(dir, &[]).await?;
    let anvil = localstack::anvil(anvil_args).await?;
    let mut env = vec![
        ("HOKUSAI__REDIS__URL".to_string(), redis.url("redis")),
        ("HOKUSAI__CHAIN__RPC_URLS".to_string(), anvil.url("http")),
    ];
    let settings = Settings::load(Sources {
        file: None,
        env: env.clone(),
    })?;
    let key = Secret::new(localstack::ANVIL_DEV_KEY);
    let boot = chain::bootstrap(&settings, &key, &[], chain::contracts::NO_NAMESPACE).await?;
    env.extend([
        (
            "HOKUSAI__CHAIN__MODEL_REGISTRY_ADDRESS".into(),
            boot.model_registry.to_string(),
        ),
        (
            "HOKUSAI__CHAIN__TOKEN_MANAGER_ADDRESS".into(),
            boot.token_manager.to_string(),
        ),
    ]);
    Ok(Stack { redis, anvil, env })
}
