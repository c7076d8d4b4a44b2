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

from dockercoins import schema
from dockercoins.backoff import Backoff, OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.metrics import WORKER_ERRORS, WORKER_RPC_SECONDS
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from worker_svc.config import WorkerSettings

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
"""Bytes of randomness per hash, as in the original."""

DIGEST_SIZE = 32

STREAM_WINDOW = 4
"""Messages a streaming loop keeps in flight at the hasher."""

COIN_BATCH = 2000
"""Coins held before they are written ahead of the next flush, to keep the worker small."""

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
    """Hashes and coins found, kept in memory until Redis has them: nothing lost, nothing twice."""

    def __init__(self, writer: str = "") -> None:
        self.writer = writer
        self.total_hashes = 0
        self.total_coins = 0
        self.pending_hashes = 0
        self.pending_coins: dict[str, bytes] = {}
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
        self.total_coins += len(coins)
        self.pending_hashes += hashes
        self.pending_coins.update(coins)

    async def flush(
        self,
        redis: Redis,
        coins_only: bool = False,
        heartbeat: schema.Heartbeat | None = None,
    ) -> None:
        """Write what is pending in one round trip; on error it stays pending.

        A count whose reply was lost is resent with its own sequence number, which
        Redis recognises if it did apply it: the counter never counts it twice. A
        `heartbeat` is sent with the count and reports `hashes_flushed` as of it.
        """
        if self._in_doubt is not None:
            sequence, doubtful = self._in_doubt
            await schema.record(redis, doubtful, {}, self.writer, sequence)
            self._in_doubt = None
            self.flushed_hashes += doubtful
        hashes = 0 if coins_only else self.pending_hashes
        coins = self.pending_coins
        if not hashes and not coins and heartbeat is None:
            return
        if hashes:
            self._sequence += 1
        self.pending_hashes -= hashes
        self.pending_coins = {}
        if heartbeat is not None:
            info = {**heartbeat.info, "hashes_flushed": self.flushed_hashes + hashes}
            heartbeat = schema.Heartbeat(heartbeat.worker, info, heartbeat.ttl)
        try:
            await schema.record(redis, hashes, coins, self.writer, self._sequence, heartbeat)
        except BaseException:
            if hashes:
                self._in_doubt = (self._sequence, hashes)
            self.pending_coins.update(coins)
            raise
        self.flushed_hashes += hashes


class Miner:
    """Runs the mining loops and the flusher until told to stop."""

    def __init__(
        self,
        settings: WorkerSettings,
        rng: ChannelPool,
        hasher: ChannelPool,
        redis: Redis,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.hasher = hasher
        self.redis = redis
        # Unique per process start: a restarted container keeps its hostname and pid 1.
        self.worker_id = worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.ledger = Ledger(self.worker_id)
        self.outages = OutageLog(log)
        self.stopping = asyncio.Event()
        self._coins_waiting = asyncio.Event()

    async def run(self) -> None:
        """Mine until `stopping` is set, then flush everything and withdraw the heartbeat."""
        flusher = asyncio.create_task(self._flush_periodically(), name="flusher")
        loop = self._stream_loop if self.settings.worker_streaming else self._unary_loop
        loops = [
            asyncio.create_task(loop(n), name=f"loop-{n}")
            for n in range(self.settings.worker_loops)
        ]
        await asyncio.gather(*loops)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await self._final_flush()

    async def _think(self) -> bool:
        """Sleep the think time; False if the worker was told to stop meanwhile."""
        if not self.settings.worker_think_time:
            return not self.stopping.is_set()
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=self.settings.worker_think_time)
        except TimeoutError:
            return True
        return False

    async def _unary_loop(self, index: int) -> None:
        """The original's loop: think, then one unary call to rng and one to hasher."""
        while await self._think():
            try:
                await self.mine_once()
            except _Abandoned:
                return

    async def mine_once(self) -> None:
        """One unit of work: random bytes from rng, their hashes, the coin check."""
        random = await self._call(
            "rng",
            lambda: rng_pb2_grpc.RngStub(self.rng.next()).GetRandom(
                rng_pb2.RandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch),
                timeout=self.settings.rpc_timeout,
            ),
        )
        hashed = await self._call(
            "hasher",
            lambda: hasher_pb2_grpc.HasherStub(self.hasher.next()).Hash(
                hasher_pb2.HashRequest(data=random.data, block_size=BLOCK_SIZE, raw=True),
                timeout=self.settings.rpc_timeout,
            ),
        )
        coins = find_coins(random.data, hashed.digests, self.settings.difficulty)
        for digest in coins:
            log.info("coin found: %s...", digest[:8])
        self.ledger.add(len(random.data) // BLOCK_SIZE, coins)

    async def _stream_loop(self, index: int) -> None:
        """The fast path: an rng stream feeding a hasher stream; reopened whenever one ends."""
        backoff = Backoff()
        broken_in_a_row = 0
        while not self.stopping.is_set():
            done_before = self.ledger.total_hashes
            try:
                await self._stream_session(index, backoff)
            except _StreamBroken as broken:
                WORKER_ERRORS.labels(broken.upstream, broken.reason.split(":")[0]).inc()
                if self.ledger.total_hashes > done_before:
                    broken_in_a_row = 0
                broken_in_a_row += 1
                if broken_in_a_row == 1:
                    # A stream that worked and then ended (a server going away, a connection
                    # reaching its maximum age) is reopened at once, without an outage.
                    log.debug("stream to %s ended: %s; reopening", broken.upstream, broken.reason)
                    continue
                self.outages.failed(broken.upstream, broken.reason)
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff.next_delay())
                except TimeoutError:
                    continue

    async def _stream_session(self, index: int, backoff: Backoff) -> None:
        """One pair of streams: a writer sends rng's batches to hasher, a reader takes the digests.

        Returns when the worker stops (after the batches in flight are answered) or when
        rng ends its stream cleanly; raises _StreamBroken when a stream fails or stalls for
        longer than the RPC deadline (a watchdog, rather than a timer per message).
        """
        rng_stub = rng_pb2_grpc.RngStub(self.rng.channels[index % len(self.rng.channels)])
        hasher_stub = hasher_pb2_grpc.HasherStub(
            self.hasher.channels[index % len(self.hasher.channels)]
        )
        randoms = rng_stub.StreamRandom(
            rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch)
        )
        hashes = hasher_stub.HashStream()
        in_flight: deque[tuple[bytes, float]] = deque()
        window = asyncio.Semaphore(STREAM_WINDOW)
        progress = 0
        stalled: list[str] = []
        rng_seconds = WORKER_RPC_SECONDS.labels("rng")
        hasher_seconds = WORKER_RPC_SECONDS.labels("hasher")
        clock = time.perf_counter

        async def write() -> None:
            nonlocal progress
            try:
                while True:
                    await window.acquire()
                    if not await self._think():
                        break
                    asked = clock()
                    reply = await _read(randoms, "rng")
                    if reply is None:
                        break  # rng ended the stream (e.g. max connection age): reopen
                    sent = clock()
                    rng_seconds.observe(sent - asked)
                    progress += 1
                    in_flight.append((reply.data, sent))
                    try:
                        await hashes.write(
                            hasher_pb2.HashRequest(data=reply.data, block_size=BLOCK_SIZE, raw=True)
                        )
                    except grpc.aio.AioRpcError as exc:
                        raise _StreamBroken("hasher", exc) from None
                    self.outages.recovered("rng")
                await hashes.done_writing()
            except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                raise _StreamBroken("hasher", exc) from None

        async def read() -> None:
            nonlocal progress
            while True:
                reply = await _read(hashes, "hasher")
                if reply is None:
                    return
                data, sent = in_flight.popleft()
                hasher_seconds.observe(clock() - sent)
                progress += 1
                self.ledger.add(
                    len(data) // BLOCK_SIZE,
                    find_coins(data, reply.digests, self.settings.difficulty),
                )
                if len(self.ledger.pending_coins) >= COIN_BATCH:
                    self._coins_waiting.set()
                self.outages.recovered("hasher")
                backoff.reset()
                window.release()

        async def watch() -> None:
            seen = -1
            while True:
                await asyncio.sleep(self.settings.rpc_timeout)
                if progress == seen and not self.stopping.is_set():
                    stalled.append("hasher" if in_flight else "rng")
                    randoms.cancel()
                    hashes.cancel()
                    return
                seen = progress

        writer = asyncio.create_task(write())
        reader = asyncio.create_task(read())
        watchdog = asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            await reader
            await writer
        except _StreamBroken:
            if stalled:
                raise _StreamBroken(
                    stalled[0], TimeoutError("no reply within the deadline")
                ) from None
            raise
        finally:
            for task in (writer, reader, watchdog):
                task.cancel()
            await asyncio.gather(writer, reader, watchdog, return_exceptions=True)
            randoms.cancel()
            hashes.cancel()

    async def _call(self, name: str, attempt: Callable[[], Awaitable[Reply]]) -> Reply:
        """Call until it succeeds, backing off; give up only when stopping."""
        backoff = Backoff()
        while True:
            started = time.perf_counter()
            try:
                reply = await attempt()
            except grpc.aio.AioRpcError as exc:
                WORKER_ERRORS.labels(name, exc.code().name).inc()
                self.outages.failed(name, f"{exc.code().name}: {exc.details()}")
                if self.stopping.is_set():
                    raise _Abandoned from None
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff.next_delay())
                    raise _Abandoned
                except TimeoutError:
                    continue
            WORKER_RPC_SECONDS.labels(name).observe(time.perf_counter() - started)
            self.outages.recovered(name)
            return reply

    async def flush_counters(self) -> None:
        """Flush pending hashes and coins and renew the heartbeat; log outages once."""
        heartbeat = schema.Heartbeat(
            self.worker_id,
            {"pid": os.getpid(), "loops": self.settings.worker_loops},
            max(3 * self.settings.worker_flush_interval, 2.0),
        )
        try:
            await self.ledger.flush(self.redis, heartbeat=heartbeat)
        except (RedisError, OSError) as exc:
            WORKER_ERRORS.labels("redis", type(exc).__name__).inc()
            self.outages.failed("redis", f"{type(exc).__name__}: {exc}")
            return
        self.outages.recovered("redis")

    async def _flush_periodically(self) -> None:
        """The count once per interval; coins also in between when many are waiting."""
        clock = asyncio.get_running_loop().time
        due = clock() + self.settings.worker_flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._coins_waiting.wait(), max(0.0, due - clock()))
            self._coins_waiting.clear()
            if clock() >= due:
                due = clock() + self.settings.worker_flush_interval
                await self.flush_counters()
            elif not self.outages.is_down("redis"):
                try:
                    await self.ledger.flush(self.redis, coins_only=True)
                except (RedisError, OSError) as exc:
                    self.outages.failed("redis", f"{type(exc).__name__}: {exc}")

    async def _final_flush(self) -> None:
        deadline = asyncio.get_running_loop().time() + max(self.settings.grace, 1.0)
        while True:
            try:
                await self.ledger.flush(self.redis)
                await self.redis.delete(schema.WORKER_KEY_PREFIX + self.worker_id)
                break
            except (RedisError, OSError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    log.error(
                        "could not flush %d hashes and %d coins: %s",
                        self.ledger.unflushed_hashes,
                        len(self.ledger.pending_coins),
                        exc,
                    )
                    break
                await asyncio.sleep(0.2)
        log.info(
            "worker stopped: %d hashes, %d coins, %d hashes unflushed",
            self.ledger.total_hashes,
            self.ledger.total_coins,
            self.ledger.unflushed_hashes,
        )


class _Abandoned(Exception):
    """The unit in hand was given up because the worker is stopping during an outage."""


class _StreamBroken(Exception):
    """A stream to `upstream` failed; the loop reopens both streams with backoff."""

    def __init__(self, upstream: str, cause: BaseException) -> None:
        if isinstance(cause, grpc.aio.AioRpcError):
            reason = f"{cause.code().name}: {cause.details()}"
        else:
            reason = f"{type(cause).__name__}: {cause}"
        super().__init__(f"{upstream}: {reason}")
        self.upstream = upstream
        self.reason = reason


async def _read(call: Any, upstream: str) -> Any:
    """The next message of a stream, None at its end; failures become _StreamBroken."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise _StreamBroken(upstream, exc) from None
    return None if reply is grpc.aio.EOF else reply
