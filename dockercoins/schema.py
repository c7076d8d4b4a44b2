"""Redis keys, compatible with the original DockerCoins, and the few DockerCoins adds beside them."""

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

HASHES_KEY = "hashes"
"""Counter: every hash any worker computed (the original's key)."""

WALLET_KEY = "wallet"
"""Hash: hex digest of a coin -> the random bytes that hashed to it (the original's key)."""

WORKER_KEY_PREFIX = "dockercoins:worker:"
"""String per live worker, JSON, expiring: workers announce themselves with a heartbeat."""

RNG_MODE_KEY = "dockercoins:rng_mode"
"""String: the rng mode the running stack was started with, for the web UI."""


@dataclass(frozen=True)
class Totals:
    """One consistent reading of the counters, timestamped by the Redis clock."""

    hashes: int
    coins: int
    now: float


async def read_totals(redis: Redis) -> Totals:
    """Read `hashes`, the wallet size and Redis `TIME` in one transaction."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(HASHES_KEY)
        pipe.hlen(WALLET_KEY)
        pipe.time()
        hashes, coins, (seconds, micros) = await pipe.execute()
    return Totals(hashes=int(hashes or 0), coins=int(coins), now=seconds + micros / 1e6)


async def record(redis: Redis, hashes: int, coins: dict[str, bytes]) -> None:
    """Write coins and add `hashes` to the counter in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        if coins:
            pipe.hset(WALLET_KEY, mapping=coins)  # type: ignore[arg-type]
        if hashes:
            pipe.incrby(HASHES_KEY, hashes)
        await pipe.execute()


async def announce_worker(redis: Redis, worker_id: str, info: dict[str, Any], ttl: float) -> None:
    """Heartbeat: this worker is alive for the next `ttl` seconds."""
    await redis.set(WORKER_KEY_PREFIX + worker_id, json.dumps(info), px=int(ttl * 1000))


async def live_workers(redis: Redis) -> int:
    """How many workers have sent a heartbeat that has not expired."""
    count = 0
    async for _ in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000):
        count += 1
    return count
