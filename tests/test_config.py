"""Bad configuration: exit status 2 and one line naming the variable, before anything starts;
busy ports named too. The CLI and each service's `python -m` run in this interpreter, as their
entry points run them (the same code after the imports), except for the busy ports."""

import importlib
import os
import re
import runpy
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from dockercoins.service_main import COMMON_FLAGS
from dockercoins_tools.cli import main as dockercoins
from tests.support import run_cli, service_env


def run(args: list[str], timeout: float = 30, **settings: object) -> subprocess.CompletedProcess:
    return run_cli(*args, env=service_env(**settings), timeout=timeout)


@pytest.fixture
def entry_point(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """Runs an entry point in this interpreter with DOCKERCOINS_<FIELD> set from keywords (and
    no other): its exit status, its stdout, its stderr."""
    for name in [name for name in os.environ if name.startswith("DOCKERCOINS_")]:
        monkeypatch.delenv(name)

    def run_entry(start: Callable[[], object], **settings: object) -> tuple[int, str, str]:
        with monkeypatch.context() as env:
            env.setattr(sys, "argv", list(sys.argv))  # given back whatever `start` sets
            for field, value in settings.items():
                env.setenv(f"DOCKERCOINS_{field.upper()}", str(value))
            with pytest.raises(SystemExit) as exited:
                start()
        captured = capsys.readouterr()
        return int(exited.value.code or 0), captured.out, captured.err

    return run_entry


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
        ("hasher", {"max_peer_rpcs": 0}, "DOCKERCOINS_MAX_PEER_RPCS"),
        ("rng", {"max_probe_streams": "many"}, "DOCKERCOINS_MAX_PROBE_STREAMS"),
        ("worker", {"call_idle_timeout": 0}, "DOCKERCOINS_CALL_IDLE_TIMEOUT"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    entry_point, command, settings, variable
) -> None:
    status, out, err = entry_point(lambda: dockercoins([command]), **settings)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dockercoins {command}: {variable}:")
    assert out == ""


@pytest.mark.slow
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


# Each service alone (`python -m rng_svc`, what the launcher and the containers' commands run)
# and under the CLI (`dockercoins rng`), with a flag whose value is out of bounds.
SERVICE_ALONE = {
    "rng": ("rng_svc", ["--port", "70000"], "DOCKERCOINS_RNG_PORT"),
    "hasher": ("hasher_svc", ["--latency", "-1"], "DOCKERCOINS_HASHER_LATENCY"),
    "worker": ("worker_svc", ["--loops", "0"], "DOCKERCOINS_WORKER_LOOPS"),
    "webui": ("webui", ["--port", "70000"], "DOCKERCOINS_WEBUI_PORT"),
}


def options_in(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


@pytest.mark.parametrize("command", SERVICE_ALONE)
def test_a_service_alone_takes_the_flags_of_its_cli_command(entry_point, command: str) -> None:
    """The same flags, from the service's own config module, and the same error and status."""
    module, bad_flag, variable = SERVICE_ALONE[command]

    def alone(*argv: str) -> Callable[[], object]:  # python -m <module> <argv>
        def start() -> None:
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)

        return start

    runs = {
        ("alone", "help"): entry_point(alone("--help")),
        ("alone", "bad"): entry_point(alone(*bad_flag)),
        ("cli", "help"): entry_point(lambda: dockercoins([command, "--help"])),
        ("cli", "bad"): entry_point(lambda: dockercoins([command, *bad_flag])),
    }
    flags = importlib.import_module(f"{module}.config").FLAGS
    expected = {"--help"} | {flag.name for flag in (*flags, *COMMON_FLAGS)}
    for how in ("alone", "cli"):
        status, out, err = runs[how, "help"]
        assert status == 0, err
        assert options_in(out) == expected, how
    alone_status, _, alone_err = runs["alone", "bad"]
    cli_status, _, cli_err = runs["cli", "bad"]
    assert alone_status == cli_status == 2
    assert alone_err == cli_err
    assert alone_err.startswith(f"dockercoins {command}: {variable}:"), alone_err
    assert len(alone_err.strip().splitlines()) == 1, alone_err
