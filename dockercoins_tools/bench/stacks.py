"""The stacks the bench measures: local processes on free ports, configured by settings."""

from pathlib import Path
from typing import Any, TextIO

from dockercoins.settings import env_name
from dockercoins_tools.launcher import Stack

SAMPLE_EVERY = 0.25
"""Seconds between two readings of the counter (and of the processes' memory, in the soak)."""


def settings_env(**fields: Any) -> dict[str, str]:
    """The DOCKERCOINS_* variables that set these settings fields in the services."""
    return {
        env_name(name): str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in fields.items()
    }


def bench_stack(
    data_dir: Path,
    workers: int,
    log: TextIO,
    env: dict[str, str],
    log_level: str = "WARNING",
    **fields: Any,
) -> Stack:
    """A stack on free ports whose children get `env`, `workers` workers, its lines in `log`."""
    return Stack.on_free_ports(data_dir, log, env, workers=workers, log_level=log_level, **fields)
