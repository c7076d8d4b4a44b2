"""`dockercoins up` (what `make run` runs) as a real process: it serves, mines, stops cleanly."""

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from dockercoins.redis_store import connect
from dockercoins.settings import env_name
from dockercoins.wire import TURBO_BATCH
from dockercoins_tools.launcher import stack as stack_module
from dockercoins_tools.launcher.stack import Stack, _wait_until, grpc_serving
from tests.stack import RunningStack, alive, get_json, scale, wait_until, wait_until_async
from tests.support import run_cli, service_env


@pytest.fixture
def stack(tmp_path):
    started: list[RunningStack] = []

    def start(*args: str, **settings) -> RunningStack:
        running = RunningStack(tmp_path / "data", args, **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.kill()


@pytest.mark.slow
def test_up_serves_json_mines_and_stops_without_orphans(stack) -> None:
    running = stack("--workers", "2")
    url = running.ready()
    for name in ("rng", "hasher", "redis"):
        running.wait_for_line(rf"^{name} \S+")
    children = running.children()
    assert len(children) == 6  # redis, rng, hasher, webui, 2 workers

    first = get_json(url + "/json")
    assert set(first) >= {"coins", "hashes", "now"}
    second: dict = {}
    wait_until(lambda: grown(url, first, second), 30, "the hashes counter to grow", running)
    assert second["now"] > first["now"]

    assert running.stop() == 0
    assert "dockercoins up: stopped" in running.output
    assert [pid for pid in children if alive(pid)] == []
    # The worker flushed on the way out.
    assert "0 hashes unflushed" in running.output


def grown(url: str, first: dict, now: dict) -> bool:
    """Whether /json's `hashes` passed `first`'s; `now` gets what /json says."""
    now.update(get_json(url + "/json"))
    return bool(now["hashes"] > first["hashes"])


def control(path: Path, request: bytes) -> dict:
    """One raw request line on the control socket; the reply."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError):  # a refused huge request: it stopped reading
            sock.sendall(request)
        return json.loads(sock.makefile("rb").readline())


@pytest.mark.slow
def test_scale_over_a_private_socket_within_bounds_and_bad_requests_refused(
    stack, tmp_path
) -> None:
    running = stack("--workers", "1")
    running.ready()
    data = tmp_path / "data"
    path = data / "control.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert data.stat().st_uid == os.geteuid()

    refused = scale(data, "worker=100000")
    assert refused.returncode == 1
    assert "worker=100000 is out of bounds: 0 to 200 (DOCKERCOINS_WORKERS)" in refused.stderr
    assert "rng=0 is out of bounds: 1 to 32" in scale(data, "rng=0").stderr
    for request, error in [
        (b"not json\n", "not a JSON request"),
        (b"x" * (1 << 20) + b"\n", "request longer than 4096 bytes"),
        (b"[1, 2]\n", "expected"),
        (b'{"scale": [1]}\n', "expected"),
        (b'{"scale": {"worker": "3"}}\n', "worker: expected a whole number, got '3'"),
        (b'{"scale": {"worker": true}}\n', "expected a whole number"),
        (b'{"scale": {"hasher": 2}}\n', "can only scale worker or rng, not 'hasher'"),
        (b'{"scale": {"worker": 2}, "drop": 1}\n', "expected"),
    ]:
        reply = control(path, request)
        assert reply["ok"] is False and error in reply["error"], (request[:40], reply)
    with socket.socket(socket.AF_UNIX) as silent:  # connects, says nothing, leaves
        silent.connect(str(path))
    assert len(running.children()) == 5  # nothing was scaled by any of these

    result = scale(data, "worker=3")
    assert result.returncode == 0, result.stderr
    assert "worker=3" in result.stdout
    assert len(running.children()) == 7  # redis, rng, hasher, webui, 3 workers
    for number in (2, 3):  # started: they will flush when stopped
        running.wait_for_line(rf"^worker\.{number}\s*\|.* mining: ")
    result = scale(data, "worker=1")
    assert result.returncode == 0, result.stderr
    assert len(running.children()) == 5
    wait_until(
        lambda: running.output.count("hashes unflushed") >= 2,
        10,
        "the two stopped to flush",
        running,
    )

    # A launcher that does not answer: the client gives up after its timeout, with one line.
    running.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        hung = run_cli("scale", "worker=1", env=service_env(data_dir=data, control_timeout=1))
        # Its 1 s, and the start of a Python process on a busy machine: not the 30 s of run_cli.
        assert time.monotonic() - started < 20
    finally:
        running.proc.send_signal(signal.SIGCONT)
    assert hung.returncode == 1
    assert "within 1 s (DOCKERCOINS_CONTROL_TIMEOUT)" in hung.stderr
    assert "Traceback" not in hung.stderr
    assert running.stop() == 0


@pytest.mark.slow
def test_a_data_dir_that_is_not_ours_or_too_long_stops_up_before_anything(tmp_path) -> None:
    others = tmp_path / "others"
    others.mkdir()
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)  # nobody's
    else:
        others = Path("/")  # root's
    too_long = tmp_path / ("d" * (110 - len(str(tmp_path))))
    for data_dir, message in [
        (others, f"DOCKERCOINS_DATA_DIR: {others} belongs to uid "),
        (too_long, "DOCKERCOINS_DATA_DIR: the control socket's path would be "),
    ]:
        result = run_cli(
            "up",
            env=service_env(rng_port=0, hasher_port=0, webui_port=0, data_dir=data_dir),
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"dockercoins up: {message}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""  # nothing started
    assert not too_long.exists() and not (others / "redis").exists()


@pytest.mark.slow
def test_a_busy_port_stops_up_with_one_line_naming_it(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "up",
            env=service_env(webui_port=port, rng_port=0, hasher_port=0, data_dir=tmp_path),
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use (DOCKERCOINS_WEBUI_PORT)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("service", ["redis", "rng"])
async def test_a_chosen_port_another_program_binds_first_is_chosen_again(
    tmp_path, monkeypatch, service
) -> None:
    """With a port setting of 0 the launcher chooses a free port and the child binds it a moment
    later: another program may bind it in between (once in `make test`, rng exited 2 and `up`
    gave up). Here the first port the launcher chooses is one a listener holds: the child
    fails to bind it, and the launcher chooses another, says so, and the stack starts."""
    chosen: list[int] = []
    choose = stack_module.ensure_free

    def first_choice_taken(setting: str, host: str, port: int) -> int:
        if setting == env_name(f"{service}_port") and port == 0 and not chosen:
            chosen.append(taker.getsockname()[1])
            return chosen[0]
        return choose(setting, host, port)

    monkeypatch.setattr(stack_module, "ensure_free", first_choice_taken)
    log = io.StringIO()
    running = Stack.on_free_ports(tmp_path / "data", log, {}, workers=0)
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        try:
            await running.start()
            port = running.ports[service]
            if service == "redis":
                client = connect(running.redis_url)
                assert await client.ping()
                await client.aclose()
            else:
                assert await grpc_serving(f"127.0.0.1:{port}")
        finally:
            await running.stop()
    assert chosen and port != chosen[0]
    assert f"port {chosen[0]} was taken before it bound it; on {port} now" in log.getvalue()


@pytest.mark.slow
def test_scale_without_a_running_stack_says_so(tmp_path) -> None:
    result = run_cli("scale", "worker=2", env=service_env(data_dir=tmp_path))
    assert result.returncode == 2
    assert "no running `dockercoins up` found" in result.stderr


@pytest.mark.slow
def test_up_with_the_turbo_profile_mines_thousands_per_second(stack) -> None:
    running = stack("--profile", "turbo", "--workers", "1")
    url = running.ready()
    running.wait_for_line(r"^workers 1, rng mode blocking, profile turbo")
    first = get_json(url + "/json")
    second: dict = {}
    wait_until(lambda: grown(url, first, second), 30, "mining", running)
    first = dict(second)
    time.sleep(3)  # the window the rate is measured over
    second = get_json(url + "/json")
    # Classic costs allow 3.3 hashes/s per worker; turbo is orders of magnitude above.
    assert (second["hashes"] - first["hashes"]) / (second["now"] - first["now"]) > 1000
    running.wait_for_line(rf"batch {TURBO_BATCH}, 2 channel\(s\), streaming")
    assert running.stop() == 0


async def test_a_cancelled_start_ends_even_when_a_check_hides_the_cancellation() -> None:
    """Ctrl-C while `dockercoins up` waits for a piece to be ready cancels the start. A
    library's timeout that expires as its task is cancelled can raise TimeoutError (an OSError
    on 3.11) instead of CancelledError: the readiness wait must not take it for "not ready
    yet" and wait on for its 30 s."""

    checking = asyncio.Event()

    async def check() -> bool:
        checking.set()
        try:
            await asyncio.sleep(60)  # a check that would take long: the start is cancelled in it
        except asyncio.CancelledError:
            raise TimeoutError("timed out") from None  # as 3.11's wait_for may, on a race
        return True

    waiting = asyncio.create_task(_wait_until("rng", check, None))
    await wait_until_async(checking.is_set, 5, "the readiness check to start")
    waiting.cancel()
    done, _ = await asyncio.wait({waiting}, timeout=3)
    try:
        assert waiting in done and waiting.cancelled()
    finally:
        while not waiting.done():
            waiting.cancel()
            await asyncio.wait({waiting}, timeout=1)
