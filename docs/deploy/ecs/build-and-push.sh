#!/usr/bin/env bash
# Builds the image and pushes it to ECR hokusai/contracts (stack hokusai-contracts-ecr) with the
# three tags of seed 003: the git sha, the version in Cargo.toml, and latest. Prints the git-sha
# tag, the one deploy.sh deploys (latest and the version move; the sha names one build).
#
# usage: docs/deploy/ecs/build-and-push.sh
# needs: docker (or DOCKER=podman), the aws CLI with credentials, AWS_REGION.
# optional: AWS_ACCOUNT_ID (else asked of STS), PLATFORM (linux/amd64; linux/arm64 goes with the
#   service stack's CpuArchitecture=ARM64), CARGO_FEATURES (aws-kms: deployer keys in AWS KMS),
#   ALLOW_DIRTY=1 (build a work tree with uncommitted changes; its sha tag then lies).
set -euo pipefail
: "${AWS_REGION:?set AWS_REGION}"
docker=${DOCKER:-docker}
platform=${PLATFORM:-linux/amd64}
cd "$(git rev-parse --show-toplevel)"

if [ -n "$(git status --porcelain --untracked-files=no)" ] && [ "${ALLOW_DIRTY:-}" != 1 ]; then
  echo "uncommitted changes: the git-sha tag would not name what is built (commit, or ALLOW_DIRTY=1)" >&2
  exit 1
fi
sha=$(git rev-parse --short=12 HEAD)
# The version of [package] (the first table whose version line counts).
version=$(awk -F'"' '/^\[/ { pkg = ($0 == "[package]") } pkg && /^version *=/ { print $2; exit }' Cargo.toml)
[ -n "$version" ] || { echo "no [package] version in Cargo.toml" >&2; exit 1; }
account=${AWS_ACCOUNT_ID:-$(aws sts get-caller-identity --query Account --output text)}
registry="$account.dkr.ecr.$AWS_REGION.amazonaws.com"
repo="$registry/hokusai/contracts"

aws ecr get-login-password --region "$AWS_REGION" \
  | "$docker" login --username AWS --password-stdin "$registry"
"$docker" build --platform "$platform" \
  --build-arg "HOKUSAI_GIT_REVISION=$sha" \
  --build-arg "CARGO_FEATURES=${CARGO_FEATURES:-}" \
  -t "$repo:$sha" -t "$repo:$version" -t "$repo:latest" .
for tag in "$sha" "$version" latest; do
  "$docker" push "$repo:$tag"
done
echo "$sha"
