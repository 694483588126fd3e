//! The model source of the API: an MLflow tracking server's REST API. A model id is a
//! registered model's name; its tags (names in `api.mlflow`) say whether it is validated,
//! who owns it and who contributed; the run named by a tag (or the latest version's run) holds
//! the metric `<metric>` and its baseline `baseline_<metric>`.

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::transports::http::reqwest;
use serde::Deserialize;

use crate::config::MlflowSettings;

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("mlflow unreachable: {0}")]
    Unreachable(String),
    #[error("mlflow answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// What the API needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: String,
    pub version: String,
    pub validated: bool,
    pub owner: Option<String>,
    pub contributors: Vec<Address>,
    pub run_id: Option<String>,
    /// `(metric, baseline, current)` when the run has both values.
    pub metric: Option<(String, f64, f64)>,
}

#[derive(Deserialize)]
struct Tag {
    key: String,
    value: String,
}

#[derive(Deserialize)]
struct Version {
    version: String,
    #[serde(default)]
    run_id: Option<String>,
}

#[derive(Deserialize)]
struct RegisteredModel {
    name: String,
    #[serde(default)]
    latest_versions: Vec<Version>,
    #[serde(default)]
    tags: Vec<Tag>,
}

#[derive(Deserialize)]
struct RegisteredModelAnswer {
    registered_model: RegisteredModel,
}

#[derive(Deserialize)]
struct Metric {
    key: String,
    /// A number, or the string `"NaN"` MLflow writes for one.
    value: serde_json::Value,
}

#[derive(Deserialize)]
struct RunData {
    #[serde(default)]
    metrics: Vec<Metric>,
}

#[derive(Deserialize)]
struct Run {
    data: RunData,
}

#[derive(Deserialize)]
struct RunAnswer {
    run: Run,
}

#[derive(Clone)]
pub struct Mlflow {
    http: reqwest::Client,
    base: String,
    settings: MlflowSettings,
}

impl Mlflow {
    pub fn new(settings: &MlflowSettings) -> Result<Mlflow, MlflowError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.timeout_ms.min(2000)))
            .build()
            .map_err(|e| MlflowError::Unreachable(e.to_string()))?;
        Ok(Mlflow {
            http,
            base: settings.url.trim_end_matches('/').to_owned(),
            settings: settings.clone(),
        })
    }

    /// An MLflow that did not answer `url`: the URL masked of credentials, then the cause
    /// (stripped of its own copy of the URL).
    fn unreachable(url: &str, e: reqwest::Error) -> MlflowError {
        MlflowError::Unreachable(format!(
            "{}: {}",
            crate::config::mask_url(url),
            e.without_url()
        ))
    }

    /// GET a REST path; `Ok(None)` for MLflow's `RESOURCE_DOES_NOT_EXIST`.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<T>, MlflowError> {
        let url = url::Url::parse_with_params(&format!("{}{path}", self.base), query)
            .map_err(|e| MlflowError::Unreachable(format!("bad mlflow url: {e}")))?;
        let r = self
            .http
            .get(url.as_str())
            .send()
            .await
            .map_err(|e| Self::unreachable(url.as_str(), e))?;
        let status = r.status().as_u16();
        let body = r
            .bytes()
            .await
            .map_err(|e| Self::unreachable(url.as_str(), e))?;
        if status == 404 {
            return Ok(None);
        }
        if status != 200 {
            let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            // MLflow refuses malformed names (with `/` or `:`) as bad parameters: no such model.
            if status == 400 && text.contains("INVALID_PARAMETER_VALUE") {
                return Ok(None);
            }
            return Err(MlflowError::Status { status, body: text });
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| MlflowError::Status {
                status,
                body: format!("unexpected answer: {e}"),
            })
    }

    /// The model and its run's metric, or `None` when MLflow has no such model.
    pub async fn model(&self, name: &str) -> Result<Option<Model>, MlflowError> {
        let Some(RegisteredModelAnswer {
            registered_model: m,
        }) = self
            .get("/api/2.0/mlflow/registered-models/get", &[("name", name)])
            .await?
        else {
            return Ok(None);
        };
        let tags: HashMap<&str, &str> = m
            .tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        let tag = |k: &str| {
            tags.get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let s = &self.settings;
        let latest = m
            .latest_versions
            .iter()
            .max_by_key(|v| v.version.parse::<u64>().unwrap_or(0));
        let run_id = tag(&s.run_tag).or_else(|| latest.and_then(|v| v.run_id.clone()));
        let validated = tag(&s.validated_tag).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        // The run's metric only matters for a validated model with a metric named: an
        // unvalidated one is refused whatever its run says.
        let mut metric = None;
        if let (true, Some(run_id), Some(name)) = (validated, &run_id, tag(&s.metric_tag)) {
            if let Some(RunAnswer { run }) = self
                .get("/api/2.0/mlflow/runs/get", &[("run_id", run_id)])
                .await?
            {
                let value = |k: &str| {
                    run.data
                        .metrics
                        .iter()
                        .find(|m| m.key == k)
                        .and_then(|m| m.value.as_f64())
                        .filter(|v| v.is_finite() && v.abs() < f64::MAX)
                };
                if let (Some(b), Some(c)) = (value(&format!("baseline_{name}")), value(&name)) {
                    metric = Some((name, b, c));
                }
            }
        }
        Ok(Some(Model {
            name: m.name,
            version: latest
                .map(|v| v.version.clone())
                .unwrap_or_else(|| "1".into()),
            validated,
            owner: tag(&s.owner_tag),
            contributors: tag(&s.contributors_tag)
                .map(|v| {
                    v.split(',')
                        .filter_map(|a| a.trim().parse::<Address>().ok())
                        .collect()
                })
                .unwrap_or_default(),
            run_id,
            metric,
        }))
    }

    /// Whether MLflow answers (readiness of the API).
    pub async fn ping(&self) -> Result<(), MlflowError> {
        let url = format!("{}/health", self.base);
        let r = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| Self::unreachable(&url, e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(MlflowError::Status {
                status: r.status().as_u16(),
                body: String::new(),
            })
        }
    }
}
