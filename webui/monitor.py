"""The web UI's monitor: sample the counters and heartbeats from Redis, keep a rolling history,
fit the rate, mark the changes of the worker count."""

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins.counter_sampler import CounterSampler
from dockercoins.rate import DEFAULT_WINDOW, Rate, window_rate
from dockercoins.redis_store import BadData, BadHeartbeat, Totals, WorkerHeartbeat, heartbeats
from dockercoins.settings import REDIS_TIMEOUT
from dockercoins.stages import STAGES, StageMerge
from webui.config import MARK_SETTLE

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.25
"""Seconds between two readings of Redis: four per flush keeps the fitted rate within a few %."""

POINT_INTERVAL = 1.0
"""Seconds between two points of the chart (and two pushes to the page)."""

HISTORY = 300.0
"""Seconds of chart the server keeps and sends to a page that connects."""


def redis_reason(exc: BaseException) -> str:
    """One line saying why Redis could not be read."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"Redis unreachable: {detail}"


def bad_data_reason(what: BadData | str) -> str:
    """One line saying what in Redis is not what the schema allows."""
    return f"bad data in Redis: {what}"


FULL_AT = 0.99
"""Share of `maxmemory` from which Redis counts as full: writes are refused at 100 %."""

REFUSED_RECENTLY = 5.0
"""Seconds Redis counts as full after it last refused a write for lack of memory (OOM)."""


class MemoryWatch:
    """Whether Redis refuses writes for lack of memory, from INFO memory and errorstats.

    With `maxmemory` and the `noeviction` policy, a full Redis answers writes with OOM: the
    workers pause and their heartbeats expire, which alone would look like "0 workers". A
    write can be refused below the cap too (its own size counts), so a rise of Redis's own
    count of OOM replies also means full, for REFUSED_RECENTLY seconds.
    """

    def __init__(self) -> None:
        self._refusals: int | None = None
        self._refused_at = -REFUSED_RECENTLY

    def reason(self, memory: Any, errors: Any) -> str | None:
        """Why Redis is full now, or None; `memory`, `errors`: INFO memory and errorstats
        (anything else, e.g. an error of a Redis that denies INFO: not known to be full)."""
        if not isinstance(memory, dict):
            return None
        cap = int(memory.get("maxmemory") or 0)
        if not cap or memory.get("maxmemory_policy") != "noeviction":
            return None
        refusals = (
            errors.get("errorstat_OOM", {}).get("count", 0) if isinstance(errors, dict) else 0
        )
        now = time.monotonic()
        if self._refusals is not None and refusals > self._refusals:
            self._refused_at = now
        self._refusals = refusals
        used = int(memory.get("used_memory") or 0)
        used -= int(memory.get("mem_not_counted_for_evict") or 0)
        if used < cap * FULL_AT and now - self._refused_at > REFUSED_RECENTLY:
            return None
        return (
            f"Redis full: {used / 2**20:.1f} of its maxmemory {cap / 2**20:.1f} MiB used, "
            "writes refused (noeviction): the workers wait; free memory or raise maxmemory"
        )


@dataclass(frozen=True, slots=True)
class ChartPoint:
    """One point of the speed chart: Redis time, hashes/s (None: a gap, Redis was down)."""

    seq: int
    time: float
    rate: float | None


@dataclass(frozen=True, slots=True)
class WorkerMark:
    """Where the number of live workers changed, and to what."""

    seq: int
    time: float
    workers: int


@dataclass
class Fleet:
    """What the live heartbeats say, folded as they are read (one heartbeat in hand at a time):
    the workers mining, the rng modes they name, their stage times, the keys that are not
    heartbeats."""

    mining: int = 0
    rng_modes: dict[str, int] = field(default_factory=dict)
    """Mode -> workers whose rng named it lately (a worker served by rng of both modes, as
    during a change, counts in both)."""
    stages: StageMerge = field(default_factory=StageMerge)
    first_bad: BadHeartbeat | None = None
    """The first key met that is not a heartbeat, said on the page."""
    bad_count: int = 0

    def add(self, heartbeat: WorkerHeartbeat | BadHeartbeat) -> None:
        """Count one heartbeat, or one bad key."""
        if isinstance(heartbeat, BadHeartbeat):
            self.bad_count += 1
            self.first_bad = self.first_bad or heartbeat
            return
        info = heartbeat.info
        self.mining += info.mining
        for mode in set((info.rng_mode or "").split(",")) - {""}:
            self.rng_modes[mode] = self.rng_modes.get(mode, 0) + 1
        if info.latency is not None:
            self.stages.add(info.latency)

    @property
    def bad_reason(self) -> str | None:
        """One line naming the first bad key (and how many more), None if none."""
        if self.first_bad is None:
            return None
        more = f" (and {self.bad_count - 1} more)" if self.bad_count > 1 else ""
        return bad_data_reason(f"{self.first_bad}{more}")


async def read_fleet(redis: Redis) -> Fleet:
    """Every live heartbeat, folded into a Fleet."""
    fleet = Fleet()
    async for heartbeat in heartbeats(redis):
        fleet.add(heartbeat)
    return fleet


def latency_fields(merged: dict[str, Any] | None) -> dict[str, Any]:
    """/json's and the page's view of the workers' stage times (`stages.StageMerge`): `latency`
    (p50 and p99 seconds per stage, each null when no worker reports), each stage's share of
    a unit's time, the whole unit's figures and the hashes per unit (1, or a turbo batch)."""
    if merged is None:
        return {
            "latency": dict.fromkeys(STAGES),
            "latency_share": dict.fromkeys(STAGES),
            "latency_unit": None,
            "hashes_per_unit": None,
        }
    return {
        "latency": merged["latency"],
        "latency_share": merged["share"],
        "latency_unit": {**merged["unit"], "units": merged["units"]},
        "hashes_per_unit": merged["hashes_per_unit"],
    }


class SpeedMonitor:
    """Reads Redis every `sample_interval` seconds and keeps what the page draws.

    Samples are timestamped by Redis `TIME`, so the rate is the same whichever
    process reads it; the chart gets one point per `point_interval`. A change of the worker
    count is marked once it has held for `mark_settle` seconds, where it began: one scaling
    step, whose heartbeats arrive over a second or two, draws one mark. A reading that takes
    longer than `read_timeout` seconds (DOCKERCOINS_REDIS_TIMEOUT) counts as Redis unreachable.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        sample_interval: float = SAMPLE_INTERVAL,
        point_interval: float = POINT_INTERVAL,
        window: float = DEFAULT_WINDOW,
        history: float = HISTORY,
        mark_settle: float = MARK_SETTLE,
        read_timeout: float = REDIS_TIMEOUT,
    ) -> None:
        self.redis = redis
        self.counter = CounterSampler.of_redis(redis, sample_interval, keep=window + 1)
        """The `hashes` counter of the last `window` + 1 seconds, read every `sample_interval`."""
        self.read_timeout = read_timeout
        """Seconds one reading may take (DOCKERCOINS_REDIS_TIMEOUT), then Redis is unreachable."""
        self.mark_settle = mark_settle
        self.point_interval = point_interval
        self.window = window
        self.history = history
        self.points: deque[ChartPoint] = deque()
        self.marks: deque[WorkerMark] = deque()
        self.totals: Totals | None = None
        self.rate: Rate | None = None
        self.workers: int | None = None
        self.rng_modes: dict[str, int] = {}
        self.stages: dict[str, Any] | None = None
        """Every live worker's stage times, merged (stages.StageMerge); None when none reports."""
        self._marked: int | None = None
        """The worker count of the last mark (or the first reading)."""
        self._change: tuple[float, float] | None = None
        """Since the last mark: when the count first changed, and when it last changed."""
        self.error: str | None = "Redis not read yet"
        self.status = "redis-unreachable"
        self._counted = False
        """Whether the last sample read the counters (a chart point has a rate)."""
        self._seq = 0
        self._next_point = 0.0
        self._outage = False
        self._clock_offset = 0.0
        self._tick = asyncio.Event()
        self._memory = MemoryWatch()

    def redis_now(self) -> float:
        """The Redis clock as last seen, carried on by the local clock while Redis is away."""
        return time.time() + self._clock_offset

    def _failed(self, status: str, reason: str) -> None:
        if self.status != status:
            log.warning("%s", reason)
        self.status, self.error = status, reason

    async def sample_once(self) -> None:
        """One reading of Redis; on failure, remember why and say so once (never raise a
        Redis error or bad data: the page shows the reason, the chart a gap). A key among the
        heartbeats that is not one is skipped and said; the rest of the sample stands."""
        try:
            async with asyncio.timeout(self.read_timeout):
                reading = await self.counter.read()
                fleet = await read_fleet(self.redis)
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.info("memory")  # both INFO: ~25 µs of Redis's time each sample
                    pipe.info("errorstats")
                    memory, errors = await pipe.execute(raise_on_error=False)
        except BadData as exc:
            self._counted = False
            self._failed("bad-data", bad_data_reason(exc))
            return
        except (RedisError, OSError, TimeoutError) as exc:
            self._counted = False
            self._outage = True
            self._failed("redis-unreachable", redis_reason(exc))
            return
        if self._outage:
            log.info("Redis reachable again")
            self._outage = False
        full = self._memory.reason(memory, errors)
        if full is not None:
            self._failed("redis-full", full)
        elif fleet.bad_reason is not None:
            self._failed("bad-data", fleet.bad_reason)
        else:
            if self.status in ("bad-data", "redis-full"):
                log.info("Redis is back to normal: its data as expected, room for writes")
            self.status, self.error = "live", None
        totals = reading.totals
        self._clock_offset = totals.now - time.time()
        self.totals = totals
        self._counted = True
        self.rng_modes = dict(sorted(fleet.rng_modes.items()))
        self.stages = fleet.stages.result()
        self._count_workers(fleet.mining, totals.now)
        self.counter.add(reading)
        self.rate = window_rate(self.counter.samples(), self.window)

    @property
    def rng_mode(self) -> str | None:
        """The mode the workers' rng named, "mixed" while they disagree; None if none did."""
        if not self.rng_modes:
            return None
        return next(iter(self.rng_modes)) if len(self.rng_modes) == 1 else "mixed"

    def _count_workers(self, workers: int, now: float) -> None:
        """Take a new count; mark a change, at its first step, once it has settled."""
        if self.workers is None:
            self._marked = workers
        elif workers != self.workers:
            self._change = (self._change[0] if self._change else now, now)
        self.workers = workers
        if self._change is not None and now - self._change[1] >= self.mark_settle:
            if workers != self._marked:
                self._seq += 1
                self.marks.append(WorkerMark(self._seq, self._change[0], workers))
                self._marked = workers
            self._change = None

    def add_point(self) -> ChartPoint:
        """Close one chart interval: the current rate, or a gap while Redis cannot be read."""
        self._seq += 1
        if self._counted and self.totals is not None:
            rate = self.rate.per_second if self.rate else None
            point = ChartPoint(self._seq, self.totals.now, rate)
        else:
            point = ChartPoint(self._seq, self.redis_now(), None)
        self.points.append(point)
        oldest = point.time - self.history
        while self.points and self.points[0].time < oldest:
            self.points.popleft()
        while self.marks and self.marks[0].time < oldest:
            self.marks.popleft()
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        return point

    async def run(self, stop: asyncio.Event | None = None, points: int | None = None) -> None:
        """Sample until `stop` is set (or, with `points`, until that many chart points more are
        added), adding a chart point every `point_interval`."""
        stop = stop or asyncio.Event()
        left = math.inf if points is None else points
        self._next_point = time.monotonic() + self.point_interval
        if self._tick.is_set():  # set by the end of an earlier run
            self._tick = asyncio.Event()

        async def step() -> None:
            nonlocal left
            left -= await self._sample_and_point()
            if left <= 0:
                stop.set()

        await self.counter.run(stop, step)
        self._tick.set()  # wake the streams, so that they see `stop`

    async def _sample_and_point(self) -> bool:
        """One step of `run`: a reading, and a chart point when one is due; whether one was."""
        await self.sample_once()
        if time.monotonic() < self._next_point:
            return False
        self.add_point()
        self._next_point += self.point_interval
        self._next_point = max(self._next_point, time.monotonic())
        return True

    async def next_point(self) -> None:
        """Wait until the next chart point is added."""
        await self._tick.wait()

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest point or mark."""
        return self._seq

    def snapshot(self, after: int = 0) -> dict[str, Any]:
        """What the page needs: current numbers, plus the points and marks newer than `after`."""
        totals = self.totals
        return {
            "status": self.status,
            "reason": self.error,
            "hashes": totals.hashes if totals else None,
            "coins": totals.coins if totals else None,
            "now": totals.now if totals else None,
            "speed": self.rate.per_second if self.rate else None,
            "spread": self.rate.stderr if self.rate else None,
            "window": self.window,
            "workers": self.workers,
            "rng_mode": self.rng_mode,
            "rng_modes": self.rng_modes,
            **latency_fields(self.stages),
            "reset": after == 0,
            "seq": self._seq,
            "points": [[p.time, p.rate] for p in self.points if p.seq > after],
            "marks": [[m.time, m.workers] for m in self.marks if m.seq > after],
        }
