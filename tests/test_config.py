"""Bad configuration: exit status 2 and one line naming the variable; busy ports named too."""

import socket
import subprocess

import pytest

from tests.conftest import dockercoins_cmd, service_env


def run(args: list[str], timeout: float = 30, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        dockercoins_cmd(*args),
        env=service_env(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("command", "settings", "variable"),
    [
        ("rng", {"rng_read_cost": "slow"}, "DOCKERCOINS_RNG_READ_COST"),
        ("rng", {"rng_mode": "fast"}, "DOCKERCOINS_RNG_MODE"),
        ("rng", {"rng_port": 70000}, "DOCKERCOINS_RNG_PORT"),
        ("hasher", {"hasher_latency": -1}, "DOCKERCOINS_HASHER_LATENCY"),
        ("worker", {"worker_loops": 0}, "DOCKERCOINS_WORKER_LOOPS"),
        ("worker", {"worker_flush_interval": "never"}, "DOCKERCOINS_WORKER_FLUSH_INTERVAL"),
        ("webui", {"log_level": "LOUD"}, "DOCKERCOINS_LOG_LEVEL"),
        ("up", {"workers": -3}, "DOCKERCOINS_WORKERS"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(command, settings, variable) -> None:
    result = run([command], **settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dockercoins {command}: {variable}:")
    assert "Traceback" not in result.stderr


def test_a_busy_port_is_one_line_naming_the_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command, field in (("rng", "rng_port"), ("hasher", "hasher_port")):
            result = run([command], **{field: port})
            assert result.returncode == 2, result.stderr
            expected = f"port {port} on 127.0.0.1 is already in use (DOCKERCOINS_{field.upper()})"
            assert expected in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
