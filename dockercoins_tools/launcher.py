"""`dockercoins up`: Redis, rng, hasher, workers and the web UI as supervised local processes."""

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from dockercoins.backoff import Backoff
from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins.lifecycle import raise_if_cancelling, stop_event_on_signals, watch_task
from dockercoins.net import ensure_free
from dockercoins.redaction import redact_url
from dockercoins.redis_store import connect
from dockercoins.settings import MetricsSettings, TlsSettings, env_name, load_settings
from dockercoins.tls import channel_credentials, open_channel
from dockercoins_tools.embedded_redis import LockedRedis
from rng_svc.config import RngMode

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
CONTROL_SOCKET = "control.sock"

UNIX_PATH_MAX = 107
"""Bytes of a Unix socket's path that Linux takes (sun_path is 108, with its final NUL)."""

CONTROL_LINE_LIMIT = 4096
"""Bytes of one control request: a scale request is a few dozen."""

CONTROL_READ_TIMEOUT = 5.0
"""Seconds the control socket waits for a request once a client connected."""

PUMP_CHUNK = 65536
"""Bytes a log pump reads from a child at a time."""

LOG_LINE_LIMIT = 4 << 20
"""Bytes of one log line passed on whole; a longer line is passed on in pieces of this size."""

STABLE_AFTER = 30.0
"""Seconds a restarted child must run for its restart delay to start again from 1 s."""

SCALABLE = {"worker": "workers", "rng": "rng_replicas"}
"""What `dockercoins scale` can scale, and the setting whose bounds apply."""


class StackSettings(TlsSettings, MetricsSettings):
    """What `dockercoins up` starts and where; the services read their own settings too."""

    workers: int = Field(1, ge=0, le=200, description="Worker processes `dockercoins up` starts.")
    rng_replicas: int = Field(1, ge=1, le=32, description="rng processes `dockercoins up` starts.")
    rng_mode: RngMode = Field("blocking", description="rng mode: blocking or buffered.")
    rng_port: int = Field(50051, ge=0, le=65535, description="Port of the (first) rng.")
    hasher_port: int = Field(50052, ge=0, le=65535, description="Port of the hasher.")
    webui_port: int = Field(8000, ge=0, le=65535, description="Port of the web UI.")
    redis_url: str | None = Field(
        None, description="Redis to use; unset: `dockercoins up` starts an embedded redis-server."
    )
    redis_port: int = Field(
        0, ge=0, le=65535, description="Port of the embedded redis-server (0: any free one)."
    )
    data_dir: Path = Field(
        Path(".dockercoins"),
        description="Where `dockercoins up` keeps the embedded Redis's data and control socket.",
    )
    fresh: bool = Field(False, description="Empty the embedded Redis's data before starting.")
    redis_maxmemory_mb: int = Field(
        1024,
        ge=0,
        le=1 << 20,
        description="Memory cap of the embedded Redis in MiB (maxmemory, policy noeviction: a "
        "full Redis refuses writes, workers pause, nothing is lost); 0: no cap.",
    )
    control_timeout: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Seconds `dockercoins scale` waits for the running stack's answer.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Not 0: rng, hasher and each worker serve /metrics, each on a free port "
        "listed at start (the web UI serves /metrics on its own port); 0: off.",
    )

    @field_validator("data_dir")
    @classmethod
    def _socket_path_fits(cls, data_dir: Path) -> Path:
        length = len(os.fsencode(data_dir / CONTROL_SOCKET))
        if length > UNIX_PATH_MAX:
            raise PydanticCustomError(
                "socket_path_too_long",
                "the control socket's path would be {length} bytes, over the {limit} a Unix "
                "socket allows: choose a shorter directory",
                {"length": length, "limit": UNIX_PATH_MAX},
            )
        return data_dir


def claim_data_dir(data_dir: Path) -> None:
    """Create `data_dir` (mode 0700), or check that it belongs to this user: the control
    socket that scales the stack lives there."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = data_dir.stat().st_uid
    except OSError as exc:
        raise ConfigError(
            f"{env_name('data_dir')}: cannot use {data_dir}: {exc.strerror}"
        ) from None
    if owner != os.geteuid():
        raise ConfigError(
            f"{env_name('data_dir')}: {data_dir} belongs to uid {owner}, not to this user "
            f"(uid {os.geteuid()}); choose a directory of your own"
        )


def checked_count(service: object, count: object) -> tuple[str, int]:
    """A scale request's service and count, within the bounds of the setting that sets it."""
    if not isinstance(service, str) or service not in SCALABLE:
        raise ConfigError(f"can only scale worker or rng, not {service!r}")
    field = SCALABLE[service]
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(f"{service}: expected a whole number, got {count!r}")
    info = StackSettings.model_fields[field]
    low = next(m.ge for m in info.metadata if hasattr(m, "ge"))
    high = next(m.le for m in info.metadata if hasattr(m, "le"))
    if not low <= count <= high:
        raise ConfigError(
            f"{service}={count} is out of bounds: {low} to {high} ({env_name(field)})"
        )
    return service, count


def _die_with_parent() -> None:
    """In the child: receive SIGTERM if the launcher dies, so nothing is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Console:
    """The launcher's own output: child lines prefixed with their name, as compose does."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.width = 10

    def line(self, name: str, text: str) -> None:
        self.out.write(f"{name:<{self.width}}| {text}\n")
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class ManagedProcess:
    """One child process, its log pump, and a restart policy like Kubernetes' `Always`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        console: Console,
        *,
        stdin: bytes | None = None,
        on_crash: Callable[[str], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.console = console
        self.stdin = stdin
        self.on_crash = on_crash
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _watched(self, task: "asyncio.Task[None]") -> "asyncio.Task[None]":
        if self.on_crash is not None:
            watch_task(task, self.on_crash)
        return task

    async def start(self, supervise: bool = True) -> None:
        """Start the process; with `supervise`, restart it with backoff whenever it dies."""
        try:
            await self._spawn()
        except OSError as exc:
            raise DockercoinsError(f"{self.name} could not start: {exc}") from None
        if supervise:
            self._watch = self._watched(
                asyncio.create_task(self._supervise(), name=f"watch-{self.name}")
            )

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL if self.stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._pump = self._watched(
            asyncio.create_task(self._pump_lines(self.proc), name=f"log-{self.name}")
        )
        if self.proc.stdin is not None and self.stdin is not None:
            with contextlib.suppress(ConnectionError):  # it died first: the supervisor sees it
                self.proc.stdin.write(self.stdin)
                await self.proc.stdin.drain()
            self.proc.stdin.close()

    async def _pump_lines(self, proc: asyncio.subprocess.Process) -> None:
        """Pass the child's lines on, however long, and keep its pipe drained whatever happens
        to our own output: a child blocked on a full pipe stops."""
        assert proc.stdout is not None
        pending = bytearray()
        while chunk := await proc.stdout.read(PUMP_CHUNK):
            if b"\n" in chunk:
                pending += chunk
                *lines, rest = bytes(pending).split(b"\n")
                for line in lines:
                    self._show(line)
                pending = bytearray(rest)
            else:
                pending += chunk
            while len(pending) >= LOG_LINE_LIMIT:
                self._show(bytes(pending[:LOG_LINE_LIMIT]))
                del pending[:LOG_LINE_LIMIT]
        if pending:
            self._show(bytes(pending))

    def _show(self, raw: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # our stdout closed: drop, keep draining
            self.console.line(self.name, raw.decode(errors="replace").rstrip())

    async def _supervise(self) -> None:
        while True:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self.stopping:
                return
            if time.monotonic() - started > STABLE_AFTER:
                self.backoff.reset()
            what = f"exited with status {code}"
            while True:
                delay = self.backoff.next_delay()
                self.console.line(self.name, f"{what}; restarting in {delay:.0f} s")
                await asyncio.sleep(delay)
                if self.stopping:
                    return
                try:
                    await self._spawn()
                    break
                except OSError as exc:  # exec error, EAGAIN...: the next attempt may work
                    what = f"could not start: {exc}"
            self.restarts += 1

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL. Returns the exit status."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.console.line(self.name, f"did not stop within {timeout:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pump, 2)
        return self.proc.returncode


async def _wait_until(
    what: str, check: Callable[[], Awaitable[bool]], process: ManagedProcess | None
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if await check():
                return
        except Exception:  # not ready yet, whatever the reason; a cancellation still ends it
            raise_if_cancelling()
        if process is not None and process.proc is not None and process.proc.returncode is not None:
            raise DockercoinsError(
                f"{what} exited with status {process.proc.returncode} before it was ready"
            )
        if time.monotonic() > deadline:
            raise DockercoinsError(f"{what} was not ready within {READY_TIMEOUT:.0f} s")
        await asyncio.sleep(0.1)


async def grpc_serving(
    address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """Whether the gRPC health at `address` answers SERVING (over TLS with `credentials`)."""
    async with open_channel(address, credentials) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def http_ok(host: str, port: int, path: str) -> bool:
    """Whether GET `path` answers 200."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 2)
    finally:
        writer.close()
    return b" 200 " in status


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


class Stack:
    """The whole app as processes: start in order, scale, stop in reverse order."""

    def __init__(
        self,
        settings: StackSettings,
        console: Console | None = None,
        child_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.console = console or Console()
        self.child_env = dict(child_env or {})
        self.host = settings.host
        self.client_host = _connect_host(settings.host)
        self.redis_url = settings.redis_url or ""
        self.ports: dict[str, int] = {}
        self.redis: ManagedProcess | None = None
        self.rngs: list[ManagedProcess] = []
        self.hasher: ManagedProcess | None = None
        self.webui: ManagedProcess | None = None
        self.workers: list[ManagedProcess] = []
        self._rng_ports: list[int] = []
        self._lock = asyncio.Lock()
        self.credentials = channel_credentials(settings)
        self.metrics_ports: dict[str, int] = {}
        self.crashed = asyncio.Event()
        self.failure = ""

    def _crash(self, failure: str) -> None:
        """A long-running task of the launcher failed: the launcher must go down too."""
        self.failure = self.failure or failure
        self.crashed.set()

    def _process(
        self, name: str, argv: list[str], env: dict[str, str], stdin: bytes | None = None
    ) -> ManagedProcess:
        return ManagedProcess(name, argv, env, self.console, stdin=stdin, on_crash=self._crash)

    # -- environment of the children -------------------------------------------------

    def _env(self, **fields: Any) -> dict[str, str]:
        env = dict(os.environ)
        env[env_name("profile")] = self.settings.profile
        env.update(self.child_env)  # e.g. the experiment's costs, over the caller's environment
        env["PYTHONUNBUFFERED"] = "1"
        env[env_name("host")] = self.host
        env[env_name("log_level")] = self.settings.log_level
        env[env_name("grace")] = str(self.settings.grace)
        env[env_name("metrics_port")] = "0"  # one port per process: see _metrics()
        for field, value in fields.items():
            env[env_name(field)] = str(value)
        return env

    def _metrics(self, name: str) -> dict[str, int]:
        """With metrics on, a /metrics port of its own for process `name` (kept across restarts)."""
        if not self.settings.metrics_port:
            return {}
        if name not in self.metrics_ports:
            self.metrics_ports[name] = ensure_free(env_name("metrics_port"), self.host, 0)
        return {"metrics_port": self.metrics_ports[name]}

    @property
    def rng_target(self) -> str:
        """The workers' rng target: one address, or an ipv4: list balanced round-robin."""
        addresses = [f"{self.client_host}:{port}" for port in self._rng_ports]
        return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)

    def _module(self, module: str) -> list[str]:
        return [sys.executable, "-m", module]

    # -- start -----------------------------------------------------------------------

    def _claim_ports(self) -> None:
        s = self.settings
        wanted = [("rng", "rng_port", s.rng_port), ("hasher", "hasher_port", s.hasher_port)]
        wanted.append(("webui", "webui_port", s.webui_port))
        if not s.redis_url:
            wanted.append(("redis", "redis_port", s.redis_port))
        for what, field, port in wanted:
            self.ports[what] = ensure_free(env_name(field), self.host, port)
        self._rng_ports = [self.ports["rng"]]

    async def start(self) -> None:
        """Start everything in order, each piece healthy before the next."""
        self._claim_ports()
        await self._start_redis()
        for _ in range(self.settings.rng_replicas):
            await self._add_rng()
        await self._start_hasher()
        await self._start_webui()
        await self.scale_workers(self.settings.workers)

    async def _start_redis(self) -> None:
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
        else:
            data = self.settings.data_dir / "redis"
            if self.settings.fresh and data.exists():
                shutil.rmtree(data)
            port = self.ports["redis"]
            locked = LockedRedis(self.host, port, data, self.settings.redis_maxmemory_mb)
            self.redis = self._process("redis", locked.argv, self._env(), stdin=locked.config())
            await self.redis.start()
            self.redis_url = locked.url(self.client_host, port)
        client = connect(self.redis_url)
        try:
            await _wait_until("redis", lambda: client.ping(), self.redis)  # type: ignore[arg-type,return-value]
        finally:
            await client.aclose()

    async def _add_rng(self) -> None:
        index = len(self.rngs) + 1
        port = self.ports["rng"] if index == 1 else ensure_free(env_name("rng_port"), self.host, 0)
        name = "rng" if self.settings.rng_replicas == 1 and index == 1 else f"rng.{index}"
        process = self._process(
            name,
            self._module("rng_svc"),
            self._env(rng_port=port, rng_mode=self.settings.rng_mode, **self._metrics(name)),
        )
        await process.start()
        address = f"{self.client_host}:{port}"
        await _wait_until(
            name, lambda: grpc_serving(address, credentials=self.credentials), process
        )
        self.rngs.append(process)
        if index > 1:
            self._rng_ports.append(port)

    async def _start_hasher(self) -> None:
        port = self.ports["hasher"]
        self.hasher = self._process(
            "hasher",
            self._module("hasher_svc"),
            self._env(hasher_port=port, **self._metrics("hasher")),
        )
        await self.hasher.start()
        address = f"{self.client_host}:{port}"
        await _wait_until(
            "hasher", lambda: grpc_serving(address, credentials=self.credentials), self.hasher
        )

    async def _start_webui(self) -> None:
        port = self.ports["webui"]
        self.webui = self._process(
            "webui", self._module("webui"), self._env(webui_port=port, redis_url=self.redis_url)
        )
        await self.webui.start()
        await _wait_until("webui", lambda: http_ok(self.client_host, port, "/healthz"), self.webui)

    def _worker_env(self, name: str = "") -> dict[str, str]:
        return self._env(
            **(self._metrics(name) if name else {}),
            rng_addr=self.rng_target,
            hasher_addr=f"{self.client_host}:{self.ports['hasher']}",
            redis_url=self.redis_url,
        )

    # -- scale -----------------------------------------------------------------------

    async def scale_workers(self, count: int) -> None:
        """Run exactly `count` workers: start new ones, or stop the newest gracefully."""
        async with self._lock:
            while len(self.workers) < count:
                number = max((int(w.name.split(".")[1]) for w in self.workers), default=0) + 1
                worker = self._process(
                    f"worker.{number}",
                    self._module("worker_svc"),
                    self._worker_env(f"worker.{number}"),
                )
                await worker.start()
                self.workers.append(worker)
            surplus = self.workers[count:]
            self.workers = self.workers[:count]
            await asyncio.gather(*(w.stop(self.settings.grace + 5) for w in surplus))

    async def scale_rng(self, count: int) -> None:
        """Run exactly `count` rng processes; workers restart to balance over the new set."""
        async with self._lock:
            checked_count("rng", count)
            changed = count != len(self.rngs)
            while len(self.rngs) < count:
                await self._add_rng()
            surplus = self.rngs[count:]
            self.rngs = self.rngs[:count]
            self._rng_ports = self._rng_ports[:count]
            if changed:
                old = self.workers
                self.workers = []
                await asyncio.gather(*(w.stop(self.settings.grace + 5) for w in old))
            await asyncio.gather(*(r.stop(self.settings.grace + 5) for r in surplus))
        if changed:
            await self.scale_workers(len(old))

    async def scale(self, service: str, count: int) -> None:
        """Scale `worker` or `rng` to `count` processes."""
        checked_count(service, count)
        if service == "worker":
            await self.scale_workers(count)
        else:
            await self.scale_rng(count)

    # -- stop ------------------------------------------------------------------------

    @classmethod
    def on_free_ports(
        cls, data_dir: Path, log: TextIO, child_env: dict[str, str], **fields: Any
    ) -> "Stack":
        """A stack for a tool that measures one: free ports, a data directory of its own
        emptied first, its processes' lines in `log`, `child_env` given to every child."""
        settings = load_settings(
            StackSettings,
            rng_port=0,
            hasher_port=0,
            webui_port=0,
            redis_port=0,
            data_dir=data_dir,
            fresh=True,
            **fields,
        )
        return cls(settings, Console(log), child_env=child_env)

    def processes(self) -> list[ManagedProcess]:
        """Every process of the stack, in start order."""
        started = [self.redis, *self.rngs, self.hasher, self.webui, *self.workers]
        return [p for p in started if p is not None]

    def pids(self) -> dict[str, int]:
        """Name -> pid of every process running now."""
        return {p.name: p.pid for p in self.processes() if p.pid is not None and p.running}

    async def stop(self) -> None:
        """Stop workers first (they flush), then the web UI, hasher, rng, Redis last."""
        timeout = self.settings.grace + 5
        await asyncio.gather(*(w.stop(timeout) for w in self.workers))
        for process in (self.webui, self.hasher):
            if process is not None:
                await process.stop(timeout)
        await asyncio.gather(*(r.stop(timeout) for r in self.rngs))
        if self.redis is not None:
            await self.redis.stop(timeout)

    def describe(self) -> list[str]:
        """One line per piece: where it listens."""
        lines = [f"rng {self.client_host}:{port}" for port in self._rng_ports]
        lines.append(f"hasher {self.client_host}:{self.ports['hasher']}")
        where = ""
        if self.redis:
            cap = self.settings.redis_maxmemory_mb
            where = f" (embedded, data in {self.settings.data_dir / 'redis'}, password set"
            where += f", maxmemory {cap} MiB)" if cap else ", no maxmemory)"
        lines.append(f"redis {redact_url(self.redis_url)}{where}")
        lines.append(f"webui http://{self.client_host}:{self.ports['webui']}")
        lines.append(
            f"workers {len(self.workers)}, rng mode {self.settings.rng_mode}, "
            f"profile {self.settings.profile}"
        )
        for name, port in self.metrics_ports.items():
            lines.append(f"metrics {name} http://{self.client_host}:{port}/metrics")
        return lines


class ControlServer:
    """A Unix socket in the data directory through which `dockercoins scale` reaches the stack.

    Mode 0600 in a directory of this user's: only this user can scale the stack. A request
    is one JSON line; anything else is answered with an error, never a crash.
    """

    def __init__(self, stack: Stack, path: Path) -> None:
        self.stack = stack
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(self.path), limit=CONTROL_LINE_LIMIT
        )
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(CONTROL_READ_TIMEOUT):
                    line = await reader.readline()
            except TimeoutError:
                reply = _refused(f"no request within {CONTROL_READ_TIMEOUT:.0f} s")
            except ValueError:
                reply = _refused(f"request longer than {CONTROL_LINE_LIMIT} bytes")
            else:
                reply = await self.answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client left: nobody to answer
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line: `{"scale": {"worker": N, "rng": K}}` or `{}`."""
        try:
            request = json.loads(line)
        except ValueError:
            return _refused("not a JSON request")
        if not isinstance(request, dict) or set(request) - {"scale"}:
            return _refused('expected {"scale": {"worker": N, "rng": K}}')
        scale = request.get("scale", {})
        if not isinstance(scale, dict):
            return _refused('expected {"scale": {"worker": N, "rng": K}}')
        try:
            counts = [checked_count(service, count) for service, count in scale.items()]
            for service, count in counts:
                await self.stack.scale(service, count)
        except DockercoinsError as exc:
            return _refused(str(exc))
        except Exception as exc:  # a defect: say it, keep the launcher and its stack running
            log.exception("control request %r failed", request)
            return _refused(f"failed: {exc!r}")
        return {"ok": True, "status": self.status()}

    def status(self) -> dict[str, Any]:
        """Counts and addresses of the running stack."""
        return {
            "worker": len(self.stack.workers),
            "rng": len(self.stack.rngs),
            "redis_url": redact_url(self.stack.redis_url),
            "webui": f"http://{self.stack.client_host}:{self.stack.ports.get('webui')}",
        }

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _refused(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


async def send_control(data_dir: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the stack running with `data_dir`; its reply, within `timeout` s."""
    path = data_dir / CONTROL_SOCKET
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(
            f"no running `dockercoins up` found (no control socket at {path}; "
            f"set {env_name('data_dir')} to the one it uses)"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (a stack of another user?)") from None
    except TimeoutError:
        raise DockercoinsError(
            f"no answer from the `dockercoins up` at {path} within {timeout:g} s "
            f"({env_name('control_timeout')})"
        ) from None
    except ConnectionError as exc:
        raise DockercoinsError(f"the `dockercoins up` at {path} hung up: {exc}") from None
    if not line:
        raise DockercoinsError(f"the `dockercoins up` at {path} closed without an answer")
    reply: dict[str, Any] = json.loads(line)
    return reply


async def serve(settings: StackSettings) -> None:
    """Start the stack, print where everything listens, run until SIGTERM or SIGINT.

    If one of the launcher's own tasks fails (a supervisor, a log pump), its traceback is
    logged, everything is stopped and DockercoinsError says which: the launcher never goes on
    half-alive.
    """
    claim_data_dir(settings.data_dir)
    stop = stop_event_on_signals()
    stack = Stack(settings)
    control = ControlServer(stack, settings.data_dir / CONTROL_SOCKET)
    try:
        starting = asyncio.create_task(stack.start())
        stopped = asyncio.create_task(stop.wait())
        crashed = asyncio.create_task(stack.crashed.wait())
        await asyncio.wait({starting, stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()
            await control.start()
            for line in stack.describe():
                stack.console.say(line)
            stack.console.say("dockercoins up: ready; Ctrl-C stops everything")
            await asyncio.wait({stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        stack.console.say("dockercoins up: stopping")
    finally:
        await control.stop()
        await stack.stop()
        stopped.cancel()
        crashed.cancel()
    if stack.failure:
        raise DockercoinsError(f"{stack.failure}; stopped everything")
    stack.console.say("dockercoins up: stopped")
