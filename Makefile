# Setlist — `make up` starts the platform, `make test` runs the tests.
# Everything installs into .venv at the repository root from uv.lock (needs only python3).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SETLIST := $(BIN)/setlist
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

# Operator variables of the old tool (all optional; the CLI has the same defaults).
TENANT_ID     ?= enterprise-client-001
PRIORITY      ?= normal
RESOURCE_TIER ?=
DRY_RUN       ?= false
PARALLEL_JOBS ?= 4
export TENANT_ID PRIORITY RESOURCE_TIER DRY_RUN PARALLEL_JOBS

.PHONY: install up down test lint test-unit test-ha test-under-load image test-container pin-image health-check create-tenant-jobs create-canary-job \
        list-jobs monitor-job restore-job-configs backup-job-configs tenants audit \
        create-ml-job create-etl-job create-security-job create-billing-job create-backup-job \
        performance-report resource-optimization security-scan-all compliance-check

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

# Bytecode compiled once here, as the image does (images/Dockerfile): every process the
# platform and the tests start (servers, workers, flow runs, staging workers) would
# otherwise compile what it imports each time where PYTHONDONTWRITEBYTECODE is set
# (importing Prefect's server: 6.6 s without, 3.3 s with, measured here).
$(VENV)/.synced: $(BIN)/uv pyproject.toml uv.lock
	$(BIN)/uv sync --frozen --inexact --compile-bytecode --python $(BIN)/python
	$(BIN)/python -m compileall -q -j 0 blocks flows setlist
	@touch $@

install: $(VENV)/.synced  ## create the environment (.venv) only

up: install  ## start PostgreSQL, server + UI, worker, deployments, demo tenant; Ctrl-C stops
	$(SETLIST) up $(if $(DATABASE),--database $(DATABASE))

down:
	$(SETLIST) down

# The suite in TEST_WORKERS processes (pytest-xdist), each with its own Prefect server,
# PostgreSQL and moto (tests/conftest.py), a test file's tests together in one of them:
# most of a test's time is spent waiting on a server or a worker, not computing, so two
# processes halve the wall time even on two cores. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: install  ## the whole test suite
	$(PYTEST)

# The suite beside a process that keeps one core busy: what a shared CI machine does to it.
test-under-load: install
	@$(BIN)/python -c 'while True: pass' & hog=$$!; \
	$(PYTEST); rc=$$?; kill $$hog; exit $$rc

test-unit: install
	$(BIN)/python -m pytest -q -m "not server and not e2e"

# The worker's, the dispatcher's and the gateway's paths on Prefect's multi-replica shape:
# two API replicas (the worker on the first, everything else on the second), a services
# process, the embedded PostgreSQL and a Redis database of its own (SETLIST_TEST_REDIS_URL,
# default the machine's 127.0.0.1:6379).
test-ha: install
	SETLIST_TEST_CONTROL_PLANE=ha $(BIN)/python -m pytest -q tests/e2e/test_dispatch_contention.py \
		tests/e2e/test_jobs_on_worker.py tests/e2e/test_jobs_through_the_gate.py tests/gateway

# ---- images (images/Dockerfile; images/build.sh picks docker, podman or buildah) ----
IMAGE          ?= ghcr.io/setlist/runtime
GPU_IMAGE      ?= ghcr.io/setlist/runtime-gpu
TAG            ?=
BASE_IMAGE     ?= docker.io/library/python:3.12-slim-bookworm
GPU_BASE_IMAGE ?= docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04
# podman's OCI runtime: runc where it is installed (crun 1.8 refuses hybrid cgroups)
export PODMAN_RUNTIME ?= $(shell command -v runc 2>/dev/null)

image:  ## the CPU and GPU runtime images
	IMAGE=$(IMAGE) GPU_IMAGE=$(GPU_IMAGE) TAG=$(TAG) BASE_IMAGE=$(BASE_IMAGE) \
		GPU_BASE_IMAGE=$(GPU_BASE_IMAGE) images/build.sh runtime gpu

# Pin overlays/prod to what a release pushed: make pin-image RUNTIME_REF=name@sha256:… GPU_REF=…
pin-image: install
	$(BIN)/python images/pin.py $(RUNTIME_REF) $(GPU_REF)

# The container contract: build both images with podman, then run the Jobs the worker
# renders in them under the pod's restrictions (tests/container). No registry is needed:
# the base defaults to a Debian image made here with debootstrap (images/local-base.sh);
# TEST_BASE_IMAGE=docker.io/library/python:3.12-slim-bookworm uses the usual one.
TEST_BASE_IMAGE ?= localhost/setlist-base:bookworm
test-container: install
	$(if $(filter localhost/setlist-base:%,$(TEST_BASE_IMAGE)),images/local-base.sh $(TEST_BASE_IMAGE))
	BUILDER=podman IMAGE=localhost/setlist/runtime GPU_IMAGE=localhost/setlist/runtime-gpu TAG=test \
		BASE_IMAGE=$(TEST_BASE_IMAGE) GPU_BASE_IMAGE=$(TEST_BASE_IMAGE) images/build.sh runtime gpu
	SETLIST_TEST_IMAGE=localhost/setlist/runtime:test \
		SETLIST_TEST_GPU_IMAGE=localhost/setlist/runtime-gpu:test \
		$(BIN)/python -m pytest -q tests/container tests/k8s/test_container_run.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

# ---- operator targets (thin wrappers over the CLI) ----
health-check: install
	$(SETLIST) health $(if $(filter true,$(DEEP)),--deep --tenant $(TENANT_ID))

tenants: install
	$(SETLIST) tenant list

create-canary-job: install
	$(SETLIST) submit canary --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))

create-tenant-jobs: install
	$(SETLIST) submit-all --tenant $(TENANT_ID) --priority $(PRIORITY)

list-jobs: install
	$(SETLIST) jobs list $(if $(FILTER),--state $(FILTER)) $(if $(TENANT_ID),--tenant $(TENANT_ID))

monitor-job: install
	@test -n "$(JOB_NAME)" || { echo "usage: make monitor-job JOB_NAME=<run name or id>"; exit 2; }
	$(SETLIST) jobs watch $(JOB_NAME)

audit: install
	$(SETLIST) audit --tenant $(TENANT_ID)

performance-report: install
	$(SETLIST) report performance --since $(or $(SINCE),7d)

resource-optimization: install
	$(SETLIST) report resources --since $(or $(SINCE),7d)

# Every active tenant scanned now (a flow run each, PARALLEL_JOBS at once); then the
# per-framework table of the latest scans, failing below 95% or for a tenant never scanned.
security-scan-all: install
	$(SETLIST) scan all --parallel $(PARALLEL_JOBS)

compliance-check: install
	$(SETLIST) scan compliance --target $(or $(TARGET),0.95)

# Platform configuration backup (pools, queues, limits, deployments, automations, variables,
# blocks). Secret values only with INCLUDE_SECRETS=true, encrypted with the passphrase of
# SETLIST_CONFIG_PASSPHRASE (or asked for). Restore refuses objects that exist: REPLACE=true.
backup-job-configs: install
	$(SETLIST) config export $(or $(BACKUP_FILE),setlist-config-$$(date +%Y%m%d-%H%M%S).tar.gz) $(if $(filter true,$(INCLUDE_SECRETS)),--include-secrets)

restore-job-configs: install
	@test -n "$(BACKUP_FILE)" || { echo "usage: make restore-job-configs BACKUP_FILE=<archive.tar.gz> [REPLACE=true]"; exit 2; }
	$(SETLIST) config import $(BACKUP_FILE) $(if $(filter true,$(REPLACE)),--replace)

# One target per job type.
create-ml-job: install
	$(SETLIST) submit ml-training --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))
create-etl-job: install
	$(SETLIST) submit data-etl --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))
create-backup-job: install
	$(SETLIST) submit tenant-backup --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))
create-security-job: install
	$(SETLIST) submit security-scan --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))
create-billing-job: install
	$(SETLIST) submit billing-report --tenant $(TENANT_ID) --priority $(PRIORITY) $(if $(RESOURCE_TIER),--tier $(RESOURCE_TIER))

# ---- the seed's cluster, performance and monitoring targets ----
.PHONY: check-cluster performance-test monitor-performance monitor-all

# The local stack's readiness and, with a kube context (KUBE_CONTEXT=…, else in-cluster or
# the kubeconfig's current one), the cluster's: one line per check, exit 1 on any failure.
check-cluster: install
	$(SETLIST) cluster check $(if $(KUBE_CONTEXT),--kube-context $(KUBE_CONTEXT))

# Every benchmark of bench/ with small sizes, each in its own process with a time limit:
# a table, and their figures in REPORT (default .setlist/reports/performance-test-*.json).
# ONLY="billing backup" runs just those.
performance-test: install
	$(SETLIST) bench run --quick $(foreach b,$(ONLY),--only $(b)) $(if $(REPORT),--out $(REPORT))

# Live views until Ctrl-C, refreshed every INTERVAL seconds (default 5): runs by tenant,
# band and state, queue depth and oldest wait, quotas, success against 99.5%, workers;
# monitor-all adds the health checks. All tenants, unless TENANT_ID is given to make.
MONITOR_ARGS = $(if $(INTERVAL),--interval $(INTERVAL)) $(if $(filter-out file,$(origin TENANT_ID)),--tenant $(TENANT_ID))
monitor-performance: install
	$(SETLIST) monitor --no-health $(MONITOR_ARGS)

monitor-all: install
	$(SETLIST) monitor --health $(MONITOR_ARGS)
