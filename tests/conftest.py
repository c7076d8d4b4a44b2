"""Fixtures on real parts: a real redis-server, real gRPC servers on port 0, real processes."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.stack import RedisProcess
from tests.support import GrpcServers, spawn_worker


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


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[asyncio.subprocess.Process]]]:
    """Starts worker processes (`spawn_worker`); kills those still running after the test, so
    that a failing test leaves no worker behind."""
    started: list[asyncio.subprocess.Process] = []

    async def start(log: Path, **fields: object) -> asyncio.subprocess.Process:
        process = await spawn_worker(log, **fields)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()
