#!/usr/bin/env bash
# Builds the image and pushes it to ECR, tagged with the git revision (and `latest`).
# usage: build-and-push.sh <env>        needs: docker (or podman), aws CLI, AWS_REGION, AWS_ACCOUNT_ID
set -euo pipefail
env=${1:?usage: build-and-push.sh <env>}
: "${AWS_REGION:?}" "${AWS_ACCOUNT_ID:?}"
cd "$(git rev-parse --show-toplevel)"
rev=$(git rev-parse --short=12 HEAD)
registry="$AWS_ACCOUNT_ID.dkr.ecr.$AWS_REGION.amazonaws.com"
repo="$registry/hokusai-deployer"
aws ecr get-login-password --region "$AWS_REGION" | docker login --username AWS --password-stdin "$registry"
docker build --build-arg "HOKUSAI_GIT_REVISION=$rev" -t "$repo:$rev" -t "$repo:$env-latest" .
docker push "$repo:$rev"
docker push "$repo:$env-latest"
echo "$repo:$rev"
