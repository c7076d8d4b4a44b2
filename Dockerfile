# One image for every DockerCoins service; the command picks the service:
#   docker run dockercoins:0.1.0 rng | hasher | worker | webui
# Built by `docker compose build` (or `make image`); no `# syntax=` line, so BuildKit needs no
# frontend image from a registry: the base image is the only thing it pulls.
#
# The build stage keeps two virtualenvs: /opt/tools (pip, setuptools, grpcio-tools) builds,
# /opt/venv (created without pip) is what the image runs. Layers go from the least to the most
# often changed: dependencies (from the lock files), then stubs (from protos/), then the
# code, so that a code change reinstalls only the package itself.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# 0. The toolchain of the native extension (dockercoins/_native.c, over libcrypto), for this stage
# only: a C compiler, OpenSSL's headers, and Python's where the base image lacks them (a
# Debian-built base; the official image has its own). The runtime stage needs only libcrypto,
# which its Python already links. Plain C, so amd64 and arm64 build alike.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev libssl-dev \
 && include=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
 && if [ ! -e "$include/Python.h" ]; then \
        apt-get install --yes --no-install-recommends libpython3-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*
# 1. Dependencies, wheels only (only our own extension is compiled), each file checked against the hashes
# of the lock files that `make lock` writes from pyproject.toml: requirements-build.lock holds the
# runtime set of requirements.lock, same pins, plus grpcio-tools and setuptools, so that the stubs'
# grpcio-tools matches the grpcio and protobuf they run with. One download, checked; two installs
# from those files alone.
COPY pyproject.toml requirements.lock requirements-build.lock ./
RUN python -m venv /opt/tools \
 && python -m venv --without-pip /opt/venv \
 && /opt/tools/bin/pip download --quiet --only-binary=:all: --require-hashes --dest /tmp/wheels \
        -r requirements-build.lock \
 && /opt/tools/bin/pip install --quiet --no-index --find-links /tmp/wheels \
        grpcio-tools setuptools \
 && /opt/tools/bin/pip --python /opt/venv/bin/python install --quiet --no-index --require-hashes \
        --find-links /tmp/wheels -r requirements.lock \
 && rm -rf /tmp/wheels
# 2. The gRPC stubs, by the same script as `make protos`.
COPY scripts/protos scripts/protos
COPY protos/ protos/
RUN sh scripts/protos /opt/tools/bin/python
# 3. The code: built into a wheel (the native extension compiled into it) and installed under
# /opt/app, a tree of its own, so that the final stage copies the unchanged dependencies and the
# fresh package as separate layers. The check fails the build if the extension did not build.
COPY README.md ./
COPY dockercoins/ dockercoins/
COPY dockercoins_tools/ dockercoins_tools/
COPY rng_svc/ rng_svc/
COPY hasher_svc/ hasher_svc/
COPY worker_svc/ worker_svc/
COPY webui/ webui/
RUN /opt/tools/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /tmp/app . \
 && /opt/tools/bin/pip --python /opt/venv/bin/python install --quiet --no-deps --no-index \
        --root /opt/app /tmp/app/*.whl \
 && cd / && PYTHONPATH=$(echo /opt/app/opt/venv/lib/python3*/site-packages) \
        /opt/venv/bin/python -c "import dockercoins.v1.rng_pb2_grpc, dockercoins.v1.hasher_pb2_grpc, \
dockercoins._native"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DOCKERCOINS_HOST=0.0.0.0
# No pip or setuptools at run time: the base image's own copies go (a Debian-built base has none).
# /run/dockercoins/redis is ours: a volume mounted there (compose's Redis password) starts so.
RUN if python -m pip --version >/dev/null 2>&1; then \
        python -m pip uninstall --yes --quiet pip setuptools wheel; \
    fi \
 && groupadd --system --gid 10001 dockercoins \
 && useradd --system --uid 10001 --gid dockercoins --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dockercoins \
 && install -d -o 10001 -g 10001 -m 0755 /run/dockercoins/redis
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/app/ /
USER 10001:10001
EXPOSE 50051 50052 50053 8000
ENTRYPOINT ["dockercoins"]
CMD ["--help"]
# Last, so that a new revision relabels the image without rebuilding a layer.
# `make image` passes them from git; pyproject.toml's version is checked against VERSION by a test.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="dockercoins" \
      org.opencontainers.image.description="DockerCoins over gRPC: rng, hasher, worker and webui" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
