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
TEST_WORKERS ?= 3

# The image installs its dependencies from these, every file checked against its hash.
LOCKS := requirements.lock requirements-build.lock
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock"

.PHONY: help setup protos run test test-durations test-fast coverage lint bench image kind lock clean

help:
	@echo "make run     start redis + rng + hasher + worker + webui (ARGS='--workers 3')"
	@echo "make test    run the whole test suite, both tiers, in parallel (what CI runs)"
	@echo "make test-fast  the in-process tests only: no browser, no engine, no stack (a minute)"
	@echo "make test-durations  measure each module again for the order of make test (tests/durations.json)"
	@echo "make coverage   the fast tier under coverage: does it exercise every module?"
	@echo "make lint    ruff, mypy and the import contract"
	@echo "make protos  generate the gRPC stubs from protos/ (installs grpcio-tools only)"
	@echo "make bench   run the benchmarks, results in bench-results/"
	@echo "make image   build $(IMAGE) with its version, git revision and source labels"
	@echo "make kind    a kind cluster with the image loaded and k8s/overlays/OVERLAY applied"
	@echo "make lock    pin the image's dependencies, with hashes, after a change to pyproject.toml"

setup: $(STAMP)

# uv installs: it fetches and unpacks in parallel (a cold setup here in about 20 s with the
# bytecode compiled; pip took 45). pip is only asked for uv itself.
UV_INSTALL = $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check 'uv>=0.5'

# The install compiles the native extension (dockercoins/_native.c): a change to it reinstalls,
# rebuilt (uv would otherwise reuse its cached build of this directory).
$(STAMP): pyproject.toml dockercoins/_native.c | $(PY)
	$(UV_INSTALL) --reinstall-package dockercoins-grpc -e '.[dev]'
	touch $@

$(PROTOC_STAMP): | $(PY)
	$(UV_INSTALL) 'grpcio-tools>=1.62'
	touch $@

protos: $(STUBS)

$(STUBS): $(PROTOS) scripts/protos $(PROTOC_STAMP)
	scripts/protos $(PY)

run: $(STAMP) $(STUBS)
	$(VENV)/bin/dockercoins up $(ARGS)

# The browser test needs Debian's chromium: installed here when root with apt, else it skips.
# scripts/test-phases says in which order and beside what the tests run (TEST_WORKERS workers).
# The checkout's bytecode (packages and tests; not .venv, which uv compiled, nor other dot
# folders) is written first: where PYTHONDONTWRITEBYTECODE is set, each of the few hundred
# processes the tests start would otherwise compile them again.
test: $(STAMP) $(STUBS)
	scripts/test-prerequisites
	$(PY) -m compileall -q -x '/\.' . >/dev/null
	scripts/test-phases $(PY) $(TEST_WORKERS) $(ARGS)

# tests/durations.json, the seconds of each module in the first phase of `make test`, which hands
# out the longest first: worth redoing after adding a module or making one much longer.
test-durations: $(STAMP) $(STUBS)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder \
		-m "not alone" --record-durations $(ARGS)

# The tests not marked slow: in-process, against a real redis-server (tests/conftest.py fails one
# that starts any other process); on two workers, then those marked `alone`.
test-fast: $(STAMP) $(STUBS)
	$(PY) -m pytest -n 2 -m "not slow and not alone" $(ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m "not slow and alone" $(ARGS) || [ $$? -eq 5 ]

coverage: $(STAMP) $(STUBS)
	$(PY) -m coverage run -m pytest -m "not slow and not alone" -q $(ARGS)
	$(PY) scripts/fast-coverage

lint: $(STAMP) $(STUBS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo

bench: $(STAMP) $(STUBS)
	$(VENV)/bin/dockercoins bench $(ARGS)

# No provenance attestation: Docker's containerd image store keeps it beside the image, and
# `kind load` then fails (kind issue 3795). Only builders that know the flag get it (BuildKit's
# buildx; the legacy builder and Debian's docker.io 20.10 do not, and add none).
image:
	docker build $$(docker build --help 2>/dev/null | grep -q -- --provenance && echo --provenance=false) \
		--tag $(IMAGE) --build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		--build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo unknown) .

kind:
	scripts/kind-up $(OVERLAY)

# Both lock files, from pyproject.toml's dependencies and requirements-build.in, one resolution for
# every platform (amd64 and arm64 alike) and Python from 3.11. Pins already in a lock are kept
# unless pyproject.toml rules them out; `make lock UPGRADE=1` moves everything to the newest.
lock: $(STAMP)
	$(UV_COMPILE) $(if $(UPGRADE),--upgrade) pyproject.toml requirements-build.in \
		-o requirements-build.lock
	$(UV_COMPILE) pyproject.toml -c requirements-build.lock -o requirements.lock

clean:
	rm -rf dockercoins/v1 .pytest_cache .mypy_cache .ruff_cache .coverage
