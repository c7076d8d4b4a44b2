"""Fixtures on real parts: a real redis-server, real gRPC servers on port 0, real processes."""

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from dockercoins.net import free_port
from dockercoins_tools.embedded_redis import redis_server_argv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session; yields its URL."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [*redis_server_argv("127.0.0.1", port, None), "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, emptied for this test."""
    redis.Redis.from_url(redis_server).flushall()
    return redis_server


def service_env(**settings: object) -> dict[str, str]:
    """This process's environment plus DOCKERCOINS_<FIELD> for each keyword."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERCOINS_")}
    env.update({f"DOCKERCOINS_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def skip_unless_ci(reason: str) -> NoReturn:
    """Skip for want of something outside Python (a browser, an engine), saying why; under
    CI=true fail instead: CI must run every test (`make test` sets those things up as root)."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def dockercoins_cmd(*args: str) -> list[str]:
    """Command line of the dockercoins CLI in this interpreter."""
    return [sys.executable, "-m", "dockercoins_tools", *args]


class GrpcServers:
    """Starts real rng and hasher servers in the test's event loop, on free ports."""

    def __init__(self) -> None:
        self._running: list[tuple[object, object]] = []

    async def rng(self, port: int = 0, **fields: object) -> str:
        """An rng server with these settings fields; returns host:port."""
        from rng_svc.config import RngSettings
        from rng_svc.server import build_server, build_source

        settings = RngSettings(rng_port=port, **fields)  # type: ignore[arg-type]
        source = build_source(settings)
        server = build_server(settings, source)
        await server.start()
        self._running.append((server, source))
        return f"127.0.0.1:{server.port}"

    async def hasher(self, port: int = 0, **fields: object) -> str:
        """A hasher server with these settings fields; returns host:port."""
        from hasher_svc.config import HasherSettings
        from hasher_svc.server import build_server

        server = build_server(HasherSettings(hasher_port=port, **fields))  # type: ignore[arg-type]
        await server.start()
        self._running.append((server, None))
        return f"127.0.0.1:{server.port}"

    async def upstreams(self, cost: float = 0.0, **both: object) -> tuple[str, str]:
        """rng and hasher whose simulated costs are `cost` each; their addresses."""
        rng = await self.rng(rng_read_cost=cost, **both)
        hasher = await self.hasher(hasher_latency=cost, **both)
        return rng, hasher

    async def stop_all(self) -> None:
        for server, source in reversed(self._running):
            await server.stop(0)  # type: ignore[attr-defined]
            if source is not None:
                await source.close()  # type: ignore[attr-defined]
        self._running.clear()


@pytest.fixture
async def servers() -> AsyncIterator[GrpcServers]:
    """Factory of real gRPC servers, stopped after the test."""
    started = GrpcServers()
    yield started
    await started.stop_all()
