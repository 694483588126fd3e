#!/usr/bin/env bash
# Deploys one environment from docs/deploy/cloudformation, in order: the image registry
# (hokusai-contracts-ecr), optionally the network (hokusai-<env>-network), the shared pieces
# (hokusai-<env>-shared), the services (hokusai-<env>-service) and the alarms and dashboard
# (hokusai-<env>-monitoring), each with `aws cloudformation deploy`; then rolls the services.
#
# usage: docs/deploy/ecs/deploy.sh <env> [image-tag]   deploy; tag defaults to HEAD's short sha
#        docs/deploy/ecs/deploy.sh <env> roll          only roll both services onto fresh tasks
#                                                      (they re-read SSM: secret rotation)
# needs: the aws CLI with credentials, AWS_REGION; the image pushed (build-and-push.sh).
#
# Rollback needs no state here: a service deployment whose tasks do not become healthy is
# stopped and rolled back by the ECS deployment circuit breaker, CloudFormation then rolls the
# stack back too, and this script exits non-zero. Rolling back a release that is healthy but
# wrong is a deploy of the earlier tag: `deploy.sh <env> <earlier sha>`.
#
# Stack parameters come from the variables below. Unset ones keep the stack's current value
# (a template default on the first deploy), so only the first deploy needs them all:
#   network   NETWORK_STACK=1 makes hokusai-<env>-network and takes the VPC and subnets from it;
#             otherwise VPC_ID, VPC_CIDR, PUBLIC_SUBNET_IDS, PRIVATE_SUBNET_IDS (comma separated)
#   shared    CERTIFICATE_ARN, DOMAIN_NAME, HOSTED_ZONE_ID, CREATE_CLUSTER, OPS_INGRESS_CIDR,
#             LOG_GROUP_NAME
#   service   CHAIN_ID, DEPLOYER_KEY_POOL_SIZE, DEPLOYER_KMS_KEY_ARNS, SSM_KMS_KEY_ARN,
#             ROLE_REDIS_URLS, MLFLOW_URI_FROM_SSM, CPU_ARCHITECTURE, WORKER_CONCURRENCY
#   monitoring ALARM_TOPIC_ARN, RUNBOOK_URL, DEPLOYER_BALANCE_THRESHOLD_ETH
set -euo pipefail
env=${1:?usage: deploy.sh <development|staging|production> [image-tag|roll]}
case "$env" in development | staging | production) ;; *) echo "unknown environment $env" >&2; exit 2 ;; esac
: "${AWS_REGION:?set AWS_REGION}"
export AWS_DEFAULT_REGION=$AWS_REGION
templates="$(cd "$(dirname "$0")/../cloudformation" && pwd)"
cluster="hokusai-$env"
api="hokusai-contracts-$env"
worker="hokusai-contracts-worker-$env"

# deploy_stack <stack> <template> [Key=Value...]
deploy_stack() {
  local stack=$1 template=$2
  shift 2
  echo "== $stack ($template)"
  local overrides=()
  [ $# -gt 0 ] && overrides=(--parameter-overrides "$@")
  if ! aws cloudformation deploy --stack-name "$stack" --template-file "$templates/$template" \
      --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset "${overrides[@]}"; then
    echo "$stack failed; its latest events:" >&2
    aws cloudformation describe-stack-events --stack-name "$stack" --max-items 15 \
      --query 'StackEvents[].[Timestamp,LogicalResourceId,ResourceStatus,ResourceStatusReason]' \
      --output text >&2 || true
    exit 1
  fi
}

# p <Key> <value>: prints Key=value when value is set (unset keeps the stack's current value).
params=()
p() { if [ -n "${2:-}" ]; then params+=("$1=$2"); fi; }

output() { # output <stack> <key>
  aws cloudformation describe-stacks --stack-name "$1" \
    --query "Stacks[0].Outputs[?OutputKey=='$2'].OutputValue | [0]" --output text
}

primary_deployment() { # primary_deployment <service>: "<id> <rolloutState> <task definition>"
  aws ecs describe-services --cluster "$cluster" --services "$1" \
    --query "services[0].deployments[?status=='PRIMARY'] | [0].[id, rolloutState, taskDefinition]" \
    --output text
}

# Starts a new deployment of each service on fresh tasks, waits, and fails when the circuit
# breaker replaced it (rolled back) instead of completing it.
roll() {
  local ids=() svc
  for svc in "$api" "$worker"; do
    echo "== rolling $svc"
    ids+=("$(aws ecs update-service --cluster "$cluster" --service "$svc" --force-new-deployment \
      --query "service.deployments[?status=='PRIMARY'] | [0].id" --output text)")
  done
  aws ecs wait services-stable --cluster "$cluster" --services "$api" "$worker" || true
  local i=0 failed=0 id state
  for svc in "$api" "$worker"; do
    read -r id state _ < <(primary_deployment "$svc")
    if [ "$id" != "${ids[$i]}" ] || [ "$state" != COMPLETED ]; then
      echo "$svc: deployment ${ids[$i]} did not complete (primary now $id, $state): rolled back by the circuit breaker, or still going after the wait; see the events of 'aws ecs describe-services --cluster $cluster --services $svc'" >&2
      failed=1
    fi
    i=$((i + 1))
  done
  return "$failed"
}

if [ "${2:-}" = roll ]; then
  roll
  echo "rolled $api and $worker"
  exit 0
fi

tag=${2:-$(git -C "$templates" rev-parse --short=12 HEAD)}
if ! aws ecr describe-images --repository-name hokusai/contracts --image-ids "imageTag=$tag" >/dev/null 2>&1; then
  echo "no image hokusai/contracts:$tag in ECR: run build-and-push.sh first" >&2
  exit 1
fi

deploy_stack hokusai-contracts-ecr ecr.yaml

if [ "${NETWORK_STACK:-}" = 1 ]; then
  deploy_stack "hokusai-$env-network" network.yaml "Environment=$env"
  VPC_ID=$(output "hokusai-$env-network" VpcId)
  VPC_CIDR=$(output "hokusai-$env-network" VpcCidr)
  PUBLIC_SUBNET_IDS=$(output "hokusai-$env-network" PublicSubnetIds)
  PRIVATE_SUBNET_IDS=$(output "hokusai-$env-network" PrivateSubnetIds)
fi

params=("Environment=$env")
p VpcId "${VPC_ID:-}"
p VpcCidr "${VPC_CIDR:-}"
p PublicSubnetIds "${PUBLIC_SUBNET_IDS:-}"
p PrivateSubnetIds "${PRIVATE_SUBNET_IDS:-}"
p CertificateArn "${CERTIFICATE_ARN:-}"
p DomainName "${DOMAIN_NAME:-}"
p HostedZoneId "${HOSTED_ZONE_ID:-}"
p CreateCluster "${CREATE_CLUSTER:-}"
p OpsIngressCidr "${OPS_INGRESS_CIDR:-}"
p LogGroupName "${LOG_GROUP_NAME:-}"
deploy_stack "hokusai-$env-shared" shared.yaml "${params[@]}"

# Which task definitions run now: if the service stack changes them, CloudFormation rolls the
# services itself (and waits for them); if not, they are rolled below.
before_api=$(primary_deployment "$api" 2>/dev/null | cut -s -f3 || true)
before_worker=$(primary_deployment "$worker" 2>/dev/null | cut -s -f3 || true)

params=("Environment=$env" "ImageTag=$tag")
p ChainId "${CHAIN_ID:-}"
p DeployerKeyPoolSize "${DEPLOYER_KEY_POOL_SIZE:-}"
p DeployerKmsKeyArns "${DEPLOYER_KMS_KEY_ARNS:-}"
p SsmKmsKeyArn "${SSM_KMS_KEY_ARN:-}"
p RoleRedisUrls "${ROLE_REDIS_URLS:-}"
p MlflowUriFromSsm "${MLFLOW_URI_FROM_SSM:-}"
p CpuArchitecture "${CPU_ARCHITECTURE:-}"
p WorkerConcurrency "${WORKER_CONCURRENCY:-}"
deploy_stack "hokusai-$env-service" service.yaml "${params[@]}"

params=("Environment=$env")
p AlarmTopicArn "${ALARM_TOPIC_ARN:-}"
p RunbookUrl "${RUNBOOK_URL:-}"
p DeployerBalanceThresholdEth "${DEPLOYER_BALANCE_THRESHOLD_ETH:-}"
deploy_stack "hokusai-$env-monitoring" monitoring.yaml "${params[@]}"

after_api=$(primary_deployment "$api" | cut -s -f3)
after_worker=$(primary_deployment "$worker" | cut -s -f3)
if [ -n "$before_api" ] && [ "$before_api" = "$after_api" ] && [ "$before_worker" = "$after_worker" ]; then
  # Same task definitions (same image, same template): roll anyway, so the tasks re-read SSM
  # and a re-pushed tag is pulled again.
  roll
fi
echo "deployed hokusai/contracts:$tag to $cluster ($api, $worker)"
