"""The honest rate of a counter: a least-squares slope over a window of Redis-timestamped samples.

Workers add to the `hashes` counter in chunks about once a second, and a reader
polls about once a second too, so one poll sees 0 chunks and the next sees 2:
the original's two-poll difference swings between 0 and twice the truth. A
straight line fitted to every sample of the last few seconds does not care when
inside the window the chunks landed.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_WINDOW = 10.0
"""Seconds of samples one rate is fitted over."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a counter: `time` in seconds (Redis `TIME`), `value` the counter."""

    time: float
    value: float


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate fitted over a window: per second, its standard error, and what it rests on."""

    per_second: float
    stderr: float
    samples: int
    span: float


def since_last_reset(samples: Sequence[Sample]) -> Sequence[Sample]:
    """The samples after the counter last went down (Redis emptied or restarted without data)."""
    start = 0
    for index in range(1, len(samples)):
        if samples[index].value < samples[index - 1].value:
            start = index
    return samples[start:]


def fit_slope(samples: Sequence[Sample]) -> Rate | None:
    """Least-squares slope of value over time, with its standard error; None under 2 samples.

    The standard error comes from the residuals (n - 2 degrees of freedom); with
    exactly two samples, or a perfect line, it is 0.
    """
    count = len(samples)
    if count < 2:
        return None
    mean_t = sum(s.time for s in samples) / count
    mean_v = sum(s.value for s in samples) / count
    sxx = sum((s.time - mean_t) ** 2 for s in samples)
    if sxx <= 0:
        return None
    sxy = sum((s.time - mean_t) * (s.value - mean_v) for s in samples)
    slope = sxy / sxx
    stderr = 0.0
    if count > 2:
        intercept = mean_v - slope * mean_t
        residuals = sum((s.value - intercept - slope * s.time) ** 2 for s in samples)
        stderr = math.sqrt(residuals / (count - 2) / sxx)
    span = samples[-1].time - samples[0].time
    return Rate(per_second=slope, stderr=stderr, samples=count, span=span)


def window_rate(
    samples: Iterable[Sample], window: float = DEFAULT_WINDOW, now: float | None = None
) -> Rate | None:
    """The rate over the last `window` seconds up to `now` (default: the newest sample).

    `samples` must be in time order. Samples before a counter reset are ignored;
    None when fewer than two samples remain.
    """
    ordered = list(samples)
    if not ordered:
        return None
    end = ordered[-1].time if now is None else now
    recent = [s for s in ordered if end - window <= s.time <= end]
    return fit_slope(since_last_reset(recent))
