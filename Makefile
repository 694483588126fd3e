# The two commands of the README's Quick start:
#   make run-local   start Redis + anvil, deploy the contracts, process the sample message, serve
#   make test        the whole test suite (what .ci/run calls)
# Everything else is a step of those two.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: tools redis-server promtool node-tools pytools abi abi-check test run-local lint fmt clean

## Install what the tests and the local stack need, when missing: redis-server and promtool
## (Debian), the pinned npm toolchain in contracts/ (solcjs, OpenZeppelin, anvil, cast), and
## the pinned Python tools in .tools/venv (MLflow, schemathesis).
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
test: tools
	$(CARGO) test --locked --all-targets

## Quick start: a local stack with the sample message processed; Ctrl-C stops it all.
run-local: tools
	$(CARGO) run --locked -- local

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf contracts/node_modules
