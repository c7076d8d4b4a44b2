"""Where a unit of work spends its time: per-stage histograms in the worker, merged in the web UI.

A worker times each stage of every unit with its own monotonic clock, from one reading to the
next, so that a unit's stages add up to its wall time. It counts each time in a fixed
logarithmic bucket (PER_DECADE per decade, about 6 % wide: a percentile is known within 3 %)
of the slot in hand; its heartbeat sums the slots of the last window and publishes, per stage,
p50, p99, the sum and the non-empty buckets. The web UI merges the buckets of every live
worker, so its percentiles are those of all their units, not an average of percentiles.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

STAGES = ("think", "rng", "hasher", "redis")
"""The stages of a unit of work, in the order a unit goes through them."""

UNIT = "unit"
"""A unit's whole wall time: the sum of its stages."""

PER_DECADE = 40
SMALLEST = 1e-7
"""Seconds below which a time counts as 0 (bucket 0)."""

BUCKETS = 1 + 10 * PER_DECADE
"""Bucket 0 (below SMALLEST), then 10 decades: from 0.1 µs to 1000 s, the last one open."""

_LOG_SMALLEST = math.log10(SMALLEST)


def bucket_of(seconds: float) -> int:
    """The bucket a time falls in."""
    if seconds < SMALLEST:
        return 0
    return min(BUCKETS - 1, 1 + int((math.log10(seconds) - _LOG_SMALLEST) * PER_DECADE))


def bucket_seconds(index: int) -> float:
    """The time a bucket stands for: the geometric middle of its bounds (0 for bucket 0), to
    4 significant digits (a bucket is 6 % wide: more would be noise)."""
    if index <= 0:
        return 0.0
    return float(f"{10 ** (_LOG_SMALLEST + (index - 0.5) / PER_DECADE):.4g}")


def quantile(counts: Mapping[int, int], fraction: float) -> float | None:
    """The `fraction` quantile (nearest rank) of bucket counts; None when they are empty."""
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return bucket_seconds(index)
    return bucket_seconds(max(counts))  # unreachable: the last bucket reaches the total


class _Slot:
    """The units finished during one slot of the window."""

    __slots__ = ("counts", "started", "sums", "units")

    def __init__(self, started: float) -> None:
        self.started = started
        self.units = 0
        self.sums = [0.0] * (len(STAGES) + 1)
        self.counts = [[0] * BUCKETS for _ in range(len(STAGES) + 1)]


class StageTimes:
    """A worker's stage times over the last `window` seconds, in `slots` rotating slots.

    `add` is called once per unit (a few microseconds: no clock, no allocation, no lock) and
    counts it in the slot in hand; `summary`, at heartbeat time, rotates the slots and sums
    them, so the window is `window` seconds give or take a heartbeat interval.
    """

    def __init__(
        self, window: float, slots: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slot_length = window / slots
        self._clock = clock
        self._slots: deque[_Slot] = deque([_Slot(clock())], maxlen=slots)
        self._current = self._slots[-1]

    def add(self, think: float, rng: float, hasher: float, redis: float) -> None:
        """Count one finished unit: the seconds of each stage."""
        slot = self._current
        slot.units += 1
        sums, counts = slot.sums, slot.counts
        for index, seconds in enumerate((think, rng, hasher, redis, think + rng + hasher + redis)):
            sums[index] += seconds
            counts[index][bucket_of(seconds)] += 1

    def _rotate(self) -> None:
        now = self._clock()
        slot = self._current
        # After a long gap (no heartbeat while Redis was away) start afresh: the slots are old.
        if now - slot.started >= self.slot_length * (self._slots.maxlen or 1):
            self._slots.clear()
            self._current = _Slot(now)
            self._slots.append(self._current)
            return
        while now - self._current.started >= self.slot_length:
            self._current = _Slot(self._current.started + self.slot_length)
            self._slots.append(self._current)

    def summary(self, hashes_per_unit: int) -> dict[str, Any]:
        """The window's figures, for the heartbeat: units, and per stage (and `unit`) p50, p99,
        the sum of seconds and the non-empty buckets ({"index": count})."""
        self._rotate()
        units = sum(slot.units for slot in self._slots)
        result: dict[str, Any] = {
            "window": self.slot_length * len(self._slots),
            "units": units,
            "hashes_per_unit": hashes_per_unit,
        }
        for index, name in enumerate((*STAGES, UNIT)):
            merged = [0] * BUCKETS
            for slot in self._slots:
                if slot.units:
                    merged = [a + b for a, b in zip(merged, slot.counts[index], strict=True)]
            counts = {bucket: count for bucket, count in enumerate(merged) if count}
            result[name] = {
                "p50": quantile(counts, 0.5),
                "p99": quantile(counts, 0.99),
                "sum": sum(slot.sums[index] for slot in self._slots),
                "buckets": {str(bucket): count for bucket, count in counts.items()},
            }
        return result


def merge(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Every worker's window as one: p50 and p99 per stage over all their units, each stage's
    share of a unit's time, the units and the mean hashes per unit. None when no unit."""
    units = 0
    hashes = 0.0
    counts: dict[str, dict[int, int]] = {name: {} for name in (*STAGES, UNIT)}
    sums = dict.fromkeys((*STAGES, UNIT), 0.0)
    for summary in summaries:
        try:
            n = int(summary.get("units") or 0)
            if n <= 0:
                continue
            per_unit = float(summary.get("hashes_per_unit") or 1)
            stages = {name: summary[name] for name in (*STAGES, UNIT)}
            parsed = {
                name: (
                    float(stage["sum"]),
                    {int(k): int(v) for k, v in stage["buckets"].items()},
                )
                for name, stage in stages.items()
            }
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # a heartbeat from another version, or damaged: not counted
        units += n
        hashes += n * per_unit
        for name, (total, buckets) in parsed.items():
            sums[name] += total
            into = counts[name]
            for bucket, count in buckets.items():
                into[bucket] = into.get(bucket, 0) + count
    if not units:
        return None
    wall = sums[UNIT]
    return {
        "latency": {
            name: {"p50": quantile(counts[name], 0.5), "p99": quantile(counts[name], 0.99)}
            for name in STAGES
        },
        "share": {name: (round(sums[name] / wall, 4) if wall > 0 else None) for name in STAGES},
        "unit": {
            "p50": quantile(counts[UNIT], 0.5),
            "p99": quantile(counts[UNIT], 0.99),
            "mean": float(f"{wall / units:.6g}"),
        },
        "units": units,
        "hashes_per_unit": round(hashes / units, 2),
    }
