"""Fixtures on real parts: a real redis-server, real gRPC servers on port 0, real processes."""

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from tests.stack import RedisProcess
from tests.support import GrpcServers


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session; yields its URL."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


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
