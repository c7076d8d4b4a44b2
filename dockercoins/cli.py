"""The `dockercoins` command: one subcommand per service, `up` for the whole stack, and tools."""

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dockercoins.errors import ConfigError
from dockercoins.logs import configure_logging
from dockercoins.settings import load_settings


@dataclass(frozen=True)
class Flag:
    """A command-line flag that overrides one settings field."""

    name: str
    field: str
    type: Callable[[str], Any] = str
    help: str = ""


@dataclass(frozen=True)
class Command:
    """A service subcommand: its settings class, its serve() and its flags (import paths, lazy)."""

    settings: str
    serve: str
    help: str
    flags: Sequence[Flag] = field(default_factory=tuple)


COMMON_FLAGS = (
    Flag("--host", "host", help="address to bind (default 127.0.0.1)"),
    Flag("--log-level", "log_level", str.upper, "DEBUG, INFO, WARNING or ERROR"),
)

SERVICES: dict[str, Command] = {
    "rng": Command(
        "rng_svc.config:RngSettings",
        "rng_svc.server:serve",
        "run the rng service",
        (
            Flag("--port", "rng_port", int, "port to listen on (0: any free)"),
            Flag("--mode", "rng_mode", help="blocking or buffered"),
            Flag("--read-cost", "rng_read_cost", float, "seconds per entropy read"),
        ),
    ),
    "hasher": Command(
        "hasher_svc.config:HasherSettings",
        "hasher_svc.server:serve",
        "run the hasher service",
        (
            Flag("--port", "hasher_port", int, "port to listen on (0: any free)"),
            Flag("--latency", "hasher_latency", float, "seconds per request"),
        ),
    ),
    "worker": Command(
        "worker_svc.config:WorkerSettings",
        "worker_svc.server:serve",
        "run one worker",
        (
            Flag("--rng", "rng_addr", help="rng target"),
            Flag("--hasher", "hasher_addr", help="hasher target"),
            Flag("--redis", "redis_url", help="Redis URL"),
            Flag("--think-time", "worker_think_time", float, "seconds per unit of work"),
            Flag("--loops", "worker_loops", int, "concurrent mining loops"),
        ),
    ),
    "webui": Command(
        "webui.config:WebuiSettings",
        "webui.server:serve",
        "run the web UI",
        (
            Flag("--port", "webui_port", int, "port to listen on (0: any free)"),
            Flag("--redis", "redis_url", help="Redis URL"),
        ),
    ),
    "up": Command(
        "dockercoins.launcher:StackSettings",
        "dockercoins.launcher:serve",
        "start redis, rng, hasher, the workers and the web UI",
        (
            Flag("--workers", "workers", int, "number of worker processes (default 1)"),
            Flag("--rng-mode", "rng_mode", help="blocking or buffered"),
            Flag("--redis", "redis_url", help="use this Redis instead of starting one"),
            Flag("--data-dir", "data_dir", help="where the embedded Redis keeps its data"),
        ),
    ),
}


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dockercoins",
        description="DockerCoins over gRPC. Settings come from DOCKERCOINS_* variables; "
        "flags override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SERVICES.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        for flag in (*command.flags, *COMMON_FLAGS):
            sub.add_argument(flag.name, dest=flag.field, type=flag.type, help=flag.help)
        if name == "up":
            sub.add_argument(
                "--fresh",
                action="store_true",
                default=None,
                help="empty the embedded Redis's data first (start from zero)",
            )
    return parser


def run_service(name: str, options: dict[str, Any]) -> int:
    """Settings from environment and flags, logging, then serve until stopped."""
    command = SERVICES[name]
    prog = f"dockercoins {name}"
    try:
        settings = load_settings(_load(command.settings), **options)
        configure_logging(settings.log_level)
        asyncio.run(_load(command.serve)(settings))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `dockercoins` command."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    sys.exit(run_service(name, args))
