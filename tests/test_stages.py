"""Stage times: the buckets keep a percentile within 3 %, the window forgets, workers merge."""

import json
import random
import statistics
from typing import Any

import pytest
from pydantic import ValidationError

from dockercoins.stages import STAGES, StageTimes, Summary, bucket_of, merge, quantile


def read_back(summary: dict[str, Any]) -> Summary:
    """A window as the web UI reads it back from a heartbeat: through JSON, validated."""
    return Summary.model_validate_json(json.dumps(summary))


def buckets_of(values: list[float]) -> dict[int, tuple[int, float]]:
    buckets: dict[int, tuple[int, float]] = {}
    for value in values:
        count, seconds = buckets.get(bucket_of(value), (0, 0.0))
        buckets[bucket_of(value)] = (count + 1, seconds + value)
    return buckets


@pytest.mark.parametrize("scale", [2e-6, 3e-4, 0.1, 0.9, 40.0])
def test_percentiles_from_buckets_are_within_3_percent(scale: float) -> None:
    rng = random.Random(13)
    values = [scale * rng.lognormvariate(0, 0.5) for _ in range(5001)]
    buckets = buckets_of(values)
    assert quantile(buckets, 0.5) == pytest.approx(statistics.median(values), rel=0.03)
    p99 = sorted(values)[int(0.99 * len(values))]
    assert quantile(buckets, 0.99) == pytest.approx(p99, rel=0.03)


def test_times_that_are_alike_read_as_they_are() -> None:
    """A fixed cost reads as itself, not as the middle of its bucket."""
    assert quantile(buckets_of([0.1003] * 9 + [0.1004]), 0.5) == 0.1003
    assert quantile(buckets_of([0.0, 0.0, 2e-5]), 0.5) == 0.0
    assert bucket_of(1e6) == bucket_of(1e4)  # the last bucket is open
    assert quantile({}, 0.5) is None


def test_the_window_forgets_old_units_and_reports_every_stage() -> None:
    now = [0.0]
    times = StageTimes(window=10, slots=10, clock=lambda: now[0])
    for _ in range(50):
        times.add(0.1, 0.8, 0.1, 0.0001)
    first = times.summary(hashes_per_unit=1)
    assert first["units"] == 50
    assert first["rng"]["p50"] == pytest.approx(0.8, rel=0.03)
    assert first["unit"]["p50"] == pytest.approx(1.0001, rel=0.03)
    assert first["rng"]["sum"] == pytest.approx(40.0)
    assert sum(count for count, _ in first["think"]["buckets"].values()) == 50
    assert first["rng"]["p50"] == 0.8

    now[0] = 5.0  # half a window later (heartbeats rotate the slots): still counted
    times.summary(1)
    times.add(0.1, 0.2, 0.1, 0.0)
    assert times.summary(1)["units"] == 51
    now[0] = 10.5  # the first slot has left the window
    assert times.summary(1)["units"] == 1
    now[0] = 500.0  # long after (no heartbeat while Redis was away): nothing left
    empty = times.summary(1)
    assert empty["units"] == 0 and empty["rng"]["p50"] is None


def test_merge_is_the_percentile_of_every_workers_units() -> None:
    slow, fast = StageTimes(10), StageTimes(10)
    for _ in range(90):
        slow.add(0.1, 0.9, 0.1, 0.0)
    for _ in range(10):
        fast.add(0.1, 0.1, 0.1, 0.0)
    idle = StageTimes(10).summary(1)
    merged = merge([read_back(slow.summary(1)), read_back(fast.summary(1000)), read_back(idle)])
    assert merged is not None
    assert merged["units"] == 100
    assert merged["latency"]["rng"]["p50"] == pytest.approx(0.9, rel=0.03)
    assert merged["latency"]["rng"]["p99"] == pytest.approx(0.9, rel=0.03)
    assert merged["latency"]["hasher"]["p50"] == pytest.approx(0.1, rel=0.03)
    assert set(merged["latency"]) == set(STAGES)
    # Shares come from the sums, so they add up to the whole unit.
    assert sum(merged["share"].values()) == pytest.approx(1.0, abs=0.001)
    assert merged["share"]["rng"] == pytest.approx(81.9 / (81.9 + 20), rel=0.001)
    assert merged["hashes_per_unit"] == pytest.approx((90 + 10_000) / 100)
    assert merge([]) is None


def test_a_window_read_back_is_only_what_a_worker_can_write() -> None:
    """Non-finite or huge numbers, wrong types, a bucket out of range, stages longer than the
    unit: refused where the heartbeat is read, so the merge only ever sees sane numbers."""
    times = StageTimes(10)
    for _ in range(20):
        times.add(0.1, 0.2, 0.1, 0.001)
    good = times.summary(1)
    assert read_back(good).units == 20
    bucket = next(iter(good["rng"]["buckets"]))

    def spoiled(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(good))
        node = copy
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return copy

    for path, value in [
        (("units",), float("inf")),
        (("units",), 2**64),
        (("units",), -1),
        (("units",), "20"),
        (("hashes_per_unit",), float("nan")),
        (("hashes_per_unit",), 0),
        (("rng", "buckets", bucket, 1), float("inf")),
        (("rng", "buckets", bucket, 1), 1e300),
        (("rng", "buckets", bucket, 0), 1.5),
        (("rng", "buckets", bucket), [1]),
        (("rng", "buckets", "401"), [1, 0.1]),
        (("rng", "buckets", "-1"), [1, 0.1]),
        (("rng", "buckets", bucket, 1), 5000.0),  # the rng stage longer than the whole unit
        (("rng",), None),
    ]:
        with pytest.raises(ValidationError):
            read_back(spoiled(path, value))
