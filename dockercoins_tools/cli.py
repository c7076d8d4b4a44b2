"""The `dockercoins` command: one subcommand per service, `up` for the whole stack, and tools."""

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins.logs import configure_logging
from dockercoins.service_main import add_flags, exit_status, run_service
from dockercoins.settings import BaseServiceSettings, env_name, load_settings
from dockercoins_tools.launcher.settings import FLAGS as UP_FLAGS
from dockercoins_tools.launcher.settings import SCALABLE, StackSettings
from dockercoins_tools.services import SERVICES
from worker_svc.config import LIVENESS, READINESS

UP_HELP = "start redis, rng, hasher, the workers and the web UI"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dockercoins",
        description="DockerCoins over gRPC. Settings come from DOCKERCOINS_* variables; "
        "flags override them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, service in SERVICES.items():
        sub = commands.add_parser(name, help=service.help, description=service.help)
        add_flags(sub, service.flags)
    up = commands.add_parser("up", help=UP_HELP, description=UP_HELP)
    add_flags(up, UP_FLAGS)
    up.add_argument(
        "--fresh",
        action="store_true",
        default=None,
        help="empty the embedded Redis's data first (start from zero)",
    )
    _add_tools(commands)
    return parser


def _add_tools(commands: Any) -> None:
    scale = commands.add_parser(
        "scale",
        help="change the number of workers or rng processes of a running `dockercoins up`",
        description="Like `kubectl scale`: dockercoins scale worker=10 (or rng=2).",
    )
    scale.add_argument("counts", nargs="+", metavar="SERVICE=N", help="worker=N or rng=N")
    scale.add_argument("--data-dir", help="the data directory of the running stack")
    probe = commands.add_parser(
        "probe",
        help="time real calls against rng or hasher, as httping does",
        description="One line per call and a min/avg/max summary; exit 1 if any call failed.",
    )
    probe.add_argument("service", choices=["rng", "hasher", "worker"])
    probe.add_argument("--addr", help="target (default: DOCKERCOINS_RNG_ADDR / _HASHER_ADDR)")
    probe.add_argument("--count", "-c", type=int, default=5, help="calls to make (default 5)")
    probe.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between calls")
    probe.add_argument("--timeout", type=float, default=10.0, help="deadline of each call")
    probe.add_argument("--health", action="store_true", help="call the health service only")
    probe.add_argument(
        "--service",
        dest="health_service",
        help=f"with --health: the health service to check (a worker: {READINESS}, the default, "
        f"or {LIVENESS})",
    )
    commands.add_parser("settings", help="print every DOCKERCOINS_* setting as a Markdown table")
    bench = commands.add_parser(
        "bench",
        help="benchmark: in-process ceiling, turbo pipeline grid, latency overhead, soak",
        description="Writes bench.json (and the stack's log) to --out.",
    )
    bench.add_argument("--out", default="bench-results", help="output directory")
    bench.add_argument("--window", type=float, help="seconds measured per configuration (10)")
    bench.add_argument("--soak", type=float, help="seconds of the turbo fault soak (600; 0: none)")
    bench.add_argument(
        "--faults",
        help="the soak's faults in turn, TARGET:pause or TARGET:kill, comma-separated, TARGET "
        "one of rng, hasher, redis, worker.1 (default: each paused, then killed); none: no fault",
    )
    bench.add_argument(
        "--soak-only", action="store_true", help="run the fault soak alone (soak.json)"
    )
    bench.add_argument("--quick", action="store_true", help="tiny scale, to check the code path")
    from dockercoins_tools.experiment.command import add_arguments

    add_arguments(
        commands.add_parser(
            "experiment",
            help="sweep rng modes x worker counts, measure the rate, chart it against the model",
            description="For each point: scale, wait for the workers, warm up, fit the rate of "
            "the Redis counter over a window. Writes experiment.json, .csv and .png.",
        )
    )


def run_scale(options: dict[str, Any]) -> int:
    """`dockercoins scale worker=N rng=K` against the stack of this data directory."""
    from dockercoins_tools.launcher.control import send_control

    counts: dict[str, int] = {}
    for item in options["counts"]:
        service, _, number = item.partition("=")
        if service not in SCALABLE or not number.isdigit():
            raise ConfigError(f"expected worker=N or rng=N, got {item!r}")
        counts[service] = int(number)
    settings = load_settings(StackSettings, data_dir=options.get("data_dir"))
    timeout = settings.control_timeout
    reply = asyncio.run(send_control(settings.data_dir, {"scale": counts}, timeout))
    if not reply.get("ok"):
        raise DockercoinsError(str(reply.get("error")))
    status = reply["status"]
    print(f"worker={status['worker']} rng={status['rng']}")
    return 0


def run_probe(options: dict[str, Any]) -> int:
    """`dockercoins probe rng|hasher`."""
    from dockercoins.settings import TlsSettings
    from dockercoins.tls import channel_credentials
    from dockercoins_tools.probe import probe
    from worker_svc.config import WorkerSettings

    credentials = channel_credentials(load_settings(TlsSettings))
    address = options.get("addr")
    if not address:
        settings = load_settings(WorkerSettings)
        if options["service"] == "worker":
            if not settings.worker_health_port:
                raise ConfigError("give --addr, or set DOCKERCOINS_WORKER_HEALTH_PORT")
            address = f"127.0.0.1:{settings.worker_health_port}"
        else:
            address = settings.rng_addr if options["service"] == "rng" else settings.hasher_addr
    if options["count"] < 1 or options["interval"] < 0 or options["timeout"] <= 0:
        raise ConfigError("--count must be >= 1, --interval >= 0, --timeout > 0")
    try:
        result = asyncio.run(
            probe(
                options["service"],
                address,
                options["count"],
                options["interval"],
                options["timeout"],
                options["health"],
                sys.stdout,
                credentials=credentials,
                health_service=options.get("health_service"),
            )
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 1 if result.errors else 0


def settings_table() -> str:
    """Every setting of every service as a Markdown table: variable, default, readers, meaning."""
    classes: dict[str, type[BaseServiceSettings]] = {
        **{name: service.settings for name, service in SERVICES.items()},
        "up": StackSettings,
    }
    rows: dict[str, dict[str, Any]] = {}
    for service, settings_class in classes.items():
        for name, info in settings_class.model_fields.items():
            row = rows.setdefault(env_name(name), {"default": info.default, "readers": {}})
            row["readers"][service] = info.description or ""
    lines = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    for variable, row in rows.items():
        readers: dict[str, str] = row["readers"]
        if len(set(readers.values())) == 1:
            meaning = next(iter(readers.values()))
        else:
            meaning = " ".join(f"*{service}*: {text}" for service, text in readers.items())
        default = "(unset)" if row["default"] is None else row["default"]
        lines.append(f"| `{variable}` | `{default}` | {', '.join(readers)} | {meaning} |")
    return "\n".join(lines)


def run_bench(options: dict[str, Any]) -> int:
    """`dockercoins bench`."""
    import dataclasses
    from pathlib import Path

    from dockercoins_tools.bench import command as bench
    from dockercoins_tools.bench.faults import Fault

    chosen = bench.BenchOptions.quick() if options["quick"] else bench.BenchOptions()
    if options["window"] is not None:
        chosen = dataclasses.replace(chosen, window=options["window"])
    soak = chosen.soak
    if options["soak"] is not None:
        soak = dataclasses.replace(soak, seconds=options["soak"])
    if options["faults"] is not None:
        try:
            faults = [] if options["faults"] == "none" else options["faults"].split(",")
            soak = dataclasses.replace(soak, faults=tuple(map(Fault.parse, faults)))
        except ValueError as exc:
            raise ConfigError(f"--faults: {exc}") from None
    configure_logging("WARNING")
    if options["soak_only"]:
        report = asyncio.run(bench.run_soak(soak, Path(options["out"])))
        return 0 if report["count"]["exact"] else 1
    asyncio.run(bench.run_bench(dataclasses.replace(chosen, soak=soak), Path(options["out"])))
    return 0


def run_settings(options: dict[str, Any]) -> int:
    """`dockercoins settings`: print the settings table."""
    print(settings_table())
    return 0


def run_experiment(options: dict[str, Any]) -> int:
    """`dockercoins experiment`."""
    from dockercoins_tools.experiment.command import run

    return run(options)


TOOLS: dict[str, Callable[[dict[str, Any]], int]] = {
    "experiment": run_experiment,
    "scale": run_scale,
    "probe": run_probe,
    "settings": run_settings,
    "bench": run_bench,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `dockercoins` command."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    prog = f"dockercoins {name}"
    if name in TOOLS:
        sys.exit(exit_status(prog, lambda: TOOLS[name](args)))
    if name == "up":
        from dockercoins_tools.launcher.up import serve

        sys.exit(run_service(prog, StackSettings, serve, args))
    service = SERVICES[name]
    sys.exit(run_service(prog, service.settings, service.load_serve(), args))
