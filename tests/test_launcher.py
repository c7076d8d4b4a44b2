"""`dockercoins up` (what `make run` runs) as a real process: it serves, mines, stops cleanly."""

import socket
import subprocess
import time

import pytest

from tests.conftest import dockercoins_cmd, service_env
from tests.stack import RunningStack, alive, get_json, scale


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


def test_up_serves_json_mines_and_stops_without_orphans(stack) -> None:
    running = stack("--workers", "2")
    url = running.ready()
    for name in ("rng", "hasher", "redis"):
        running.wait_for_line(rf"^{name} \S+")
    children = running.children()
    assert len(children) == 6  # redis, rng, hasher, webui, 2 workers

    first = get_json(url + "/json")
    assert set(first) >= {"coins", "hashes", "now"}
    time.sleep(3)
    second = get_json(url + "/json")
    assert second["hashes"] > first["hashes"]
    assert second["now"] > first["now"]

    assert running.stop() == 0
    assert "dockercoins up: stopped" in running.output
    assert [pid for pid in children if alive(pid)] == []
    # The worker flushed on the way out.
    assert "0 hashes unflushed" in running.output


def test_scale_changes_the_number_of_worker_processes(stack, tmp_path) -> None:
    running = stack("--workers", "1")
    running.ready()
    result = scale(tmp_path / "data", "worker=3")
    assert result.returncode == 0, result.stderr
    assert "worker=3" in result.stdout
    assert len(running.children()) == 7  # redis, rng, hasher, webui, 3 workers
    result = scale(tmp_path / "data", "worker=1")
    assert result.returncode == 0, result.stderr
    assert len(running.children()) == 5
    assert running.output.count("hashes unflushed") == 2  # the two stopped ones flushed
    assert running.stop() == 0


def test_a_busy_port_stops_up_with_one_line_naming_it(tmp_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            dockercoins_cmd("up"),
            env=service_env(webui_port=port, rng_port=0, hasher_port=0, data_dir=tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use (DOCKERCOINS_WEBUI_PORT)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_scale_without_a_running_stack_says_so(tmp_path) -> None:
    result = subprocess.run(
        dockercoins_cmd("scale", "worker=2"),
        env=service_env(data_dir=tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no running `dockercoins up` found" in result.stderr


def test_up_with_the_turbo_profile_mines_thousands_per_second(stack) -> None:
    running = stack("--profile", "turbo", "--workers", "1")
    url = running.ready()
    running.wait_for_line(r"^workers 1, rng mode blocking, profile turbo")
    first = get_json(url + "/json")
    time.sleep(3)
    second = get_json(url + "/json")
    # Classic costs allow 3.3 hashes/s per worker; turbo is orders of magnitude above.
    assert (second["hashes"] - first["hashes"]) / (second["now"] - first["now"]) > 1000
    running.wait_for_line(r"batch 1000, 2 channel\(s\), streaming")
    assert running.stop() == 0
