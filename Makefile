# DockerCoins over gRPC. `make run` starts the stack, `make test` tests it; both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make protos` alone needs grpcio-tools only, not the whole development set.
PROTOC_STAMP := $(VENV)/.grpcio-tools
PROTOS := $(wildcard protos/dockercoins/v1/*.proto)
STUBS := dockercoins/v1/__init__.py
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= dockercoins:$(VERSION)
OVERLAY ?= base
ARGS ?=

.PHONY: help setup protos run test lint bench image kind clean

help:
	@echo "make run     start redis + rng + hasher + worker + webui (ARGS='--workers 3')"
	@echo "make test    run the test suite"
	@echo "make lint    ruff, mypy and the import contract"
	@echo "make protos  generate the gRPC stubs from protos/ (installs grpcio-tools only)"
	@echo "make bench   run the benchmarks, results in bench-results/"
	@echo "make image   build $(IMAGE) with its version, git revision and source labels"
	@echo "make kind    a kind cluster with the image loaded and k8s/overlays/OVERLAY applied"

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The install compiles the native extension (dockercoins/_native.c): a change to it reinstalls.
$(STAMP): pyproject.toml dockercoins/_native.c | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(PROTOC_STAMP): | $(PY)
	$(PY) -m pip install --quiet 'grpcio-tools>=1.62'
	touch $@

protos: $(STUBS)

$(STUBS): $(PROTOS) scripts/protos $(PROTOC_STAMP)
	scripts/protos $(PY)

run: $(STAMP) $(STUBS)
	$(VENV)/bin/dockercoins up $(ARGS)

# The browser test needs Debian's chromium: installed here when root with apt, else it skips.
test: $(STAMP) $(STUBS)
	scripts/test-prerequisites
	$(PY) -m pytest $(ARGS)

lint: $(STAMP) $(STUBS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo

bench: $(STAMP) $(STUBS)
	$(VENV)/bin/dockercoins bench $(ARGS)

image:
	docker build --tag $(IMAGE) --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		--build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo unknown) .

kind:
	scripts/kind-up $(OVERLAY)

clean:
	rm -rf dockercoins/v1 .pytest_cache .mypy_cache .ruff_cache
