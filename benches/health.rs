//! Latency of the ops endpoints on a real Redis and anvil: `cargo bench --bench health`.
//! Seed 001 asks for health answers under 100 ms; we aim for a p99 under 5 ms on `/health`.
//! Prints figures only; nothing here is a pass/fail test. Under `cargo test` it does nothing.

use std::time::{Duration, Instant};

use hokusai_deployer::config::{Secret, Settings, Sources};
use hokusai_deployer::{chain, localstack, ops, telemetry};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn measure(client: &reqwest::Client, url: &str, n: usize) -> Vec<Duration> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.get(url).send().await.expect("request");
        let _ = r.bytes().await.expect("body");
        v.push(t.elapsed());
    }
    v.sort();
    v
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("health bench: run with `cargo bench --bench health`");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let redis = localstack::redis(dir.path(), &[]).await?;
    let anvil = localstack::anvil(&[]).await?;
    let env = vec![
        ("HOKUSAI__REDIS__URL".to_string(), redis.url("redis")),
        ("HOKUSAI__CHAIN__RPC_URLS".to_string(), anvil.url("http")),
        ("HOKUSAI__OPS__PORT".to_string(), "0".to_string()),
        ("HOKUSAI__OPS__BIND".to_string(), "127.0.0.1".to_string()),
    ];
    let mut settings = Settings::load(Sources { file: None, env })?;
    let b = chain::bootstrap(
        &settings,
        &Secret::new(localstack::ANVIL_DEV_KEY),
        &[],
        chain::contracts::NO_NAMESPACE,
    )
    .await?;
    settings.chain.model_registry_address = b.model_registry.to_string();
    settings.chain.token_manager_address = b.token_manager.to_string();

    let state = ops::OpsState::new(&settings, Some(telemetry::install_metrics()?), None)?;
    let listener = ops::bind(&settings).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(ops::serve(listener, state, stop.clone()));

    let client = reqwest::Client::new();
    // Warm up the connection and the probes.
    measure(&client, &format!("{base}/health/ready"), 50).await;
    println!("endpoint          requests     p50        p99        max");
    for (path, n) in [
        ("/health", 20_000),
        ("/health/ready", 2_000),
        ("/health/detailed", 1_000),
        ("/metrics", 1_000),
    ] {
        let v = measure(&client, &format!("{base}{path}"), n).await;
        println!(
            "{path:<17} {n:>8} {:>9.3?} {:>9.3?} {:>9.3?}",
            percentile(&v, 0.50),
            percentile(&v, 0.99),
            v[v.len() - 1]
        );
    }
    stop.cancel();
    server.await??;
    Ok(())
}
