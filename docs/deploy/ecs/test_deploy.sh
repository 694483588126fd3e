#!/usr/bin/env bash
# Runs deploy.sh against a stand-in `aws` (no AWS account, no network) and checks what it asks
# for: the stacks in order with their parameters, the roll when the task definitions did not
# change, a failure when the circuit breaker rolled a deployment back, and a refusal of an
# unknown environment. Run by `make deploy-lint`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The stand-in records each call; FAKE_ROLLED_ID is the id update-service reports for the new
# deployment, while describe-services always shows deployment dep-1 as the completed primary.
cat >"$tmp/aws" <<'STUB'
#!/usr/bin/env bash
echo "aws $*" >>"$FAKE_LOG"
case "$1 $2" in
  "ecs describe-services") printf 'dep-1\tCOMPLETED\tarn:aws:ecs:td/x:1\n' ;;
  "ecs update-service") echo "${FAKE_ROLLED_ID:-dep-1}" ;;
  "cloudformation describe-stacks") echo "out-${*: -3:1}" ;;
esac
exit 0
STUB
chmod +x "$tmp/aws"

fail() { echo "test_deploy.sh: $*" >&2; exit 1; }
run() { # run <log> <args...>: deploy.sh with the stand-in; prints nothing, returns its status
  local log=$1
  shift
  : >"$log"
  env -i PATH="$tmp:$PATH" HOME="$tmp" FAKE_LOG="$log" AWS_REGION=us-east-1 \
    CERTIFICATE_ARN=arn:aws:acm:us-east-1:123456789012:certificate/x \
    DEPLOYER_KEY_POOL_SIZE=4 ALARM_TOPIC_ARN=arn:aws:sns:us-east-1:123456789012:alerts \
    FAKE_ROLLED_ID="${FAKE_ROLLED_ID:-}" bash "$here/deploy.sh" "$@" >/dev/null 2>"$log.err"
}

# 1. A deploy: the stacks in order, each with its parameters, then a roll (same task definitions).
run "$tmp/deploy.log" development abc123def456 || fail "deploy failed: $(cat "$tmp/deploy.log.err")"
order=$(grep -o 'cloudformation deploy --stack-name [^ ]*' "$tmp/deploy.log" | awk '{print $4}' | paste -sd' ')
[ "$order" = "hokusai-contracts-ecr hokusai-development-shared hokusai-development-service hokusai-development-monitoring" ] \
  || fail "stack order: $order"
grep -q 'service.yaml .*ImageTag=abc123def456 DeployerKeyPoolSize=4' "$tmp/deploy.log" || fail "service parameters"
grep -q 'shared.yaml .*Environment=development CertificateArn=arn:aws:acm' "$tmp/deploy.log" || fail "shared parameters"
grep -q 'monitoring.yaml .*AlarmTopicArn=arn:aws:sns' "$tmp/deploy.log" || fail "monitoring parameters"
[ "$(grep -c 'update-service .*--force-new-deployment' "$tmp/deploy.log")" = 2 ] || fail "no roll of both services"

# 2. A roll the circuit breaker undid: deploy.sh must fail.
if FAKE_ROLLED_ID=dep-2 run "$tmp/rollback.log" staging roll; then
  fail "a rolled-back deployment was reported as success"
fi
grep -q 'rolled back by the circuit breaker' "$tmp/rollback.log.err" || fail "rollback not explained"

# 3. An unknown environment is refused before any call.
if run "$tmp/bad.log" prod abc; then fail "environment prod accepted"; fi
[ ! -s "$tmp/bad.log" ] || fail "calls made for an unknown environment"

echo "deploy.sh: stack order, parameters, roll, rollback detection and environment check ok"
