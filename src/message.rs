//! Wire formats: the inbound `model_ready_to_deploy` message (the producer's envelope or seed
//! 001's bare form), its validation, the outbound `token_deployed` event, the DLQ envelope and
//! the failure event. Every rejection names the field and the rule it broke.

use std::collections::BTreeMap;
use std::fmt;

use alloy::primitives::{keccak256, Address};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use validator::Validate;

/// The message type the producer writes into its envelope.
pub const MESSAGE_TYPE: &str = "model_ready_to_deploy";
/// The version of the events we write; consumers accept any 1.x.
pub const EVENT_VERSION: &str = "1.0";
/// Longest model id: registry keys and Redis keys stay short (producer ids are ~10 chars).
const MAX_MODEL_ID: u64 = 128;
/// Longest producer symbol (the producer's own limit, issue 2).
const MAX_SYMBOL: u64 = 64;
/// Longest token name: long enough for "Hokusai " + a 128-char model id.
const MAX_TOKEN_NAME: u64 = 160;
/// Longest metric name, model name, version, run id or experiment name.
const MAX_LABEL: u64 = 128;

/// Why a message was refused: a stable code for machines, the field and rule for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// `INVALID_MESSAGE`, `MESSAGE_TOO_LARGE`, `UNSUPPORTED_VERSION`, `THRESHOLD_NOT_MET`.
    pub code: String,
    /// The JSON field at fault (`payload.` is not prefixed: the bare and envelope forms share names).
    pub field: String,
    /// The rule it broke: `required`, `type`, `format`, `length`, `checksum`, ...
    pub rule: String,
    pub message: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: field `{}` breaks rule `{}`: {}",
            self.code, self.field, self.rule, self.message
        )
    }
}

fn reject(code: &str, field: &str, rule: &str, message: impl Into<String>) -> Rejection {
    Rejection {
        code: code.into(),
        field: field.into(),
        rule: rule.into(),
        message: message.into(),
    }
}

fn invalid(field: &str, rule: &str, message: impl Into<String>) -> Rejection {
    reject("INVALID_MESSAGE", field, rule, message)
}

/// The producer's envelope, read loosely so the bare form (which has none of it) parses too.
#[derive(Deserialize)]
struct EnvelopeProbe<'a> {
    message_id: Option<String>,
    message_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    retry_count: Option<u32>,
    max_retries: Option<u32>,
}

/// The payload exactly as it may arrive: everything optional so that presence is checked by
/// rules that name the field; unknown fields (`proposal_identifier`, `eval_spec`, ...) ignored.
#[derive(Deserialize, Validate)]
struct RawPayload {
    #[validate(required, length(min = 1, max = MAX_MODEL_ID), custom(function = "rule_model_id"))]
    model_id: Option<String>,
    #[validate(required, length(min = 1, max = MAX_SYMBOL), custom(function = "rule_symbol"))]
    token_symbol: Option<String>,
    #[validate(length(min = 1, max = MAX_TOKEN_NAME), custom(function = "rule_token_name"))]
    token_name: Option<String>,
    #[validate(required, length(min = 1, max = MAX_LABEL), custom(function = "rule_label"))]
    metric_name: Option<String>,
    #[validate(required, custom(function = "rule_finite"))]
    baseline_value: Option<f64>,
    #[validate(required, custom(function = "rule_finite"))]
    current_value: Option<f64>,
    #[validate(required, length(min = 1, max = MAX_LABEL), custom(function = "rule_text"))]
    model_name: Option<String>,
    #[validate(required, length(min = 1, max = MAX_LABEL), custom(function = "rule_label"))]
    model_version: Option<String>,
    #[validate(length(min = 1, max = MAX_LABEL), custom(function = "rule_label"))]
    mlflow_run_id: Option<String>,
    #[validate(custom(function = "rule_finite"))]
    improvement_percentage: Option<f64>,
    contributor_address: Option<String>,
    #[validate(length(max = MAX_LABEL), custom(function = "rule_text"))]
    experiment_name: Option<String>,
    timestamp: Option<String>,
    message_version: Option<String>,
}

/// Field order in which rejections are reported, so the same message always names the same field.
const FIELD_ORDER: &[&str] = &[
    "model_id",
    "token_symbol",
    "token_name",
    "metric_name",
    "baseline_value",
    "current_value",
    "model_name",
    "model_version",
    "mlflow_run_id",
    "improvement_percentage",
    "experiment_name",
];

fn verr(code: &'static str, msg: &'static str) -> validator::ValidationError {
    validator::ValidationError::new(code).with_message(msg.into())
}

fn rule_model_id(v: &str) -> Result<(), validator::ValidationError> {
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        Ok(())
    } else {
        Err(verr(
            "format",
            "only ASCII letters, digits, '_', '-', '.' and ':'",
        ))
    }
}

fn rule_symbol(v: &str) -> Result<(), validator::ValidationError> {
    let ok = v
        .split('-')
        .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(verr(
            "format",
            "ASCII letters and digits in groups joined by single hyphens (e.g. msg-ai)",
        ))
    }
}

fn rule_token_name(v: &str) -> Result<(), validator::ValidationError> {
    rule_text(v)?;
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || " -_.()".contains(c))
    {
        Ok(())
    } else {
        Err(verr(
            "format",
            "ASCII letters, digits, spaces and -_.() only",
        ))
    }
}

fn rule_label(v: &str) -> Result<(), validator::ValidationError> {
    if v.chars().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(verr("format", "printable ASCII without spaces"))
    }
}

/// Free text: no control characters, no leading or trailing whitespace.
fn rule_text(v: &str) -> Result<(), validator::ValidationError> {
    if v.chars().any(char::is_control) {
        return Err(verr(
            "control_characters",
            "must not contain control characters",
        ));
    }
    if v.trim() != v {
        return Err(verr("whitespace", "must not start or end with whitespace"));
    }
    Ok(())
}

fn rule_finite(v: f64) -> Result<(), validator::ValidationError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(verr("finite", "must be a finite number"))
    }
}

/// A validated `ModelReadyToDeployMessage`, normalized: what the pipeline deploys from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReady {
    pub model_id: String,
    /// The producer's symbol as sent (`msg-ai`).
    pub token_symbol: String,
    /// The symbol written on chain: the producer's symbol in upper case (`MSG-AI`).
    pub chain_symbol: String,
    /// The message's name, or `Hokusai {model_id}` (seed 000).
    pub token_name: String,
    pub metric_name: String,
    pub baseline_value: f64,
    pub current_value: f64,
    pub model_name: String,
    pub model_version: String,
    pub mlflow_run_id: Option<String>,
    /// As sent, or derived from baseline and current value when the producer sent null.
    pub improvement_percentage: f64,
    pub contributor_address: Option<Address>,
    pub experiment_name: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    pub message_version: String,
}

/// One message taken from the queue, with its identity and the raw text kept verbatim.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The envelope's `message_id`, or `keccak:<hash of the raw bytes>` for the bare form.
    pub message_id: String,
    pub model: ModelReady,
    /// The producer's own retry bookkeeping, kept for the DLQ record.
    pub producer_retry_count: Option<u32>,
    pub producer_max_retries: Option<u32>,
}

/// Limits that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub max_message_bytes: usize,
    pub min_improvement_percentage: f64,
}

/// The identity of a raw message before (or without) parsing: for DLQ records of garbage.
pub fn fallback_id(raw: &[u8]) -> String {
    format!("keccak:{}", &hex::encode(keccak256(raw))[..32])
}

/// Parses and validates one raw queue item. Never panics, whatever the bytes.
pub fn parse(raw: &[u8], rules: &Rules) -> Result<Inbound, Rejection> {
    if raw.len() > rules.max_message_bytes {
        return Err(reject(
            "MESSAGE_TOO_LARGE",
            "$",
            "max_bytes",
            format!(
                "{} bytes exceeds the limit of {}",
                raw.len(),
                rules.max_message_bytes
            ),
        ));
    }
    let text =
        std::str::from_utf8(raw).map_err(|e| invalid("$", "utf8", format!("not UTF-8: {e}")))?;
    let probe: EnvelopeProbe<'_> = from_json(text, "")?;
    let (message_id, payload_text) = match probe.payload {
        Some(p) => {
            match probe.message_type.as_deref() {
                Some(MESSAGE_TYPE) => {}
                Some(other) => {
                    return Err(invalid(
                        "message_type",
                        "value",
                        format!("expected `{MESSAGE_TYPE}`, got `{}`", printable(other)),
                    ))
                }
                None => {
                    return Err(invalid(
                        "message_type",
                        "required",
                        "the envelope has no message_type",
                    ))
                }
            }
            let id = match probe.message_id {
                Some(id)
                    if !id.is_empty()
                        && id.len() <= 128
                        && id.chars().all(|c| c.is_ascii_graphic()) =>
                {
                    id
                }
                Some(_) => {
                    return Err(invalid(
                        "message_id",
                        "format",
                        "1 to 128 printable ASCII characters",
                    ))
                }
                None => {
                    return Err(invalid(
                        "message_id",
                        "required",
                        "the envelope has no message_id",
                    ))
                }
            };
            (id, p.get())
        }
        None => (fallback_id(raw), text),
    };
    let raw_payload: RawPayload = from_json(
        payload_text,
        if probe.payload.is_some() {
            "payload."
        } else {
            ""
        },
    )?;
    let model = validate(raw_payload, rules)?;
    Ok(Inbound {
        message_id,
        model,
        producer_retry_count: probe.retry_count,
        producer_max_retries: probe.max_retries,
    })
}

/// Deserializes with the path of the failing field in the rejection.
fn from_json<'a, T: Deserialize<'a>>(text: &'a str, prefix: &str) -> Result<T, Rejection> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if let Some(rest) = msg.strip_prefix("duplicate field `") {
            let field = rest.split('`').next().unwrap_or("?");
            return invalid(
                &format!("{prefix}{field}"),
                "duplicate_key",
                format!("`{field}` appears twice"),
            );
        }
        let (field, rule) = match inner.classify() {
            serde_json::error::Category::Data if path != "." => (format!("{prefix}{path}"), "type"),
            serde_json::error::Category::Data => ("$".to_owned(), "type"),
            _ => ("$".to_owned(), "json"),
        };
        let field = if field.is_empty() {
            "$".to_owned()
        } else {
            field
        };
        invalid(&field, rule, msg)
    })
}

fn validate(p: RawPayload, rules: &Rules) -> Result<ModelReady, Rejection> {
    if let Err(errors) = p.validate() {
        let fields = errors.field_errors();
        let first = FIELD_ORDER
            .iter()
            .find_map(|f| fields.get(*f).and_then(|v| v.first()).map(|e| (*f, e)));
        let (field, e) = match first {
            Some(x) => x,
            None => {
                // A field outside FIELD_ORDER: still report it rather than pass the message.
                let (k, v) = fields
                    .iter()
                    .next()
                    .expect("validate() failed, so one field erred");
                (
                    k.as_ref(),
                    v.first().expect("a field error list is never empty"),
                )
            }
        };
        let message = match (e.code.as_ref(), &e.message) {
            (_, Some(m)) => m.to_string(),
            ("required", None) => "is required and must not be null".into(),
            ("length", None) => {
                let min = e
                    .params
                    .get("min")
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "0".into());
                let max = e
                    .params
                    .get("max")
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into());
                format!("length must be between {min} and {max} characters")
            }
            (code, None) => format!("breaks {code}"),
        };
        return Err(invalid(field, &e.code, message));
    }
    // `validate` passed, so every `required` field is present.
    let model_id = p.model_id.expect("required: checked by validate");
    let token_symbol = p.token_symbol.expect("required: checked by validate");
    let baseline = p.baseline_value.expect("required: checked by validate");
    let current = p.current_value.expect("required: checked by validate");

    let message_version = p.message_version.unwrap_or_else(|| EVENT_VERSION.into());
    let major = message_version.split('.').next().unwrap_or("");
    if major != "1" {
        return Err(reject(
            "UNSUPPORTED_VERSION",
            "message_version",
            "compatible",
            format!("version `{}` is not 1.x", printable(&message_version)),
        ));
    }

    let improvement = match p.improvement_percentage {
        Some(v) => v,
        None => {
            if baseline == 0.0 {
                return Err(invalid(
                    "improvement_percentage",
                    "derivable",
                    "is null and cannot be derived from a baseline_value of 0",
                ));
            }
            (current - baseline) / baseline.abs() * 100.0
        }
    };
    if !improvement.is_finite() {
        return Err(invalid(
            "improvement_percentage",
            "finite",
            "must be a finite number",
        ));
    }
    if improvement <= rules.min_improvement_percentage {
        return Err(reject(
            "THRESHOLD_NOT_MET",
            "improvement_percentage",
            "above_threshold",
            format!(
                "{improvement} is not above the minimum of {}",
                rules.min_improvement_percentage
            ),
        ));
    }

    let contributor_address = p
        .contributor_address
        .as_deref()
        .map(parse_contributor)
        .transpose()?;
    let timestamp = p.timestamp.as_deref().map(parse_timestamp).transpose()?;
    let token_name = p
        .token_name
        .unwrap_or_else(|| format!("Hokusai {model_id}"));
    Ok(ModelReady {
        chain_symbol: token_symbol.to_ascii_uppercase(),
        token_symbol,
        token_name,
        metric_name: p.metric_name.expect("required: checked by validate"),
        baseline_value: baseline,
        current_value: current,
        model_name: p.model_name.expect("required: checked by validate"),
        model_version: p.model_version.expect("required: checked by validate"),
        mlflow_run_id: p.mlflow_run_id,
        improvement_percentage: improvement,
        contributor_address,
        experiment_name: p.experiment_name,
        timestamp,
        message_version,
        model_id,
    })
}

/// EIP-55: all-lower or all-upper hex passes; mixed case must match its checksum.
pub fn parse_contributor(v: &str) -> Result<Address, Rejection> {
    let hexpart = v
        .strip_prefix("0x")
        .ok_or_else(|| invalid("contributor_address", "format", "must start with 0x"))?;
    if hexpart.len() != 40 || !hexpart.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(
            "contributor_address",
            "format",
            "must be 0x followed by 40 hex digits",
        ));
    }
    let addr: Address = v
        .parse()
        .map_err(|e| invalid("contributor_address", "format", format!("{e}")))?;
    let has_lower = hexpart.chars().any(|c| c.is_ascii_lowercase());
    let has_upper = hexpart.chars().any(|c| c.is_ascii_uppercase());
    if has_lower && has_upper && Address::parse_checksummed(v, None).is_err() {
        return Err(invalid(
            "contributor_address",
            "checksum",
            format!(
                "mixed-case address fails its EIP-55 checksum (expected {})",
                addr.to_checksum(None)
            ),
        ));
    }
    Ok(addr)
}

/// ISO 8601 / RFC 3339; a timestamp without an offset (the producer's) is read as UTC.
pub fn parse_timestamp(v: &str) -> Result<DateTime<Utc>, Rejection> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|n| n.and_utc())
        .map_err(|_| invalid("timestamp", "iso8601", "must be an ISO 8601 date-time"))
}

/// Control characters and overlong text are cut before a value is quoted back in an error.
fn printable(v: &str) -> String {
    v.chars().filter(|c| !c.is_control()).take(64).collect()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The outbound `token_deployed` event: every field of seed 001's example, plus optional extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenDeployed {
    pub event_type: String,
    pub model_id: String,
    pub token_address: String,
    pub token_symbol: String,
    pub token_name: String,
    pub transaction_hash: String,
    pub registry_transaction_hash: String,
    pub mlflow_run_id: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub deployment_timestamp: String,
    pub deployer_address: String,
    pub network: String,
    pub block_number: u64,
    /// Gas of the token deployment, decimal.
    pub gas_used: String,
    /// Effective gas price of the token deployment in wei, decimal.
    pub gas_price: String,
    pub contributor_address: Option<String>,
    pub performance_metric: String,
    pub performance_improvement: f64,
    pub message_version: String,
    /// Extras (optional for consumers): which message caused it, chain id, registry gas.
    pub source_message_id: String,
    pub chain_id: u64,
    pub registry_block_number: u64,
    pub registry_gas_used: String,
    /// The registration's effective gas price (wei); absent in events written before it existed.
    #[serde(default)]
    pub registry_gas_price: String,
    /// Present (`true`) only on an event re-published after a reorganisation removed the
    /// transaction an earlier event named: this one names the block it is in now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reorged: bool,
}

/// A message that could not be deployed, as stored in the DLQ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub dlq_version: String,
    pub message_id: String,
    pub model_id: Option<String>,
    pub error: DeadLetterError,
    /// Attempts this service made (1 for a message refused at once).
    pub attempts: u32,
    pub first_attempt_at: String,
    pub failed_at: String,
    pub worker_id: String,
    pub producer_retry_count: Option<u32>,
    pub producer_max_retries: Option<u32>,
    /// The message exactly as it was on the queue (lossy only if it was not UTF-8).
    pub original: String,
}

impl DeadLetter {
    /// A dead letter for `raw`, failed now; callers fill in what they know of the message.
    pub fn new(
        raw: &[u8],
        error: DeadLetterError,
        attempts: u32,
        first_attempt_at: &str,
        worker_id: &str,
    ) -> Self {
        DeadLetter {
            dlq_version: "1".into(),
            message_id: fallback_id(raw),
            model_id: None,
            error,
            attempts,
            first_attempt_at: first_attempt_at.to_owned(),
            failed_at: rfc3339(Utc::now()),
            worker_id: worker_id.to_owned(),
            producer_retry_count: None,
            producer_max_retries: None,
            original: String::from_utf8_lossy(raw).into_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterError {
    pub code: String,
    pub field: Option<String>,
    pub rule: Option<String>,
    pub message: String,
    /// Extra facts, e.g. the existing token for `TOKEN_EXISTS`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// The failure event for monitoring (seed 001 §6.5): no message body, only what alerts need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentFailed {
    pub event_type: String,
    pub message_id: String,
    pub model_id: Option<String>,
    pub error_code: String,
    pub error_message: String,
    pub attempts: u32,
    pub failed_at: String,
    pub message_version: String,
}

impl DeploymentFailed {
    pub fn from_dead_letter(d: &DeadLetter) -> Self {
        Self {
            event_type: "token_deployment_failed".into(),
            message_id: d.message_id.clone(),
            model_id: d.model_id.clone(),
            error_code: d.error.code.clone(),
            error_message: d.error.message.clone(),
            attempts: d.attempts,
            failed_at: d.failed_at.clone(),
            message_version: EVENT_VERSION.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        max_message_bytes: 65536,
        min_improvement_percentage: 0.0,
    };
    const SAMPLE: &str = include_str!("../tests/data/producer-envelope.json");
    const BARE: &str = include_str!("../tests/data/seed-bare.json");

    fn field_rule(raw: &str) -> (String, String, String) {
        let r = parse(raw.as_bytes(), &RULES).unwrap_err();
        (r.code, r.field, r.rule)
    }

    fn with_payload(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        edit(v["payload"].as_object_mut().unwrap());
        v.to_string()
    }

    #[test]
    fn producer_envelope_parses() {
        let m = parse(SAMPLE.as_bytes(), &RULES).unwrap();
        assert_eq!(m.message_id, "6f4c6a8e-69bf-4c53-9e60-fd3a28a2fc2a");
        assert_eq!(m.model.model_id, "model_7");
        assert_eq!(m.model.chain_symbol, "MSG-AI");
        assert_eq!(m.model.token_name, "Hokusai model_7");
        assert_eq!(
            m.model.timestamp.unwrap().to_rfc3339(),
            "2026-11-22T12:30:53.516759+00:00"
        );
        assert_eq!(m.producer_max_retries, Some(3));
    }

    #[test]
    fn seed_bare_message_parses() {
        let m = parse(BARE.as_bytes(), &RULES).unwrap();
        assert!(m.message_id.starts_with("keccak:"));
        assert_eq!(m.model.chain_symbol, "HKAI-123");
        assert_eq!(m.model.improvement_percentage, 3.51);
        assert_eq!(
            m.model.experiment_name.as_deref(),
            Some("iris_classification")
        );
    }

    #[test]
    fn null_improvement_is_derived() {
        let raw = with_payload(|p| {
            p.insert("improvement_percentage".into(), serde_json::Value::Null);
        });
        let m = parse(raw.as_bytes(), &RULES).unwrap();
        assert!((m.model.improvement_percentage - 10.0).abs() < 1e-9);
    }

    /// A change made to the sample payload.
    type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, serde_json::Value>)>;

    #[test]
    fn each_rule_names_field_and_rule() {
        use serde_json::json;
        let cases: Vec<(Edit, &str, &str, &str)> = vec![
            (
                Box::new(|p| {
                    p.remove("model_id");
                }),
                "INVALID_MESSAGE",
                "model_id",
                "required",
            ),
            (
                Box::new(|p| {
                    p.insert("model_id".into(), json!("a b"));
                }),
                "INVALID_MESSAGE",
                "model_id",
                "format",
            ),
            (
                Box::new(|p| {
                    p.insert("model_id".into(), json!("x".repeat(129)));
                }),
                "INVALID_MESSAGE",
                "model_id",
                "length",
            ),
            (
                Box::new(|p| {
                    p.insert("token_symbol".into(), json!("msg--ai"));
                }),
                "INVALID_MESSAGE",
                "token_symbol",
                "format",
            ),
            (
                Box::new(|p| {
                    p.insert("token_symbol".into(), json!("a".repeat(65)));
                }),
                "INVALID_MESSAGE",
                "token_symbol",
                "length",
            ),
            (
                Box::new(|p| {
                    p.insert("token_symbol".into(), json!(null));
                }),
                "INVALID_MESSAGE",
                "token_symbol",
                "required",
            ),
            (
                Box::new(|p| {
                    p.insert("token_name".into(), json!("Evil\u{200b}Token"));
                }),
                "INVALID_MESSAGE",
                "token_name",
                "format",
            ),
            (
                Box::new(|p| {
                    p.insert("metric_name".into(), json!(""));
                }),
                "INVALID_MESSAGE",
                "metric_name",
                "length",
            ),
            (
                Box::new(|p| {
                    p.insert("baseline_value".into(), json!("high"));
                }),
                "INVALID_MESSAGE",
                "payload.baseline_value",
                "type",
            ),
            (
                Box::new(|p| {
                    p.insert("model_name".into(), json!("bad\u{7}"));
                }),
                "INVALID_MESSAGE",
                "model_name",
                "control_characters",
            ),
            (
                Box::new(|p| {
                    p.insert("improvement_percentage".into(), json!(-1.0));
                }),
                "THRESHOLD_NOT_MET",
                "improvement_percentage",
                "above_threshold",
            ),
            (
                Box::new(|p| {
                    p.insert("improvement_percentage".into(), json!(0.0));
                }),
                "THRESHOLD_NOT_MET",
                "improvement_percentage",
                "above_threshold",
            ),
            (
                Box::new(|p| {
                    p.insert(
                        "contributor_address".into(),
                        json!("0x742d35Cc6634C0532925a3b844Bc9e7595f82b3D"),
                    );
                }),
                "INVALID_MESSAGE",
                "contributor_address",
                "checksum",
            ),
            (
                Box::new(|p| {
                    p.insert("contributor_address".into(), json!("0x1234"));
                }),
                "INVALID_MESSAGE",
                "contributor_address",
                "format",
            ),
            (
                Box::new(|p| {
                    p.insert("message_version".into(), json!("2.0"));
                }),
                "UNSUPPORTED_VERSION",
                "message_version",
                "compatible",
            ),
            (
                Box::new(|p| {
                    p.insert("timestamp".into(), json!("yesterday"));
                }),
                "INVALID_MESSAGE",
                "timestamp",
                "iso8601",
            ),
            (
                Box::new(|p| {
                    p.insert("baseline_value".into(), json!(0.0));
                    p.insert("improvement_percentage".into(), json!(null));
                }),
                "INVALID_MESSAGE",
                "improvement_percentage",
                "derivable",
            ),
        ];
        for (edit, code, field, rule) in cases {
            let raw = with_payload(edit);
            assert_eq!(
                field_rule(&raw),
                (code.into(), field.into(), rule.into()),
                "{raw}"
            );
        }
    }

    #[test]
    fn checksum_rule_accepts_single_case_and_exact_checksum() {
        for a in [
            "0x742d35cc6634c0532925a3b844bc9e7595f82b3d",
            "0x742D35CC6634C0532925A3B844BC9E7595F82B3D",
            "0x742D35cC6634C0532925a3b844BC9E7595f82b3d",
        ] {
            parse_contributor(a).unwrap();
        }
        // Seed 001's example address is not a valid EIP-55 checksum.
        assert_eq!(
            parse_contributor("0x742d35Cc6634C0532925a3b844Bc9e7595f82b3d")
                .unwrap_err()
                .rule,
            "checksum"
        );
    }

    #[test]
    fn envelope_level_rules() {
        let v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        let mut wrong_type = v.clone();
        wrong_type["message_type"] = "model_deleted".into();
        assert_eq!(field_rule(&wrong_type.to_string()).1, "message_type");
        let mut no_id = v.clone();
        no_id.as_object_mut().unwrap().remove("message_id");
        assert_eq!(field_rule(&no_id.to_string()).2, "required");
        assert_eq!(field_rule("not json").2, "json");
        assert_eq!(field_rule("[1,2]").0, "INVALID_MESSAGE");
        let r = parse(&[0xff, 0xfe, b'{'], &RULES).unwrap_err();
        assert_eq!(r.rule, "utf8");
        let big = "x".repeat(70_000);
        assert_eq!(field_rule(&big).0, "MESSAGE_TOO_LARGE");
        let dup = SAMPLE.replacen(
            "\"model_id\": \"model_7\"",
            "\"model_id\": \"model_7\", \"model_id\": \"model_8\"",
            1,
        );
        assert_eq!(
            field_rule(&dup),
            (
                "INVALID_MESSAGE".into(),
                "payload.model_id".into(),
                "duplicate_key".into()
            )
        );
        // Deep nesting in an ignored field is skipped without recursion (the byte limit bounds
        // it); the message is refused for what it lacks, not by a stack overflow.
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            field_rule(&deep),
            (
                "INVALID_MESSAGE".into(),
                "model_id".into(),
                "required".into()
            )
        );
        // Deep nesting where a value is expected is a type error at once.
        let deep = format!(
            "{{\"model_id\": {}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(
            field_rule(&deep),
            ("INVALID_MESSAGE".into(), "model_id".into(), "type".into())
        );
    }

    #[test]
    fn events_round_trip() {
        let d = DeadLetter {
            dlq_version: "1".into(),
            message_id: "m".into(),
            model_id: None,
            error: DeadLetterError {
                code: "INVALID_MESSAGE".into(),
                field: Some("model_id".into()),
                rule: Some("required".into()),
                message: "x".into(),
                details: BTreeMap::new(),
            },
            attempts: 1,
            first_attempt_at: "t".into(),
            failed_at: "t".into(),
            worker_id: "w".into(),
            producer_retry_count: Some(0),
            producer_max_retries: Some(3),
            original: "{}".into(),
        };
        let s = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<DeadLetter>(&s).unwrap(), d);
    }
}

/// Property tests: whatever arrives, parsing ends in a message or a rejection that names a
/// field and a rule; never a panic. On-chain names and symbols are plain ASCII by policy, so
/// look-alike letters, zero-width and other invisible characters cannot spoof another token.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = include_str!("../tests/data/producer-envelope.json");

    fn rules() -> Rules {
        Rules {
            max_message_bytes: 65_536,
            min_improvement_percentage: 0.0,
        }
    }

    fn rejected_well(r: &Rejection) -> bool {
        !r.code.is_empty() && !r.field.is_empty() && !r.rule.is_empty() && !r.message.is_empty()
    }

    /// Any JSON value, nested a few levels, with strings of any characters and extreme numbers.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
            "[a-zA-Z0-9 ._-]{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn payload_keys() -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        v["payload"].as_object().unwrap().keys().cloned().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Err(r) = parse(&raw, &rules()) {
                prop_assert!(rejected_well(&r), "{r:?}");
            }
        }

        #[test]
        fn any_value_in_any_payload_field_is_accepted_or_named(
            key in prop::sample::select(payload_keys()),
            value in json_value(),
        ) {
            let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
            v["payload"][&key] = value;
            let raw = v.to_string();
            if let Err(r) = parse(raw.as_bytes(), &rules()) {
                prop_assert!(rejected_well(&r), "{r:?}");
            }
        }

        #[test]
        fn any_envelope_field_value_is_accepted_or_named(
            key in prop::sample::select(vec!["message_id", "message_type", "timestamp", "retry_count", "max_retries", "payload"]),
            value in json_value(),
        ) {
            let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
            v[key] = value;
            if let Err(r) = parse(v.to_string().as_bytes(), &rules()) {
                prop_assert!(rejected_well(&r), "{r:?}");
            }
        }

        #[test]
        fn plain_symbols_pass_and_anything_else_is_refused(
            symbol in "[A-Za-z0-9]{1,8}(-[A-Za-z0-9]{1,8}){0,2}",
            intruder in prop::sample::select(vec!['\u{200B}', '\u{00A0}', '\u{0410}', '\u{FF21}', '\u{202E}', ' ', '\t', '\u{0}', '_', '.']),
            at in 0usize..8,
        ) {
            let with = |s: &str| {
                let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
                v["payload"]["token_symbol"] = s.into();
                parse(v.to_string().as_bytes(), &rules())
            };
            prop_assert!(with(&symbol).is_ok());
            let mut spoof: Vec<char> = symbol.chars().collect();
            spoof.insert(at.min(spoof.len()), intruder);
            let spoof: String = spoof.into_iter().collect();
            let r = with(&spoof).unwrap_err();
            prop_assert_eq!(r.field.as_str(), "token_symbol");
        }

        #[test]
        fn token_names_with_invisible_or_look_alike_characters_are_refused(
            name in "[A-Za-z0-9]{1,12}( [A-Za-z0-9]{1,12}){0,2}",
            intruder in prop::sample::select(vec!['\u{200B}', '\u{200D}', '\u{00A0}', '\u{0430}', '\u{2024}', '\u{FEFF}', '\u{202E}', '\n']),
        ) {
            let with = |s: &str| {
                let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
                v["payload"]["token_name"] = s.into();
                parse(v.to_string().as_bytes(), &rules())
            };
            prop_assert!(with(&name).is_ok());
            let r = with(&format!("{name}{intruder}x")).unwrap_err();
            prop_assert_eq!(r.field.as_str(), "token_name");
        }
    }

    #[test]
    fn deep_nesting_is_a_rejection_not_a_stack_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let r = parse(
            deep.as_bytes(),
            &Rules {
                max_message_bytes: 1 << 20,
                min_improvement_percentage: 0.0,
            },
        )
        .unwrap_err();
        assert!(rejected_well(&r), "{r:?}");
    }
}
