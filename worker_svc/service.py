"""The miner: think, fetch random bytes, hash them, keep coins, count hashes in Redis."""

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins import schema
from dockercoins.backoff import Backoff, OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from worker_svc.config import WorkerSettings

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
"""Bytes of randomness per hash, as in the original."""

DIGEST_SIZE = 32

Reply = TypeVar("Reply")


def is_coin(hexdigest: str, difficulty: int = 1) -> bool:
    """The coin rule: the hex digest starts with `difficulty` zeros."""
    return hexdigest.startswith("0" * difficulty)


def find_coins(data: bytes, digests: bytes, difficulty: int = 1) -> dict[str, bytes]:
    """Coins among a batch: hex digest -> the 32 random bytes that hashed to it."""
    # The first byte of a digest holds its first two hex digits: a cheap pre-filter.
    first_byte_limit = 16 if difficulty == 1 else 1
    coins: dict[str, bytes] = {}
    for index, first in enumerate(digests[::DIGEST_SIZE]):
        if first < first_byte_limit:
            digest = digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE].hex()
            if is_coin(digest, difficulty):
                coins[digest] = data[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
    return coins


class Ledger:
    """Hashes and coins found, kept in memory until Redis has them: nothing is lost."""

    def __init__(self) -> None:
        self.total_hashes = 0
        self.total_coins = 0
        self.pending_hashes = 0
        self.pending_coins: dict[str, bytes] = {}

    def add(self, hashes: int, coins: dict[str, bytes]) -> None:
        """Record a finished unit of work."""
        self.total_hashes += hashes
        self.total_coins += len(coins)
        self.pending_hashes += hashes
        self.pending_coins.update(coins)

    async def flush(self, redis: Redis) -> None:
        """Write what is pending in one round trip; on error it stays pending."""
        hashes, coins = self.pending_hashes, self.pending_coins
        if not hashes and not coins:
            return
        self.pending_hashes, self.pending_coins = 0, {}
        try:
            await schema.record(redis, hashes, coins)
        except BaseException:
            self.pending_hashes += hashes
            self.pending_coins.update(coins)
            raise


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
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.ledger = Ledger()
        self.outages = OutageLog(log)
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Mine until `stopping` is set, then flush everything and withdraw the heartbeat."""
        flusher = asyncio.create_task(self._flush_periodically(), name="flusher")
        loops = [
            asyncio.create_task(self._mine_loop(), name=f"loop-{n}")
            for n in range(self.settings.worker_loops)
        ]
        await asyncio.gather(*loops)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await self._final_flush()

    async def _mine_loop(self) -> None:
        while not self.stopping.is_set():
            if self.settings.worker_think_time:
                try:
                    await asyncio.wait_for(
                        self.stopping.wait(), timeout=self.settings.worker_think_time
                    )
                    return  # stopped while thinking: no unit in hand
                except TimeoutError:
                    pass
            try:
                await self.mine_once()
            except _Abandoned:
                return

    async def mine_once(self) -> None:
        """One unit of work: 32 random bytes from rng, their hash, the coin check."""
        random = await self._call(
            "rng",
            lambda: rng_pb2_grpc.RngStub(self.rng.next()).GetRandom(
                rng_pb2.RandomRequest(size=BLOCK_SIZE, count=1),
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

    async def _call(self, name: str, attempt: Callable[[], Awaitable[Reply]]) -> Reply:
        """Call until it succeeds, backing off; give up only when stopping."""
        backoff = Backoff()
        while True:
            try:
                reply = await attempt()
            except grpc.aio.AioRpcError as exc:
                self.outages.failed(name, f"{exc.code().name}: {exc.details()}")
                if self.stopping.is_set():
                    raise _Abandoned from None
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=backoff.next_delay())
                    raise _Abandoned
                except TimeoutError:
                    continue
            self.outages.recovered(name)
            return reply

    async def flush_counters(self) -> None:
        """Flush pending hashes and coins and renew the heartbeat; log outages once."""
        try:
            await self.ledger.flush(self.redis)
            ttl = max(3 * self.settings.worker_flush_interval, 2.0)
            await schema.announce_worker(
                self.redis,
                self.worker_id,
                {"pid": os.getpid(), "loops": self.settings.worker_loops},
                ttl,
            )
        except (RedisError, OSError) as exc:
            self.outages.failed("redis", f"{type(exc).__name__}: {exc}")
            return
        self.outages.recovered("redis")

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_flush_interval)
            await self.flush_counters()

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
                        self.ledger.pending_hashes,
                        len(self.ledger.pending_coins),
                        exc,
                    )
                    break
                await asyncio.sleep(0.2)
        log.info(
            "worker stopped: %d hashes, %d coins, %d hashes unflushed",
            self.ledger.total_hashes,
            self.ledger.total_coins,
            self.ledger.pending_hashes,
        )


class _Abandoned(Exception):
    """The unit in hand was given up because the worker is stopping during an outage."""
