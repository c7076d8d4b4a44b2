"""`dockercoins probe`: httping-style lines and summary against a real, loaded stack."""

import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack import RunningStack, Service, get_json, wait_until
from tests.support import dockercoins_cmd, run_cli, service_env

pytestmark = pytest.mark.slow

LINE = r"^{what} {addr}: seq={seq} time=(\d+\.\d) ms$"
SUMMARY = r"^4 calls, 4 ok, 0 failed, round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms$"


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("probe", *args, timeout=60)


def check_output(result: subprocess.CompletedProcess[str], what: str, addr: str) -> list[float]:
    """The httping shape: 4 numbered lines, a `---` line, the summary; the min/avg/max in ms."""
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    times = []
    for seq, line in enumerate(lines[:4], 1):
        found = re.match(LINE.format(what=re.escape(what), addr=re.escape(addr), seq=seq), line)
        assert found, line
        times.append(float(found.group(1)))
    assert lines[4] == f"--- {what} {addr} ---"
    summary = re.match(SUMMARY, lines[5])
    assert summary, lines[5]
    low, mean, high = (float(value) for value in summary.groups())
    assert low == pytest.approx(min(times), abs=0.1)
    assert high == pytest.approx(max(times), abs=0.1)
    assert mean == pytest.approx(sum(times) / 4, abs=0.1)
    return [low, mean, high]


def test_probe_finds_the_bottleneck_and_health_stays_fast(tmp_path: Path) -> None:
    # 8 workers against one blocking rng (read 0.02 s): rng's queue is the bottleneck.
    stack = RunningStack(tmp_path / "data", ("--workers", "8"), rng_read_cost=0.02)
    try:
        rng = stack.wait_for_line(r"^rng (\S+)$").group(1)
        hasher = stack.wait_for_line(r"^hasher (\S+)$").group(1)
        url = stack.ready()
        wait_until(lambda: get_json(url + "/json")["workers"] == 8, 30, "8 workers mining", stack)
        common = ("--count", "4", "--interval", "0.1")
        rng_ms = check_output(probe("rng", "--addr", rng, *common), "rng", rng)
        hasher_ms = check_output(probe("hasher", "--addr", hasher, *common), "hasher", hasher)
        health_ms = check_output(
            probe("rng", "--addr", rng, "--health", *common), "rng health", rng
        )
    finally:
        stack.kill()
    # rng waits behind the other workers' reads (~7 x 20 ms); hasher only pays its 10 ms.
    assert rng_ms[1] > 60, rng_ms
    assert hasher_ms[1] < 60, hasher_ms
    assert rng_ms[1] > 2 * hasher_ms[1], (rng_ms, hasher_ms)
    # Health never waits behind the rng lock, however long its queue.
    assert health_ms[2] < 100, health_ms
    assert health_ms[1] < rng_ms[1] / 3, (health_ms, rng_ms)


def test_probe_of_a_dead_address_prints_the_error_and_fails(tmp_path: Path) -> None:
    from dockercoins.net import free_port

    addr = f"127.0.0.1:{free_port()}"
    result = probe("hasher", "--addr", addr, "--count", "2", "--interval", "0", "--timeout", "1")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert re.match(
        rf"^hasher {re.escape(addr)}: seq=1 error (UNAVAILABLE|DEADLINE_EXCEEDED)", lines[0]
    )
    assert lines[-1] == "2 calls, 0 ok, 2 failed"


def _cpu_seconds(argv: list[str]) -> float:
    """CPU (user + system) that running `argv` to its end cost; it must exit 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(argv, env=service_env(), capture_output=True, text=True, timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stdout + result.stderr
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def test_the_container_healthcheck_asks_the_named_service_and_costs_little() -> None:
    """`python -m dockercoins_tools.healthcheck`, what compose runs every 5 s in every container."""
    from dockercoins.net import free_port

    port = free_port()
    rng = Service("rng", rng_port=port)
    address = f"127.0.0.1:{port}"
    check = [sys.executable, "-m", "dockercoins_tools.healthcheck", address, "--timeout", "2"]
    try:
        rng.wait_for("listening on")
        named = subprocess.run([*check, "--service", "dockercoins.v1.Rng"], capture_output=True)
        assert named.returncode == 0 and b"dockercoins.v1.Rng: SERVING" in named.stdout, named
        assert subprocess.run(check, capture_output=True).returncode == 0  # overall status
        unknown = subprocess.run([*check, "--service", "nosuch"], capture_output=True, text=True)
        assert unknown.returncode == 1 and "nosuch: NOT_FOUND" in unknown.stderr, unknown
        # It speaks HTTP/2 with the standard library; the CLI's probe loads gRPC, settings, TLS
        # and every stub first (measured 0.03 s of CPU against 0.35 s).
        probe_argv = dockercoins_cmd("probe", "rng", "--health", "-c", "1", "--addr", address)
        light = statistics.median(_cpu_seconds(check) for _ in range(3))
        heavy = statistics.median(_cpu_seconds(probe_argv) for _ in range(3))
        assert light < 0.3 * heavy, f"healthcheck {light:.3f} s of CPU, probe {heavy:.3f} s"
        # A paused server accepts the connection (the kernel does) and never answers.
        rng.proc.send_signal(signal.SIGSTOP)
        try:
            paused = _fails_within([*check[:-2], "--timeout", "1"], 1)
        finally:
            rng.proc.send_signal(signal.SIGCONT)
        assert "DEADLINE_EXCEEDED: no answer in 1 s" in paused, paused
    finally:
        rng.terminate()


def _fails_within(argv: list[str], timeout: float) -> str:
    """Run a check that must fail within its `timeout` (plus a start-up's margin): its stderr."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    assert time.monotonic() - started < timeout + 3, result
    return result.stderr
