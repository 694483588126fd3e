//! CloudWatch Embedded Metric Format: the figures of `/metrics` as JSON log lines, so that
//! ECS tasks send metrics with their logs (awslogs) and CloudWatch extracts them, with no
//! agent and no `PutMetricData` call (seed 003: "automatic metric extraction").
//!
//! [`Emitter::lines`] reads the Prometheus exposition this process renders, and turns it into
//! one EMF document per dimension set: counters as their increase since the last interval,
//! gauges as they are, histograms as up to 100 values spread like the interval's
//! observations (CloudWatch computes percentiles from them). Namespace `Hokusai/Contracts`;
//! every metric has the dimensions `Environment` and `Role` (`api`, `worker`), some one more
//! from a small fixed set. The names are in [`METRICS`] and docs/operations.md.

use std::collections::{BTreeMap, HashMap};

use prometheus_parse::{Sample, Scrape, Value};
use serde_json::{json, Map, Value as Json};

pub const NAMESPACE: &str = "Hokusai/Contracts";

/// The most values one EMF metric may carry.
pub const MAX_VALUES: usize = 100;

/// How a Prometheus series becomes an EMF metric.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A counter: its increase over the interval.
    Delta,
    /// A gauge: its current value.
    Gauge,
    /// A histogram in seconds: the interval's observations as values, times `scale`.
    Histogram { scale: f64 },
    /// A histogram's observation count over the interval (requests).
    Count,
    /// A histogram's observation count over the interval whose `status` label is 5xx.
    ServerErrors,
}

/// One EMF metric: its name and unit, the Prometheus series it comes from, and the label that
/// becomes its extra dimension (with the dimension's name), if any.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub source: &'static str,
    pub dimension: Option<(&'static str, &'static str)>,
    kind: Kind,
}

const fn m(
    name: &'static str,
    unit: &'static str,
    source: &'static str,
    dimension: Option<(&'static str, &'static str)>,
    kind: Kind,
) -> Metric {
    Metric {
        name,
        unit,
        source,
        dimension,
        kind,
    }
}

use crate::telemetry::names as n;

/// Every EMF metric and where it comes from.
pub const METRICS: &[Metric] = &[
    m(
        "Deployments",
        "Count",
        n::DEPLOYMENTS,
        Some(("outcome", "Outcome")),
        Kind::Delta,
    ),
    m(
        "Messages",
        "Count",
        n::MESSAGES,
        Some(("result", "Result")),
        Kind::Delta,
    ),
    m(
        "DlqMoves",
        "Count",
        n::DLQ_MOVES,
        Some(("code", "Code")),
        Kind::Delta,
    ),
    m(
        "Retries",
        "Count",
        n::RETRIES,
        Some(("code", "Code")),
        Kind::Delta,
    ),
    m("GasUsed", "None", n::GAS_USED, None, Kind::Delta),
    m("FeesPaidGwei", "None", n::FEES_PAID, None, Kind::Delta),
    m("Reorgs", "Count", n::REORGS, None, Kind::Delta),
    m(
        "WebhookDeliveries",
        "Count",
        n::WEBHOOK_DELIVERIES,
        Some(("result", "Result")),
        Kind::Delta,
    ),
    m(
        "WebhookDeadLetters",
        "Count",
        n::WEBHOOK_DEAD,
        None,
        Kind::Gauge,
    ),
    m(
        "ApiErrors",
        "Count",
        n::API_ERRORS,
        Some(("code", "Code")),
        Kind::Delta,
    ),
    m(
        "QueueDepth",
        "Count",
        n::QUEUE_DEPTH,
        Some(("queue", "Queue")),
        Kind::Gauge,
    ),
    m("InFlight", "Count", n::IN_FLIGHT, None, Kind::Gauge),
    m("RedisUp", "None", n::REDIS_UP, None, Kind::Gauge),
    m("DeployerBalanceEth", "None", n::BALANCE, None, Kind::Gauge),
    m(
        "ChainBreakerState",
        "None",
        n::BREAKER_STATE,
        None,
        Kind::Gauge,
    ),
    m("ApiRequests", "Count", n::API_DURATION, None, Kind::Count),
    m(
        "ApiRequests",
        "Count",
        n::API_DURATION,
        Some(("route", "Route")),
        Kind::Count,
    ),
    m(
        "ApiServerErrors",
        "Count",
        n::API_DURATION,
        None,
        Kind::ServerErrors,
    ),
    m(
        "ApiLatency",
        "Milliseconds",
        n::API_DURATION,
        None,
        Kind::Histogram { scale: 1000.0 },
    ),
    m(
        "ApiLatency",
        "Milliseconds",
        n::API_DURATION,
        Some(("route", "Route")),
        Kind::Histogram { scale: 1000.0 },
    ),
    m(
        "RpcLatency",
        "Milliseconds",
        n::RPC_DURATION,
        None,
        Kind::Histogram { scale: 1000.0 },
    ),
    m(
        "DeploymentDuration",
        "Seconds",
        n::DEPLOYMENT_DURATION,
        None,
        Kind::Histogram { scale: 1.0 },
    ),
];

/// Turns successive renderings of `/metrics` into EMF lines; remembers the last counter and
/// histogram readings to report increases.
pub struct Emitter {
    environment: String,
    role: &'static str,
    last: HashMap<String, f64>,
    last_buckets: HashMap<String, Vec<(f64, f64)>>,
}

/// A series' identity across renderings: name and sorted labels.
fn key(s: &Sample) -> String {
    let labels: BTreeMap<_, _> = s.labels.iter().collect();
    format!("{}{labels:?}", s.metric)
}

impl Emitter {
    pub fn new(environment: &str, role: &'static str) -> Emitter {
        Emitter {
            environment: environment.to_owned(),
            role,
            last: HashMap::new(),
            last_buckets: HashMap::new(),
        }
    }

    /// The EMF documents for this rendering, one JSON line each, stamped `timestamp_ms`.
    pub fn lines(&mut self, exposition: &str, timestamp_ms: i64) -> Vec<String> {
        let scrape = match Scrape::parse(exposition.lines().map(|l| Ok(l.to_owned()))) {
            Ok(s) => s,
            Err(_) => return Vec::new(),
        };
        // Increases since the last rendering, per series; the first rendering counts from 0
        // (a process's counters start with it).
        let mut deltas: HashMap<String, f64> = HashMap::new();
        let mut interval_buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for s in &scrape.samples {
            let k = key(s);
            match &s.value {
                Value::Counter(v) | Value::Untyped(v) => {
                    let before = self.last.insert(k.clone(), *v).unwrap_or(0.0);
                    // A reset (never in one process) counts from zero.
                    deltas.insert(k, if *v >= before { v - before } else { *v });
                }
                Value::Histogram(buckets) => {
                    let mut now: Vec<(f64, f64)> =
                        buckets.iter().map(|b| (b.less_than, b.count)).collect();
                    now.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let before = self.last_buckets.insert(k.clone(), now.clone());
                    let cumulative: Vec<(f64, f64)> = now
                        .iter()
                        .map(|(le, c)| {
                            let prev = before
                                .as_ref()
                                .and_then(|b| b.iter().find(|(l, _)| l == le))
                                .map_or(0.0, |(_, c)| *c);
                            (*le, (c - prev).max(0.0))
                        })
                        .collect();
                    interval_buckets.insert(k, cumulative);
                }
                _ => {}
            }
        }

        let mut docs: BTreeMap<Option<(&str, String)>, Members> = BTreeMap::new();
        for metric in METRICS {
            let mut groups: BTreeMap<Option<String>, Acc> = BTreeMap::new();
            for s in scrape.samples.iter().filter(|s| s.metric == metric.source) {
                let group = match metric.dimension {
                    Some((label, _)) => match s.labels.get(label) {
                        Some(v) => Some(v.to_owned()),
                        None => continue,
                    },
                    None => None,
                };
                let acc = groups.entry(group).or_default();
                let k = key(s);
                match (metric.kind, &s.value) {
                    (Kind::Delta, Value::Counter(_) | Value::Untyped(_)) => {
                        acc.sum += deltas.get(&k).copied().unwrap_or(0.0);
                        acc.seen = true;
                    }
                    (Kind::Gauge, Value::Gauge(v) | Value::Untyped(v)) => {
                        acc.sum += v;
                        acc.seen = true;
                    }
                    (
                        Kind::Histogram { .. } | Kind::Count | Kind::ServerErrors,
                        Value::Histogram(_),
                    ) => {
                        if matches!(metric.kind, Kind::ServerErrors)
                            && !s.labels.get("status").is_some_and(|st| st.starts_with('5'))
                        {
                            continue;
                        }
                        let Some(b) = interval_buckets.get(&k) else {
                            continue;
                        };
                        acc.add_buckets(b);
                        acc.seen = true;
                    }
                    _ => {}
                }
            }
            for (group, acc) in groups {
                if !acc.seen {
                    continue;
                }
                let value = match metric.kind {
                    Kind::Delta | Kind::Gauge => json!(acc.sum),
                    Kind::Count | Kind::ServerErrors => json!(acc.count()),
                    Kind::Histogram { scale } => match acc.values(scale) {
                        Some(v) => v,
                        // No observation this interval: nothing to report.
                        None => continue,
                    },
                };
                let dim = metric.dimension.zip(group).map(|((_, dim), v)| (dim, v));
                docs.entry(dim)
                    .or_default()
                    .insert(metric.name, (metric.unit, value));
            }
        }

        docs.into_iter()
            .map(|(dim, metrics)| self.document(dim, metrics, timestamp_ms))
            .collect()
    }

    fn document(&self, dim: Option<(&str, String)>, metrics: Members, timestamp_ms: i64) -> String {
        let mut dims = vec!["Environment", "Role"];
        let mut doc = Map::new();
        doc.insert("Environment".into(), json!(self.environment));
        doc.insert("Role".into(), json!(self.role));
        if let Some((name, value)) = &dim {
            dims.push(name);
            doc.insert((*name).into(), json!(value));
        }
        let defs: Vec<Json> = metrics
            .iter()
            .map(|(name, (unit, _))| json!({"Name": name, "Unit": unit}))
            .collect();
        for (name, (_, value)) in metrics {
            doc.insert(name.into(), value);
        }
        doc.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [dims],
                    "Metrics": defs,
                }],
            }),
        );
        Json::Object(doc).to_string()
    }
}

/// One document's metrics: name -> (unit, value).
type Members = BTreeMap<&'static str, (&'static str, Json)>;

/// A group's figures while summing series.
#[derive(Default)]
struct Acc {
    sum: f64,
    seen: bool,
    /// Cumulative bucket increases by upper bound.
    buckets: BTreeMap<u64, (f64, f64)>,
}

impl Acc {
    fn add_buckets(&mut self, cumulative: &[(f64, f64)]) {
        for (le, c) in cumulative {
            let e = self.buckets.entry(le.to_bits()).or_insert((*le, 0.0));
            e.1 += c;
        }
    }

    /// Observations in the interval: the `+Inf` bucket's increase.
    fn count(&self) -> f64 {
        self.sorted().last().map_or(0.0, |(_, c)| *c)
    }

    fn sorted(&self) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self.buckets.values().copied().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// Up to [`MAX_VALUES`] values spread like the interval's observations: each bucket is
    /// represented by the middle of its range (the last finite bound for `+Inf`), repeated in
    /// proportion to its share of the observations (at least once if it has any).
    fn values(&self, scale: f64) -> Option<Json> {
        let sorted = self.sorted();
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        // (value, copies) per bucket with observations.
        let mut points: Vec<(f64, usize)> = Vec::new();
        let (mut lower, mut below) = (0.0_f64, 0.0_f64);
        for (le, cum) in sorted {
            let n = cum - below;
            below = cum;
            let point = if le.is_finite() {
                (lower + le) / 2.0
            } else {
                lower
            };
            if le.is_finite() {
                lower = le;
            }
            if n <= 0.0 {
                continue;
            }
            let copies = if total <= MAX_VALUES as f64 {
                n as usize
            } else {
                ((n / total) * MAX_VALUES as f64).floor().max(1.0) as usize
            };
            points.push((point * scale, copies));
        }
        // Buckets kept at one copy can push the sum over the limit: the largest gives way.
        while points.iter().map(|p| p.1).sum::<usize>() > MAX_VALUES {
            if let Some(p) = points.iter_mut().max_by_key(|p| p.1) {
                p.1 -= 1;
            }
        }
        let values: Vec<f64> = points
            .into_iter()
            .flat_map(|(v, n)| std::iter::repeat_n(v, n))
            .collect();
        Some(json!(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: &str = "\
# TYPE hokusai_deployments_total counter
hokusai_deployments_total{outcome=\"created\"} 3
hokusai_deployments_total{outcome=\"failed\"} 1
# TYPE hokusai_queue_depth gauge
hokusai_queue_depth{queue=\"dlq\"} 2
# TYPE hokusai_api_request_duration_seconds histogram
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"200\",le=\"0.1\"} 4
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"200\",le=\"1\"} 5
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"200\",le=\"+Inf\"} 5
hokusai_api_request_duration_seconds_sum{route=\"/a\",method=\"GET\",status=\"200\"} 1.2
hokusai_api_request_duration_seconds_count{route=\"/a\",method=\"GET\",status=\"200\"} 5
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"503\",le=\"0.1\"} 0
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"503\",le=\"1\"} 1
hokusai_api_request_duration_seconds_bucket{route=\"/a\",method=\"GET\",status=\"503\",le=\"+Inf\"} 1
";

    fn parse(lines: &[String]) -> Vec<Json> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn find<'a>(docs: &'a [Json], metric: &str, dim: Option<(&str, &str)>) -> &'a Json {
        docs.iter()
            .find(|d| {
                d.get(metric).is_some()
                    && match dim {
                        Some((k, v)) => d[k] == v,
                        None => {
                            d.as_object().unwrap().len()
                                == 3 + d["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                                    .as_array()
                                    .unwrap()
                                    .len()
                        }
                    }
            })
            .unwrap_or_else(|| panic!("{metric} {dim:?} in {docs:?}"))
    }

    #[test]
    fn counters_are_increases_gauges_values_histograms_spread_values() {
        let mut e = Emitter::new("development", "api");
        let docs = parse(&e.lines(FIRST, 1_700_000_000_000));
        assert_eq!(
            find(&docs, "Deployments", Some(("Outcome", "created")))["Deployments"],
            3.0
        );
        assert_eq!(
            find(&docs, "QueueDepth", Some(("Queue", "dlq")))["QueueDepth"],
            2.0
        );
        assert_eq!(find(&docs, "ApiRequests", None)["ApiRequests"], 6.0);
        assert_eq!(find(&docs, "ApiServerErrors", None)["ApiServerErrors"], 1.0);
        let latency = find(&docs, "ApiLatency", Some(("Route", "/a")))["ApiLatency"].clone();
        assert_eq!(latency, json!([50.0, 50.0, 50.0, 50.0, 550.0, 550.0]));
        // The next interval reports only what happened since.
        let second = FIRST.replace("outcome=\"created\"} 3", "outcome=\"created\"} 5");
        let docs = parse(&e.lines(&second, 1_700_000_060_000));
        assert_eq!(
            find(&docs, "Deployments", Some(("Outcome", "created")))["Deployments"],
            2.0
        );
        assert_eq!(
            find(&docs, "Deployments", Some(("Outcome", "failed")))["Deployments"],
            0.0
        );
        assert!(
            docs.iter().all(|d| d.get("ApiLatency").is_none()),
            "no requests, no latency"
        );
        for d in &docs {
            let cw = &d["_aws"]["CloudWatchMetrics"][0];
            assert_eq!(cw["Namespace"], NAMESPACE);
            assert_eq!(d["_aws"]["Timestamp"], 1_700_000_060_000_i64);
        }
    }

    #[test]
    fn a_busy_histogram_stays_within_100_values() {
        let acc = Acc {
            buckets: BTreeMap::from([
                (0.1f64.to_bits(), (0.1, 9_000.0)),
                (1f64.to_bits(), (1.0, 9_990.0)),
                (f64::INFINITY.to_bits(), (f64::INFINITY, 10_000.0)),
            ]),
            ..Default::default()
        };
        let v = acc.values(1000.0).unwrap();
        let v = v.as_array().unwrap();
        assert!(v.len() <= MAX_VALUES, "{}", v.len());
        assert_eq!(v.iter().filter(|x| **x == json!(50.0)).count(), 90);
        assert!(v.contains(&json!(1000.0)), "the +Inf bucket is represented");
    }
}
