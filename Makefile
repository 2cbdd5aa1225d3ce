# Two commands matter to a newcomer:
#   make demo   set up, run the tiny pool locally and stream one completion (TTFT and ITL printed)
#   make test   everything CI runs: lint, types and every test, installing what they need
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian's prometheus for the autoscaling tests; apt-get needs root (CI) or sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# helm-sdkpy (the real Helm library, for the chart tests) needs Python >= 3.12; pyenv has one here.
PYTHON312 ?= $(or $(shell ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1),$(shell command -v python3.12))
HELM_VENV := build/helm-venv

.PHONY: demo test install lint typecheck pytest prometheus helm-venv crds \
	images image-operator image-worker-cuda image-worker-cpu push-images chart-package

# Images carry the chart's version as their tag (the chart's defaults pull exactly these).
# `make images` builds what .github/workflows/release.yaml builds and pushes; the kind workflow builds
# image-operator and image-worker-cpu. REGISTRY=ghcr.io/you to build for your own registry.
REGISTRY ?= ghcr.io/splitserve
VERSION := $(shell sed -n 's/^version: *//p' charts/splitserve/Chart.yaml)
DOCKER ?= docker
OPERATOR_IMAGE := $(REGISTRY)/operator:$(VERSION)
WORKER_IMAGE := $(REGISTRY)/worker:$(VERSION)
WORKER_CPU_IMAGE := $(REGISTRY)/worker:$(VERSION)-cpu
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[local,test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/splitserve up examples/local.yaml --demo

prometheus:
	@command -v prometheus >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@# the package starts a system service on :9090; the tests start their own on free ports
	@$(SUDO) service prometheus stop >/dev/null 2>&1 || true

helm-venv: $(HELM_VENV)/.installed

$(HELM_VENV)/.installed:
	@test -n "$(PYTHON312)" || { echo "make: need python3.12 for helm-sdkpy (set PYTHON312=...)"; exit 1; }
	$(PYTHON312) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/pip install --quiet helm-sdkpy==0.1.32
	touch $@

lint: install
	$(BIN)/ruff check operator worker tests bench
	$(BIN)/ruff format --check operator worker tests bench
	$(BIN)/lint-imports --no-cache  # the layer contracts in .importlinter

typecheck: install
	$(BIN)/mypy

crds: install
	$(BIN)/python -m splitserve_operator.crd --out crds/ --out charts/splitserve/crds/ --readme README.md
	$(BIN)/python -m splitserve_operator.chart_values --chart charts/splitserve --doc docs/install.md

pytest: install prometheus helm-venv
	SPLITSERVE_HELM_PYTHON=$(HELM_VENV)/bin/python $(BIN)/pytest

test: lint typecheck pytest

images: image-operator image-worker-cuda image-worker-cpu

image-operator:
	$(DOCKER) build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .

image-worker-cuda:
	$(DOCKER) build -f worker/Dockerfile -t $(WORKER_IMAGE) .

image-worker-cpu:
	$(DOCKER) build -f worker/Dockerfile --build-arg TORCH_INDEX_URL=$(CPU_TORCH_INDEX) -t $(WORKER_CPU_IMAGE) .

push-images:
	$(DOCKER) push $(OPERATOR_IMAGE)
	$(DOCKER) push $(WORKER_IMAGE)
	$(DOCKER) push $(WORKER_CPU_IMAGE)

# build/splitserve-$(VERSION).tgz, for `helm push ... oci://` (the release workflow) or a file install.
chart-package:
	helm package charts/splitserve --destination build
