"""A service's entry point: its flags over its settings, logging, then serve until stopped; and
the one mapping from an error to an exit status, for the services and the tools alike."""

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins.logs import configure_logging
from dockercoins.settings import BaseServiceSettings, load_settings

SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)

CONFIG_ERROR = 2
"""Exit status of bad configuration or bad arguments (argparse's own)."""
FAILED = 1
"""Exit status of a run that failed (a busy port, an unreachable dependency...)."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as a shell reports it."""


@dataclass(frozen=True)
class Flag:
    """A command-line flag that overrides one settings field."""

    name: str
    field: str
    type: Callable[[str], Any] = str
    help: str = ""


COMMON_FLAGS = (
    Flag("--host", "host", help="address to bind (default 127.0.0.1)"),
    Flag("--log-level", "log_level", str.upper, "DEBUG, INFO, WARNING or ERROR"),
)
"""Flags of every service: fields of BaseServiceSettings."""


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Add a service's flags, then the common ones, to `parser` (each defaults to None: unset)."""
    for flag in (*flags, *COMMON_FLAGS):
        parser.add_argument(flag.name, dest=flag.field, type=flag.type, help=flag.help)


def exit_status(prog: str, run: Callable[[], int | None], *, progress: bool = False) -> int:
    """Call `run` and turn its end into an exit status, with one line on stderr for an error.

    ConfigError: 2; any other DockercoinsError: 1; Ctrl-C: 130; else what `run` returned (0
    for None). With `progress` (`run` prints progress lines that an error may cut short), the
    error line starts on a fresh line, and Ctrl-C is said too.
    """
    fresh = "\n" if progress else ""
    try:
        return run() or 0
    except ConfigError as exc:
        print(f"{fresh}{prog}: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except DockercoinsError as exc:
        print(f"{fresh}{prog}: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        if progress:
            print(f"{fresh}{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def run_service(
    prog: str,
    settings_class: type[SettingsT],
    serve: Callable[[SettingsT], Coroutine[Any, Any, None]],
    options: dict[str, Any],
) -> int:
    """Settings from the environment and `options` (flags), logging, then serve until stopped;
    returns the exit status."""

    def start() -> None:
        settings = load_settings(settings_class, **options)
        configure_logging(settings.log_level)
        asyncio.run(serve(settings))

    return exit_status(prog, start)


def service_main(
    prog: str,
    settings_class: type[SettingsT],
    serve: Callable[[SettingsT], Coroutine[Any, Any, None]],
    flags: Sequence[Flag],
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """`python -m <service>`: parse the service's flags, run it, exit with its status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Settings come from DOCKERCOINS_* variables; flags override them.",
    )
    add_flags(parser, flags)
    sys.exit(run_service(prog, settings_class, serve, vars(parser.parse_args(argv))))
