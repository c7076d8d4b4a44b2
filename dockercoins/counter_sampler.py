"""The Redis counters read on a schedule, the readings kept: the one loop of the web UI, the
bench and the experiment."""

import asyncio
import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins.lifecycle import raise_if_cancelling
from dockercoins.rate import Sample
from dockercoins.redis_store import BadData, Totals, read_totals


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of the counters: `at` on this process's monotonic clock (halfway through
    the read), `totals` as Redis gave them, timestamped by its clock."""

    at: float
    totals: Totals

    @property
    def hashes(self) -> int:
        return self.totals.hashes

    @property
    def sample(self) -> Sample:
        """The `hashes` counter at Redis's time, for a fitted rate (`dockercoins.rate`)."""
        return Sample(self.totals.now, self.totals.hashes)


class CounterSampler:
    """Reads the counters every `every` seconds until stopped, and keeps the readings of the
    last `keep` seconds of Redis time (all by default).

    `read` is where the counters come from: `read_totals` of a Redis client (`of_redis`), or
    any other source of `Totals`. Each step of `run` is `step` (by default `sample_answered`);
    the next starts `every` seconds after the last began, or at once if it took longer.
    """

    def __init__(
        self, read: Callable[[], Awaitable[Totals]], every: float, keep: float = math.inf
    ) -> None:
        self._read = read
        self.every = every
        self.keep = keep
        self.readings: deque[Reading] = deque()
        self._stop = asyncio.Event()

    @classmethod
    def of_redis(cls, redis: Redis, every: float, keep: float = math.inf) -> "CounterSampler":
        """A sampler of this Redis's counters."""
        return cls(functools.partial(read_totals, redis), every, keep)

    async def read(self) -> Reading:
        """One reading, not kept yet; raises what the source raises."""
        asked = time.monotonic()
        totals = await self._read()
        return Reading((asked + time.monotonic()) / 2, totals)

    def add(self, reading: Reading) -> None:
        """Keep `reading`, and drop those more than `keep` seconds older (Redis time)."""
        self.readings.append(reading)
        oldest = reading.totals.now - self.keep
        while self.readings[0].totals.now < oldest:
            self.readings.popleft()

    async def sample(self) -> Reading:
        """Read and keep one reading."""
        reading = await self.read()
        self.add(reading)
        return reading

    async def sample_answered(self) -> Reading | None:
        """Read and keep one reading; None, and nothing kept, when Redis does not answer
        (paused, restarting, away) or its counters hold bad data."""
        try:
            return await self.sample()
        except (RedisError, OSError, BadData):
            raise_if_cancelling()
            return None

    def samples(self) -> list[Sample]:
        """The kept readings as samples of the `hashes` counter, oldest first."""
        return [reading.sample for reading in self.readings]

    def between(self, start: float, end: float = math.inf) -> list[Reading]:
        """The kept readings taken from `start` to `end` (monotonic clock)."""
        return [reading for reading in self.readings if start <= reading.at <= end]

    async def run(
        self,
        stop: asyncio.Event | None = None,
        step: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Run `step` every `every` seconds until `stop` (or `self.stop()`) is set; stopped
        by an event, never cancelled mid-reading."""
        stopped = self._stop if stop is None else stop
        while not stopped.is_set():
            started = time.monotonic()
            await (step or self.sample_answered)()
            pause = max(0.0, self.every - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):  # no task of its own, unlike wait_for
                    await stopped.wait()

    async def run_for(self, seconds: float) -> None:
        """Sample for `seconds`, then stop."""
        task = asyncio.create_task(self.run())
        await asyncio.sleep(seconds)
        self.stop()
        await task

    def stop(self) -> None:
        """End `run` (when it waits on the sampler's own event) after its current step."""
        self._stop.set()
