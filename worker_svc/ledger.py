"""The exactly-once ledger: work not yet in Redis, flushed in chunks, under two bounds."""

import asyncio
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable

from redis.asyncio import Redis

from dockercoins import redis_store

log = logging.getLogger(__name__)

COIN_BATCH = 2000
"""Coins held before they are written ahead of the next flush, to keep the worker small."""


class Ledger:
    """Hashes and coins found, kept in memory until Redis has them: nothing lost, nothing twice.

    Coins wait in chunks of about `chunk` coins, written one chunk per command, so that a
    backlog left by an outage drains in steps that each fit the Redis timeout. `room` is
    cleared (mining pauses) at `max_pending` coins not yet written, until Redis has taken half
    of them, and once the oldest hash not yet counted in Redis is `max_unflushed` seconds old
    (the work a kill -9 would lose), until Redis has taken it; pausing and resuming are told
    once each.
    """

    def __init__(
        self,
        writer: str = "",
        chunk: int = 10_000,
        max_pending: int = sys.maxsize,
        max_unflushed: float = math.inf,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        """Whose counts these are: the worker's id, under which Redis numbers its flushes."""
        self.chunk = chunk
        self.max_pending = max_pending
        self.max_unflushed = max_unflushed
        self._clock: Callable[[], float] = clock
        self.total_hashes = 0
        """Hashes found since the start, in Redis or not (the worker's own total)."""
        self.total_coins = 0
        self.pending_hashes = 0
        """Hashes found and not yet sent to Redis (a count in doubt aside)."""
        self.pending_coins = 0
        """Coins not yet written to Redis."""
        self._chunks: deque[dict[str, bytes]] = deque([{}])
        self.flushed_hashes = 0
        """Hashes known to be in the counter."""
        self._sequence = 0
        self._in_doubt: tuple[int, int, float] | None = None
        """A count sent whose fate is unknown: (sequence, hashes, when its oldest hash was
        found), resent as it was."""
        self._pending_since: float | None = None
        """When the oldest of the pending hashes was found (clock), None if none."""
        self.coins_waiting = asyncio.Event()
        """Set once COIN_BATCH coins wait: worth writing before the next flush."""
        self.room = asyncio.Event()
        """Set while the work not yet in Redis is under its bounds: mining goes on."""
        self.room.set()
        self.paused_for = ""
        """Why mining is paused ("" while it is not)."""

    @property
    def unflushed_hashes(self) -> int:
        """Hashes not known to be in Redis."""
        return self.pending_hashes + (self._in_doubt[1] if self._in_doubt else 0)

    def unflushed_seconds(self, now: float | None = None) -> float:
        """How long ago the oldest hash not known to be in Redis was found (0: none)."""
        oldest = [self._in_doubt[2]] if self._in_doubt else []
        oldest += [self._pending_since] if self._pending_since is not None else []
        if not oldest:
            return 0.0
        return (self._clock() if now is None else now) - min(oldest)

    def add(self, hashes: int, coins: dict[str, bytes]) -> None:
        """Record a finished unit of work; wake the flusher, or pause, as the backlog grows."""
        now = self._clock()
        if self._pending_since is None:
            self._pending_since = now
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
        pending = self.pending_coins
        if pending >= COIN_BATCH:
            self.coins_waiting.set()
            if pending >= self.max_pending:
                self._pause(
                    f"{pending} coins not yet in Redis "
                    f"(DOCKERCOINS_WORKER_MAX_PENDING_COINS={self.max_pending})"
                )
        age = self.unflushed_seconds(now)
        if age >= self.max_unflushed:
            self._pause(
                f"{self.unflushed_hashes} hashes not yet in Redis, the oldest found {age:.1f} s "
                f"ago (DOCKERCOINS_WORKER_MAX_UNFLUSHED={self.max_unflushed:g} s)"
            )

    def _pause(self, why: str) -> None:
        if self.room.is_set():
            self.room.clear()
            self.paused_for = why
            log.warning("mining paused: %s; resuming once Redis takes them", why)

    def make_room(self) -> None:
        """After a flush: resume mining once Redis has taken half the coins' bound and the work
        older than the unflushed bound."""
        if (
            not self.room.is_set()
            and self.pending_coins <= self.max_pending // 2
            and self.unflushed_seconds() < self.max_unflushed
        ):
            self.room.set()
            self.paused_for = ""
            log.info("mining resumed: Redis took the backlog")

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
        called after each round trip. A count Redis refuses for bad data (BadWrite) is pending
        again, unless it went in all the same.
        """
        if self._in_doubt is not None:
            sequence, doubtful, _ = self._in_doubt
            try:
                await redis_store.record(redis, doubtful, {}, self.writer, sequence)
            except redis_store.BadWrite as exc:
                if exc.counted:
                    self._in_doubt = None
                    self.flushed_hashes += doubtful
                raise
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
        hashes, since = self.pending_hashes, self._pending_since
        coins = self._take_chunk() if self.pending_coins else {}
        if not hashes and not coins and heartbeat is None:
            return
        if hashes:
            self._sequence += 1
        self.pending_hashes -= hashes
        self._pending_since = None
        if heartbeat is not None:
            info = {**heartbeat.info, "hashes_flushed": self.flushed_hashes + hashes}
            heartbeat = redis_store.Heartbeat(heartbeat.worker, info, heartbeat.ttl)
        try:
            await redis_store.record(redis, hashes, coins, self.writer, self._sequence, heartbeat)
        except redis_store.BadWrite as exc:
            if exc.counted:
                self.flushed_hashes += hashes
            elif hashes and since is not None:  # not in: pending again, under a new number
                self.pending_hashes += hashes
                later = self._pending_since
                self._pending_since = since if later is None else min(since, later)
            self._give_back(coins)
            raise
        except BaseException:
            if hashes and since is not None:
                self._in_doubt = (self._sequence, hashes, since)
            self._give_back(coins)
            raise
        self.flushed_hashes += hashes
        step()
