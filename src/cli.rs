//! The command line: `run` (the daemon), `contracts deploy`, `local` (the quick start), `push`,
//! `check-config`, and the operator's commands (`dlq`, `queue stats`, `pause`, `resume`,
//! `audit tail`). `main.rs` only parses and calls [`dispatch`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::acl;
use crate::admin::{Admin, Letter, Stats};
use crate::config::{DeployerKey, Secret, Settings, Sources};
use crate::pipeline::WorkerStatus;
use crate::{audit, chain, localstack, ops, pipeline, queue, telemetry};

/// The sample message of the quick start: the producer's envelope, as the ML platform writes it.
pub const SAMPLE_MESSAGE: &str = include_str!("../tests/data/producer-envelope.json");

#[derive(Debug, Parser)]
#[command(
    name = "hokusai-deployer",
    version,
    about = "Turns validated ML models into ERC-20 tokens"
)]
pub struct Cli {
    /// A TOML file layered over the built-in defaults (environment variables still win).
    #[arg(long, global = true, env = "HOKUSAI_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the deployment worker until SIGTERM or Ctrl-C.
    Run {
        /// Seconds in-flight messages get to finish at shutdown before they are left for recovery.
        #[arg(long, default_value_t = 30)]
        drain_secs: u64,
        /// Test only: run without the deployment journal, to show what it prevents.
        #[arg(long, hide = true)]
        unsafe_no_journal: bool,
    },
    /// Serve the HTTP deployment API (port `api.port`, 3001, with /health and /health/ready;
    /// /health/detailed and /metrics on `ops.port`); the
    /// workers (`run`) do the deployments it queues, so the two scale apart.
    Api,
    /// Exit 0 if this container's service answers `GET /health` (the ops port or the API
    /// port, on loopback): the image's HEALTHCHECK, so the image needs no curl.
    Healthcheck {
        /// Check this URL instead.
        #[arg(long)]
        url: Option<String>,
    },
    /// Manage the on-chain contracts.
    Contracts {
        #[command(subcommand)]
        command: ContractsCommand,
    },
    /// Quick start: start Redis and anvil, deploy the contracts, run the worker, process the
    /// sample message and print its token_deployed event.
    Local {
        /// Exit after the sample message instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Push a message (a file, or - for standard input) onto the inbound queue.
    Push { file: PathBuf },
    /// Load and validate the configuration, print it with secrets redacted; non-zero on error.
    CheckConfig,
    /// Inspect, requeue or purge the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The outbound webhook deliveries that spent their attempts: list, show, send again, purge.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Queue depths, workers and the pause flag.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Stop every worker from taking new messages (in-flight work finishes).
    Pause {
        /// Why, for the audit trail and the health page.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        who: Operator,
    },
    /// Let the workers take messages again.
    Resume {
        #[command(flatten)]
        who: Operator,
    },
    /// Read the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Re-publish stored token_deployed events for a downstream consumer.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Print a Redis ACL file (`redis-server --aclfile`) with a user per role: worker, api,
    /// operator, viewer, limited to the configured queues. Passwords come from
    /// HOKUSAI_ACL_<ROLE>_PASSWORD and are written as SHA-256 hashes; a role without one is
    /// written switched off.
    RedisAcl,
}

/// Who runs an operator command, recorded in the audit trail.
#[derive(Debug, clap::Args)]
pub struct Operator {
    /// Operator name for the audit trail (default: $USER).
    #[arg(long, env = "USER", default_value = "unknown")]
    operator: String,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// One JSON object per line (the stored entries).
        #[arg(long)]
        json: bool,
    },
    /// Print the dead letters of one message id.
    Show { message_id: String },
    /// Move dead letters back to the inbound queue (atomically: concurrent runs never double one).
    Requeue {
        /// The message id to requeue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        message_id: Option<String>,
        /// Requeue every dead letter, oldest first.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        who: Operator,
    },
    /// Delete every dead letter.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        who: Operator,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// List the webhook dead-letter list, newest first, and the deliveries still pending.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u64,
        /// One stored job (JSON) per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the dead deliveries with this job id, event id or deployment id, body included.
    Show { id: String },
    /// Send dead deliveries again (same event id and body, a fresh set of attempts).
    Requeue {
        /// A job id, event id or deployment id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        who: Operator,
    },
    /// Delete every dead delivery.
    Purge {
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        who: Operator,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Depths of the inbound, processing, dead-letter, outbound and failure queues, and workers.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Push stored `token_deployed` events again, each with `"replayed": true`, from the
    /// journal; nothing changes on chain.
    Replay {
        /// A model whose event to replay; repeat for more.
        #[arg(
            long = "model",
            value_name = "MODEL_ID",
            required_unless_present = "since"
        )]
        models: Vec<String>,
        /// Every event published at or after this time (RFC 3339).
        #[arg(long, conflicts_with = "models", value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Push onto this list instead of the outbound queue.
        #[arg(long)]
        to_queue: Option<String>,
        #[command(flatten)]
        who: Operator,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2026-12-01T00:00:00Z"))
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the newest audit entries, oldest first.
    Tail {
        /// How many entries.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: u64,
        /// Keep printing new entries until Ctrl-C.
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContractsCommand {
    /// Deploy the token implementation, ModelRegistry and TokenManager (a registrar of the
    /// registry), make this key and the `--deployer` addresses deployers, and print the
    /// addresses as JSON.
    Deploy {
        /// Also allow this address to deploy tokens (a worker's key); repeat for a key pool.
        #[arg(long = "deployer", value_name = "ADDRESS")]
        deployers: Vec<alloy::primitives::Address>,
        /// Mixed into every token's CREATE2 salt (32 bytes hex): managers with different
        /// namespaces on one chain give one model different addresses.
        #[arg(long)]
        namespace: Option<alloy::primitives::B256>,
    },
}

fn load(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(Settings::load(Sources::process(cli.config.as_deref()))?)
}

/// [`load`], with the webhook endpoints' signing secrets read: for the processes that sign.
fn load_signing(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(load(cli)?.with_webhook_secrets(&|var| std::env::var(var).ok())?)
}

fn require_key(settings: &Settings) -> anyhow::Result<Secret> {
    settings.private_key()?.context(
        "no deployer key: set HOKUSAI__CHAIN__PRIVATE_KEY (or DEPLOYER_PRIVATE_KEY) or chain.private_key_file",
    )
}

/// Runs a command; the returned error becomes a non-zero exit status in `main`.
pub async fn dispatch(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run {
            drain_secs,
            unsafe_no_journal,
        } => {
            let settings = load_signing(&cli)?;
            telemetry::init(&settings.log);
            settings.contract_addresses()?;
            let keys = settings.deployer_keys()?;
            anyhow::ensure!(
                !keys.is_empty(),
                "no deployer key: set HOKUSAI__CHAIN__PRIVATE_KEY (or DEPLOYER_PRIVATE_KEY), \
                 chain.private_key_file or chain.aws_kms_key_ids"
            );
            let status = Arc::new(WorkerStatus::default());
            let listener = ops::bind(&settings).await?;
            let ops = Ops::start(&settings, listener, status.clone())?;
            let opts = pipeline::RunOptions {
                drain_deadline: Duration::from_secs(*drain_secs),
                journal: !*unsafe_no_journal,
                status,
            };
            let r = pipeline::run(settings.clone(), keys, opts, shutdown).await;
            ops.stop().await;
            r
        }
        Command::Api => {
            let settings = load(&cli)?;
            telemetry::init(&settings.log);
            settings.contract_addresses()?;
            let metrics = telemetry::install_metrics()?;
            let state = crate::api::ApiState::new(&settings).await?;
            let ops_state = ops::OpsState::for_api(&settings, Some(metrics), state.mlflow())?;
            let listener = crate::api::bind(&settings).await?;
            let ops_listener = ops::bind(&settings).await?;
            tracing::info!(addr = %listener.local_addr()?, "API listening (/api/deployments, /api/deployments/quote, /api/deployments/{{id}}/status, /api/deployments/{{id}}/events, /api/webhooks/model-registered, /api/openapi.json, /health, /health/ready)");
            tracing::info!(addr = %ops_listener.local_addr()?, "ops server listening (/health, /health/ready, /health/detailed, /metrics)");
            let ops_task = tokio::spawn(ops::serve(
                ops_listener,
                ops_state.clone(),
                shutdown.clone(),
            ));
            let served =
                crate::api::serve(listener, state, ops_state.clone(), shutdown.clone()).await;
            shutdown.cancel();
            let _ = ops_task.await;
            ops_state.close().await;
            served?;
            Ok(())
        }
        Command::Healthcheck { url } => {
            let settings = load(&cli)?;
            let targets = match url {
                Some(u) => vec![u.clone()],
                None => vec![
                    format!("http://127.0.0.1:{}/health", settings.ops.port),
                    format!("http://127.0.0.1:{}/health", settings.api.port),
                ],
            };
            let mut errors = Vec::new();
            for t in &targets {
                match health_ok(t).await {
                    Ok(()) => return Ok(()),
                    Err(e) => errors.push(format!("{t}: {e}")),
                }
            }
            anyhow::bail!("unhealthy: {}", errors.join("; "))
        }
        Command::Contracts {
            command:
                ContractsCommand::Deploy {
                    deployers,
                    namespace,
                },
        } => {
            let settings = load(&cli)?;
            let key = require_key(&settings)?;
            let b = chain::bootstrap(
                &settings,
                &key,
                deployers,
                namespace.unwrap_or(chain::contracts::NO_NAMESPACE),
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&b)?);
            Ok(())
        }
        Command::Push { file } => {
            let settings = load(&cli)?;
            let body = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let client = queue::client(&settings)?;
            client.init().await.context("connecting to redis")?;
            let len: u64 = client
                .lpush(&settings.queues.inbound, body.trim_end())
                .await?;
            println!("pushed onto {} (length now {len})", settings.queues.inbound);
            Ok(())
        }
        Command::RedisAcl => {
            let settings = load(&cli)?;
            let mut passwords = Vec::new();
            for role in acl::Role::ALL {
                let var = role.password_var();
                let p = std::env::var(var).ok().filter(|p| !p.is_empty());
                if let Some(p) = &p {
                    anyhow::ensure!(
                        p.len() >= 16,
                        "{var}: at least 16 characters (use a generated password)"
                    );
                }
                passwords.push((role, p.map(Secret::new)));
            }
            let file = acl::acl_file(&settings.queues, &|role| {
                passwords
                    .iter()
                    .find(|(r, _)| *r == role)
                    .and_then(|(_, p)| p.clone())
            });
            print!("{file}");
            Ok(())
        }
        Command::CheckConfig => {
            let settings = load_signing(&cli)?;
            if let Err(e) = settings.contract_addresses() {
                eprintln!("warning: {e}");
            }
            let keys = settings.deployer_keys()?;
            for k in &keys {
                if let DeployerKey::Local(secret) = k {
                    chain::signer(secret)?;
                }
            }
            println!("{}", serde_json::to_string_pretty(&settings)?);
            let kms = settings.chain.aws_kms_key_ids.len();
            println!(
                "deployer key: {}",
                match keys.len() {
                    0 => "missing".to_owned(),
                    n if kms > 0 => format!("{n} in AWS KMS (not contacted)"),
                    1 => "configured".to_owned(),
                    n => format!("{n} configured"),
                }
            );
            Ok(())
        }
        Command::Local { once } => local(&cli, *once, shutdown).await,
        Command::Events {
            command:
                EventsCommand::Replay {
                    models,
                    since,
                    to_queue,
                    who,
                },
        } => {
            let (admin, client) = admin(&cli, &who.operator).await?;
            let which = match since {
                Some(t) => crate::admin::Replay::Since(*t),
                None => crate::admin::Replay::Models(models.clone()),
            };
            let replayed = admin.replay_events(&which, to_queue.as_deref()).await?;
            println!(
                "replayed {} event(s): {}",
                replayed.len(),
                replayed.join(", ")
            );
            let missing: Vec<&String> = models.iter().filter(|m| !replayed.contains(m)).collect();
            if !missing.is_empty() {
                eprintln!(
                    "no stored event (not deployed by this service, or its journal expired): {}",
                    missing
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let _ = client.quit().await;
            Ok(())
        }
        Command::Dlq { command } => dlq(&cli, command).await,
        Command::Webhooks { command } => webhooks(&cli, command).await,
        Command::Queue {
            command: QueueCommand::Stats { json },
        } => {
            let (admin, client) = admin(&cli, "stats").await?;
            let stats = admin.stats().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            let _ = client.quit().await;
            Ok(())
        }
        Command::Pause { reason, who } => {
            let (admin, client) = admin(&cli, &who.operator).await?;
            let p = admin.pause(&who.operator, reason).await?;
            println!(
                "paused by {} at {}: workers take no new messages within a second",
                p.by, p.at
            );
            let _ = client.quit().await;
            Ok(())
        }
        Command::Resume { who } => {
            let (admin, client) = admin(&cli, &who.operator).await?;
            let was = admin.resume().await?;
            println!("{}", if was { "resumed" } else { "was not paused" });
            let _ = client.quit().await;
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    count,
                    follow,
                    json,
                },
        } => {
            let settings = load(&cli)?;
            let client = connect(&settings).await?;
            let key = audit::key(&settings);
            let mut last = "$".to_owned();
            for r in audit::tail(&client, &key, *count).await? {
                print_audit(&r, *json);
                last = r.id;
            }
            while *follow && !shutdown.is_cancelled() {
                let batch = tokio::select! {
                    b = audit::after(&client, &key, &last, 1000) => b?,
                    _ = shutdown.cancelled() => break,
                };
                for r in batch {
                    print_audit(&r, *json);
                    last = r.id;
                }
            }
            let _ = client.quit().await;
            Ok(())
        }
    }
}

/// The ops server of a worker process, stopped after the worker.
struct Ops {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    state: Arc<ops::OpsState>,
}

impl Ops {
    fn start(
        settings: &Settings,
        listener: tokio::net::TcpListener,
        status: Arc<WorkerStatus>,
    ) -> anyhow::Result<Ops> {
        let metrics = telemetry::install_metrics()?;
        let state = ops::OpsState::new(settings, Some(metrics), Some(status))?;
        let stop = CancellationToken::new();
        tracing::info!(addr = %listener.local_addr()?, "ops server listening (/health, /health/ready, /health/detailed, /metrics)");
        let task = tokio::spawn(ops::serve(listener, state.clone(), stop.clone()));
        Ok(Ops { stop, task, state })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        self.state.close().await;
    }
}

/// `GET url` answered 200 within 2 s.
async fn health_ok(url: &str) -> anyhow::Result<()> {
    let http = alloy::transports::http::reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let r = http.get(url).send().await?;
    anyhow::ensure!(r.status().is_success(), "answered {}", r.status());
    Ok(())
}

async fn connect(settings: &Settings) -> anyhow::Result<fred::prelude::Client> {
    let client = queue::client(settings)?;
    client.init().await.context("connecting to redis")?;
    Ok(client)
}

async fn admin(cli: &Cli, operator: &str) -> anyhow::Result<(Admin, fred::prelude::Client)> {
    let settings = load(cli)?;
    let client = connect(&settings).await?;
    let actor = format!("operator:{operator}");
    Ok((Admin::new(client.clone(), &settings, &actor), client))
}

async fn dlq(cli: &Cli, command: &DlqCommand) -> anyhow::Result<()> {
    let operator = match command {
        DlqCommand::Requeue { who, .. } | DlqCommand::Purge { who, .. } => who.operator.as_str(),
        _ => "read-only",
    };
    let (admin, client) = admin(cli, operator).await?;
    let r = match command {
        DlqCommand::List { limit, json } => {
            let letters = admin.dlq_list(*limit).await?;
            for l in &letters {
                if *json {
                    println!("{}", l.raw);
                } else {
                    println!("{}", summary(l));
                }
            }
            if !*json {
                eprintln!("{} shown", letters.len());
            }
            Ok(())
        }
        DlqCommand::Show { message_id } => {
            let letters = admin.dlq_show(message_id).await?;
            if letters.is_empty() {
                Err(anyhow::anyhow!(
                    "no dead letter with message id {message_id}"
                ))
            } else {
                for l in letters {
                    let v: serde_json::Value = serde_json::from_str(&l.raw)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Ok(())
            }
        }
        DlqCommand::Requeue {
            message_id, json, ..
        } => {
            let moved = match message_id {
                Some(id) => admin.dlq_requeue(id).await?,
                None => admin.dlq_requeue_all().await?,
            };
            if *json {
                println!("{}", serde_json::json!({ "requeued": moved }));
            } else {
                println!("requeued {moved} message(s)");
            }
            match message_id {
                Some(id) if moved == 0 => {
                    Err(anyhow::anyhow!("no dead letter with message id {id}"))
                }
                _ => Ok(()),
            }
        }
        DlqCommand::Purge { yes, .. } => {
            if !*yes {
                Err(anyhow::anyhow!(
                    "purging deletes every dead letter for good; add --yes to confirm"
                ))
            } else {
                let n = admin.dlq_purge().await?;
                println!("purged {n} dead letter(s)");
                Ok(())
            }
        }
    };
    let _ = client.quit().await;
    r
}

async fn webhooks(cli: &Cli, command: &WebhooksCommand) -> anyhow::Result<()> {
    use crate::webhooks::Store;
    let operator = match command {
        WebhooksCommand::Requeue { who, .. } | WebhooksCommand::Purge { who, .. } => {
            who.operator.as_str()
        }
        _ => "read-only",
    };
    let settings = load(cli)?;
    let client = connect(&settings).await?;
    let audit = crate::audit::Audit::new(client.clone(), &settings, format!("operator:{operator}"));
    let store = Store::new(client.clone(), &settings.queues.state_prefix, "operator");
    let r = async {
        match command {
            WebhooksCommand::List { limit, json } => {
                let jobs = store.dead_list(*limit).await?;
                for j in &jobs {
                    if *json {
                        println!("{}", j.to_json());
                    } else {
                        println!(
                            "{}  {}  {}  deployment={}  attempts={}  last={}  dead_at={}",
                            j.job_id,
                            j.event_type,
                            j.target,
                            j.deployment_id,
                            j.attempts,
                            j.last_error.as_deref().unwrap_or("-"),
                            j.dead_at.as_deref().unwrap_or("-"),
                        );
                    }
                }
                if !*json {
                    let d = store.depths().await?;
                    eprintln!(
                        "{} shown; dead {}, ready {}, scheduled for a retry {}",
                        jobs.len(),
                        d.dead,
                        d.ready,
                        d.scheduled
                    );
                }
                Ok(())
            }
            WebhooksCommand::Show { id } => {
                let jobs = store.dead_show(id).await?;
                anyhow::ensure!(!jobs.is_empty(), "no dead webhook delivery with id {id}");
                for j in jobs {
                    println!("{}", serde_json::to_string_pretty(&j)?);
                }
                Ok(())
            }
            WebhooksCommand::Requeue { id, .. } => {
                let moved = store.requeue(id.as_deref(), &audit).await?;
                println!("requeued {moved} delivery(ies)");
                match id {
                    Some(id) if moved == 0 => {
                        Err(anyhow::anyhow!("no dead webhook delivery with id {id}"))
                    }
                    _ => Ok(()),
                }
            }
            WebhooksCommand::Purge { yes, .. } => {
                anyhow::ensure!(
                    *yes,
                    "purging deletes every dead webhook delivery for good; add --yes to confirm"
                );
                let n = store.purge(&audit).await?;
                println!("purged {n} dead delivery(ies)");
                Ok(())
            }
        }
    }
    .await;
    let _ = client.quit().await;
    r
}

fn summary(l: &Letter) -> String {
    match &l.entry {
        Some(e) => format!(
            "{}  {}  model={}  {}{}  attempts={}  failed_at={}",
            e.message_id,
            e.error.code,
            e.model_id.as_deref().unwrap_or("-"),
            e.error
                .field
                .as_deref()
                .map(|f| format!("field={f} "))
                .unwrap_or_default(),
            e.error
                .rule
                .as_deref()
                .map(|r| format!("rule={r}"))
                .unwrap_or_default(),
            e.attempts,
            e.failed_at
        ),
        None => format!(
            "(not a dead letter of ours) {}",
            l.raw.chars().take(120).collect::<String>()
        ),
    }
}

fn print_stats(s: &Stats) {
    println!("inbound     {}", s.inbound);
    println!("processing  {}", s.processing);
    println!("dlq         {}", s.dlq);
    println!("outbound    {}", s.outbound);
    println!("failures    {}", s.failures);
    match &s.paused {
        Some(p) => println!("paused      yes, by {} at {} ({})", p.by, p.at, p.reason),
        None => println!("paused      no"),
    }
    println!("workers     {}", s.workers.len());
    for w in &s.workers {
        println!(
            "  {}  {}  heartbeat ttl {} s  processing {}",
            w.worker_id,
            if w.alive { "alive" } else { "dead" },
            w.heartbeat_ttl_secs,
            w.processing
        );
    }
}

fn print_audit(r: &audit::Record, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "id": r.id, "fields": r.fields }));
        return;
    }
    let get = |k: &str| r.fields.get(k).map(String::as_str).unwrap_or("");
    let rest: Vec<String> = r
        .fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "at" | "action" | "actor"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{} {:<15} {:<24} {}",
        get("at"),
        get("action"),
        get("actor"),
        rest.join(" ")
    );
}

/// The quick start: everything on loopback, nothing left behind when it exits.
async fn local(cli: &Cli, once: bool, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = localstack::redis(dir.path(), &[]).await?;
    let anvil = localstack::anvil(&[]).await?;
    eprintln!(
        "redis-server on {}, anvil on {}",
        redis.url("redis"),
        anvil.url("http")
    );

    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.extend([
        ("HOKUSAI__REDIS__URL".into(), redis.url("redis")),
        ("HOKUSAI__CHAIN__RPC_URLS".into(), anvil.url("http")),
        ("HOKUSAI__CHAIN__POLL_INTERVAL_MS".into(), "100".into()),
    ]);
    let mut settings = Settings::load(Sources {
        file: cli.config.as_deref(),
        env,
    })?;
    telemetry::init(&settings.log);
    let key = Secret::new(localstack::ANVIL_DEV_KEY);
    let b = chain::bootstrap(&settings, &key, &[], chain::contracts::NO_NAMESPACE).await?;
    eprintln!("contracts: {}", serde_json::to_string(&b)?);
    settings.chain.model_registry_address = b.model_registry.to_string();
    settings.chain.token_manager_address = b.token_manager.to_string();

    // The configured ops port, or any free one if it is taken (the quick start must not fail).
    let listener = match ops::bind(&settings).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}; using a free port instead");
            settings.ops.port = 0;
            ops::bind(&settings).await?
        }
    };
    eprintln!(
        "ops server on http://{}/health/detailed",
        listener.local_addr()?
    );
    let status = Arc::new(WorkerStatus::default());
    let ops = Ops::start(&settings, listener, status.clone())?;
    let worker_stop = CancellationToken::new();
    let worker = tokio::spawn(pipeline::run(
        settings.clone(),
        vec![DeployerKey::Local(key)],
        pipeline::RunOptions {
            status,
            ..Default::default()
        },
        worker_stop.clone(),
    ));

    let client = queue::client(&settings)?;
    client.init().await?;
    let _: u64 = client
        .lpush(&settings.queues.inbound, SAMPLE_MESSAGE.trim_end())
        .await?;
    eprintln!("pushed the sample message onto {}", settings.queues.inbound);
    let got: Option<(String, String)> = client.brpop(&settings.queues.outbound, 60.0).await?;
    let (_, event) = got.context("no token_deployed event within 60 s")?;
    let pretty: serde_json::Value = serde_json::from_str(&event)?;
    println!("{}", serde_json::to_string_pretty(&pretty)?);

    if !once {
        eprintln!(
            "serving; push more with:\n  HOKUSAI__REDIS__URL={} hokusai-deployer push <file>\nCtrl-C to stop",
            redis.url("redis")
        );
        shutdown.cancelled().await;
    }
    worker_stop.cancel();
    worker.await??;
    ops.stop().await;
    let _ = client.quit().await;
    drop((redis, anvil));
    Ok(())
}
