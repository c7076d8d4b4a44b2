"""The miner: think, fetch random bytes, hash them, keep coins, count hashes in Redis."""

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins import redis_store
from dockercoins.backoff import Backoff, OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.lifecycle import cancel_all, raise_if_cancelling
from dockercoins.stages import StageTimes
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE
from worker_svc.coins import find_coins
from worker_svc.config import HEALTH_TICK, WorkerSettings
from worker_svc.ledger import Ledger
from worker_svc.metrics import WORKER_ERRORS, WORKER_RPC_SECONDS
from worker_svc.stream import StreamBroken, StreamSession

log = logging.getLogger(__name__)

PAUSE_TICK = 1.0
"""Seconds between two liveness steps of a loop waiting for room in the backlog."""

Reply = TypeVar("Reply")


HealthReport = Callable[[bool, bool], Awaitable[None]]
"""Called with (ready, live) whenever either changes."""


class StuckError(RuntimeError):
    """A mining loop or the flusher made no step for the liveness timeout: a defect."""


class Miner:
    """Runs the mining loops, the flusher and the health watch until told to stop.

    Every wait on a peer is bounded (a deadline per call, a watchdog per stream, a timeout
    per Redis command), so a loop always steps: succeeds, fails, retries or waits for room.
    Readiness is "mining now": no upstream unreachable, room in the backlog, a unit finished
    recently. Liveness is "every loop and the flusher still step"; an outage, however long,
    does not fail it, so that a supervisor never restarts a worker holding a backlog.
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
        self.redis = redis
        # Unique per process start: a restarted container keeps its hostname and pid 1.
        self.worker_id = worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.ledger = Ledger(
            self.worker_id,
            settings.worker_flush_chunk,
            settings.worker_max_pending_coins,
            log,
            settings.worker_max_unflushed,
        )
        self.outages = OutageLog(log)
        self.stopping = asyncio.Event()
        self.ready = False
        """Readiness: mining now."""
        self.live = True
        """Liveness: every loop and the flusher step."""
        self._report_health = report_health
        self.steps: dict[str, float] = {}
        """Last step (time.monotonic()) of each loop and of the flusher."""
        self._last_unit = float("-inf")
        self.stage_times = (
            StageTimes(settings.worker_stage_window) if settings.worker_stage_timing else None
        )
        """Each stage of the recent units, for the heartbeat; None when timing is off."""
        self.rng_modes_seen: set[str] = set()
        """The modes rng named in its replies since the last heartbeat."""
        self.rng_mode = ""
        """The mode(s) rng named lately, comma-separated if several rng disagree."""

    def stop(self) -> None:
        """Ask the loops to finish the unit in hand and return."""
        self.stopping.set()
        self.ledger.room.set()

    async def run(self) -> None:
        """Mine until stopped, then flush everything and withdraw the heartbeat.

        A loop, the flusher or the health watch that ends or fails before the worker is
        stopped is a defect: the others are stopped, the count flushed, and its exception
        raised, so that the process exits with a traceback and its supervisor restarts it.
        Stopping takes at most DOCKERCOINS_GRACE: half for the units in hand, the rest (at
        least 1 s) for the last flush.
        """
        body = self._stream_loop if self.settings.worker_streaming else self._unary_loop
        now = time.monotonic()
        self.steps = {f"loop-{n}": now for n in range(self.settings.worker_loops)}
        self.steps["flusher"] = now
        loops = [
            asyncio.create_task(body(n), name=f"loop-{n}")
            for n in range(self.settings.worker_loops)
        ]
        background = [
            asyncio.create_task(self._flush_periodically(), name="flusher"),
            asyncio.create_task(self._watch_health(), name="health"),
        ]
        stop = asyncio.create_task(self.stopping.wait())
        failed: list[asyncio.Task[Any]] = []
        stopped_at = time.monotonic()
        try:
            done, _ = await asyncio.wait(
                {*loops, *background, stop}, return_when=asyncio.FIRST_COMPLETED
            )
            if not self.stopping.is_set():
                failed = [task for task in done if task is not stop]
                self.stop()
            stopped_at = time.monotonic()
            _, late = await asyncio.wait(loops, timeout=self.settings.grace / 2)
            await cancel_all(list(late))
            failed += [task for task in loops if not task.cancelled() and task.exception()]
        finally:
            await cancel_all([*background, stop])
        await self._final_flush(stopped_at + max(self.settings.grace, 1.0))
        for task in failed:
            error = None if task.cancelled() else task.exception()
            error = error or RuntimeError(f"{task.get_name()} ended by itself")
            log.error(
                "%s failed (%s); exiting so that a supervisor restarts the worker",
                task.get_name(),
                error,
            )
            raise error

    def _step(self, step: str) -> None:
        self.steps[step] = time.monotonic()

    async def _think(self) -> bool:
        """Sleep the think time; False if the worker was told to stop meanwhile."""
        if not self.settings.worker_think_time:
            return not self.stopping.is_set()
        return not await _wait_for_event(self.stopping, self.settings.worker_think_time)

    async def next_unit(self, step: str) -> float | None:
        """Wait for room in the backlog, then think; the seconds spent waiting for room (for
        Redis to take the backlog), or None once the worker is stopping."""
        paused = 0.0
        if not self.ledger.room.is_set():
            started = time.monotonic()
            while not self.ledger.room.is_set():
                self._step(step)
                await _wait_for_event(self.ledger.room, PAUSE_TICK)
            paused = time.monotonic() - started
        return paused if await self._think() else None

    def record(self, step: str, data: bytes, digests: bytes) -> dict[str, bytes]:
        """Count a finished unit (the ledger wakes the flusher, or pauses, as the backlog
        grows); its coins."""
        coins = find_coins(data, digests, self.settings.difficulty)
        self.ledger.add(len(data) // BLOCK_SIZE, coins)
        self._last_unit = self.steps[step] = time.monotonic()
        return coins

    async def _unary_loop(self, index: int) -> None:
        """The original's loop: think, then one unary call to rng and one to hasher."""
        step = f"loop-{index}"
        while True:
            started = time.monotonic()
            paused = await self.next_unit(step)
            if paused is None:
                return
            try:
                await self.mine_once(step, started, paused)
            except _Abandoned:
                return

    async def mine_once(self, step: str, started: float, paused: float) -> None:
        """One unit of work: random bytes from rng, their hashes, the coin check; its stages
        timed from `started` (when the unit began, before `paused` seconds waiting for room
        and its think time)."""
        thought = time.monotonic()
        random = await self._call(
            "rng",
            step,
            lambda: rng_pb2_grpc.RngStub(self.rng.next()).GetRandom(
                rng_pb2.RandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch),
                timeout=self.settings.rpc_timeout,
            ),
        )
        self.rng_modes_seen.add(random.mode)
        data = random.data  # each read of a bytes field copies it
        fetched = time.monotonic()
        hashed = await self._call(
            "hasher",
            step,
            lambda: hasher_pb2_grpc.HasherStub(self.hasher.next()).Hash(
                hasher_pb2.HashRequest(data=data, block_size=BLOCK_SIZE, raw=True),
                timeout=self.settings.rpc_timeout,
            ),
        )
        answered = time.monotonic()
        for digest in self.record(step, data, hashed.digests):
            log.info("coin found: %s...", digest[:8])
        if self.stage_times is not None:
            self.stage_times.add(
                thought - started - paused,
                fetched - thought,
                answered - fetched,
                paused + time.monotonic() - answered,
            )

    async def _call(self, name: str, step: str, attempt: Callable[[], Awaitable[Reply]]) -> Reply:
        """Call until it succeeds, backing off; give up only when stopping."""
        backoff = Backoff()
        while True:
            started = time.monotonic()
            try:
                reply = await attempt()
            except grpc.aio.AioRpcError as exc:
                self._step(step)
                WORKER_ERRORS.labels(name, exc.code().name).inc()
                self.outages.failed(name, f"{exc.code().name}: {exc.details()}", started)
                if await self._stopped_within(backoff.next_delay()):
                    raise _Abandoned from None
                continue
            self._step(step)
            WORKER_RPC_SECONDS.labels(name).observe(time.monotonic() - started)
            self.outages.recovered(name)
            return reply

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait `seconds` (a backoff); True if the worker is stopping."""
        return await _wait_for_event(self.stopping, seconds)

    async def _stream_loop(self, index: int) -> None:
        """The fast path: an rng stream feeding a hasher stream; reopened whenever one ends."""
        step = f"loop-{index}"
        backoff = Backoff()
        while not self.stopping.is_set():
            self._step(step)
            try:
                answered = await StreamSession(self, index, step).run()
            except StreamBroken as broken:
                WORKER_ERRORS.labels(broken.upstream, broken.code).inc()
                if broken.answered and not broken.stalled:
                    # A stream that worked and then ended (a server going away, a connection
                    # reaching its maximum age) is reopened at once, without an outage.
                    log.debug("stream to %s ended: %s; reopening", broken.upstream, broken.reason)
                    backoff.reset()
                    continue
                self.outages.failed(broken.upstream, broken.reason, broken.started)
            else:
                if answered:  # rng ended its stream cleanly: reopen at once
                    backoff.reset()
                    continue
            self._step(step)
            if await self._stopped_within(backoff.next_delay()):
                return

    async def flush_counters(self) -> bool:
        """Flush pending hashes and coins and renew the heartbeat; False if Redis failed."""
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "loops": self.settings.worker_loops,
            "mining": self.ready,
        }
        seen = sorted(self.rng_modes_seen - {""})  # "": an rng that does not name its mode
        self.rng_modes_seen.clear()
        if seen:
            self.rng_mode = ",".join(seen)
        if self.rng_mode:
            info["rng_mode"] = self.rng_mode
        if self.stage_times is not None:
            info["latency"] = self.stage_times.summary(self.settings.worker_batch)
        heartbeat = redis_store.Heartbeat(
            self.worker_id, info, max(3 * self.settings.worker_flush_interval, 2.0)
        )
        return await self._flush(heartbeat=heartbeat)

    async def _flush(
        self, coins_only: bool = False, heartbeat: redis_store.Heartbeat | None = None
    ) -> bool:
        """One flush; an error of Redis (down, full, too slow) is an outage, logged once."""
        try:
            await self.ledger.flush(
                self.redis, coins_only, heartbeat, step=lambda: self._step("flusher")
            )
        except (RedisError, OSError, redis_store.BadData) as exc:
            raise_if_cancelling()
            WORKER_ERRORS.labels("redis", type(exc).__name__).inc()
            self.outages.failed("redis", f"{type(exc).__name__}: {exc}")
            return False
        self.outages.recovered("redis")
        self.ledger.make_room()
        return True

    async def _flush_periodically(self) -> None:
        """The count once per interval; coins also in between when many are waiting."""
        interval = self.settings.worker_flush_interval
        due = time.monotonic() + interval
        while True:
            self._step("flusher")
            wait = max(0.0, due - time.monotonic())
            if self.outages.is_down("redis"):
                await asyncio.sleep(wait)  # coins piling up change nothing until the next try
            else:
                await _wait_for_event(self.ledger.coins_waiting, wait)
            self.ledger.coins_waiting.clear()
            if time.monotonic() >= due:
                due = time.monotonic() + interval
                await self.flush_counters()
            else:
                await self._flush(coins_only=True)

    def _readiness(self, now: float) -> str:
        """Why the worker is not mining now; empty if it is."""
        if self.stopping.is_set():
            return "stopping"
        down = self.outages.down()
        if down:
            return f"{', '.join(down)} unreachable"
        if not self.ledger.room.is_set():
            return f"mining paused: {self.ledger.paused_for}"
        idle = self.settings.ready_timeout
        if now - self._last_unit > idle:
            return f"no unit of work finished in {idle:g} s"
        return ""

    async def _watch_health(self) -> None:
        """Keep `ready` and `live` up to date, report changes; raise StuckError on a stuck loop."""
        if self._report_health is not None:
            await self._report_health(self.ready, self.live)
        limit = self.settings.liveness_timeout
        reason = "starting"
        while True:
            now = time.monotonic()
            was = reason
            reason = self._readiness(now)
            stuck = _stale(self.steps, now - limit) if not self.stopping.is_set() else []
            ready, live = not reason, not stuck
            if not was and reason.startswith("no unit"):
                log.warning("not ready: %s", reason)
            if (ready, live) != (self.ready, self.live):
                log.debug("ready %s (%s), live %s", ready, reason or "mining", live)
                self.ready, self.live = ready, live
                if self._report_health is not None:
                    await self._report_health(ready, live)
            if stuck:
                raise StuckError(
                    f"no step of {', '.join(stuck)} in {limit:g} s "
                    "(DOCKERCOINS_WORKER_LIVENESS_TIMEOUT); exiting to be restarted"
                )
            await asyncio.sleep(HEALTH_TICK)

    async def _final_flush(self, deadline: float) -> None:
        """Flush everything and withdraw the heartbeat, retrying until `deadline`."""
        while True:
            try:
                await asyncio.wait_for(self._flush_all(), max(deadline - time.monotonic(), 0.01))
                break
            except (RedisError, OSError, TimeoutError, redis_store.BadData) as exc:
                if time.monotonic() >= deadline:
                    log.error(
                        "could not flush %d hashes and %d coins: %s",
                        self.ledger.unflushed_hashes,
                        self.ledger.pending_coins,
                        f"{type(exc).__name__}: {exc}",
                    )
                    break
                await asyncio.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
        log.info(
            "worker stopped: %d hashes, %d coins, %d hashes unflushed",
            self.ledger.total_hashes,
            self.ledger.total_coins,
            self.ledger.unflushed_hashes,
        )

    async def _flush_all(self) -> None:
        await self.ledger.flush(self.redis)
        await self.redis.delete(redis_store.WORKER_KEY_PREFIX + self.worker_id)


async def _wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, for at most `seconds`; whether it is set.

    asyncio.timeout, unlike wait_for on Python 3.11, starts no task and tells its own expiry
    from a cancellation of the caller.
    """
    if not event.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        raise_if_cancelling()
    return event.is_set()


def _stale(steps: dict[str, float], before: float) -> list[str]:
    """The names whose last step is older than `before`."""
    return [name for name, at in steps.items() if at < before]


class _Abandoned(Exception):
    """The unit in hand was given up because the worker is stopping during an outage."""
