//! Throughput against the chain's own ceiling: `cargo bench --bench throughput`.
//!
//! Starts Redis and anvil with one-second blocks, deploys the contracts, runs the real binary
//! (`hokusai-deployer run`) as a child process, pushes N messages at once and prints:
//! deployments per hour, the chain's ceiling for the same run (block gas limit / measured gas
//! per model x blocks per hour) and our share of it, p50/p95/p99 from push to event, and the
//! daemon's peak RSS and CPU seconds. The daemon runs with the shipped defaults;
//! `BENCH_N` (default 1000), `BENCH_CONCURRENCY` (sets `pipeline.concurrency`) and
//! `BENCH_RATE` change the run, `HOKUSAI__*` variables the daemon's configuration. Under
//! `cargo test` it does nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use fred::prelude::*;
use hokusai_deployer::config::{Settings, Sources};
use hokusai_deployer::{chain, localstack};

#[path = "common/mod.rs"]
mod common;
use common::{env_or, pct, usage};

fn message(i: usize) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(include_str!("../tests/data/producer-envelope.json")).unwrap();
    v["message_id"] = format!("bench-{i}").into();
    v["payload"]["model_id"] = format!("bench_{i}").into();
    v["payload"]["token_symbol"] = format!("b-{i}").into();
    v.to_string()
}

const QUEUE: &str = "hokusai:model_ready_queue";

/// Reads events until `expect` models of `pushed` have one: (seconds from its push, gas of
/// its one transaction) per model.
async fn collect(
    client: &Client,
    pushed: &Mutex<HashMap<String, Instant>>,
    expect: usize,
) -> anyhow::Result<Vec<(f64, u64)>> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        if out.len() >= expect {
            return Ok(out);
        }
        let got: Option<(String, String)> = client
            .brpop("hokusai:token_deployed_queue", 2.0)
            .await
            .or_else(|e| {
                if *e.kind() == fred::error::ErrorKind::Timeout {
                    Ok(None)
                } else {
                    Err(e)
                }
            })?;
        let Some((_, event)) = got else {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(3600),
                "stalled at {} events",
                out.len()
            );
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&event)?;
        let model = v["model_id"].as_str().unwrap_or_default().to_owned();
        let Some(t) = pushed.lock().unwrap().get(&model).copied() else {
            continue;
        };
        if seen.insert(model) {
            let g = |k: &str| {
                v[k].as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            out.push((t.elapsed().as_secs_f64(), g("gas_used")));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !common::bench_only("throughput") {
        return Ok(());
    }
    let n = env_or("BENCH_N", 1000);
    let concurrency = std::env::var("BENCH_CONCURRENCY").ok();
    let dir = tempfile::tempdir()?;
    let common::Stack {
        redis: _redis,
        anvil: _anvil,
        mut env,
    } = common::stack(dir.path(), &["--block-time", "1"]).await?;
    let settings = Settings::load(Sources {
        file: None,
        env: env.clone(),
    })?;
    // The shipped defaults, but for the key, a free ops port and logs to read.
    env.extend([
        (
            "HOKUSAI__CHAIN__PRIVATE_KEY".into(),
            localstack::ANVIL_DEV_KEY.into(),
        ),
        ("HOKUSAI__OPS__PORT".into(), "0".into()),
        ("HOKUSAI__LOG__LEVEL".into(), "info".into()),
        ("HOKUSAI__LOG__FORMAT".into(), "json".into()),
    ]);
    if let Some(c) = &concurrency {
        env.push(("HOKUSAI__PIPELINE__CONCURRENCY".into(), c.clone()));
    }
    let mut daemon = common::spawn("run", env, "daemon")?;
    let pid = daemon.id().expect("running");

    let client = hokusai_deployer::queue::client(&settings)?;
    client.init().await?;
    let provider = chain::provider(&settings)?;
    let first_block = provider.get_block_number().await?;

    // Phase 1, throughput: all N pushed at once, the chain as the only limit.
    let messages: Vec<String> = (0..n).map(message).collect();
    let pushed = Instant::now();
    let mut at: HashMap<String, Instant> = HashMap::new();
    for i in 0..n {
        at.insert(format!("bench_{i}"), pushed);
    }
    let _: u64 = client.lpush(QUEUE, messages).await?;
    let burst = collect(&client, &Mutex::new(at), n).await?;
    let elapsed = pushed.elapsed().as_secs_f64();
    let last_block = provider.get_block_number().await?;
    let block = provider
        .get_block_by_number(last_block.into())
        .await?
        .expect("head block");
    let gas_limit = block.header.gas_limit as f64;
    let (_, burst_cpu) = usage(pid);

    let gas: Vec<u64> = burst.iter().map(|(_, g)| *g).collect();
    let mean_gas = gas.iter().sum::<u64>() as f64 / gas.len() as f64;
    let per_hour = n as f64 / elapsed * 3600.0;
    let blocks = (last_block - first_block).max(1) as f64;
    let blocks_per_hour = blocks / elapsed * 3600.0;
    let per_block = (gas_limit / mean_gas).floor();
    let ceiling = per_block * blocks_per_hour;
    let mut burst_latency: Vec<f64> = burst.iter().map(|(l, _)| *l).collect();
    burst_latency.sort_by(f64::total_cmp);

    // Phase 2, latency: N more pushed one by one at a steady rate under the ceiling
    // (`BENCH_RATE` per second, default half the ceiling), each timed from its own push.
    let rate = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(ceiling / 3600.0 / 2.0);
    let at = std::sync::Arc::new(Mutex::new(HashMap::new()));
    let pusher = {
        let (client, at) = (client.clone(), at.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            for i in n..2 * n {
                tick.tick().await;
                at.lock()
                    .unwrap()
                    .insert(format!("bench_{i}"), Instant::now());
                let _: u64 = client.lpush(QUEUE, message(i)).await.expect("lpush");
            }
        })
    };
    let paced = collect(&client, &at, n).await?;
    pusher.await?;
    let mut paced_latency: Vec<f64> = paced.iter().map(|(l, _)| *l).collect();
    paced_latency.sort_by(f64::total_cmp);

    let (rss, cpu) = usage(pid);
    let _ = daemon.kill().await;
    let dlq: u64 = client.llen("hokusai:model_ready_queue:dlq").await?;

    let block_time = elapsed / blocks;
    println!(
        "messages               {n} at once, then {n} at {rate:.1}/s (pipeline.concurrency {}, anvil --block-time 1)",
        concurrency.as_deref().unwrap_or("default")
    );
    println!("dead-lettered          {dlq}");
    println!("burst wall time        {elapsed:.1} s over {blocks} blocks");
    println!("deployments per hour   {per_hour:.0}");
    println!("gas per model          {mean_gas:.0} (block gas limit {gas_limit:.0})");
    println!(
        "chain ceiling          {ceiling:.0} per hour ({per_block:.0} models per block x {blocks_per_hour:.0} blocks per hour)"
    );
    println!("share of the ceiling   {:.1} %", per_hour / ceiling * 100.0);
    // A burst of n needs at least ceil(n / per_block) whole blocks: its last block is partly
    // empty whatever the service does (1000 models in 121-model blocks: 9 blocks, 91.8 %).
    let fewest = (n as f64 / per_block).ceil();
    println!(
        "blocks used            {blocks} (the fewest possible for {n}: {fewest}, {:.1} %)",
        fewest / blocks * 100.0
    );
    println!(
        "burst push -> event    p50 {:.1} s  p95 {:.1} s  p99 {:.1} s (queueing behind the burst)",
        pct(&burst_latency, 0.5),
        pct(&burst_latency, 0.95),
        pct(&burst_latency, 0.99)
    );
    println!(
        "paced push -> event    p50 {:.2} s  p95 {:.2} s ({:.1} blocks)  p99 {:.2} s  max {:.2} s",
        pct(&paced_latency, 0.5),
        pct(&paced_latency, 0.95),
        pct(&paced_latency, 0.95) / block_time,
        pct(&paced_latency, 0.99),
        paced_latency.last().copied().unwrap_or_default()
    );
    println!("daemon peak RSS        {:.1} MiB", rss as f64 / 1048576.0);
    println!(
        "daemon CPU             {cpu:.1} s ({burst_cpu:.1} s in the burst: {:.2} ms per deployment)",
        burst_cpu * 1000.0 / n as f64
    );
    let _ = client.quit().await;
    Ok(())
}
