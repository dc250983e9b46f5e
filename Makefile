# gpuyard developer entry points. `make demo` and `make test` do all set-up on a fresh
# machine: the Python environment, the cluster binaries (built once into
# ~/.cache/gpuyard, reused afterwards) and the local cluster.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local cluster's tooling lives in hack/ and is not part of the shipped package.
export PYTHONPATH := $(CURDIR)/hack
CLUSTER := $(BIN)/python -m localcluster

.PHONY: help venv binaries keda cluster-up cluster-down cluster-env crds dist chart-lint lint test test-unit demo report-image bench-peers clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/gpuyard: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,report]'
	@touch $@

venv: $(BIN)/gpuyard ## create .venv with gpuyard, the dev tools and the report extra (pinned)

binaries: ## build the pinned cluster binaries into ~/.cache/gpuyard (slow the first time)
	bash hack/build-binaries.sh

keda: ## build KEDA's operator and metrics adapter (KEDA_VERSION) into ~/.cache/gpuyard; only when asked
	bash hack/build-keda.sh

cluster-up: venv ## start the local cluster (prints `export` lines for KUBECONFIG & co.)
	$(CLUSTER) up

cluster-down: venv ## stop the local cluster and remove its files
	$(CLUSTER) down

cluster-env: venv ## print `export` lines for the running local cluster
	$(CLUSTER) env

crds: venv ## regenerate crds/ (and the chart's copy) from the pydantic models
	$(BIN)/gpuyard crds --output-dir crds --reference docs/api.md
	$(BIN)/gpuyard crds --output-dir charts/gpuyard/files/crds

dist: binaries ## render dist/install.yaml from the chart (after `make crds` or a chart change)
	bash hack/render-install.sh

chart-lint: venv binaries ## helm lint the chart; shellcheck and hadolint the packaging
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	  HELM_CACHE_HOME=$$scratch/c HELM_CONFIG_HOME=$$scratch/f HELM_DATA_HOME=$$scratch/d \
	  "$$(bash hack/build-binaries.sh --print-dir)/helm" lint --strict charts/gpuyard
	$(BIN)/shellcheck -x -P SCRIPTDIR hack/*.sh
	$(BIN)/hadolint Dockerfile

lint: venv ## ruff, mypy (strict) and the import-layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test-unit: venv ## the fast tests only (no cluster)
	$(BIN)/pytest -m 'not cluster'

test: venv binaries lint ## everything: lint, unit and cluster tests (starts its own cluster)
	$(BIN)/pytest

# System packages first (Prometheus, openssl; Go is checked), then the venv and binaries.
demo: ## scaling, scale-to-zero, billing on a local cluster (PROFILE=short|long, KEEP=1)
	bash hack/install-system-deps.sh
	@$(MAKE) --no-print-directory venv binaries
	$(BIN)/python hack/demo.py --profile $(or $(PROFILE),standard) --out $(or $(OUT),out/demo) \
	  $(if $(KEEP),--keep-cluster) $(DEMO_ARGS)

bench-peers: venv ## gpuyard next to KEDA + the HPA on one load profile (bench/peers.py; ARGS=--quick)
	PYTHONPATH=$(CURDIR)/operator:$(CURDIR)/hack $(BIN)/python bench/peers.py $(ARGS)

report-image: venv ## redraw docs/images/usage-report.png (gpuyard usage --chart, sample ledger)
	$(BIN)/python -m localcluster.sample_report

clean: ## remove the virtual environment and caches kept in the repository
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
