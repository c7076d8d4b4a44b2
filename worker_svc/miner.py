"""The miner: think, fetch random bytes, hash them, keep coins, count hashes in Redis; the parts
that do it wired together and run until stopped."""

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Any

from redis.asyncio import Redis

from dockercoins.backoff import OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.lifecycle import cancel_all
from worker_svc.config import WorkerSettings
from worker_svc.flusher import STEP as FLUSHER_STEP
from worker_svc.flusher import Flusher
from worker_svc.health import HealthReport, HealthWatch
from worker_svc.ledger import Ledger
from worker_svc.stream import StreamLoops
from worker_svc.unary import UnaryLoops
from worker_svc.units import Units, UnitSource

log = logging.getLogger(__name__)


class Miner:
    """The worker's parts, wired: the loops (unary calls or streams), the ledger, the flusher
    and the health watch, around one `Units`.

    Every wait on a peer is bounded (a deadline per call, a watchdog per stream, a timeout
    per Redis command), so a loop always steps: succeeds, fails, retries or waits for room.
    Each unit's stages (think, rng, hasher, its wait on Redis) are timed, one ending where
    the next begins, for the heartbeat (dockercoins.stages), with the mode rng names.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        rng: ChannelPool,
        hasher: ChannelPool,
        redis: Redis,
        worker_id: str | None = None,
        report_health: HealthReport | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.hasher = hasher
        # Unique per process start: a restarted container keeps its hostname and pid 1.
        self.worker_id = worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.ledger = Ledger(
            self.worker_id,
            settings.worker_flush_chunk,
            settings.worker_max_pending_coins,
            settings.worker_max_unflushed,
        )
        self.units = Units(settings, self.ledger, OutageLog(log))
        source = StreamLoops if settings.worker_streaming else UnaryLoops
        self.loops: UnitSource = source(settings, rng, hasher, self.units)
        self.health = HealthWatch(settings, self.units, report_health)
        self.flusher = Flusher(settings, redis, self.units, self.health)

    def stop(self) -> None:
        """Ask the loops to finish the unit in hand and return."""
        self.units.stop()

    async def run(self, units: int | None = None) -> None:
        """Mine until stopped (or, with `units`, until that many units are mined), then flush
        everything and withdraw the heartbeat.

        A loop, the flusher or the health watch that ends or fails before the miner is
        stopped is a defect: the others are stopped, the count flushed, and its exception
        raised, so that the process exits with a traceback and its supervisor restarts it.
        Stopping takes at most DOCKERCOINS_GRACE: half for the units in hand, the rest (at
        least 1 s) for the last flush.
        """
        if units is not None:
            self.units.limit = units
        count = self.settings.worker_loops
        now = time.monotonic()
        self.units.steps.update({f"loop-{n}": now for n in range(count)})
        self.units.steps[FLUSHER_STEP] = now
        loops = [asyncio.create_task(self.loops.run(n), name=f"loop-{n}") for n in range(count)]
        background = [
            asyncio.create_task(self.flusher.run(), name=FLUSHER_STEP),
            asyncio.create_task(self.health.run(), name="health"),
        ]
        stopping = self.units.stopping
        stop = asyncio.create_task(stopping.wait())
        failed: list[asyncio.Task[Any]] = []
        stopped_at = time.monotonic()
        try:
            done, _ = await asyncio.wait(
                {*loops, *background, stop}, return_when=asyncio.FIRST_COMPLETED
            )
            if not stopping.is_set():
                failed = [task for task in done if task is not stop]
                self.stop()
            stopped_at = time.monotonic()
            _, late = await asyncio.wait(loops, timeout=self.settings.grace / 2)
            await cancel_all(list(late))
            failed += [task for task in loops if not task.cancelled() and task.exception()]
        finally:
            await cancel_all([*background, stop])
        await self.flusher.final_flush(stopped_at + max(self.settings.grace, 1.0))
        log.info(
            "worker stopped: %d hashes, %d coins, %d hashes unflushed",
            self.ledger.total_hashes,
            self.ledger.total_coins,
            self.ledger.unflushed_hashes,
        )
        for task in failed:
            error = None if task.cancelled() else task.exception()
            error = error or RuntimeError(f"{task.get_name()} ended by itself")
            log.error(
                "%s failed (%s); exiting so that a supervisor restarts the worker",
                task.get_name(),
                error,
            )
            raise error
