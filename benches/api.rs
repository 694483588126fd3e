//! The HTTP API under load: `cargo bench --bench api`.
//!
//! Starts Redis, anvil (contracts deployed) and an MLflow server, seeds `BENCH_MODELS` models
//! (default 300), runs the real binary (`hokusai-deployer api`) and drives it with
//! `BENCH_CONNECTIONS` (default 100) concurrent keep-alive connections: one POST per model by a
//! caller who may not deploy it (MLflow's first lookup of each model, answered 403), one POST
//! per model by its contributor (each its own user, so no quota refuses it; the model's facts
//! now cached), then `BENCH_GETS` (default 20000) status GETs.
//! Prints p50/p99/max and requests per second of each, and the API's peak RSS. Needs
//! `make pytools` (MLflow). Under `cargo test` it does nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hokusai_deployer::localstack;
use jsonwebtoken::{encode, EncodingKey, Header};

#[path = "common/mod.rs"]
mod common;
use common::{env_or, pct, usage};

const SECRET: &str = "bench-secret-0123456789-0123456789-abc";
const ADDRESS: &str = "0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d";

const STRANGER: &str = "0x000000000000000000000000000000000000dEaD";

fn token_for(sub: &str, address: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    encode(
        &Header::default(),
        &serde_json::json!({ "sub": sub, "address": address, "exp": exp }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signs")
}

/// What every request of the run needs, shared by the workers.
struct Ctx {
    http: reqwest::Client,
    base: String,
    /// The owner's token per model, and a stranger's (who may not deploy it).
    tokens: Vec<String>,
    strangers: Vec<String>,
    names: Vec<String>,
    /// Accepted deployments: (model index, deployment id).
    ids: std::sync::Mutex<Vec<(usize, String)>>,
}

impl Ctx {
    /// POSTs a deployment of model `i` and checks the status; returns the body.
    async fn post(&self, token: &str, address: &str, i: usize, status: u16) -> serde_json::Value {
        let r = self
            .http
            .post(format!("{}/api/deployments", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({ "model_id": self.names[i], "user_address": address }))
            .send()
            .await
            .expect("POST answered");
        assert_eq!(r.status().as_u16(), status, "POST {}", self.names[i]);
        r.json().await.expect("json")
    }
}

/// Runs `n` requests over `connections` workers; returns sorted latencies (ms) and wall time.
async fn drive<F, Fut>(n: usize, connections: usize, one: F) -> (Vec<f64>, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let one = Arc::new(one);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, one) = (next.clone(), one.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return lat;
                }
                let t = Instant::now();
                one(i).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("worker task"));
    }
    all.sort_by(f64::total_cmp);
    (all, started.elapsed().as_secs_f64())
}

fn report(what: &str, lat: &[f64], wall: f64) {
    println!(
        "{what:<22} {:>6} requests  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  {:.0} req/s",
        lat.len(),
        pct(lat, 0.5),
        pct(lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        lat.len() as f64 / wall
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !common::bench_only("api") {
        return Ok(());
    }
    let models = env_or("BENCH_MODELS", 300);
    let connections = env_or("BENCH_CONNECTIONS", 100);
    let gets = env_or("BENCH_GETS", 20_000);
    let dir = tempfile::tempdir()?;
    let common::Stack {
        redis: _redis,
        anvil: _anvil,
        mut env,
    } = common::stack(dir.path(), &[]).await?;
    let mlflow = localstack::mlflow(dir.path()).await?;
    let names: Vec<String> = (0..models).map(|i| format!("bench_api_{i}")).collect();
    let seeding = Instant::now();
    for n in &names {
        localstack::seed_model(&mlflow, n, true, "owner", &[ADDRESS]).await?;
    }
    println!(
        "seeded {models} models in MLflow in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let port = localstack::free_port();
    env.extend([
        ("HOKUSAI__API__PORT".into(), port.to_string()),
        ("HOKUSAI__API__BIND".into(), "127.0.0.1".into()),
        // The API's ops listener (/metrics), on a free port of its own.
        (
            "HOKUSAI__OPS__PORT".into(),
            localstack::free_port().to_string(),
        ),
        ("HOKUSAI__OPS__BIND".into(), "127.0.0.1".into()),
        ("HOKUSAI__API__JWT__SECRET".into(), SECRET.into()),
        ("HOKUSAI__API__MLFLOW__URL".into(), mlflow.clone()),
        (
            "HOKUSAI__API__LIMITS__GLOBAL_PER_HOUR".into(),
            "1000000".into(),
        ),
        ("HOKUSAI__API__MLFLOW__CACHE_SECS".into(), "3600".into()),
        ("HOKUSAI__LOG__LEVEL".into(), "warn".into()),
    ]);
    let mut api = common::spawn("api", env, "api")?;
    let pid = api.id().expect("running");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/health")).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the API did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let ctx = Arc::new(Ctx {
        http,
        base,
        tokens: (0..models)
            .map(|i| token_for(&format!("u{i}"), ADDRESS))
            .collect(),
        strangers: (0..models)
            .map(|i| token_for(&format!("s{i}"), STRANGER))
            .collect(),
        names,
        ids: Default::default(),
    });

    // Every model looked up in MLflow for the first time, by a caller who may not deploy it:
    // the whole check up to the ownership refusal (403), MLflow included.
    let (cold_lat, cold_wall) = {
        let ctx = ctx.clone();
        drive(models, connections, move |i| {
            let ctx = ctx.clone();
            async move {
                ctx.post(&ctx.strangers[i], STRANGER, i, 403).await;
            }
        })
        .await
    };
    let (post_lat, post_wall) = {
        let ctx = ctx.clone();
        drive(models, connections, move |i| {
            let ctx = ctx.clone();
            async move {
                let v = ctx.post(&ctx.tokens[i], ADDRESS, i, 202).await;
                let id = v["deployment_id"].as_str().unwrap().to_owned();
                ctx.ids.lock().unwrap().push((i, id));
            }
        })
        .await
    };
    let ids: Arc<Vec<(usize, String)>> = Arc::new(ctx.ids.lock().unwrap().clone());
    let (get_lat, get_wall) = {
        let ctx = ctx.clone();
        drive(gets, connections, move |i| {
            let (ctx, ids) = (ctx.clone(), ids.clone());
            async move {
                let (who, id) = &ids[i % ids.len()];
                let r = ctx
                    .http
                    .get(format!("{}/api/deployments/{id}/status", ctx.base))
                    .bearer_auth(&ctx.tokens[*who])
                    .send()
                    .await
                    .expect("GET answered");
                assert_eq!(r.status().as_u16(), 200);
                let _ = r.bytes().await;
            }
        })
        .await
    };
    let rss = usage(pid).0;
    let _ = api.kill().await;
    println!("connections            {connections}");
    report("POST, MLflow cold (403)", &cold_lat, cold_wall);
    report("POST /api/deployments", &post_lat, post_wall);
    report("GET  .../status", &get_lat, get_wall);
    println!("API peak RSS           {:.1} MiB", rss as f64 / 1048576.0);
    Ok(())
}
