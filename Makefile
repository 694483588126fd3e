# The two commands of the README's Quick start:
#   make run-local   start Redis + anvil, deploy the contracts, process the sample message, serve
#   make test        the whole test suite (what .ci/run calls)
# Everything else is a step of those two.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: tools redis-server promtool node-tools pytools abi abi-check test run-local lint deny deploy-lint image fmt clean

## Install what the tests and the local stack need, when missing: redis-server and promtool
## (Debian), the pinned npm toolchain in contracts/ (solcjs, OpenZeppelin, anvil, cast), and
## the pinned Python tools in .tools/venv (MLflow, schemathesis, the deploy-lint linters).
tools: redis-server promtool node-tools pytools

PYTHON ?= python3

pytools: .tools/venv/.installed

.tools/venv/.installed: tests/requirements.txt
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv .tools/venv
	.tools/venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

## promtool checks the /metrics exposition in the tests (Debian package `prometheus`).
promtool:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@promtool --version | head -1

node-tools: contracts/node_modules/.package-lock.json

contracts/node_modules/.package-lock.json: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund --loglevel=error

## Recompile contracts/*.sol into abi/ (reproducible; commit the result).
abi: node-tools
	node contracts/build.mjs

abi-check: node-tools
	node contracts/build.mjs --check

## The whole suite: unit, integration (real redis-server and anvil), contract and CLI tests.
## With the optional aws-kms feature, so the KMS signer is tested too.
FEATURES ?= aws-kms

test: tools
	$(CARGO) test --locked --all-targets --features "$(FEATURES)"

## Quick start: a local stack with the sample message processed; Ctrl-C stops it all.
run-local: redis-server node-tools
	$(CARGO) run --locked -- local

## Clippy on the default build (what `make run-local` and the image build) and with the
## features the tests use.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) clippy --locked --all-targets --features "$(FEATURES)" -- -D warnings

## Supply chain (deny.toml): licences, banned crates, duplicate versions, crate sources.
## cargo-deny is built once into .tools/cargo (about 3.5 min on 2 cores) unless on PATH.
CARGO_DENY_VERSION := 0.20.2
CARGO_DENY := $(shell command -v cargo-deny 2>/dev/null || echo .tools/cargo/bin/cargo-deny)

deny: $(CARGO_DENY)
	$(CARGO_DENY) --version
	$(CARGO_DENY) check licenses bans sources

.tools/cargo/bin/cargo-deny:
	$(CARGO) install --locked --quiet cargo-deny@$(CARGO_DENY_VERSION) --root .tools/cargo

## Packaging lint: hadolint on the Dockerfile, kubernetes-validate --strict on every manifest,
## the compose file parses (podman-compose config needs podman); the AWS deployment
## (docs/deploy): cfn-lint on the CloudFormation templates (informational rules too), checkov on
## them and on k8s/ (every skip is named with its reason in the file it applies to), the seeds'
## names and numbers in the templates, shellcheck on the scripts and deploy.sh against a
## stand-in aws CLI. All offline; the tools come from PyPI (tests/requirements.txt).
CHECKOV := .tools/venv/bin/checkov --skip-download --compact --quiet
K8S_MANIFESTS := $(filter-out k8s/kustomization.yaml,$(wildcard k8s/*.yaml))

deploy-lint: pytools
	.tools/venv/bin/hadolint Dockerfile
	.tools/venv/bin/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	.tools/venv/bin/python -c 'import yaml, sys; [yaml.safe_load(open(f)) for f in sys.argv[1:]]' docs/deploy/docker-compose.yml k8s/kustomization.yaml
	@if command -v podman >/dev/null; then .tools/venv/bin/podman-compose -f docs/deploy/docker-compose.yml config >/dev/null && echo "compose file valid"; fi
	.tools/venv/bin/cfn-lint --include-checks I -- docs/deploy/cloudformation/*.yaml
	$(CHECKOV) --framework cloudformation -d docs/deploy/cloudformation
	$(CHECKOV) --framework kubernetes $(addprefix -f ,$(K8S_MANIFESTS))
	.tools/venv/bin/python docs/deploy/check_seed_names.py docs/deploy/cloudformation
	bash -n docs/deploy/ecs/build-and-push.sh
	bash -n docs/deploy/ecs/deploy.sh
	.tools/venv/bin/shellcheck docs/deploy/ecs/*.sh
	bash docs/deploy/ecs/test_deploy.sh
	@if [ -f k8s/monitoring/check.sh ]; then bash k8s/monitoring/check.sh; fi

## The container image with podman and local stand-ins for the base images (no registry here).
image:
	bash ../shared/tools/container-bases.sh build
	eval "$$(bash ../shared/tools/container-bases.sh env)" && podman build --pull=never --format docker \
	  -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
	  --build-arg HOKUSAI_GIT_REVISION=$$(git rev-parse --short=12 HEAD) -t hokusai-deployer .

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf contracts/node_modules
