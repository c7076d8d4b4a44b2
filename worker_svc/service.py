"""The miner: think, fetch random bytes, hash them, keep coins, count hashes in Redis."""

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins import redis_store
from dockercoins.backoff import Backoff, OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.stages import StageTimes
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from worker_svc.config import WorkerSettings
from worker_svc.metrics import WORKER_ERRORS, WORKER_RPC_SECONDS

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
"""Bytes of randomness per hash, as in the original."""

DIGEST_SIZE = 32

STREAM_WINDOW = 4
"""Messages a streaming loop keeps in flight at the hasher."""

COIN_BATCH = 2000
"""Coins held before they are written ahead of the next flush, to keep the worker small."""

HEALTH_TICK = 0.25
"""Seconds between two evaluations of readiness and liveness."""

PAUSE_TICK = 1.0
"""Seconds between two liveness steps of a loop waiting for room in the backlog."""

Reply = TypeVar("Reply")


def is_coin(hexdigest: str, difficulty: int = 1) -> bool:
    """The coin rule: the hex digest starts with `difficulty` zeros."""
    return hexdigest.startswith("0" * difficulty)


# The first byte of a digest holds its first two hex digits: one leading zero digit means a
# first byte below 16, two or more mean a first byte of 0. Marking the candidates with
# bytes.translate and finding them with bytes.find keeps the scan in C; Python only sees them.
_FIRST_BYTE_BELOW_16 = bytes(1 if value < 16 else 0 for value in range(256))
_FIRST_BYTE_ZERO = bytes(1 if value == 0 else 0 for value in range(256))


def find_coins(data: bytes, digests: bytes, difficulty: int = 1) -> dict[str, bytes]:
    """Coins among a batch: hex digest -> the 32 random bytes that hashed to it."""
    table = _FIRST_BYTE_BELOW_16 if difficulty == 1 else _FIRST_BYTE_ZERO
    candidates = digests[::DIGEST_SIZE].translate(table)
    coins: dict[str, bytes] = {}
    index = candidates.find(1)
    while index != -1:
        digest = digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE].hex()
        if is_coin(digest, difficulty):
            coins[digest] = data[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        index = candidates.find(1, index + 1)
    return coins


class Ledger:
    """Hashes and coins found, kept in memory until Redis has them: nothing lost, nothing twice.

    Coins wait in chunks of about `chunk` coins, written one chunk per command, so that a
    backlog left by an outage drains in steps that each fit the Redis timeout.
    """

    def __init__(self, writer: str = "", chunk: int = 10_000) -> None:
        self.writer = writer
        self.chunk = chunk
        self.total_hashes = 0
        self.total_coins = 0
        self.pending_hashes = 0
        self.pending_coins = 0
        """Coins not yet written to Redis."""
        self._chunks: deque[dict[str, bytes]] = deque([{}])
        self.flushed_hashes = 0
        """Hashes known to be in the counter."""
        self._sequence = 0
        self._in_doubt: tuple[int, int] | None = None
        """A count sent whose fate is unknown: (sequence, hashes), resent as it was."""

    @property
    def unflushed_hashes(self) -> int:
        """Hashes not known to be in Redis."""
        return self.pending_hashes + (self._in_doubt[1] if self._in_doubt else 0)

    def add(self, hashes: int, coins: dict[str, bytes]) -> None:
        """Record a finished unit of work."""
        self.total_hashes += hashes
        self.pending_hashes += hashes
        if coins:
            self.total_coins += len(coins)
            tail = self._chunks[-1]
            if len(tail) >= self.chunk:
                tail = {}
                self._chunks.append(tail)
            before = len(tail)
            tail.update(coins)
            self.pending_coins += len(tail) - before

    def _take_chunk(self) -> dict[str, bytes]:
        """The oldest pending chunk, no longer pending (new coins go to a fresh one)."""
        chunk = self._chunks.popleft()
        if not self._chunks:
            self._chunks.append({})
        self.pending_coins -= len(chunk)
        return chunk

    def _give_back(self, chunk: dict[str, bytes]) -> None:
        if chunk:
            self._chunks.appendleft(chunk)
            self.pending_coins += len(chunk)

    async def flush(
        self,
        redis: Redis,
        coins_only: bool = False,
        heartbeat: redis_store.Heartbeat | None = None,
        step: Callable[[], object] = lambda: None,
    ) -> None:
        """Write what is pending, a chunk of coins per round trip; on error it stays pending.

        The chunks pending when the flush starts are written, the last one in the same round
        trip as the count. A count whose reply was lost is resent with its own sequence
        number, which Redis recognises if it did apply it: the counter never counts it twice.
        A `heartbeat` is sent with the count and reports `hashes_flushed` as of it. `step` is
        called after each round trip.
        """
        if self._in_doubt is not None:
            sequence, doubtful = self._in_doubt
            await redis_store.record(redis, doubtful, {}, self.writer, sequence)
            self._in_doubt = None
            self.flushed_hashes += doubtful
            step()
        chunks = sum(1 for chunk in self._chunks if chunk)
        for _ in range(chunks if coins_only else chunks - 1):
            chunk = self._take_chunk()
            try:
                await redis_store.record(redis, 0, chunk)
            except BaseException:
                self._give_back(chunk)
                raise
            step()
        if coins_only:
            return
        hashes = self.pending_hashes
        coins = self._take_chunk() if self.pending_coins else {}
        if not hashes and not coins and heartbeat is None:
            return
        if hashes:
            self._sequence += 1
        self.pending_hashes -= hashes
        if heartbeat is not None:
            info = {**heartbeat.info, "hashes_flushed": self.flushed_hashes + hashes}
            heartbeat = redis_store.Heartbeat(heartbeat.worker, info, heartbeat.ttl)
        try:
            await redis_store.record(redis, hashes, coins, self.writer, self._sequence, heartbeat)
        except BaseException:
            if hashes:
                self._in_doubt = (self._sequence, hashes)
            self._give_back(coins)
            raise
        self.flushed_hashes += hashes
        step()


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
        self.ledger = Ledger(self.worker_id, settings.worker_flush_chunk)
        self.outages = OutageLog(log)
        self.stopping = asyncio.Event()
        self.ready = False
        """Readiness: mining now."""
        self.live = True
        """Liveness: every loop and the flusher step."""
        self._report_health = report_health
        self._coins_waiting = asyncio.Event()
        self._room = asyncio.Event()
        """Set while the backlog of unwritten coins is under its bound."""
        self._room.set()
        self._steps: dict[str, float] = {}
        """Last step (time.monotonic()) of each loop and of the flusher."""
        self._last_unit = float("-inf")
        self.stage_times = (
            StageTimes(settings.worker_stage_window) if settings.worker_stage_timing else None
        )
        """Each stage of the recent units, for the heartbeat; None when timing is off."""
        self._rng_modes: set[str] = set()
        """The modes rng named in its replies since the last heartbeat."""
        self.rng_mode = ""
        """The mode(s) rng named lately, comma-separated if several rng disagree."""

    def stop(self) -> None:
        """Ask the loops to finish the unit in hand and return."""
        self.stopping.set()
        self._room.set()

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
        self._steps = {f"loop-{n}": now for n in range(self.settings.worker_loops)}
        self._steps["flusher"] = now
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
            await _cancel_all(list(late))
            failed += [task for task in loops if not task.cancelled() and task.exception()]
        finally:
            await _cancel_all([*background, stop])
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
        self._steps[step] = time.monotonic()

    async def _think(self) -> bool:
        """Sleep the think time; False if the worker was told to stop meanwhile."""
        if not self.settings.worker_think_time:
            return not self.stopping.is_set()
        return not await _wait_for_event(self.stopping, self.settings.worker_think_time)

    async def _next_unit(self, step: str) -> float | None:
        """Wait for room in the backlog, then think; the seconds spent waiting for room (for
        Redis to take the backlog), or None once the worker is stopping."""
        paused = 0.0
        if not self._room.is_set():
            started = time.monotonic()
            while not self._room.is_set():
                self._step(step)
                await _wait_for_event(self._room, PAUSE_TICK)
            paused = time.monotonic() - started
        return paused if await self._think() else None

    def _record(self, step: str, data: bytes, digests: bytes) -> dict[str, bytes]:
        """Count a finished unit; wake the flusher, or pause, as the backlog grows."""
        coins = find_coins(data, digests, self.settings.difficulty)
        self.ledger.add(len(data) // BLOCK_SIZE, coins)
        self._last_unit = self._steps[step] = time.monotonic()
        pending = self.ledger.pending_coins
        if pending >= COIN_BATCH:
            self._coins_waiting.set()
            if pending >= self.settings.worker_max_pending_coins and self._room.is_set():
                self._room.clear()
                log.warning(
                    "mining paused: %d coins not yet in Redis "
                    "(DOCKERCOINS_WORKER_MAX_PENDING_COINS=%d); resuming once Redis takes them",
                    pending,
                    self.settings.worker_max_pending_coins,
                )
        return coins

    async def _unary_loop(self, index: int) -> None:
        """The original's loop: think, then one unary call to rng and one to hasher."""
        step = f"loop-{index}"
        while True:
            started = time.monotonic()
            paused = await self._next_unit(step)
            if paused is None:
                return
            try:
                await self.mine_once(step, started, paused)
            except _Abandoned:
                return

    async def mine_once(
        self, step: str = "loop-0", started: float | None = None, paused: float = 0.0
    ) -> None:
        """One unit of work: random bytes from rng, their hashes, the coin check.

        With `started` (when the unit began, before `paused` seconds waiting for room and its
        think time), the unit's stages are timed.
        """
        thought = time.monotonic()
        random = await self._call(
            "rng",
            step,
            lambda: rng_pb2_grpc.RngStub(self.rng.next()).GetRandom(
                rng_pb2.RandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch),
                timeout=self.settings.rpc_timeout,
            ),
        )
        self._rng_modes.add(random.mode)
        fetched = time.monotonic()
        hashed = await self._call(
            "hasher",
            step,
            lambda: hasher_pb2_grpc.HasherStub(self.hasher.next()).Hash(
                hasher_pb2.HashRequest(data=random.data, block_size=BLOCK_SIZE, raw=True),
                timeout=self.settings.rpc_timeout,
            ),
        )
        answered = time.monotonic()
        for digest in self._record(step, random.data, hashed.digests):
            log.info("coin found: %s...", digest[:8])
        if self.stage_times is not None and started is not None:
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
                answered = await self._stream_session(index, step)
            except _StreamBroken as broken:
                WORKER_ERRORS.labels(broken.upstream, broken.reason.split(":")[0]).inc()
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

    async def _stream_session(self, index: int, step: str) -> int:
        """One pair of streams: a writer sends rng's batches to hasher, a reader takes the digests.

        Returns the number of batches answered when the worker stops (after the batches in
        flight are answered) or when rng ends its stream cleanly. Raises _StreamBroken when a
        stream fails, or when a peer keeps the worker waiting longer than the deadline: rng
        for its next batch, hasher for the oldest unanswered one or for the end of the
        stream. The session then cancels both calls and both tasks, whatever they wait on (a
        read, a write held by HTTP/2 flow control, the window).
        """
        rng_stub = rng_pb2_grpc.RngStub(self.rng.channels[index % len(self.rng.channels)])
        hasher_stub = hasher_pb2_grpc.HasherStub(
            self.hasher.channels[index % len(self.hasher.channels)]
        )
        opened = time.monotonic()
        randoms = rng_stub.StreamRandom(
            rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch)
        )
        hashes = hasher_stub.HashStream()
        deadline = self.settings.rpc_timeout
        # Batches at hasher: data, when sent, and the unit's think, rng and pause seconds.
        in_flight: deque[tuple[bytes, float, float, float, float]] = deque()
        window = asyncio.Semaphore(STREAM_WINDOW)
        rng_asked: float | None = None
        closing: float | None = None
        answered = 0
        rng_seconds = WORKER_RPC_SECONDS.labels("rng")
        hasher_seconds = WORKER_RPC_SECONDS.labels("hasher")
        clock = time.monotonic
        stage_times = self.stage_times
        rng_modes = self._rng_modes

        async def write() -> None:
            nonlocal rng_asked, closing
            while True:
                await window.acquire()
                started = clock()  # a unit starts when it has its place in the window
                paused = await self._next_unit(step)
                if paused is None:
                    break
                asked = rng_asked = clock()
                reply = await _read(randoms, "rng")
                if reply is None:
                    break  # rng ended the stream (e.g. max connection age): reopen
                sent = self._steps[step] = clock()
                rng_seconds.observe(sent - asked)
                rng_asked = None
                rng_modes.add(reply.mode)
                in_flight.append((reply.data, sent, asked - started - paused, sent - asked, paused))
                await _write(
                    hashes, hasher_pb2.HashRequest(data=reply.data, block_size=BLOCK_SIZE, raw=True)
                )
                self.outages.recovered("rng")
            rng_asked = None
            closing = clock()
            await _write(hashes, None)

        async def read() -> None:
            nonlocal answered
            while True:
                reply = await _read(hashes, "hasher")
                if reply is None:
                    return
                if not in_flight:
                    raise _StreamBroken("hasher", ValueError("a reply to no request"))
                data, sent, think, rng, paused = in_flight.popleft()
                hashed = clock()
                hasher_seconds.observe(hashed - sent)
                answered += 1
                self._record(step, data, reply.digests)
                if stage_times is not None:
                    stage_times.add(think, rng, hashed - sent, paused + clock() - hashed)
                self.outages.recovered("hasher")
                window.release()

        async def watch() -> tuple[str, float]:
            """The first peer to keep this session waiting past the deadline, and since when."""
            while True:
                waits = []
                if rng_asked is not None:
                    waits.append((rng_asked, "rng"))
                if in_flight:
                    waits.append((in_flight[0][1], "hasher"))
                elif closing is not None:
                    waits.append((closing, "hasher"))
                now = clock()
                if not waits:
                    await asyncio.sleep(min(deadline / 4, HEALTH_TICK))
                    continue
                since, upstream = min(waits)
                if now - since >= deadline:
                    return upstream, since
                await asyncio.sleep(since + deadline - now)

        writer = asyncio.create_task(write(), name=f"{step}-writer")
        reader = asyncio.create_task(read(), name=f"{step}-reader")
        watchdog = asyncio.create_task(watch(), name=f"{step}-watchdog")
        tasks = {writer: "rng", reader: "hasher", watchdog: ""}
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if watchdog in done:
                    upstream, since = watchdog.result()
                    raise _StreamBroken(
                        upstream, TimeoutError(f"no reply within {deadline:g} s"), since, True
                    )
                for task in done:
                    if task.cancelled():  # grpc.aio raises CancelledError for a cancelled call
                        raise _StreamBroken(tasks[task], asyncio.CancelledError("call cancelled"))
                    task.result()
                if reader in done:
                    return answered
        except _StreamBroken as broken:
            broken.answered = answered
            if broken.started is None:
                broken.started = opened
            raise
        finally:
            randoms.cancel()
            hashes.cancel()
            await _cancel_all(list(tasks))

    async def flush_counters(self) -> bool:
        """Flush pending hashes and coins and renew the heartbeat; False if Redis failed."""
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "loops": self.settings.worker_loops,
            "mining": self.ready,
        }
        seen = sorted(self._rng_modes - {""})  # "": an rng that does not name its mode
        self._rng_modes.clear()
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
        except (RedisError, OSError) as exc:
            _raise_if_cancelling()
            WORKER_ERRORS.labels("redis", type(exc).__name__).inc()
            self.outages.failed("redis", f"{type(exc).__name__}: {exc}")
            return False
        self.outages.recovered("redis")
        if not self._room.is_set() and (
            self.ledger.pending_coins <= self.settings.worker_max_pending_coins // 2
        ):
            self._room.set()
            log.info("mining resumed: Redis took the backlog")
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
                await _wait_for_event(self._coins_waiting, wait)
            self._coins_waiting.clear()
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
        if not self._room.is_set():
            return "backlog full"
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
            stuck = _stale(self._steps, now - limit) if not self.stopping.is_set() else []
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
            except (RedisError, OSError, TimeoutError) as exc:
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


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again if one lingers."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            names = ", ".join(task.get_name() for task in pending)
            log.warning("%s did not end when cancelled; cancelling again", names)


async def _wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, for at most `seconds`; whether it is set.

    asyncio.timeout, unlike wait_for on Python 3.11, starts no task and tells its own expiry
    from a cancellation of the caller.
    """
    if not event.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        _raise_if_cancelling()
    return event.is_set()


def _raise_if_cancelling() -> None:
    """Raise CancelledError if this task is being cancelled.

    A cancellation can reach a coroutine as another error: a library's timeout that expires
    as the task is cancelled raises TimeoutError, an OSError; caught as an outage, it would
    keep a cancelled loop running.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stale(steps: dict[str, float], before: float) -> list[str]:
    """The names whose last step is older than `before`."""
    return [name for name, at in steps.items() if at < before]


class _Abandoned(Exception):
    """The unit in hand was given up because the worker is stopping during an outage."""


class _StreamBroken(Exception):
    """A stream to `upstream` failed or stalled; the loop reopens both streams.

    `started`: when the failed wait began (time.monotonic()); `stalled`: the peer was silent
    past the deadline; `answered`: batches the session had answered before.
    """

    def __init__(
        self,
        upstream: str,
        cause: BaseException,
        started: float | None = None,
        stalled: bool = False,
    ) -> None:
        if isinstance(cause, grpc.aio.AioRpcError):
            reason = f"{cause.code().name}: {cause.details()}"
        else:
            reason = f"{type(cause).__name__}: {cause}"
        super().__init__(f"{upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason
        self.started = started
        self.stalled = stalled
        self.answered = 0


async def _read(call: Any, upstream: str) -> Any:
    """The next message of a stream, None at its end; failures become _StreamBroken."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise _StreamBroken(upstream, exc) from None
    return None if reply is grpc.aio.EOF else reply


async def _write(call: Any, request: Any) -> None:
    """Send `request` on a client stream, or half-close it (None); failures become _StreamBroken."""
    try:
        if request is None:
            await call.done_writing()
        else:
            await call.write(request)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        raise _StreamBroken("hasher", exc) from None
