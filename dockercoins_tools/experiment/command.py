"""`dockercoins experiment`'s flags, checked and turned into a sweep on a backend."""

import asyncio
import contextlib
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins_tools.cost_model import PROFILES, Costs, profile_costs
from dockercoins_tools.experiment.backends import Backend, LocalBackend
from dockercoins_tools.experiment.kubectl import KubectlBackend
from dockercoins_tools.experiment.plan import DEFAULT_WORKERS, MODES, Timing, parse_point, plan
from dockercoins_tools.experiment.sweep import Experiment


def costs_from(profile: str, **overrides: float | None) -> Costs:
    """The profile's costs with single costs overridden (None: keep the profile's)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    given: dict[str, Any] = {name: value for name, value in overrides.items() if value is not None}
    for name, value in given.items():
        if value < 0 or (name == "worker_flush_interval" and value <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return replace(profile_costs(profile), **given)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it again."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["dockercoins", *(shlex.quote(a) for a in args)])


def _numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"expected numbers >= 1 separated by commas, got {text!r}")
    return values


def add_arguments(parser: Any) -> None:
    """The flags of `dockercoins experiment`."""
    sweep = parser.add_argument_group("the sweep")
    sweep.add_argument("--modes", default=",".join(MODES), help="rng modes (default: %(default)s)")
    sweep.add_argument(
        "--workers",
        default=",".join(map(str, DEFAULT_WORKERS)),
        help="worker counts (default: %(default)s)",
    )
    sweep.add_argument("--rng-replicas", default="1", help="rng process counts (default: 1)")
    sweep.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="MODE:worker=N[:rng=K]",
        help="one more point, e.g. blocking:worker=10:rng=2 (repeatable)",
    )
    costs = parser.add_argument_group("costs (local; kubectl reads the cluster's own settings)")
    costs.add_argument(
        "--profile", default="classic", choices=sorted(PROFILES), help="named set of costs"
    )
    for dest, (flag, meaning) in COST_FLAGS.items():
        costs.add_argument(flag, type=float, dest=dest, help=meaning)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=float, default=Timing.warmup, help="s (default 5)")
    timing.add_argument("--window", type=float, default=Timing.window, help="s (default 20)")
    timing.add_argument("--sample-interval", type=float, default=Timing.sample_interval)
    timing.add_argument("--ready-timeout", type=float, default=Timing.ready_timeout)
    parser.add_argument("--output", "-o", default="experiment-results", help="result directory")
    parser.add_argument("--backend", choices=["local", "kubectl"], default="local")
    cluster = parser.add_argument_group("kubectl backend")
    cluster.add_argument("--url", help="the web UI's URL (its /json is read)")
    cluster.add_argument("--namespace", "-n", default="dockercoins", help="(default: %(default)s)")
    cluster.add_argument("--context", help="kubectl context (default: the current one)")
    cluster.add_argument("--kubectl", default="kubectl", help="the kubectl executable")
    cluster.add_argument(
        "--rng-workload",
        default="deployment/rng",
        help="deployment/rng (scaled to --rng-replicas) or daemonset/rng (one per node, "
        "the daemonset overlay)",
    )


COST_FLAGS = {
    "rng_read_cost": ("--read-cost", "rng read, s"),
    "rng_latency": ("--rng-latency", "rng time per request, s"),
    "hasher_latency": ("--hasher-latency", "s"),
    "worker_think_time": ("--think-time", "s"),
    "worker_flush_interval": ("--flush-interval", "s"),
}
"""The flags that override single costs of the profile: Costs field -> (flag, help)."""


def run(options: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """`dockercoins experiment` from parsed options; exit status."""
    given = [name for name in COST_FLAGS if options.get(name) is not None]
    if options["backend"] == "kubectl" and given:
        flags = ", ".join(COST_FLAGS[name][0] for name in given)
        raise ConfigError(f"--backend kubectl reads the costs from the cluster; drop {flags}")
    costs = costs_from(options["profile"], **{name: options.get(name) for name in COST_FLAGS})
    modes = [m.strip() for m in options["modes"].split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes: expected some of {', '.join(MODES)}, got {options['modes']!r}")
    points = plan(
        modes,
        _numbers(options["workers"]),
        _numbers(options["rng_replicas"]),
        [parse_point(text) for text in options["extra"]],
    )
    timing = Timing(
        options["warmup"], options["window"], options["sample_interval"], options["ready_timeout"]
    )
    if timing.window < 2 * timing.sample_interval or timing.warmup < 0:
        raise ConfigError("--window must hold at least two samples and --warmup be >= 0")
    output = Path(options["output"])
    output.mkdir(parents=True, exist_ok=True)
    backend: Backend
    with contextlib.ExitStack() as closing:
        if options["backend"] == "kubectl":
            if not options.get("url"):
                raise ConfigError("--backend kubectl needs --url, the web UI's address")
            backend = KubectlBackend(
                options["url"],
                options["namespace"],
                options.get("context"),
                options["kubectl"],
                rng_workload=options["rng_workload"],
            )
        else:
            log_out = closing.enter_context((output / "experiment.log").open("w"))
            backend = LocalBackend(costs, log_out)
        experiment = Experiment(
            backend, points, costs, timing, output, options["profile"], command_line(argv)
        )
        try:
            asyncio.run(experiment.run(sys.stdout))
        except KeyboardInterrupt:
            print("\ndockercoins experiment: interrupted", file=sys.stderr)
            return 130
        except DockercoinsError as exc:
            print(f"\ndockercoins experiment: {exc}", file=sys.stderr)
            return 1
    return 0
