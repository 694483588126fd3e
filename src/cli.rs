//! The command line: `run` (the daemon), `contracts deploy`, `local` (the quick start),
//! `push` and `check-config`. `main.rs` only parses and calls [`dispatch`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::config::{Secret, Settings, Sources};
use crate::{chain, localstack, pipeline, queue, telemetry};

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
    /// Load and validate the configuration, print it with secrets redacted.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum ContractsCommand {
    /// Deploy ModelRegistry and TokenManager and print their addresses as JSON.
    Deploy {
        /// Also authorise this address to register models (the worker's key, if different).
        #[arg(long)]
        registrar: Option<alloy::primitives::Address>,
    },
}

fn load(cli: &Cli) -> anyhow::Result<Settings> {
    Ok(Settings::load(Sources::process(cli.config.as_deref()))?)
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
            let settings = load(&cli)?;
            telemetry::init(&settings.log);
            settings.contract_addresses()?;
            require_key(&settings)?;
            let opts = pipeline::RunOptions {
                drain_deadline: Duration::from_secs(*drain_secs),
                journal: !*unsafe_no_journal,
            };
            pipeline::run(settings.clone(), settings.private_keys()?, opts, shutdown).await
        }
        Command::Contracts {
            command: ContractsCommand::Deploy { registrar },
        } => {
            let settings = load(&cli)?;
            let key = require_key(&settings)?;
            let b = chain::bootstrap(&settings, &key, *registrar).await?;
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
        Command::CheckConfig => {
            let settings = load(&cli)?;
            if let Err(e) = settings.contract_addresses() {
                eprintln!("warning: {e}");
            }
            let key = settings.private_key()?;
            if let Some(k) = &key {
                chain::signer(k)?;
            }
            println!("{}", serde_json::to_string_pretty(&settings)?);
            println!(
                "deployer key: {}",
                if key.is_some() {
                    "configured"
                } else {
                    "missing"
                }
            );
            Ok(())
        }
        Command::Local { once } => local(&cli, *once, shutdown).await,
    }
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
    let b = chain::bootstrap(&settings, &key, None).await?;
    eprintln!("contracts: {}", serde_json::to_string(&b)?);
    settings.chain.model_registry_address = b.model_registry.to_string();
    settings.chain.token_manager_address = b.token_manager.to_string();

    let worker_stop = CancellationToken::new();
    let worker = tokio::spawn(pipeline::run(
        settings.clone(),
        vec![key],
        Default::default(),
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
    let _ = client.quit().await;
    drop((redis, anvil));
    Ok(())
}
