"""The soak's faults and plan, and what the counter's flushes say about a recovery."""

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from dockercoins.counter_sampler import Reading
from worker_svc.config import WorkerSettings

SOAK_DIFFICULTY: int = WorkerSettings.TURBO_DEFAULTS["difficulty"]
"""The soak's coin rule: turbo's default (one coin in 65,536 hashes at difficulty 4), which keeps
the wallet small (README: the difficulty table); at difficulty 1 (one in 16) turbo passes the
embedded Redis's 1 GiB maxmemory in a minute or two, after which Redis refuses writes and the
worker pauses (nothing lost, but the soak would measure a full Redis instead of the faults)."""

RECOVERED = 0.8
"""A fault is over once the counter's rate is back to this fraction of the rate before it."""

PAUSE, KILL = "pause", "kill"


@dataclass(frozen=True)
class Fault:
    """What the soak does to one process of the stack: `pause` (SIGSTOP, later SIGCONT) or
    `kill` (SIGKILL: the launcher restarts it)."""

    target: str
    action: str

    @property
    def label(self) -> str:
        return f"{self.action} {self.target}"

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """`rng:pause`, `worker.1:kill`... as given on the command line."""
        target, _, action = text.partition(":")
        if target not in FAULT_TARGETS or action not in (PAUSE, KILL):
            raise ValueError(
                f"expected TARGET:pause or TARGET:kill with TARGET one of "
                f"{', '.join(FAULT_TARGETS)}, got {text!r}"
            )
        return cls(target, action)


FAULT_TARGETS = ("rng", "hasher", "redis", "worker.1")
ALL_FAULTS = tuple(Fault(target, action) for target in FAULT_TARGETS for action in (PAUSE, KILL))
QUICK_FAULTS = (Fault("redis", PAUSE), Fault("worker.1", KILL))


@dataclass(frozen=True)
class SoakPlan:
    """How long the soak lasts and what it does meanwhile: each fault in turn, in a slot of
    `seconds / len(faults)`: the rate before it over the slot's first fifth (at least
    `window` + 0.5 s), a pause of two fifths, then the recovery, watched to the slot's end and
    on, while not recovered, for up to `patience` more seconds."""

    seconds: float = 600.0
    faults: tuple[Fault, ...] = ALL_FAULTS
    window: float = 3.0
    patience: float = 60.0
    difficulty: int = SOAK_DIFFICULTY

    @property
    def slot(self) -> float:
        return self.seconds / max(len(self.faults), 1)

    @property
    def before(self) -> float:
        return max(0.2 * self.slot, self.window + 0.5)

    @property
    def pause(self) -> float:
        return max(0.4 * self.slot, 1.0)


@dataclass
class FaultResult:
    """What one fault cost: seconds (monotonic) from the fault's end to the recovery."""

    fault: str
    seconds: float
    rate_before: float
    recovered_after: float | None
    rate_after: float
    worker_peak_rss_mb: float
    redis_peak_rss_mb: float
    lines: list[str] = field(default_factory=list)
    flushes: list[tuple[float, int]] = field(default_factory=list)
    """The counter at each flush seen, seconds from the fault's end (negative: before)."""


def flushes(readings: Iterable[Reading]) -> list[Reading]:
    """The readings where the counter had moved: the workers' flushes, as Redis took them."""
    return [r for previous, r in itertools.pairwise(readings) if r.hashes > previous.hashes]


def flush_rate(readings: list[Reading]) -> float:
    """The counter's rate from its first flush to its last in `readings`: a window that
    begins and ends on a flush counts whole flushes only (0 under two flushes)."""
    moved = flushes(readings)
    if len(moved) < 2 or moved[-1].at <= moved[0].at:
        return 0.0
    return (moved[-1].hashes - moved[0].hashes) / (moved[-1].at - moved[0].at)


def recovered_at(readings: list[Reading], rate: float, window: float) -> float | None:
    """The first flush from which the counter's rate over the next `window` seconds is back to
    RECOVERED of `rate`; None if none is yet. The first flush after a fault also carries what
    was mined while Redis could not take it: windows start on it, so it does not count."""
    moved = flushes(readings)
    for index, start in enumerate(moved):
        for end in moved[index + 1 :]:
            if end.at - start.at >= window:
                if (end.hashes - start.hashes) / (end.at - start.at) >= RECOVERED * rate:
                    return start.at
                break
    return None
