//! Thin entry point: parse the command line, wire Ctrl-C and SIGTERM to one cancellation
//! token, run the command, turn its result into an exit status.

// The worker's future nests deeply once the AWS SDK's futures are in it (`aws-kms`).
#![recursion_limit = "256"]

use clap::Parser;
use tokio_util::sync::CancellationToken;

use hokusai_deployer::cli::{dispatch, Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    match dispatch(cli, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let text = format!("{e:#}");
            if text.contains("NOPERM") {
                eprintln!(
                    "hint: the Redis user in redis.url may not do this: `run` needs \
                     hokusai-worker, `api` hokusai-api, changing operator commands \
                     hokusai-operator (docs/operations.md, \"Who may do what\")"
                );
            } else if text.contains("NOAUTH") || text.contains("WRONGPASS") {
                eprintln!(
                    "hint: Redis wants credentials: put the ACL user in redis.url \
                     (rediss://user@host) and its password there or in REDIS_PASSWORD"
                );
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Cancels on the first Ctrl-C or SIGTERM (PID 1 in a container gets SIGTERM).
async fn shutdown_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    token.cancel();
}
