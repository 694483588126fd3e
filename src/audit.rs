//! The audit trail: every attempt, transaction and outcome, and every operator action, as one
//! entry in a capped Redis stream (`<state_prefix>:audit`, `XADD MAXLEN ~`) and one log line
//! (target `audit`). Writing it never fails a deployment: a lost entry is counted and logged.

use std::collections::{BTreeMap, HashMap};

use fred::prelude::*;
use fred::types::streams::{XCapKind, XCapTrim};
use tracing::{info, warn};

use crate::config::Settings;
use crate::telemetry::names;

/// Fields of one entry; empty values are left out.
pub type Fields = BTreeMap<&'static str, String>;

#[derive(Clone)]
pub struct Audit {
    client: Client,
    key: String,
    max_len: u64,
    /// Who acts: a worker id, or `operator:<user>` for the CLI (a name the caller gives).
    actor: String,
    /// The Redis ACL user the entry was written as: the name Redis authenticated.
    redis_user: String,
}

/// The stream's key.
pub fn key(settings: &Settings) -> String {
    format!("{}:audit", settings.queues.state_prefix)
}

impl Audit {
    pub fn new(client: Client, settings: &Settings, actor: impl Into<String>) -> Audit {
        Audit {
            key: key(settings),
            max_len: settings.ops.audit_max_len,
            actor: actor.into(),
            redis_user: client
                .client_config()
                .username
                .clone()
                .unwrap_or_else(|| "default".into()),
            client,
        }
    }

    /// Appends one entry: `action` plus the given fields, the actor and a timestamp.
    pub async fn record(&self, action: &str, fields: Fields) {
        let mut pairs: Vec<(String, String)> = vec![
            ("action".into(), action.into()),
            ("actor".into(), self.actor.clone()),
            ("redis_user".into(), self.redis_user.clone()),
            ("at".into(), crate::message::rfc3339(chrono::Utc::now())),
        ];
        pairs.extend(
            fields
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        let line = serde_json::to_string(&fields).unwrap_or_default();
        info!(target: "audit", action, actor = %self.actor, fields = %line, "audit");
        let cap = (XCapKind::MaxLen, XCapTrim::AlmostExact, self.max_len as i64);
        let r: Result<String, _> = self.client.xadd(&self.key, false, cap, "*", pairs).await;
        if let Err(e) = r {
            metrics::counter!(names::AUDIT_WRITE_FAILURES).increment(1);
            warn!(error = %e, action, "audit entry not written to redis (logged above)");
        }
    }
}

/// A stream entry as Redis returns it: id and field-value pairs.
type RawEntry = (String, BTreeMap<String, String>);
type StreamEntry = (String, HashMap<String, String>);

/// One stream entry: its id and fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

/// The last `count` entries, oldest first.
pub async fn tail(
    client: &Client,
    key: &str,
    count: u64,
) -> Result<Vec<Record>, fred::error::Error> {
    let raw: Vec<RawEntry> = client.xrevrange(key, "+", "-", Some(count)).await?;
    Ok(raw
        .into_iter()
        .rev()
        .map(|(id, fields)| Record { id, fields })
        .collect())
}

/// Entries after `last_id`, waiting up to `block_ms` for the first one.
pub async fn after(
    client: &Client,
    key: &str,
    last_id: &str,
    block_ms: u64,
) -> Result<Vec<Record>, fred::error::Error> {
    // XREAD answers [[key, entries]] (RESP2) or a map (RESP3); xread_map reads either.
    let read = client
        .xread_map(Some(100), Some(block_ms), key, last_id)
        .await;
    let mut streams: HashMap<String, Vec<StreamEntry>> = match read {
        Ok(s) => s,
        // Nothing arrived within `block_ms`: fred reports the empty answer as a timeout.
        Err(e) if *e.kind() == fred::error::ErrorKind::Timeout => HashMap::new(),
        Err(e) => return Err(e),
    };
    Ok(streams
        .remove(key)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, fields)| (id, fields.into_iter().collect()))
        .map(|(id, fields)| Record { id, fields })
        .collect())
}
