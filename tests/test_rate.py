"""The windowed rate against synthetic counter series of known slope."""

import random
import statistics
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dockercoins.rate import Sample, fit_slope, since_last_reset, window_rate

TRUE_RATE = 100.0


def two_poll_rate(previous: Sample, current: Sample) -> float:
    """The original web UI's speed: difference of two polls over their time apart."""
    elapsed = current.time - previous.time
    if elapsed <= 0:
        return 0.0
    return (current.value - previous.value) / elapsed


def staircase(
    poll: float, seed: int, workers: int = 1, duration: float = 60.0, flush: float = 1.0
) -> list[Sample]:
    """A `hashes` counter fed by workers that flush their count about once a second.

    Each worker adds the work done since its last flush (TRUE_RATE / workers per
    second) at flush times jittered by up to 50 ms; the reader polls every
    `poll` seconds, jittered too. This is the pattern that gives a 1-second poll
    0 chunks one time and 2 the next.
    """
    rnd = random.Random(seed)
    flushes: list[tuple[float, float]] = []
    for _ in range(workers):
        previous, at = 0.0, rnd.uniform(0, flush)
        while at < duration:
            flushes.append((at, TRUE_RATE / workers * (at - previous)))
            previous, at = at, at + flush + rnd.uniform(-0.05, 0.05)
    flushes.sort()
    samples, at = [], rnd.uniform(0, poll)
    while at < duration:
        value = sum(chunk for when, chunk in flushes if when <= at)
        samples.append(Sample(at, value))
        at += poll + rnd.uniform(-0.05, 0.05) * poll
    return samples


def test_two_polls_swing_between_zero_and_double_while_the_window_holds() -> None:
    naive: list[float] = []
    windowed_errors: list[float] = []
    for seed in range(40):
        polls = staircase(poll=1.0, seed=seed)
        naive += [two_poll_rate(a, b) for a, b in pairwise(polls[1:])]
        samples = staircase(poll=0.25, seed=seed)
        for end in range(48, len(samples)):  # once a full 10 s window exists
            rate = window_rate(samples[: end + 1])
            assert rate is not None
            windowed_errors.append(abs(rate.per_second - TRUE_RATE) / TRUE_RATE)

    assert min(naive) < 0.1 * TRUE_RATE
    assert max(naive) > 1.8 * TRUE_RATE
    assert max(windowed_errors) < 0.07
    assert statistics.median(windowed_errors) < 0.02


def test_window_at_one_poll_per_second_never_swings_like_two_polls() -> None:
    errors = []
    for seed in range(40):
        samples = staircase(poll=1.0, seed=seed)
        for end in range(11, len(samples)):
            rate = window_rate(samples[: end + 1])
            assert rate is not None
            errors.append(abs(rate.per_second - TRUE_RATE) / TRUE_RATE)
    assert max(errors) < 0.25
    assert statistics.median(errors) < 0.03


def test_many_workers_smooth_the_staircase() -> None:
    samples = staircase(poll=1.0, seed=7, workers=10)
    rate = window_rate(samples)
    assert rate is not None
    assert rate.per_second == pytest.approx(TRUE_RATE, rel=0.03)


def test_spread_reflects_the_staircase_and_vanishes_on_a_line() -> None:
    line = [Sample(t, 5 + 3 * t) for t in range(10)]
    exact = fit_slope(line)
    assert exact is not None
    assert exact.per_second == pytest.approx(3)
    assert exact.stderr == pytest.approx(0, abs=1e-9)
    assert exact.samples == 10
    assert exact.span == 9

    stairs = window_rate(staircase(poll=0.25, seed=1))
    assert stairs is not None
    assert 0 < stairs.stderr / stairs.per_second < 0.1


def test_window_keeps_only_the_last_seconds() -> None:
    slow = [Sample(t, 1.0 * t) for t in range(0, 30)]
    fast = [Sample(t, 30 + 50.0 * (t - 30)) for t in range(30, 45)]
    rate = window_rate(slow + fast, window=10)
    assert rate is not None
    assert rate.per_second == pytest.approx(50)
    assert rate.span == 10


def test_counter_reset_starts_the_fit_again() -> None:
    before = [Sample(t, 1000 + 10.0 * t) for t in range(5)]
    after = [Sample(t, 20.0 * (t - 5)) for t in range(5, 10)]
    assert since_last_reset(before + after) == after
    rate = window_rate(before + after)
    assert rate is not None
    assert rate.per_second == pytest.approx(20)


def test_too_few_samples_give_no_rate() -> None:
    assert window_rate([]) is None
    assert window_rate([Sample(1, 1)]) is None
    assert fit_slope([Sample(1, 1), Sample(1, 2)]) is None
    assert two_poll_rate(Sample(1, 1), Sample(1, 5)) == 0


@given(
    slope=st.floats(0, 1e6),
    intercept=st.integers(0, 10**9),
    step=st.floats(0.05, 2),
    count=st.integers(2, 60),
)
def test_any_line_is_recovered(slope: float, intercept: int, step: float, count: int) -> None:
    samples = [Sample(1.7e9 + i * step, intercept + slope * i * step) for i in range(count)]
    rate = fit_slope(samples)
    assert rate is not None
    # The times themselves are rounded: at 1.7e9 s a float is exact to 2.4e-7 s, so a 0.05 s
    # step is known to 5e-6 of itself, and the fit can be no closer than that.
    assert rate.per_second == pytest.approx(slope, rel=1e-5, abs=1e-3)
