"""The launcher's process supervisor: spawn a child, pump its log lines, restart it with backoff
when it dies, stop it (SIGTERM, then SIGKILL)."""

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import TextIO

from dockercoins.backoff import Backoff
from dockercoins.errors import DockercoinsError
from dockercoins.lifecycle import watch_task

PUMP_CHUNK = 65536
"""Bytes a log pump reads from a child at a time."""

LOG_LINE_LIMIT = 4 << 20
"""Bytes of one log line passed on whole; a longer line is passed on in pieces of this size."""

STABLE_AFTER = 30.0
"""Seconds a restarted child must run for its restart delay to start again from 1 s."""


ORPHAN_GUARD = f"""\
import ctypes, os, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, {int(signal.SIGTERM)})  # PR_SET_PDEATHSIG
except AttributeError:
    pass  # not Linux: no prctl
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the launcher died before that
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"could not start: {{exc}}", flush=True)
    sys.exit(127)
"""
"""What a child runs before its program, in the same process: it asks the kernel for SIGTERM
when the launcher dies (so that nothing is orphaned, even by a kill -9), then execs the program.
It is a program of its own, not a `preexec_fn`: that forks the launcher whole (its gRPC threads
too) and runs Python in the child before the exec, where gRPC's fork handlers restart a poller
whose epoll descriptor `close_fds` then closes: the child aborted (SIGABRT, SIGSEGV) before it
became the service, one spawn in five while the launcher's health checks were in flight.
Without a `preexec_fn` the child is vforked and runs nothing of the launcher's."""


def _guarded(argv: list[str], env: dict[str, str]) -> list[str]:
    """`argv` run behind ORPHAN_GUARD. The program is looked up first, as exec would, so that a
    missing or non-executable one is an OSError here (`could not start: ...`), as before."""
    program = argv[0]
    if shutil.which(program, path=env.get("PATH")) is None:
        code = errno.EACCES if os.sep in program and os.path.exists(program) else errno.ENOENT
        raise OSError(code, os.strerror(code), program)
    return [sys.executable, "-I", "-S", "-c", ORPHAN_GUARD, str(os.getpid()), *argv]


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
        self.backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self.console = console
        self.stdin = stdin
        self.on_crash = on_crash
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
            *_guarded(self.argv, self.env),
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL if self.stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group, so that the terminal's Ctrl-C reaches `up` alone (which stops
            # the services in order), but the user's session: a new session is a new scheduling
            # group under Linux's autogroup, where `nice dockercoins up` no longer lowered the
            # services (each weighed as much as the user's whole session).
            process_group=0,
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
