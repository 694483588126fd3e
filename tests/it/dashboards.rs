//! The Kubernetes monitoring files (k8s/monitoring) stay in step with the code and the docs:
//! every `hokusai_*` metric the Grafana dashboard and the Prometheus rules name is one the
//! process exposes (`telemetry::names::ALL`), the dashboard keeps its key panels, every alert
//! names a runbook section that exists, and every alert has a firing and a quiet unit test
//! (`promtool test rules`, run by k8s/monitoring/check.sh).

use std::collections::{BTreeMap, BTreeSet};

use hokusai_deployer::telemetry::names;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/k8s/monitoring/grafana-dashboard.json"
);
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/k8s/monitoring/prometheus-rules.yaml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/k8s/monitoring/prometheus-rules.test.yaml"
);

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `hokusai_[a-z_]+` token of `text` that starts a word.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    const PREFIX: &[u8] = b"hokusai_";
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i + PREFIX.len() <= b.len() {
        let starts_word = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if starts_word && &b[i..i + PREFIX.len()] == PREFIX {
            let mut j = i + PREFIX.len();
            while j < b.len() && (b[j].is_ascii_lowercase() || b[j] == b'_') {
                j += 1;
            }
            if j > i + PREFIX.len() {
                out.insert(text[i..j].to_owned());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The exposed metric a token names: itself, or the histogram whose `_bucket`, `_sum` or
/// `_count` series it is. `Err` with the reason otherwise.
fn exposed(token: &str) -> Result<&'static str, String> {
    if let Some(n) = names::ALL.iter().find(|n| **n == token) {
        return Ok(n);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = token.strip_suffix(suffix) {
            if let Some(n) = names::ALL.iter().find(|n| **n == base) {
                // Only histograms have these series (all of ours are in seconds).
                return if n.ends_with("_seconds") {
                    Ok(n)
                } else {
                    Err(format!("{base} is not a histogram; {token} does not exist"))
                };
            }
        }
    }
    Err(format!("{token} is not in telemetry::names::ALL"))
}

fn assert_known_metrics(path: &str, text: &str) -> BTreeSet<&'static str> {
    let tokens = metric_tokens(text);
    assert!(!tokens.is_empty(), "{path} names no hokusai_ metric");
    let mut found = BTreeSet::new();
    let mut unknown = Vec::new();
    for t in &tokens {
        match exposed(t) {
            Ok(n) => {
                found.insert(n);
            }
            Err(e) => unknown.push(e),
        }
    }
    assert!(
        unknown.is_empty(),
        "{path} names metrics the process does not expose (src/telemetry.rs):\n  {}",
        unknown.join("\n  ")
    );
    found
}

#[test]
fn dashboard_and_rules_name_only_exposed_metrics() {
    let dashboard = read(DASHBOARD);
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    assert_known_metrics(DASHBOARD, &dashboard);
    let in_rules = assert_known_metrics(RULES, &rules);
    // The synthetic series of the unit tests must be real series too, or a test proves nothing.
    assert_known_metrics(RULE_TESTS, &tests);

    // The runbook's alerts and seed 003's alarms are all there.
    for n in [
        names::API_DURATION,
        names::DLQ_MOVES,
        names::QUEUE_DEPTH,
        names::MESSAGES,
        names::DEPLOYMENT_DURATION,
        names::RETRIES,
        names::BREAKER_STATE,
        names::REDIS_UP,
        names::BALANCE,
        names::UNFUNDED,
        names::REORGS,
        names::WORKERS,
        names::FEE_WAITING,
        names::REPLACEMENTS,
        names::PAUSED,
        names::BACKPRESSURE,
        names::AUDIT_WRITE_FAILURES,
    ] {
        assert!(in_rules.contains(n), "{RULES} has no alert on {n}");
    }
}

#[test]
fn dashboard_keeps_its_panels() {
    let text = read(DASHBOARD);
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion under 36"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );

    // Every panel's queries, by panel title.
    let mut queries: BTreeMap<String, String> = BTreeMap::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            p["title"]
        );
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
            .unwrap_or_default();
        assert!(!exprs.is_empty(), "panel {} has no query", p["title"]);
        let title = p["title"].as_str().expect("a title").to_owned();
        assert!(
            queries.insert(title.clone(), exprs.join("\n")).is_none(),
            "two panels titled {title}"
        );
    }

    // The panels of the CloudWatch dashboard (seed 003, issue 17), plus breaker and balance:
    // a panel whose title contains the first string queries every metric that follows.
    let key: &[(&str, &[&str])] = &[
        ("requests by endpoint", &[names::API_DURATION]),
        ("latency percentiles", &[names::API_DURATION]),
        ("errors by code", &[names::API_ERRORS]),
        ("Redis up", &[names::REDIS_UP]),
        ("RPC latency", &[names::RPC_DURATION]),
        ("CPU", &["container_cpu_usage_seconds_total"]),
        ("memory", &["container_memory_working_set_bytes"]),
        ("Deployments by outcome", &[names::DEPLOYMENTS]),
        ("DLQ depth", &[names::QUEUE_DEPTH]),
        ("DLQ moves", &[names::DLQ_MOVES]),
        ("Gas used", &[names::GAS_USED]),
        ("breaker state", &[names::BREAKER_STATE]),
        ("balance", &[names::BALANCE]),
    ];
    for (title, metrics) in key {
        let exprs: Vec<&String> = queries
            .iter()
            .filter(|(t, _)| t.to_lowercase().contains(&title.to_lowercase()))
            .map(|(_, e)| e)
            .collect();
        assert!(!exprs.is_empty(), "no panel titled like {title:?}");
        for m in *metrics {
            assert!(
                exprs.iter().any(|e| e.contains(m)),
                "the {title:?} panel does not query {m}"
            );
        }
    }
    // The p50/p90/p99 of the API, the DLQ's own depth.
    let latency = &queries["API latency percentiles"];
    for q in [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
    ] {
        assert!(latency.contains(q), "API latency percentiles lacks {q}");
    }
    assert!(queries["DLQ depth"].contains(r#"queue="dlq""#));
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code fences).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The value of a `key: value` YAML line, unquoted.
fn yaml_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line
        .trim_start()
        .trim_start_matches("- ")
        .strip_prefix(key)?;
    let v = rest.strip_prefix(':')?.trim();
    Some(v.trim_matches(|c| c == '"' || c == '\''))
}

/// Each alert of the rules file with the lines of its block.
fn alerts(rules: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in rules.lines() {
        if let Some(name) = yaml_value(line, "alert") {
            assert!(
                out.insert(name.to_owned(), Vec::new()).is_none(),
                "alert {name} defined twice"
            );
            current = Some(name.to_owned());
        } else if yaml_value(line, "record").is_some() || yaml_value(line, "name").is_some() {
            current = None;
        } else if let Some(c) = &current {
            out.get_mut(c).expect("current alert").push(line.to_owned());
        }
    }
    out
}

#[test]
fn every_alert_names_a_runbook_section_and_is_unit_tested() {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let alerts = alerts(&read(RULES));
    assert!(alerts.len() >= 4 + 13, "only {} alerts", alerts.len());

    // Seed 003's four alarms.
    for a in [
        "HokusaiApiHighErrorRate",
        "HokusaiUnhealthyPods",
        "HokusaiHighMemory",
        "HokusaiApiLatencyP99High",
    ] {
        assert!(alerts.contains_key(a), "seed 003's alarm {a} is missing");
    }

    let mut docs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, block) in &alerts {
        let value = |key: &str| block.iter().find_map(|l| yaml_value(l, key));
        for key in ["expr", "severity", "summary", "description"] {
            assert!(value(key).is_some(), "alert {name} has no {key}");
        }
        let url = value("runbook_url")
            .or_else(|| value("runbook"))
            .unwrap_or_else(|| panic!("alert {name} has no runbook_url"));
        let (file, section) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("alert {name}: runbook_url {url} names no section"));
        let known = docs
            .entry(file.to_owned())
            .or_insert_with(|| anchors(&read(&format!("{manifest}/{file}"))));
        assert!(
            known.contains(section),
            "alert {name}: {file} has no section #{section} (its anchors: {known:?})"
        );
    }

    // promtool test rules: a case that fires (exp_alerts with entries) and one that stays
    // quiet (exp_alerts: []) for every alert, and no test of an alert that does not exist
    // (it would pass quietly).
    let tests = read(RULE_TESTS);
    let lines: Vec<&str> = tests.lines().collect();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = yaml_value(line, "alertname") else {
            continue;
        };
        assert!(
            alerts.contains_key(name),
            "{RULE_TESTS} tests {name}, which is not an alert"
        );
        let exp = lines[i + 1..]
            .iter()
            .find_map(|l| yaml_value(l, "exp_alerts"))
            .unwrap_or_else(|| panic!("the test of {name} has no exp_alerts"));
        if exp == "[]" {
            quiet.insert(name.to_owned());
        } else {
            fires.insert(name.to_owned());
        }
    }
    for name in alerts.keys() {
        assert!(fires.contains(name), "no unit test where {name} fires");
        assert!(
            quiet.contains(name),
            "no unit test where {name} stays quiet"
        );
    }
}

#[test]
fn metric_tokens_and_anchors() {
    let t = metric_tokens(
        r#"sum(rate(hokusai_api_request_duration_seconds_count{status=~"5.."}[5m])) / x_hokusai_no hokusai_redis_up==0 hokusai-deployer"#,
    );
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        [
            "hokusai_api_request_duration_seconds_count",
            "hokusai_redis_up"
        ]
    );
    assert_eq!(
        exposed("hokusai_api_request_duration_seconds_bucket"),
        Ok(names::API_DURATION)
    );
    assert!(exposed("hokusai_messages_total_count").is_err());
    assert!(exposed("hokusai_no_such_metric").is_err());
    assert_eq!(
        anchor(" Backpressure: the website stopped consuming"),
        "backpressure-the-website-stopped-consuming"
    );
    assert_eq!(
        anchor(r#" "every deployer key is leased by another process""#),
        "every-deployer-key-is-leased-by-another-process"
    );
}
