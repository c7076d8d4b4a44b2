"""Drive `dockercoins up` as a real process, as a user's terminal would."""

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY, WALLET_KEY
from dockercoins_tools.embedded_redis import redis_server_argv
from tests.support import dockercoins_cmd, run_cli, service_env

POLL_INTERVAL = 0.05
"""Seconds between two looks of `wait_until`."""

FAST_COSTS = {
    "rng_read_cost": 0.01,
    "hasher_latency": 0.01,
    "worker_think_time": 0.01,
    "worker_flush_interval": 0.5,
}


class LoggedProcess:
    """A child process whose output lines (stdout and stderr) are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first output line matching `pattern`, waiting for it while the process runs."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            ended = self.proc.poll() is not None and not self._reader.is_alive()
            found.extend(match for line in list(self.lines) if (match := re.search(pattern, line)))
            if not found and ended:
                raise AssertionError(
                    f"exited ({self.proc.returncode}) with no line matching {pattern!r}; "
                    f"output:\n{self.output}"
                )
            return bool(found)

        wait_until(seen, timeout, f"a line matching {pattern!r}", self)
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` (SIGTERM) and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class RunningStack(LoggedProcess):
    """`dockercoins up` in a child process, its output collected, its URLs parsed."""

    def __init__(self, data_dir: Path, args: tuple[str, ...] = (), **settings: Any) -> None:
        fields = {
            "rng_port": 0,
            "hasher_port": 0,
            "webui_port": 0,
            "data_dir": data_dir,
            **FAST_COSTS,
            **settings,
        }
        super().__init__(dockercoins_cmd("up", *args), service_env(**fields))
        self.env = service_env(data_dir=data_dir)

    def ready(self) -> str:
        """Wait until the stack says it is ready; the web UI's URL."""
        self.wait_for_line(r"^dockercoins up: ready")
        return self.wait_for_line(r"^webui (http://\S+)").group(1)

    def redis_url(self) -> str:
        """The Redis URL the stack gives its children, password included: read from the web
        UI's environment, as only the same user can (the launcher prints it masked)."""
        for pid in self.children():
            with contextlib.suppress(OSError):
                for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    name, _, value = entry.decode().partition("=")
                    if name == "DOCKERCOINS_REDIS_URL":
                        return value
        raise AssertionError(f"no child with DOCKERCOINS_REDIS_URL; output:\n{self.output}")

    def children(self) -> set[int]:
        """Pids of the launcher's direct children."""
        found: set[int] = set()
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        for task in task_dir.iterdir():
            text = (task / "children").read_text()
            found.update(int(pid) for pid in text.split())
        return found


def wait_until(
    condition: Callable[[], object],
    timeout: float,
    what: str | Callable[[], str],
    proc: LoggedProcess | None = None,
    *,
    errors: tuple[type[BaseException], ...] = (),
    interval: float = POLL_INTERVAL,
) -> float:
    """The one way a test waits: poll `condition()` every `interval` s until it holds; the
    seconds that took. After `timeout` s, fail saying `what` (or what `what()` says then) did
    not happen, with the last of the `errors` the condition raised (those count as "not yet":
    a server still starting, a page between two states) and `proc`'s last output."""
    started = time.monotonic()
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except errors as exc:
            last_error = exc
        if time.monotonic() - started > timeout:
            raise AssertionError(_not_within(what, timeout, last_error, proc))
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], object],
    timeout: float = 15.0,
    what: str | Callable[[], str] = "the condition",
    proc: LoggedProcess | None = None,
    *,
    errors: tuple[type[BaseException], ...] = (),
    interval: float = POLL_INTERVAL,
) -> float:
    """`wait_until` for a test's event loop, which it leaves free between two looks; the
    condition may be a coroutine function (a look that itself awaits)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    last_error: BaseException | None = None
    while True:
        try:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return loop.time() - started
        except errors as exc:
            last_error = exc
        if loop.time() - started > timeout:
            raise AssertionError(_not_within(what, timeout, last_error, proc))
        await asyncio.sleep(interval)


def _not_within(
    what: str | Callable[[], str],
    timeout: float,
    error: BaseException | None,
    proc: LoggedProcess | None,
) -> str:
    message = f"{what if isinstance(what, str) else what()} did not happen within {timeout:g} s"
    if error is not None:
        message += f" (last: {type(error).__name__}: {error})"
    if proc is not None:
        message += "\n" + "\n".join(proc.lines[-60:])
    return message


class RedisProcess:
    """A redis-server of the test's own on a free port, answering once built; `args` go on its
    command line. A test can pause it (SIGSTOP on `proc`) or fill it."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*redis_server_argv("127.0.0.1", self.port, None), "--dir", str(data_dir), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            wait_until(self._pings, 10, "redis-server answering")
        except AssertionError:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def hashes(self) -> int:
        return int(self.client.get(HASHES_KEY) or 0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


def read_data_dir(data: Path) -> tuple[int, int]:
    """`hashes` and the wallet's size, read back from the append-only file in `data` (the
    embedded Redis's, after its stack stopped) by a server of the test's own."""
    server = RedisProcess(data, "--appendonly", "yes")
    try:
        return server.hashes(), int(server.client.hlen(WALLET_KEY))
    finally:
        server.stop()


def get_json(url: str, timeout: float = 5) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def scale(data_dir: Path, *counts: str) -> subprocess.CompletedProcess[str]:
    """`dockercoins scale worker=N ...` against the stack using `data_dir`."""
    return run_cli("scale", *counts, env=service_env(data_dir=data_dir), timeout=60)


class ServiceProcesses:
    """Services started one by one as real processes, each logging to a file; stopped by pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_starts: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self._log_starts[name] = log.tell()  # where this run's lines begin
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_listening(self, name: str, timeout: float = 30) -> None:
        """Until `name`, as last started, logs its start line: rng, hasher and the web UI log it
        once they serve."""

        def listening() -> bool:
            with (self.logs / f"{name}.log").open("rb") as log:
                log.seek(self._log_starts[name])
                return b" listening on " in log.read()

        wait_until(listening, timeout, lambda: f"{name} listening\n{self.log_tail()}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:]
            for path in sorted(self.logs.glob("*.log"))
        )


def python_m(module: str) -> list[str]:
    return [sys.executable, "-m", module]


class Service(LoggedProcess):
    """`dockercoins <command>` as a child process, its log collected."""

    def __init__(self, command: str, **settings: object) -> None:
        super().__init__(dockercoins_cmd(command), service_env(**settings))

    def wait_for(self, text: str, timeout: float = 20) -> None:
        assert self.proc.poll() is None, self.output
        self.wait_for_line(re.escape(text), timeout)

    def terminate(self, timeout: float = 15) -> int:
        return self.stop(signal.SIGTERM, timeout)
