"""Fixtures on real parts: a real redis-server, real gRPC servers on port 0, real processes."""

import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from dockercoins.net import free_port
from dockercoins_tools.embedded_redis import redis_server_argv
from tests.support import GrpcServers


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


@pytest.fixture
async def servers() -> AsyncIterator[GrpcServers]:
    """Factory of real gRPC servers, stopped after the test."""
    started = GrpcServers()
    yield started
    await started.stop_all()
