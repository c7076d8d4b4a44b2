"""Where a unit of work spends its time: per-stage histograms in the worker, merged in the web UI.

A worker times each stage of every unit with its own monotonic clock, from one reading to the
next, so that a unit's stages add up to its wall time. It counts each time in a fixed
logarithmic bucket (PER_DECADE per decade, about 6 % wide) of the slot in hand, and adds it to
the bucket's sum; its heartbeat sums the slots of the last window and publishes, per stage,
p50, p99, the sum and the non-empty buckets. The web UI merges the buckets of every live
worker, so its percentiles are those of all their units, not an average of percentiles. A
percentile is the mean of the times in the bucket it falls in: within 3 % of the true one, and
exact when they are alike (a fixed think time reads 100.3 ms, not a bucket's middle).

What a heartbeat publishes is read back through `Summary`, which accepts only what `StageTimes`
can write (finite, bounded numbers of the right types, stages that fit in the unit): the merge
does its arithmetic on validated numbers only, so no heartbeat can make it raise or yield a
non-finite figure.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGES = ("think", "rng", "hasher", "redis")
"""The stages of a unit of work, in the order a unit goes through them."""

UNIT = "unit"
"""A unit's whole wall time: the sum of its stages."""

PER_DECADE = 40
SMALLEST = 1e-7
"""Seconds below which a time counts in bucket 0."""

BUCKETS = 1 + 10 * PER_DECADE
"""Bucket 0 (below SMALLEST), then 10 decades: from 0.1 µs to 1000 s, the last one open."""

_LOG_SMALLEST = math.log10(SMALLEST)

Buckets = Mapping[int, tuple[int, float]]
"""Bucket index -> (times counted, their sum in seconds)."""


def bucket_of(seconds: float) -> int:
    """The bucket a time falls in."""
    if seconds < SMALLEST:
        return 0
    return min(BUCKETS - 1, 1 + int((math.log10(seconds) - _LOG_SMALLEST) * PER_DECADE))


def quantile(buckets: Buckets, fraction: float) -> float | None:
    """The `fraction` quantile (nearest rank) of bucketed times: the mean of the times in the
    bucket where it falls, to 4 significant digits; None when there are none."""
    total = sum(count for count, _ in buckets.values())
    if not total:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for index in sorted(buckets):
        count, seconds = buckets[index]
        seen += count
        if seen >= rank:
            return float(f"{max(seconds, 0.0) / count:.4g}")
    raise AssertionError("unreachable: the last bucket reaches the total")


class _Slot:
    """The units finished during one slot of the window."""

    __slots__ = ("counts", "started", "sums", "units")

    def __init__(self, started: float) -> None:
        self.started = started
        self.units = 0
        self.counts = [[0] * BUCKETS for _ in range(len(STAGES) + 1)]
        self.sums = [[0.0] * BUCKETS for _ in range(len(STAGES) + 1)]


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
        counts, sums = slot.counts, slot.sums
        for index, seconds in enumerate((think, rng, hasher, redis, think + rng + hasher + redis)):
            bucket = bucket_of(seconds)
            counts[index][bucket] += 1
            sums[index][bucket] += seconds

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
        the sum of seconds and the non-empty buckets ({"index": [count, seconds]})."""
        self._rotate()
        slots = [slot for slot in self._slots if slot.units]
        result: dict[str, Any] = {
            "window": self.slot_length * len(self._slots),
            "units": sum(slot.units for slot in slots),
            "hashes_per_unit": hashes_per_unit,
        }
        for index, name in enumerate((*STAGES, UNIT)):
            buckets: dict[int, tuple[int, float]] = {}
            for slot in slots:
                sums = slot.sums[index]
                for bucket, count in enumerate(slot.counts[index]):
                    if count:
                        was = buckets.get(bucket, (0, 0.0))
                        buckets[bucket] = (was[0] + count, was[1] + sums[bucket])
            result[name] = {
                "p50": quantile(buckets, 0.5),
                "p99": quantile(buckets, 0.99),
                "sum": sum(seconds for _, seconds in buckets.values()),
                "buckets": {  # 6 significant digits: a heartbeat a third smaller
                    str(bucket): [count, float(f"{seconds:.6g}")]
                    for bucket, (count, seconds) in buckets.items()
                },
            }
        return result


MAX_COUNT = 2**53
"""Most units one heartbeat may report (in all, or in a bucket): exact as a JSON number."""

MAX_SECONDS = 1e9
"""Most seconds one bucket may sum: far beyond any window (3600 s x 1024 loops), finite when
every worker's are added up."""

MAX_HASHES_PER_UNIT = 1e6
"""Most hashes a unit of work may stand for (a batch is at most the wire's MAX_BATCH)."""

STAGE_ROUNDING = 1e-3
"""How much a window's stages may sum beyond its units' wall time: each bucket's seconds are
published to 6 significant digits."""

_STRICT = ConfigDict(strict=True, frozen=True, extra="ignore")
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
BucketIndex = Annotated[int, Field(ge=0, lt=BUCKETS)]


class StageFigures(BaseModel):
    """One stage of a published window, as read back: its non-empty buckets, `"index":
    [count, seconds]`. Its p50, p99 and sum are not read: the merge computes them again."""

    model_config = _STRICT

    buckets: dict[BucketIndex, tuple[Count, Seconds]] = Field(max_length=BUCKETS)

    @property
    def seconds(self) -> float:
        """The seconds of every time counted."""
        return sum(seconds for _, seconds in self.buckets.values())


class Summary(BaseModel):
    """A worker's window as its heartbeat publishes it (`StageTimes.summary`), validated."""

    model_config = _STRICT

    units: Count
    hashes_per_unit: Annotated[float, Field(ge=1, le=MAX_HASHES_PER_UNIT, allow_inf_nan=False)] = (
        1.0
    )
    think: StageFigures
    rng: StageFigures
    hasher: StageFigures
    redis: StageFigures
    unit: StageFigures

    @model_validator(mode="after")
    def _stages_fit_in_the_unit(self) -> "Summary":
        stages = sum(getattr(self, name).seconds for name in STAGES)
        if stages > self.unit.seconds * (1 + STAGE_ROUNDING):
            raise ValueError(
                f"its stages sum {stages:.6g} s, more than its units' {self.unit.seconds:.6g} s"
            )
        return self


class StageMerge:
    """Every worker's window as one, added a heartbeat at a time: p50 and p99 per stage over
    all their units, each stage's share of a unit's time, the units and the mean hashes per
    unit. Holds one set of buckets, however many heartbeats are added."""

    def __init__(self) -> None:
        self.units = 0
        self.hashes = 0.0
        self.buckets: dict[str, dict[int, tuple[int, float]]] = {
            name: {} for name in (*STAGES, UNIT)
        }

    def add(self, summary: Summary) -> None:
        """Count one worker's window (one without units counts for nothing)."""
        if not summary.units:
            return
        self.units += summary.units
        self.hashes += summary.units * summary.hashes_per_unit
        for name, into in self.buckets.items():
            for bucket, (count, seconds) in getattr(summary, name).buckets.items():
                was = into.get(bucket, (0, 0.0))
                into[bucket] = (was[0] + count, was[1] + seconds)

    def result(self) -> dict[str, Any] | None:
        """The merged figures; None when no unit was added."""
        if not self.units:
            return None
        merged = self.buckets
        sums = {name: sum(seconds for _, seconds in merged[name].values()) for name in merged}
        wall = sums[UNIT]
        return {
            "latency": {
                name: {"p50": quantile(merged[name], 0.5), "p99": quantile(merged[name], 0.99)}
                for name in STAGES
            },
            "share": {name: (round(sums[name] / wall, 4) if wall > 0 else None) for name in STAGES},
            "unit": {
                "p50": quantile(merged[UNIT], 0.5),
                "p99": quantile(merged[UNIT], 0.99),
                "mean": float(f"{wall / self.units:.6g}"),
            },
            "units": self.units,
            "hashes_per_unit": round(self.hashes / self.units, 2),
        }


def merge(summaries: Iterable[Summary]) -> dict[str, Any] | None:
    """Every worker's window as one (`StageMerge`); None when no unit."""
    merging = StageMerge()
    for summary in summaries:
        merging.add(summary)
    return merging.result()
