//! The outbound events and the delivery jobs one event makes.
//!
//! An event's id and body are derived from what the pipeline publishes (the `token_deployed`
//! or `deployment_failed` event), never from the clock or chance: publishing the same event
//! again (a Redis write retried after a lost answer) makes the same id and the same bytes, so a
//! receiver that deduplicates on `X-Hokusai-Idempotency-Key` sees one event.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Settings;

pub const COMPLETED: &str = "deployment.completed";
pub const FAILED: &str = "deployment.failed";

/// The namespace of event ids (uuid v5): fixed, so an event's id never changes.
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f0d_5c2e_8a41_4b7e_9d13_42a7_c0de_b1e5);

/// The `target` of a job sent to the deployment's `callback_url`.
pub const CALLBACK: &str = "callback";

/// One delivery of one event to one receiver, as stored in Redis (JSON). Everything a
/// delivery sends is here, so every attempt sends the same id and body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// This delivery (an event sent to two receivers makes two jobs).
    pub job_id: String,
    /// The event's id: `X-Hokusai-Idempotency-Key`, the same on every attempt.
    pub event_id: String,
    pub event_type: String,
    /// An endpoint's `name`, or `callback`.
    pub target: String,
    /// The callback URL (endpoints are looked up by name when sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub deployment_id: String,
    #[serde(default)]
    pub model_id: String,
    /// The exact bytes sent.
    pub body: String,
    /// Requests made so far.
    pub attempts: u32,
    /// When the event was queued (unix milliseconds): the latency histogram's start.
    pub created_ms: i64,
    /// What the last attempt got: the status, or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was dead-lettered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<String>,
}

impl Job {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job always serializes")
    }
}

/// The body every delivery sends.
#[derive(Serialize)]
struct Envelope<'a> {
    event_id: &'a str,
    event_type: &'a str,
    created_at: &'a str,
    deployment_id: &'a str,
    model_id: &'a str,
    /// The `token_deployed` event, or the `deployment_failed` one, as published.
    data: &'a RawValue,
}

/// Which receivers get which events: built once from the settings.
#[derive(Clone)]
pub struct Outbox {
    endpoints: Vec<(String, Vec<String>)>,
    callbacks: bool,
    state_prefix: String,
}

impl Outbox {
    pub fn new(settings: &Settings) -> Outbox {
        Outbox {
            endpoints: settings
                .webhooks
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), e.events.clone()))
                .collect(),
            callbacks: settings.webhooks.callback_secret.is_some(),
            state_prefix: settings.queues.state_prefix.clone(),
        }
    }

    /// Whether any event is ever delivered.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty() || self.callbacks
    }

    /// The deployment's callback URL, from the record the API wrote, unless callbacks are
    /// off, there is none, or a 410 disabled it.
    pub async fn callback(
        &self,
        client: &fred::clients::Client,
        deployment_id: &str,
    ) -> Result<Option<String>, fred::error::Error> {
        use fred::prelude::HashesInterface;
        if !self.callbacks {
            return Ok(None);
        }
        let (url, gone): (Option<String>, Option<String>) = client
            .hmget(
                record_key(&self.state_prefix, deployment_id),
                vec!["callback_url", "callback_gone"],
            )
            .await?;
        Ok(url.filter(|_| gone.is_none()))
    }

    /// The jobs of a published `token_deployed` event (JSON as published).
    pub fn completed(
        &self,
        deployment_id: &str,
        event: &str,
        callback: Option<&str>,
    ) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
        let s = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
        let identity = format!(
            "{COMPLETED}:{deployment_id}:{}:{}",
            s("transaction_hash"),
            s("block_number")
        );
        let at = v
            .get("deployment_timestamp")
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        let model = v
            .get("model_id")
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        self.jobs(
            COMPLETED,
            deployment_id,
            model,
            &identity,
            at,
            event,
            callback,
        )
    }

    /// The jobs of a `deployment_failed` event (JSON as published).
    pub fn failed(&self, deployment_id: &str, event: &str, callback: Option<&str>) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
        let s = |k: &str| {
            v.get(k)
                .and_then(|t| t.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let identity = format!(
            "{FAILED}:{deployment_id}:{}:{}",
            s("error_code"),
            s("failed_at")
        );
        self.jobs(
            FAILED,
            deployment_id,
            &s("model_id"),
            &identity,
            &s("failed_at"),
            event,
            callback,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn jobs(
        &self,
        event_type: &str,
        deployment_id: &str,
        model_id: &str,
        identity: &str,
        created_at: &str,
        data: &str,
        callback: Option<&str>,
    ) -> Vec<String> {
        let Ok(data) = RawValue::from_string(data.to_owned()) else {
            return vec![];
        };
        let event_id = uuid::Uuid::new_v5(&EVENT_NAMESPACE, identity.as_bytes()).to_string();
        let body = serde_json::to_string(&Envelope {
            event_id: &event_id,
            event_type,
            created_at,
            deployment_id,
            model_id,
            data: &data,
        })
        .expect("an envelope always serializes");
        let now = chrono::Utc::now().timestamp_millis();
        let job = |target: &str, url: Option<&str>| {
            Job {
                // Derived too, so a repeated publication makes the identical job.
                job_id: uuid::Uuid::new_v5(
                    &EVENT_NAMESPACE,
                    format!("{event_id}:{target}").as_bytes(),
                )
                .to_string(),
                event_id: event_id.clone(),
                event_type: event_type.to_owned(),
                target: target.to_owned(),
                url: url.map(str::to_owned),
                deployment_id: deployment_id.to_owned(),
                model_id: model_id.to_owned(),
                body: body.clone(),
                attempts: 0,
                created_ms: now,
                last_status: None,
                last_error: None,
                dead_at: None,
            }
            .to_json()
        };
        let mut out: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, events)| events.iter().any(|e| e == event_type))
            .map(|(name, _)| job(name, None))
            .collect();
        if let (true, Some(url)) = (self.callbacks, callback) {
            out.push(job(CALLBACK, Some(url)));
        }
        out
    }
}

/// The API's record of a deployment (`callback_url`, `callback_gone` live there).
pub fn record_key(state_prefix: &str, deployment_id: &str) -> String {
    format!("{state_prefix}:deployment:{deployment_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    fn outbox() -> Outbox {
        let mut s = Settings::load(Sources {
            file: None,
            env: vec![],
        })
        .unwrap();
        s.webhooks.endpoints = vec![serde_json::from_value(serde_json::json!({
            "name": "site", "url": "https://example.com/h", "secret_env": "X",
            "events": ["deployment.completed"],
        }))
        .unwrap()];
        s.webhooks.callback_secret = Some(crate::config::Secret::new("x".repeat(32)));
        Outbox::new(&s)
    }

    #[test]
    fn an_event_published_twice_makes_the_same_id_and_body() {
        let o = outbox();
        let event = r#"{"event_type":"token_deployed","model_id":"m","transaction_hash":"0xab","block_number":7,"deployment_timestamp":"2026-12-02T10:00:00Z"}"#;
        let a: Vec<Job> = o
            .completed("d1", event, Some("https://cb.example/x"))
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        let b: Vec<Job> = o
            .completed("d1", event, Some("https://cb.example/x"))
            .iter()
            .map(|j| serde_json::from_str(j).unwrap())
            .collect();
        assert_eq!(a.len(), 2, "the endpoint and the callback");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (&x.job_id, &x.event_id, &x.body),
                (&y.job_id, &y.event_id, &y.body)
            );
        }
        assert_eq!(a[0].event_id, a[1].event_id, "one event, two receivers");
        assert_ne!(a[0].job_id, a[1].job_id);
        let body: serde_json::Value = serde_json::from_str(&a[0].body).unwrap();
        assert_eq!(body["event_type"], COMPLETED);
        assert_eq!(body["data"]["transaction_hash"], "0xab");
        assert_eq!(body["created_at"], "2026-12-02T10:00:00Z");
        // Another block (a reorganisation) is another event.
        let moved = event.replace("\"block_number\":7", "\"block_number\":8");
        let c: Job = serde_json::from_str(&o.completed("d1", &moved, None)[0]).unwrap();
        assert_ne!(c.event_id, a[0].event_id);
        // The endpoint did not ask for failures: only the callback gets one.
        let failed = r#"{"event_type":"token_deployment_failed","message_id":"d1","model_id":"m","error_code":"RPC_ERROR","error_message":"x","attempts":3,"failed_at":"2026-12-02T10:00:00Z"}"#;
        let f = o.failed("d1", failed, Some("https://cb.example/x"));
        assert_eq!(f.len(), 1);
        assert!(f[0].contains("\"target\":\"callback\""));
    }
}
