"""The flusher: the ledger's count and coins into Redis on a schedule, with the heartbeat, and a
last flush when the miner stops."""

import asyncio
import logging
import os
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins import redis_store
from dockercoins.backoff import OutageLog
from dockercoins.lifecycle import raise_if_cancelling
from worker_svc.config import WorkerSettings
from worker_svc.health import HealthWatch
from worker_svc.ledger import Ledger
from worker_svc.metrics import WORKER_ERRORS
from worker_svc.units import Units, wait_for_event

log = logging.getLogger(__name__)

STEP = "flusher"
"""The flusher's name among the steps liveness watches."""


class Flusher:
    """Writes the ledger to Redis: the count (and the heartbeat) once per flush interval, the
    coins also in between once many wait, and everything when the miner stops.

    An error of Redis (down, full, too slow, bad data) is an outage, said once on
    `units.outages`; the work stays in the ledger (`units.ledger`), and mining goes on until
    the ledger's bounds pause it. The heartbeat says whether the worker mines (`health`), rng's
    mode and the units' stage times.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        redis: Redis,
        units: Units,
        health: HealthWatch,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.units = units
        self.health = health
        self.ledger: Ledger = units.ledger
        self.outages: OutageLog = units.outages

    def _step(self) -> None:
        self.units.step(STEP)

    async def run(self) -> None:
        """The count once per interval; coins also in between when many are waiting."""
        ledger, interval = self.ledger, self.settings.worker_flush_interval
        due = time.monotonic() + interval
        while True:
            self._step()
            wait = max(0.0, due - time.monotonic())
            if self.outages.is_down("redis"):
                await asyncio.sleep(wait)  # coins piling up change nothing until the next try
            else:
                await wait_for_event(ledger.coins_waiting, wait)
            ledger.coins_waiting.clear()
            if time.monotonic() >= due:
                due = time.monotonic() + interval
                await self.flush_counters()
            else:
                await self.flush(coins_only=True)

    def heartbeat(self) -> redis_store.Heartbeat:
        """What the worker says of itself with each count: alive for three flush intervals."""
        settings = self.settings
        info: dict[str, Any] = {"pid": os.getpid(), "loops": settings.worker_loops}
        info["mining"] = self.health.ready
        rng_mode = self.units.take_rng_mode()
        if rng_mode:
            info["rng_mode"] = rng_mode
        if self.units.stage_times is not None:
            info["latency"] = self.units.stage_times.summary(settings.worker_batch)
        ttl = max(3 * settings.worker_flush_interval, 2.0)
        return redis_store.Heartbeat(self.ledger.writer, info, ttl)

    async def flush_counters(self) -> bool:
        """Flush pending hashes and coins and renew the heartbeat; False if Redis failed."""
        return await self.flush(heartbeat=self.heartbeat())

    async def flush(
        self, coins_only: bool = False, heartbeat: redis_store.Heartbeat | None = None
    ) -> bool:
        """One flush; an error of Redis (down, full, too slow) is an outage, logged once."""
        try:
            await self.ledger.flush(self.redis, coins_only, heartbeat, step=self._step)
        except (RedisError, OSError, redis_store.BadData) as exc:
            raise_if_cancelling()
            WORKER_ERRORS.labels("redis", type(exc).__name__).inc()
            self.outages.failed("redis", f"{type(exc).__name__}: {exc}")
            return False
        self.outages.recovered("redis")
        self.ledger.make_room()
        return True

    async def final_flush(self, deadline: float) -> None:
        """Flush everything and withdraw the heartbeat, retrying until `deadline`."""
        while True:
            try:
                await asyncio.wait_for(self._flush_all(), max(deadline - time.monotonic(), 0.01))
                return
            except (RedisError, OSError, TimeoutError, redis_store.BadData) as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "could not flush %d hashes and %d coins: %s",
                        self.ledger.unflushed_hashes,
                        self.ledger.pending_coins,
                        f"{type(exc).__name__}: {exc}",
                    )
                    return
                await asyncio.sleep(min(0.2, max(deadline - time.monotonic(), 0)))

    async def _flush_all(self) -> None:
        await self.ledger.flush(self.redis)
        await redis_store.withdraw_heartbeat(self.redis, self.ledger.writer)
