"""Fixtures on real parts: a real redis-server, real gRPC servers on port 0, real processes;
and the guard of the two tiers: a test not marked `slow` that starts a process other than a
redis-server fails."""

import asyncio
import json
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dockercoins_tools.embedded_redis import redis_server_binary
from tests.stack import RedisProcess
from tests.support import GrpcServers, spawn_worker

_unmarked: list[str] = []
"""The test running now when it is not marked `slow` (empty otherwise): it may start no process."""

_started: list[str] = []
"""What that test tried to start."""

_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]


def _guarded_execute_child(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> Any:
    """Every child process of the test run starts here: subprocess.run, Popen, asyncio's
    create_subprocess_exec, selenium's chromedriver, the docker CLI. From a test that is not
    marked `slow`, the process is refused and the test fails (even if it catches the error),
    unless it is a redis-server: the fast tier's tests run against a real Redis, the session's
    (`redis_server`) or one of their own (`RedisProcess`, which a test can pause)."""
    argv = [args] if isinstance(args, (str, bytes)) else [str(arg) for arg in args]
    if _unmarked and argv[0] != redis_server_binary():
        command = " ".join(argv)
        _started.append(command)
        pytest.fail(f"{_unmarked[0]} starts a process ({command[:200]}): mark it slow", False)
    return _execute_child(self, args, *rest, **kw)


subprocess.Popen._execute_child = _guarded_execute_child  # type: ignore[attr-defined]


def _guarded(item: pytest.Item) -> Generator[None, Any, Any]:
    """Arm the guard around one phase of `item` unless it is marked `slow`; fail the phase if
    the test tried to start a process."""
    if item.get_closest_marker("slow") is not None:
        return (yield)
    _unmarked.append(item.nodeid)
    _started.clear()
    try:
        result = yield
    finally:
        _unmarked.clear()
    if _started:
        pytest.fail(f"{item.nodeid} is not marked slow but starts processes: {_started}", False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


DURATIONS = Path(__file__).with_name("durations.json")
"""Seconds each test module took (its tests' setup, call and teardown), measured by
`make test-durations`: the order in which `make test` hands modules to its workers."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write the seconds of each module run to {DURATIONS.name} (others kept)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, each module's tests in their order: pytest-xdist hands a
    module to the next free worker in this order (`--no-loadscope-reorder`), so the last ones
    handed out are short and the workers finish together. A module not in the file yet goes
    first, where it cannot become the tail."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    def seconds(item: pytest.Item) -> float:
        return -known.get(item.nodeid.split("::")[0], float("inf"))

    items.sort(key=seconds)  # stable: a module's tests keep their order


class _DurationRecorder:
    """With --record-durations, in the main process (pytest-xdist's workers send it their
    reports): each module's seconds, merged into the file at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid.split("::")[0]] += report.duration

    def pytest_sessionfinish(self) -> None:
        known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        known |= {module: round(seconds, 1) for module, seconds in self.seconds.items()}
        ordered = dict(sorted(known.items(), key=lambda pair: -pair[1]))
        DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("record_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_DurationRecorder(), "duration-recorder")


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
