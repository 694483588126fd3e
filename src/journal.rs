//! The write-ahead deployment journal: one Redis hash per model, written before each
//! transaction is broadcast and after it lands, so that a redelivered message resumes instead
//! of starting over. A signed transaction is re-broadcast byte-identical (same hash) and
//! rebuilt only once its nonce is provably used by another transaction, when it can no longer
//! land. A finished model keeps its event, so a redelivery re-publishes the identical event.
//! Each write a status reader sees (the transaction, the event, the event's removal) also
//! publishes the model id on [`crate::queue::progress_channel`], in the same round trip, for
//! the API's live status streams.

use std::collections::HashMap;

use alloy::primitives::{Address, Bytes, B256};
use fred::prelude::*;

use crate::message::ModelReady;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// A record that precedes a broadcast reached too few replicas (`redis.min_replica_acks`).
    #[error(transparent)]
    NotReplicated(#[from] crate::queue::QueueError),
    #[error("journal of model {model_id} is corrupt: field `{field}`")]
    Corrupt {
        model_id: String,
        field: &'static str,
    },
}

/// The journal's field prefix of a model's one transaction (`TokenManager.deployToken`).
const TX: &str = "deploy";

/// A signed transaction as journaled before broadcast.
#[derive(Debug, Clone, PartialEq)]
pub struct TxRecord {
    pub signer: Address,
    pub nonce: u64,
    pub hash: B256,
    /// The EIP-2718 encoding, re-broadcast as is.
    pub raw: Bytes,
    /// Hashes of the earlier versions this one replaced (same nonce, lower fees), oldest
    /// first: any of them may still be the one that lands.
    pub replaced: Vec<B256>,
}

impl TxRecord {
    /// Every version's hash, newest first.
    pub fn hashes(&self) -> impl Iterator<Item = B256> + '_ {
        std::iter::once(self.hash).chain(self.replaced.iter().rev().copied())
    }
}

/// Everything known about one model's deployment.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The message that started the deployment.
    pub message_id: Option<String>,
    /// The message's validated content, so the event never depends on a later message.
    pub model: Option<ModelReady>,
    pub first_attempt_at: Option<String>,
    /// The model's one transaction (`deployToken`: the token and its registration), with
    /// every version that replaced an earlier one.
    pub deploy: Option<TxRecord>,
    /// The token's address, predicted (CREATE2 from the model id) before the transaction is
    /// signed.
    pub token_address: Option<Address>,
    /// The published `token_deployed` event, verbatim.
    pub event: Option<String>,
    /// When the transaction was first journaled and when the event was (RFC 3339,
    /// milliseconds): the status API's `updated_at`.
    pub deploy_at: Option<String>,
    pub event_at: Option<String>,
    /// The block (number and hash) the event names, canonical when it was recorded: what
    /// the reorg watch compares with the chain.
    pub event_block: Option<(u64, B256)>,
}

impl Entry {
    /// Mirrors [`Journal::record_tx`] in memory.
    pub fn set_tx(&mut self, rec: TxRecord, token_address: Address) {
        self.deploy = Some(rec);
        self.token_address = Some(token_address);
    }

    /// Mirrors [`Journal::clear_tx`] in memory.
    pub fn clear_tx(&mut self) {
        self.deploy = None;
    }
}

/// Now, RFC 3339 in milliseconds: steps of one deployment can be milliseconds apart.
fn now_ms() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Clone)]
pub struct Journal {
    client: Client,
    prefix: String,
    /// [`crate::queue::symbols_key`].
    symbols: String,
    /// `<state_prefix>:reorg_watch`, one sorted set per signer below it.
    watch: String,
    /// [`crate::queue::progress_channel`]: the model id goes there at each transition.
    progress: String,
    /// Off only in the test that proves the journal is what prevents double deployments.
    enabled: bool,
    /// Makes a transaction's record wait for replicas before it is broadcast.
    durability: Option<crate::topology::Durability>,
}

impl Journal {
    pub fn new(client: Client, state_prefix: &str, enabled: bool) -> Journal {
        Journal {
            client,
            prefix: format!("{state_prefix}:journal"),
            symbols: crate::queue::symbols_key(state_prefix),
            watch: format!("{state_prefix}:reorg_watch"),
            progress: crate::queue::progress_channel(state_prefix),
            enabled,
            durability: None,
        }
    }

    /// Waits until replicas hold every write this connection made (and so every write before
    /// them in the replication stream); at once when `redis.min_replica_acks` is 0.
    pub async fn durable(&self) -> Result<(), JournalError> {
        if let Some(d) = &self.durability {
            d.wait().await?;
        }
        Ok(())
    }

    /// Records of signed transactions wait for `redis.min_replica_acks` replicas before
    /// `record_tx` returns (the worker's journal; the API only reads).
    pub fn with_durability(mut self, d: crate::topology::Durability) -> Journal {
        self.durability = Some(d);
        self
    }

    fn key(&self, model_id: &str) -> String {
        format!("{}:{model_id}", self.prefix)
    }

    /// The Redis key of a model's journal.
    pub fn key_of(state_prefix: &str, model_id: &str) -> String {
        format!("{state_prefix}:journal:{model_id}")
    }

    pub async fn load(&self, model_id: &str) -> Result<Entry, JournalError> {
        if !self.enabled {
            return Ok(Entry::default());
        }
        let h: HashMap<String, String> = self.client.hgetall(self.key(model_id)).await?;
        let corrupt = |field| JournalError::Corrupt {
            model_id: model_id.to_owned(),
            field,
        };
        let tx = || -> Result<Option<TxRecord>, JournalError> {
            let p = TX;
            let Some(raw) = h.get(&format!("{p}_raw")) else {
                return Ok(None);
            };
            let get = |f: &'static str| h.get(&format!("{p}_{f}")).ok_or_else(|| corrupt(f));
            Ok(Some(TxRecord {
                signer: get("signer")?.parse().map_err(|_| corrupt("signer"))?,
                nonce: get("nonce")?.parse().map_err(|_| corrupt("nonce"))?,
                hash: get("hash")?.parse().map_err(|_| corrupt("hash"))?,
                raw: raw.parse().map_err(|_| corrupt("raw"))?,
                replaced: match h.get(&format!("{p}_replaced")) {
                    None => Vec::new(),
                    Some(l) => l
                        .split(',')
                        .filter(|x| !x.is_empty())
                        .map(|x| x.parse().map_err(|_| corrupt("replaced")))
                        .collect::<Result<_, _>>()?,
                },
            }))
        };
        Ok(Entry {
            message_id: h.get("message_id").cloned(),
            model: h
                .get("model")
                .map(|m| serde_json::from_str(m))
                .transpose()
                .map_err(|_| corrupt("model"))?,
            first_attempt_at: h.get("first_attempt_at").cloned(),
            deploy: tx()?,
            token_address: h
                .get("token_address")
                .map(|a| a.parse())
                .transpose()
                .map_err(|_| corrupt("token_address"))?,
            event: h.get("event").cloned(),
            deploy_at: h.get("deploy_at").cloned(),
            event_at: h.get("event_at").cloned(),
            event_block: match (h.get("event_block"), h.get("event_block_hash")) {
                (Some(n), Some(b)) => Some((
                    n.parse().map_err(|_| corrupt("event_block"))?,
                    b.parse().map_err(|_| corrupt("event_block_hash"))?,
                )),
                _ => None,
            },
        })
    }

    /// Opens the record of a model's deployment (the caller holds the model's lock).
    pub async fn begin(
        &self,
        model: &ModelReady,
        message_id: &str,
        at: &str,
    ) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        let model_json = serde_json::to_string(model).expect("ModelReady always serializes");
        // The symbol joins the issued ones, so the API generates no symbol a model already has.
        let p = self.client.pipeline();
        let _: () = p
            .hset(
                self.key(&model.model_id),
                vec![
                    ("message_id", message_id),
                    ("model", model_json.as_str()),
                    ("first_attempt_at", at),
                ],
            )
            .await?;
        let _: () = p
            .hsetnx(&self.symbols, &model.chain_symbol, &model.model_id)
            .await?;
        let _: Vec<Value> = p.all().await?;
        Ok(())
    }

    /// Records the signed transaction (or a replacement, with the hashes it replaced) and the
    /// token's predicted address; called before it is broadcast. The model id is published on
    /// the progress channel in the same pipeline (one round trip, after the write).
    pub async fn record_tx(
        &self,
        model_id: &str,
        rec: &TxRecord,
        token_address: Address,
    ) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        let p = TX;
        let mut fields = vec![
            (format!("{p}_signer"), rec.signer.to_string()),
            (format!("{p}_nonce"), rec.nonce.to_string()),
            (format!("{p}_hash"), rec.hash.to_string()),
            (format!("{p}_raw"), rec.raw.to_string()),
            (
                format!("{p}_replaced"),
                rec.replaced
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        fields.push(("token_address".into(), token_address.to_string()));
        if rec.replaced.is_empty() {
            // The step's first transaction: when it began.
            fields.push((format!("{p}_at"), now_ms()));
        }
        let p = self.client.pipeline();
        let _: () = p.hset(self.key(model_id), fields).await?;
        let _: () = p.publish(&self.progress, model_id).await?;
        let _: Vec<Value> = p.all().await?;
        // Write-ahead across a failover too: not broadcast until replicas hold the record.
        if let Some(d) = &self.durability {
            d.wait().await?;
        }
        Ok(())
    }

    /// Forgets a transaction that can no longer land (its nonce went to another one) or reverted.
    pub async fn clear_tx(&self, model_id: &str) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        let fields: Vec<String> = ["signer", "nonce", "hash", "raw", "replaced"]
            .iter()
            .map(|f| format!("{TX}_{f}"))
            .collect();
        let _: () = self.client.hdel(self.key(model_id), fields).await?;
        Ok(())
    }

    /// Stores the event before it is published, so every re-publication is identical, and
    /// puts the model under the reorg watch of the transaction's signer, in one transaction:
    /// no event is ever recorded unwatched. The same transaction publishes the model id on the
    /// progress channel.
    pub async fn record_event(
        &self,
        model_id: &str,
        event: &str,
        signer: Address,
        block: u64,
        block_hash: B256,
    ) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        let tx = self.client.multi();
        let _: () = tx
            .hset(
                self.key(model_id),
                vec![
                    ("event", event.to_owned()),
                    ("event_at", now_ms()),
                    ("event_block", block.to_string()),
                    ("event_block_hash", block_hash.to_string()),
                ],
            )
            .await?;
        self.watch_at(&tx, signer, model_id, block).await?;
        let _: () = tx.publish(&self.progress, model_id).await?;
        let _: Vec<Value> = tx.exec(true).await?;
        Ok(())
    }

    /// Forgets the event of a deployment a reorganisation removed from the chain: until it is
    /// deployed again, status shows it in progress. It stays under watch, so a crash before the
    /// new event is recorded leaves it to be found again. The model id is published on the
    /// progress channel in the same pipeline.
    pub async fn clear_event(&self, model_id: &str) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        let p = self.client.pipeline();
        let _: () = p
            .hdel(
                self.key(model_id),
                vec!["event", "event_at", "event_block", "event_block_hash"],
            )
            .await?;
        let _: () = p.publish(&self.progress, model_id).await?;
        let _: Vec<Value> = p.all().await?;
        Ok(())
    }

    /// The sorted set of the models under reorg watch whose transactions `signer` signed,
    /// scored by the event's block.
    fn watch_key(&self, signer: Address) -> String {
        format!("{}:{signer}", self.watch)
    }

    /// Keeps a model under `signer`'s watch as of `block` (a redeployment under way must not
    /// age out of the watch before its new event is recorded).
    pub async fn rewatch(
        &self,
        signer: Address,
        model_id: &str,
        block: u64,
    ) -> Result<(), JournalError> {
        if !self.enabled {
            return Ok(());
        }
        self.watch_at(&self.client, signer, model_id, block).await
    }

    /// Puts the model in `signer`'s watch set, scored by `block` (on a client or a MULTI).
    async fn watch_at<C: SortedSetsInterface + Sync>(
        &self,
        on: &C,
        signer: Address,
        model_id: &str,
        block: u64,
    ) -> Result<(), JournalError> {
        let _: () = on
            .zadd(
                self.watch_key(signer),
                None,
                None,
                false,
                false,
                (block as f64, model_id),
            )
            .await?;
        Ok(())
    }

    /// The models under `signer`'s watch and their blocks, at or above `from`.
    pub async fn watched(
        &self,
        signer: Address,
        from: u64,
    ) -> Result<Vec<(String, u64)>, JournalError> {
        let v: Vec<(String, f64)> = self
            .client
            .zrangebyscore(self.watch_key(signer), from as f64, "+inf", true, None)
            .await?;
        Ok(v.into_iter().map(|(m, b)| (m, b as u64)).collect())
    }

    /// Ends the watch of every model whose block is under `below`.
    pub async fn unwatch_below(&self, signer: Address, below: u64) -> Result<(), JournalError> {
        let _: u64 = self
            .client
            .zremrangebyscore(self.watch_key(signer), "-inf", format!("({below}"))
            .await?;
        Ok(())
    }
}
