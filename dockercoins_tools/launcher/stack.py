"""The stack: which services run as processes, on which ports and with which environment, started
in order (each ready before the next), scaled, stopped in reverse order."""

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.errors import DockercoinsError
from dockercoins.lifecycle import raise_if_cancelling
from dockercoins.net import ensure_free, port_in_use
from dockercoins.redaction import redact_url
from dockercoins.redis_store import connect
from dockercoins.settings import env_name, load_settings
from dockercoins.tls import channel_credentials, open_channel
from dockercoins_tools.embedded_redis import LockedRedis
from dockercoins_tools.launcher.settings import StackSettings, checked_count
from dockercoins_tools.launcher.supervisor import Console, ManagedProcess
from dockercoins_tools.services import SERVICES

READY_TIMEOUT = 30.0
"""Seconds a process of the stack has to become ready (health SERVING, /healthz 200, PING)."""
PORT_ATTEMPTS = 3
"""Starts of a process on a port the launcher chose (its setting is 0): another program may take
the port between the choice and the process's bind, and the launcher then chooses again."""


class ExitedBeforeReady(DockercoinsError):
    """A process of the stack ended before it was ready."""

    def __init__(self, what: str, process: ManagedProcess, status: int) -> None:
        super().__init__(f"{what} exited with status {status} before it was ready")
        self.process = process


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
            raise ExitedBeforeReady(what, process, process.proc.returncode)
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


async def _redis_ready(url: str, process: ManagedProcess | None) -> None:
    """Until Redis at `url` answers PING."""
    client = connect(url)
    try:
        await _wait_until("redis", lambda: client.ping(), process)  # type: ignore[arg-type,return-value]
    finally:
        await client.aclose()


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
        self._chosen: set[str] = set()
        """The services whose port the launcher chose (their setting is 0)."""
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

    # -- start -----------------------------------------------------------------------

    def _claim_ports(self) -> None:
        s = self.settings
        wanted = [("rng", "rng_port", s.rng_port), ("hasher", "hasher_port", s.hasher_port)]
        wanted.append(("webui", "webui_port", s.webui_port))
        if not s.redis_url:
            wanted.append(("redis", "redis_port", s.redis_port))
        for what, field, port in wanted:
            self.ports[what] = ensure_free(env_name(field), self.host, port)
        self._chosen = {what for what, _, port in wanted if port == 0}

    async def start(self) -> None:
        """Start everything in order, each piece healthy before the next."""
        self._claim_ports()
        await self._start_redis()
        for _ in range(self.settings.rng_replicas):
            await self._add_rng()
        await self._start_hasher()
        await self._start_webui()
        await self.scale_workers(self.settings.workers)

    async def _on_a_port(
        self,
        name: str,
        field: str,
        port: int,
        chosen: bool,
        start: Callable[[int], Awaitable[ManagedProcess]],
    ) -> tuple[int, ManagedProcess]:
        """The port and the process that `start(port)` started there, once ready. When the
        launcher chose the port (`chosen`) and the process ended before it was ready while the
        port is taken now (another program bound it first), another port and another start, up
        to PORT_ATTEMPTS in all."""
        attempt = 1
        while True:
            try:
                return port, await start(port)
            except ExitedBeforeReady as exc:
                await exc.process.stop(1)
                if not chosen or attempt == PORT_ATTEMPTS or not port_in_use(self.host, port):
                    raise
            attempt += 1
            taken, port = port, ensure_free(env_name(field), self.host, 0)
            self.console.line(name, f"port {taken} was taken before it bound it; on {port} now")

    async def _start_redis(self) -> None:
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
            await _redis_ready(self.redis_url, None)
            return
        data = self.settings.data_dir / "redis"
        if self.settings.fresh and data.exists():
            shutil.rmtree(data)

        async def on(port: int) -> ManagedProcess:
            locked = LockedRedis(self.host, port, data, self.settings.redis_maxmemory_mb)
            process = self._process("redis", locked.argv, self._env(), stdin=locked.config())
            await process.start()
            self.redis_url = locked.url(self.client_host, port)
            await _redis_ready(self.redis_url, process)
            return process

        chosen = "redis" in self._chosen
        self.ports["redis"], self.redis = await self._on_a_port(
            "redis", "redis_port", self.ports["redis"], chosen, on
        )

    async def _grpc_service(
        self, name: str, service: str, port: int, chosen: bool, **fields: Any
    ) -> tuple[int, ManagedProcess]:
        """rng or hasher as process `name`: its port (another when the launcher chose it and
        another program took it first) and the process, once its health answers SERVING."""

        async def on(port: int) -> ManagedProcess:
            env = self._env(**{f"{service}_port": port}, **fields, **self._metrics(name))
            process = self._process(name, SERVICES[service].argv, env)
            await process.start()
            address = f"{self.client_host}:{port}"

            def serving() -> Awaitable[bool]:
                return grpc_serving(address, credentials=self.credentials)

            await _wait_until(name, serving, process)
            return process

        return await self._on_a_port(name, f"{service}_port", port, chosen, on)

    async def _add_rng(self) -> None:
        index = len(self.rngs) + 1
        name = "rng" if self.settings.rng_replicas == 1 and index == 1 else f"rng.{index}"
        if index == 1:
            port, chosen = self.ports["rng"], "rng" in self._chosen
        else:
            port, chosen = ensure_free(env_name("rng_port"), self.host, 0), True
        port, process = await self._grpc_service(
            name, "rng", port, chosen, rng_mode=self.settings.rng_mode
        )
        if index == 1:
            self.ports["rng"] = port
        self._rng_ports.append(port)
        self.rngs.append(process)

    async def _start_hasher(self) -> None:
        chosen = "hasher" in self._chosen
        self.ports["hasher"], self.hasher = await self._grpc_service(
            "hasher", "hasher", self.ports["hasher"], chosen
        )

    async def _start_webui(self) -> None:
        async def on(port: int) -> ManagedProcess:
            env = self._env(webui_port=port, redis_url=self.redis_url)
            process = self._process("webui", SERVICES["webui"].argv, env)
            await process.start()
            await _wait_until("webui", lambda: http_ok(self.client_host, port, "/healthz"), process)
            return process

        chosen = "webui" in self._chosen
        self.ports["webui"], self.webui = await self._on_a_port(
            "webui", "webui_port", self.ports["webui"], chosen, on
        )

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
                    SERVICES["worker"].argv,
                    self._worker_env(f"worker.{number}"),
                )
                await worker.start()
                self.workers.append(worker)
            surplus = self.workers[count:]
            self.workers = self.workers[:count]
            await asyncio.gather(*(w.stop(self.settings.grace + 5) for w in surplus))

    async def scale_rng(self, count: int) -> None:
        """Run exactly `count` rng processes (bounds: `scale` checks them); workers restart to
        balance over the new set."""
        async with self._lock:
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
