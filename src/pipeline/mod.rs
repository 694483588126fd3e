//! The worker: takes messages, deploys and registers their tokens (one `deployToken`
//! transaction each), publishes events, and sorts every outcome into exactly one of ack (event
//! published) or dead letter (with a reason).
//!
//! Each step can run again safely: the journal says what was already signed or mined, the
//! token manager on chain refuses a second token for a model, and the event is stored before it
//! is published so a redelivery re-publishes the identical event.
//!
//! - [`worker`]: the loop: key lease, chain connection, recovery of what a previous run left,
//!   taking messages under the in-flight bound, drain at shutdown.
//! - [`handle`]: one message from taken to acked or dead-lettered: parsing, retries with
//!   backoff, publishing.
//! - [`attempt`]: one attempt at a valid message under the model's lock: the journal, the one
//!   `deployToken` transaction, its receipt, the event.
//! - [`guards`]: the circuit breaker on chain operations and the signer's funds, which hold
//!   the worker back while the chain cannot be used.
//! - [`reorg`]: the watch over published deployments: one that a reorganisation removes is
//!   made again and published with `"reorged": true`.
//! - [`status`]: what the ops server shows of a running worker.

mod attempt;
mod guards;
mod handle;
mod reorg;
mod status;
mod worker;

use status::FeeWait;
pub use status::WorkerStatus;
pub use worker::{run, RunOptions};

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use alloy::primitives::Address;

use crate::audit::Audit;
use crate::chain::{Chain, ChainError, SendError};
use crate::config::Settings;
use crate::journal::{Journal, JournalError};
use crate::message::Rules;
use crate::queue::{QueueError, Queues};

/// The `step` label of the transaction metrics: one transaction per model now.
const STEP: &str = "deploy";

/// Why one attempt at a message failed, sorted once into retry or give up.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("model {0} is being deployed by another worker")]
    ModelBusy(String),
    #[error("model {model_id} already has token {token}")]
    TokenExists { model_id: String, token: Address },
    /// The model's journal holds a transaction that does not call our token manager (written
    /// by the two-transaction version or for other contracts): finishing it would publish an
    /// event for a token we did not deploy.
    #[error("the journal of model {model_id} holds transaction {hash}, which does not call chain.token_manager_address: check it and delete the journal (docs/runbook.md) before requeueing")]
    ForeignJournal {
        model_id: String,
        hash: alloy::primitives::TxHash,
    },
}

impl AttemptError {
    pub fn is_retryable(&self) -> bool {
        match self {
            AttemptError::Chain(e) => e.is_retryable(),
            AttemptError::Queue(e) => e.is_retryable(),
            AttemptError::Journal(JournalError::Redis(_) | JournalError::NotReplicated(_)) => true,
            AttemptError::Journal(JournalError::Corrupt { .. }) => false,
            AttemptError::ModelBusy(_) => true,
            AttemptError::TokenExists { .. } | AttemptError::ForeignJournal { .. } => false,
        }
    }

    /// No RPC URL answered: what the circuit breaker counts.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, AttemptError::Chain(e) if e.is_unreachable())
    }

    /// The error code seen in the DLQ and failure events (seed 000 §8 names where they fit).
    pub fn code(&self) -> &'static str {
        match self {
            AttemptError::TokenExists { .. } => "TOKEN_EXISTS",
            AttemptError::ModelBusy(_) => "MODEL_BUSY",
            AttemptError::Queue(_)
            | AttemptError::Journal(JournalError::Redis(_) | JournalError::NotReplicated(_)) => {
                "REDIS_UNAVAILABLE"
            }
            AttemptError::Journal(JournalError::Corrupt { .. })
            | AttemptError::ForeignJournal { .. } => "JOURNAL_CORRUPT",
            AttemptError::Chain(e) => e.code(),
        }
    }

    fn details(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        if let AttemptError::TokenExists { token, .. } = self {
            d.insert("token_address".into(), token.to_checksum(None));
        }
        d
    }
}

impl<E: Into<AttemptError>> From<SendError<E>> for AttemptError {
    fn from(e: SendError<E>) -> Self {
        match e {
            SendError::Chain(c) => AttemptError::Chain(c),
            SendError::Journal(j) => j.into(),
        }
    }
}

/// Everything a worker needs, shared by its in-flight jobs.
pub struct Deployer {
    settings: Settings,
    pub queues: Queues,
    journal: Journal,
    chain: Chain,
    rules: Rules,
    lock_seq: AtomicU64,
    audit: Audit,
    status: Arc<WorkerStatus>,
    /// `chain.reorg_watch_blocks` for this chain (0: no watch).
    reorg_window: u64,
    /// Published deployments under this worker's reorg watch.
    watched: std::sync::Mutex<reorg::Watched>,
    /// Which webhook deliveries each published outcome makes.
    outbox: crate::webhooks::Outbox,
}

/// A finished attempt: the event to publish, the model's token, and whether this attempt
/// created it (false: an earlier delivery did and the event is re-published).
struct Done {
    event: String,
    token: Address,
    created: bool,
    /// The block (number, hash) the event names: watched for a reorganisation.
    block: Option<(u64, alloy::primitives::B256)>,
}

/// Where a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Deployed,
    DeadLettered,
    /// Shutdown came first; the message stays in the processing list for recovery.
    Abandoned,
}
