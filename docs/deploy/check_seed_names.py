#!/usr/bin/env python3
"""Checks that the CloudFormation templates carry every name and number seeds 002 and 003 give.

The seeds are a contract with the platform team: the repository, cluster, service and DNS
names, the SSM parameters, the health check, the sizing and the alarms' thresholds. Each check
below reads the parsed templates (not just their text) and the run fails naming each seed item
it did not find. Run by `make deploy-lint`:

    python3 docs/deploy/check_seed_names.py [docs/deploy/cloudformation]

It also checks that the dashboard body is valid JSON once its ${...} are filled in.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

ENV = "${Environment}"
SSM_PATH = f"/hokusai/{ENV}/contracts/"
# Seed 003 section 5, in its order.
SSM_NAMES = [
    "deployer_key",
    "token_manager_address",
    "model_registry_address",
    "rpc_endpoint",
    "redis_url",
    "api_keys",
    "jwt_secret",
]


class CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as {"Fn::X": value}."""


def _tag(loader: CfnLoader, suffix: str, node: yaml.Node) -> Any:
    name = "Ref" if suffix == "Ref" else ("Fn::GetAtt" if suffix == "GetAtt" else f"Fn::{suffix}")
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


CfnLoader.add_multi_constructor("!", _tag)


def strings(value: Any) -> Iterator[str]:
    """Every string leaf of a value (the text of !Sub included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif value is not None:
        yield str(value)


def text(value: Any) -> str:
    """A property as text: a plain value, or the template string of !Sub."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return str(value)


class Templates:
    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.yaml"))
        if not self.files:
            raise SystemExit(f"no templates in {folder}")
        self.docs = {f.name: yaml.load(f.read_text(), Loader=CfnLoader) for f in self.files}

    def resources(self, kind: str) -> list[dict[str, Any]]:
        found = []
        for doc in self.docs.values():
            for res in (doc.get("Resources") or {}).values():
                if res.get("Type") == kind:
                    found.append(res.get("Properties") or {})
        return found

    def parameter_defaults(self, name: str) -> list[Any]:
        return [
            doc["Parameters"][name].get("Default")
            for doc in self.docs.values()
            if name in (doc.get("Parameters") or {})
        ]


def containers(t: Templates) -> list[dict[str, Any]]:
    return [c for td in t.resources("AWS::ECS::TaskDefinition") for c in td.get("ContainerDefinitions", [])]


def container(t: Templates, name: str) -> dict[str, Any]:
    return next((c for c in containers(t) if c.get("Name") == name), {})


def service(t: Templates, name: str) -> dict[str, Any]:
    return next(
        (s for s in t.resources("AWS::ECS::Service") if text(s.get("ServiceName")) == name), {}
    )


def target_group(t: Templates) -> dict[str, Any]:
    groups = t.resources("AWS::ElasticLoadBalancingV2::TargetGroup")
    return groups[0] if groups else {}


def tg_attribute(t: Templates, key: str) -> Any:
    for a in target_group(t).get("TargetGroupAttributes", []):
        if a.get("Key") == key:
            return a.get("Value")
    return None


def alarms(t: Templates) -> list[dict[str, Any]]:
    return t.resources("AWS::CloudWatch::Alarm")


def alarm_on(t: Templates, metric: str) -> list[dict[str, Any]]:
    """Alarms that watch `metric`, directly or through a metric math query."""
    out = []
    for a in alarms(t):
        names = {a.get("MetricName")}
        for q in a.get("Metrics", []) or []:
            names.add(((q.get("MetricStat") or {}).get("Metric") or {}).get("MetricName"))
        if metric in names and a.get("AlarmActions") and "Scaling only" not in text(a.get("AlarmDescription", "")):
            out.append(a)
    return out


def secrets_from(t: Templates, name: str) -> list[str]:
    """SSM names a container's secrets read."""
    return [s for sec in container(t, name).get("Secrets", []) for s in strings(sec) if SSM_PATH in s]


def num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


Check = tuple[str, Callable[[Templates], bool]]

CHECKS: list[Check] = [
    ("Environment parameter allows development, staging and production in every template that has one",
     lambda t: all(
         {"development", "staging", "production"} <= set(d["Parameters"]["Environment"].get("AllowedValues", []))
         for d in t.docs.values() if "Environment" in (d.get("Parameters") or {}))),
    ("ECR repository hokusai/contracts (seed 002)",
     lambda t: any(r.get("RepositoryName") == "hokusai/contracts" for r in t.resources("AWS::ECR::Repository"))),
    ("ECR scan on push and a lifecycle policy (seed 003: lifecycle policy for old image cleanup)",
     lambda t: any((r.get("ImageScanningConfiguration") or {}).get("ScanOnPush") is True and r.get("LifecyclePolicy")
                   for r in t.resources("AWS::ECR::Repository"))),
    ("images pulled from hokusai/contracts",
     lambda t: len(containers(t)) >= 2 and all("/hokusai/contracts:" in text(c.get("Image")) for c in containers(t))),
    (f"ECS cluster hokusai-{ENV} (seed 002: hokusai-development)",
     lambda t: any(text(c.get("ClusterName")) == f"hokusai-{ENV}" for c in t.resources("AWS::ECS::Cluster"))
     and all(text(s.get("Cluster")) == f"hokusai-{ENV}" for s in t.resources("AWS::ECS::Service"))),
    (f"ECS service hokusai-contracts-{ENV} (seed 003: hokusai-contracts-development)",
     lambda t: bool(service(t, f"hokusai-contracts-{ENV}"))),
    ("API service desired count 2 (seed 003)",
     lambda t: service(t, f"hokusai-contracts-{ENV}").get("DesiredCount") == 2),
    ("API service minimum healthy 100 %, maximum 200 % (seed 003)",
     lambda t: (service(t, f"hokusai-contracts-{ENV}").get("DeploymentConfiguration") or {}).get("MinimumHealthyPercent") == 100
     and (service(t, f"hokusai-contracts-{ENV}").get("DeploymentConfiguration") or {}).get("MaximumPercent") == 200),
    ("deployment circuit breaker with rollback on both services (seed 002: rollback mechanism)",
     lambda t: len(t.resources("AWS::ECS::Service")) >= 2 and all(
         ((s.get("DeploymentConfiguration") or {}).get("DeploymentCircuitBreaker") or {}) == {"Enable": True, "Rollback": True}
         for s in t.resources("AWS::ECS::Service"))),
    ("API service in the target group on container port 3001 (seed 002: resolve 3001 vs 8002)",
     lambda t: any(lb.get("ContainerPort") == 3001 for lb in service(t, f"hokusai-contracts-{ENV}").get("LoadBalancers", []))),
    ("target group on port 3001 (seed 003)",
     lambda t: target_group(t).get("Port") == 3001),
    ("target group health check path /health/ready (seed 003)",
     lambda t: target_group(t).get("HealthCheckPath") == "/health/ready"),
    ("target group health check interval 30 s (seed 003)",
     lambda t: target_group(t).get("HealthCheckIntervalSeconds") == 30),
    ("target group unhealthy threshold 2 (seed 003)",
     lambda t: target_group(t).get("UnhealthyThresholdCount") == 2),
    ("target group deregistration delay 30 s (seed 003)",
     lambda t: str(tg_attribute(t, "deregistration_delay.timeout_seconds")) == "30"),
    (f"Cloud Map contracts.hokusai-{ENV}.local (seed 002: contracts.hokusai-development.local)",
     lambda t: any(text(n.get("Name")) == f"hokusai-{ENV}.local" for n in t.resources("AWS::ServiceDiscovery::PrivateDnsNamespace"))
     and any(s.get("Name") == "contracts" for s in t.resources("AWS::ServiceDiscovery::Service"))
     and bool(service(t, f"hokusai-contracts-{ENV}").get("ServiceRegistries"))),
    ("Route 53 contracts.hokus.ai (seed 002)",
     lambda t: "contracts.hokus.ai" in t.parameter_defaults("DomainName")
     and bool(t.resources("AWS::Route53::RecordSet"))),
    ("HTTPS listener with an ACM certificate (seed 002)",
     lambda t: any(l.get("Protocol") == "HTTPS" and l.get("Certificates")
                   for l in t.resources("AWS::ElasticLoadBalancingV2::Listener"))),
    *[
        (f"SSM parameter {SSM_PATH}{name} (seed 003 section 5) read by a task",
         (lambda n: lambda t: any(s.endswith(SSM_PATH + n) for c in ("api", "worker") for s in secrets_from(t, c)))(name))
        for name in SSM_NAMES
    ],
    (f"execution roles may read {SSM_PATH}",
     lambda t: sum(1 for r in t.resources("AWS::IAM::Role")
                   if any("ssm:GetParameters" == s for s in strings(r)) and any(SSM_PATH in s for s in strings(r))) >= 2),
    ("log group /ecs/hokusai-contracts (seed 003)",
     lambda t: "/ecs/hokusai-contracts" in t.parameter_defaults("LogGroupName")
     and bool(t.resources("AWS::Logs::LogGroup"))),
    ("awslogs to the log group from both task definitions, one stream prefix per role",
     lambda t: sorted((c.get("LogConfiguration") or {}).get("Options", {}).get("awslogs-stream-prefix", "")
                      for c in containers(t)) == ["api", "worker"]
     and all((c.get("LogConfiguration") or {}).get("LogDriver") == "awslogs" for c in containers(t))),
    ("CPU 256 units (seed 003)",
     lambda t: all(str(td.get("Cpu")) == "256" for td in t.resources("AWS::ECS::TaskDefinition"))
     and all(c.get("Cpu") == 256 for c in containers(t))),
    ("memory 512 MB soft (seed 003)",
     lambda t: all(c.get("MemoryReservation") == 512 for c in containers(t))),
    ("memory 1024 MB hard (seed 003)",
     lambda t: all(c.get("Memory") == 1024 for c in containers(t))),
    ("API container port 3001 and ops port 9091 (seed 003: ports 3001 and 9091)",
     lambda t: {p.get("ContainerPort") for p in container(t, "api").get("PortMappings", [])} == {3001, 9091}),
    ("the image's health check in both task definitions (Dockerfile HEALTHCHECK)",
     lambda t: all((c.get("HealthCheck") or {}).get("Command") == ["CMD", "/usr/local/bin/hokusai-deployer", "healthcheck"]
                   for c in containers(t))),
    ("CloudWatch EMF on in both task definitions",
     lambda t: all({"Name": "HOKUSAI__OPS__CLOUDWATCH_EMF", "Value": "true"} in c.get("Environment", [])
                   for c in containers(t))),
    ("API auto scaling 2 to 10 tasks (seed 002)",
     lambda t: any(s.get("MinCapacity") == 2 and s.get("MaxCapacity") == 10
                   for s in t.resources("AWS::ApplicationAutoScaling::ScalableTarget"))),
    ("API scaling on CPU 70 % (seed 002)",
     lambda t: any(((p.get("TargetTrackingScalingPolicyConfiguration") or {}).get("PredefinedMetricSpecification") or {})
                   .get("PredefinedMetricType") == "ECSServiceAverageCPUUtilization"
                   and p["TargetTrackingScalingPolicyConfiguration"].get("TargetValue") == 70
                   for p in t.resources("AWS::ApplicationAutoScaling::ScalingPolicy"))),
    ("alarm: error rate > 1 % (seed 003)",
     lambda t: any(num(a.get("Threshold")) == 1 and a.get("ComparisonOperator") == "GreaterThanThreshold"
                   and any("100 * " in text(q.get("Expression", "")) for q in a.get("Metrics", []))
                   for a in alarm_on(t, "ApiServerErrors"))),
    ("alarm: unhealthy task count (seed 003)",
     lambda t: bool(alarm_on(t, "UnHealthyHostCount"))),
    ("alarm: memory > 80 % (seed 003)",
     lambda t: len([a for a in alarm_on(t, "MemoryUtilization") if num(a.get("Threshold")) == 80
                    and a.get("ComparisonOperator") == "GreaterThanThreshold"]) >= 1),
    ("alarm: API response time > 2 s p99 (seed 003)",
     lambda t: any(a.get("ExtendedStatistic") == "p99" and num(a.get("Threshold")) == 2000
                   and a.get("Unit") == "Milliseconds" for a in alarm_on(t, "ApiLatency"))),
    ("alarm: DLQ growth", lambda t: bool(alarm_on(t, "QueueDepth"))),
    ("alarm: deployer balance low", lambda t: bool(alarm_on(t, "DeployerBalanceEth"))),
    ("alarm: chain breaker open", lambda t: bool(alarm_on(t, "ChainBreakerState"))),
    ("every notifying alarm links its runbook section",
     lambda t: all(re.search(r"Runbook: \$\{RunbookUrl\}#[a-z0-9-]+$", text(a.get("AlarmDescription", "")))
                   for a in alarms(t) if "Scaling only" not in text(a.get("AlarmDescription", "")))),
    ("CloudWatch dashboard (seed 002: dashboard with key metrics)",
     lambda t: bool(t.resources("AWS::CloudWatch::Dashboard"))),
]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def runbook_problems(t: Templates, runbook: Path) -> list[str]:
    """Every runbook section an alarm links must exist in docs/runbook.md."""
    anchors = {slug(line[3:]) for line in runbook.read_text().splitlines() if line.startswith("## ")}
    linked = {m for a in alarms(t) for m in re.findall(r"#([a-z0-9-]+)$", text(a.get("AlarmDescription", "")))}
    return [f"alarm links runbook section #{a}, which {runbook} does not have" for a in sorted(linked - anchors)]


def dashboard_problems(t: Templates) -> list[str]:
    """Each dashboard body must be JSON once ${...} are replaced, and show the seeds' metrics."""
    problems = []
    wanted = ["ApiRequests", "ApiLatency", "ApiErrors", "RedisUp", "RpcLatency", "CPUUtilization",
              "MemoryUtilization", "Deployments", "DlqMoves", "QueueDepth", "GasUsed"]
    for d in t.resources("AWS::CloudWatch::Dashboard"):
        body = text(d.get("DashboardBody"))
        filled = re.sub(r"\$\{[^}]+\}", "0", body)
        try:
            parsed = json.loads(filled)
        except json.JSONDecodeError as e:
            problems.append(f"dashboard body is not JSON: {e}")
            continue
        shown = " ".join(strings(parsed))
        problems += [f"dashboard shows no {m}" for m in wanted if m not in shown]
    return problems


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "cloudformation"
    t = Templates(folder)
    missing = []
    for name, check in CHECKS:
        try:
            ok = check(t)
        except (KeyError, TypeError, AttributeError, IndexError):
            ok = False
        if not ok:
            missing.append(name)
    missing += dashboard_problems(t)
    missing += runbook_problems(t, Path(__file__).resolve().parent.parent / "runbook.md")
    for m in missing:
        print(f"missing seed item: {m}", file=sys.stderr)
    if missing:
        print(f"{len(missing)} of {len(CHECKS)} seed checks failed in {folder}", file=sys.stderr)
        return 1
    print(f"seed names: {len(CHECKS)} checks passed in {', '.join(f.name for f in t.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
