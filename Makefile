# agentgate — the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
CONTROLPLANE := e2e/controlplane
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: help deps controlplane crds lint test bench demo demo-down

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

deps: ## Install what the build and tests need (Debian packages; idempotent)
	@e2e/deps.sh

controlplane: deps ## Build (or reuse the cached) kube-apiserver, kubectl, etcd and helm
	@$(CONTROLPLANE)/build.sh >/dev/null
	@$(CONTROLPLANE)/helm.sh >/dev/null

crds: ## Regenerate the CRD manifests (crds/manifests and the chart's copy) from crds/src
	$(CARGO) run --quiet -p agentgate-crds --bin crdgen -- crds/manifests charts/agentgate/crds

lint: ## rustfmt and clippy, warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: controlplane lint ## Everything: lint, unit, property and integration tests against a real API server
	$(CARGO) test --workspace --locked

bench: controlplane ## Benchmarks, each side by side with a peer, reported as ratios
	$(CARGO) bench --locked -p agentgate-sidecar --bench proxy
	$(CARGO) bench --locked -p agentgate-sidecar --bench audit
	$(CARGO) bench --locked -p agentgate-sidecar --bench pgbench
	$(CARGO) bench --locked -p agentgate-operator --bench admission
	$(CARGO) bench --locked -p agentgate-operator --bench approval

demo: controlplane ## Start a local control plane, apply the CRDs and examples, show what a user sees
	@e2e/demo.sh up $(DEMO_DIR)

demo-down: ## Stop the demo control plane
	@e2e/demo.sh down $(DEMO_DIR)
