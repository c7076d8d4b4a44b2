"""The experiment's sweep: its points (rng mode, rng processes, workers), their order, timing."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from dockercoins.errors import ConfigError
from rng_svc.config import RngMode

MODES: tuple[str, ...] = get_args(RngMode)
DEFAULT_WORKERS = (1, 2, 3, 5, 10)


@dataclass(frozen=True, order=True)
class Point:
    """One point of the sweep: rng mode, rng processes, worker processes."""

    mode: str
    rng_replicas: int
    workers: int

    def label(self) -> str:
        return f"{self.mode} rng={self.rng_replicas} workers={self.workers}"


def parse_point(text: str) -> Point:
    """`blocking:worker=10:rng=2` (rng defaults to 1) as a Point."""
    mode, *parts = text.split(":")
    counts = {"worker": 0, "rng": 1}
    for part in parts:
        name, _, number = part.partition("=")
        if name not in counts or not number.isdigit() or int(number) < 1:
            raise ConfigError(f"expected MODE:worker=N[:rng=K], got {text!r}")
        counts[name] = int(number)
    if mode not in MODES or not counts["worker"]:
        raise ConfigError(f"expected MODE:worker=N[:rng=K] with MODE in {MODES}, got {text!r}")
    return Point(mode, counts["rng"], counts["worker"])


def plan(
    modes: Sequence[str],
    workers: Sequence[int],
    rng_replicas: Sequence[int] = (1,),
    extra: Sequence[Point] = (),
) -> list[Point]:
    """Every point, grouped so that rng changes as rarely as possible: modes in the given
    order, then rng replicas ascending, then workers ascending."""
    points = {Point(m, k, n) for m in modes for k in rng_replicas for n in workers}
    points.update(extra)
    order = {mode: index for index, mode in enumerate(modes)}
    return sorted(
        points, key=lambda p: (order.get(p.mode, len(order)), p.mode, p.rng_replicas, p.workers)
    )


@dataclass(frozen=True)
class Timing:
    """How long to wait and to measure at each point, in seconds."""

    warmup: float = 5.0
    window: float = 20.0
    sample_interval: float = 0.25
    ready_timeout: float = 60.0
