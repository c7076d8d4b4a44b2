"""Bad configuration: exit status 2 and one line naming the variable; busy ports named too."""

import importlib
import os
import re
import runpy
import socket
import subprocess
import sys

import pytest

from dockercoins.service_main import COMMON_FLAGS
from tests.support import dockercoins_cmd, run_cli, service_env


def run(args: list[str], timeout: float = 30, **settings: object) -> subprocess.CompletedProcess:
    return run_cli(*args, env=service_env(**settings), timeout=timeout)


@pytest.mark.slow
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
def test_a_bad_setting_is_one_line_naming_the_variable(command, settings, variable) -> None:
    result = run([command], **settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dockercoins {command}: {variable}:")
    assert "Traceback" not in result.stderr


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


@pytest.mark.slow
@pytest.mark.parametrize("command", SERVICE_ALONE)
def test_a_service_alone_takes_the_flags_of_its_cli_command(command: str) -> None:
    """The same flags, from the service's own config module, and the same error and status."""
    module, bad_flag, variable = SERVICE_ALONE[command]
    argvs = {"alone": [sys.executable, "-m", module], "cli": dockercoins_cmd(command)}
    runs = {
        (how, what): subprocess.Popen(
            [*argv, *extra],
            env=service_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for how, argv in argvs.items()
        for what, extra in (("help", ["--help"]), ("bad", bad_flag))
    }
    done = {key: (*proc.communicate(timeout=60), proc.returncode) for key, proc in runs.items()}
    flags = importlib.import_module(f"{module}.config").FLAGS
    expected = {"--help"} | {flag.name for flag in (*flags, *COMMON_FLAGS)}
    for how in argvs:
        out, err, status = done[how, "help"]
        assert status == 0, err
        assert options_in(out) == expected, how
    _, alone_err, alone_status = done["alone", "bad"]
    _, cli_err, cli_status = done["cli", "bad"]
    assert alone_status == cli_status == 2
    assert alone_err == cli_err
    assert alone_err.startswith(f"dockercoins {command}: {variable}:"), alone_err
    assert len(alone_err.strip().splitlines()) == 1, alone_err


@pytest.mark.parametrize("command", SERVICE_ALONE)
def test_python_m_a_service_reads_its_flags_and_stops_at_a_bad_one_in_process(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service's __main__ run in this interpreter, as `python -m` runs it: the same one
    line and status 2 as the process above, before anything starts."""
    module, bad_flag, variable = SERVICE_ALONE[command]
    for name in [name for name in os.environ if name.startswith("DOCKERCOINS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", [module, *bad_flag])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dockercoins {command}: {variable}:"), lines
