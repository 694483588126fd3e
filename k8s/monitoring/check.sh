#!/usr/bin/env bash
# Checks the monitoring files of this folder (called by `make deploy-lint`):
#   1. promtool check rules  prometheus-rules.yaml
#   2. promtool test rules   prometheus-rules.test.yaml (each alert fires and stays quiet)
#   3. grafana-dashboard.json is JSON (python3 -m json.tool), a dashboard of schemaVersion >= 36
#      with a Prometheus datasource variable, and every panel query parses as PromQL
#      (promtool check rules on a throwaway rules file built from the queries).
#   4. kustomization.yaml builds (kubectl kustomize), when kubectl is installed.
# promtool comes from `make promtool`. Exits non-zero on the first failure.
# Metric names are checked against src/telemetry.rs by `cargo test --test it dashboards`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

if ! command -v promtool >/dev/null 2>&1; then
    echo "check.sh: promtool not found on PATH; run \`make promtool\`" >&2
    exit 1
fi

echo "== promtool check rules"
promtool check rules prometheus-rules.yaml

echo "== promtool test rules"
promtool test rules prometheus-rules.test.yaml

echo "== grafana-dashboard.json"
python3 -m json.tool grafana-dashboard.json >/dev/null

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# JSON is YAML: the panel queries become recording rules promtool can parse. Grafana's
# $__rate_interval / $__interval / $__range are replaced by a fixed range first.
python3 - grafana-dashboard.json "$tmp/dashboard-queries.rules.json" <<'EOF'
import json
import sys

src, out = sys.argv[1], sys.argv[2]
with open(src) as f:
    d = json.load(f)
errors = []
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
    errors.append(f"schemaVersion {d.get('schemaVersion')!r} < 36")
variables = d.get("templating", {}).get("list", [])
if not any(v.get("type") == "datasource" and v.get("query") == "prometheus" for v in variables):
    errors.append("no datasource variable of type prometheus in templating.list")

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

rules, ids, titles = [], set(), set()
for p in walk(d.get("panels", [])):
    if p.get("id") in ids:
        errors.append(f"panel id {p.get('id')} used twice")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    if p.get("title") in titles:
        errors.append(f"panel title {p.get('title')!r} used twice")
    titles.add(p.get("title"))
    ds = p.get("datasource", {})
    if ds.get("uid") != "${datasource}":
        errors.append(f"panel {p.get('title')!r} does not use the datasource variable")
    targets = p.get("targets", [])
    if not targets:
        errors.append(f"panel {p.get('title')!r} has no query")
    for t in targets:
        expr = t.get("expr", "")
        for var in ("$__rate_interval", "$__interval", "$__range"):
            expr = expr.replace(var, "5m")
        rules.append({"record": f"dashboard:query:{len(rules)}", "expr": expr})
if errors:
    for e in errors:
        print(f"grafana-dashboard.json: {e}", file=sys.stderr)
    sys.exit(1)
with open(out, "w") as f:
    json.dump({"groups": [{"name": "grafana-dashboard-queries", "rules": rules}]}, f)
print(f"  {len(titles)} panels, {len(rules)} queries")
EOF
promtool check rules "$tmp/dashboard-queries.rules.json" >/dev/null \
    || { echo "check.sh: a query of grafana-dashboard.json does not parse (above)" >&2; exit 1; }
echo "  SUCCESS: JSON, schema and PromQL of every panel"

# The ConfigMaps of kustomization.yaml build (when kubectl is there to build them).
if command -v kubectl >/dev/null 2>&1; then
    echo "== kubectl kustomize"
    kubectl kustomize . >/dev/null
    echo "  SUCCESS"
fi
