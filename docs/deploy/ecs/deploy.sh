#!/usr/bin/env bash
# Registers new task definitions for the worker and the API with IMAGE, rolls both ECS services
# onto them, waits until they are stable, and rolls back to the previous task definitions if
# they are not (or on `deploy.sh <env> rollback`).
# usage: deploy.sh <env> <image> | deploy.sh <env> rollback
# needs: aws CLI, envsubst, jq; AWS_REGION, AWS_ACCOUNT_ID, CHAIN_ID; cluster hokusai-<env>.
# The API service's ALB target group is container `api` port 3001 (health check /health/ready);
# the ops port 9091 of either task is in no target group (security group: Prometheus only).
set -euo pipefail
env=${1:?usage: deploy.sh <env> <image>|rollback}
what=${2:?usage: deploy.sh <env> <image>|rollback}
: "${AWS_REGION:?}" "${AWS_ACCOUNT_ID:?}"
cluster="hokusai-$env"
here=$(cd "$(dirname "$0")" && pwd)
state="$here/.last-deploy-$env"

current() { aws ecs describe-services --cluster "$cluster" --services "$1" \
  --query 'services[0].taskDefinition' --output text; }

roll() { # service task-definition-arn
  aws ecs update-service --cluster "$cluster" --service "$1" --task-definition "$2" >/dev/null
}

if [ "$what" = rollback ]; then
  [ -f "$state" ] || { echo "no previous deployment recorded in $state" >&2; exit 1; }
  while read -r service arn; do
    echo "rolling $service back to $arn"
    roll "$service" "$arn"
  done <"$state"
  aws ecs wait services-stable --cluster "$cluster" --services hokusai-deployer-worker hokusai-deployer-api
  exit 0
fi

: "${CHAIN_ID:?}"
export IMAGE=$what ENV=$env AWS_REGION AWS_ACCOUNT_ID CHAIN_ID
: >"$state"
for svc in worker api; do
  service="hokusai-deployer-$svc"
  echo "$service $(current "$service")" >>"$state"
  arn=$(envsubst <"$here/task-definition-$svc.json" \
    | aws ecs register-task-definition --cli-input-json file:///dev/stdin \
    | jq -r '.taskDefinition.taskDefinitionArn')
  echo "rolling $service onto $arn"
  roll "$service" "$arn"
done
# Rolling update: new tasks must pass their health check before old ones drain (the worker
# drains in-flight messages within its 30 s deadline on SIGTERM; stopTimeout is 45 s).
if ! timeout 900 aws ecs wait services-stable --cluster "$cluster" \
    --services hokusai-deployer-worker hokusai-deployer-api; then
  echo "services did not become stable: rolling back" >&2
  "$0" "$env" rollback
  exit 1
fi
echo "deployed $IMAGE to $cluster"
