"""Redis keys, compatible with the original DockerCoins, the few added beside them, and every
read and write of them."""

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from dockercoins.errors import DockercoinsError

HASHES_KEY = "hashes"
"""Counter: every hash any worker computed (the original's key)."""

WALLET_KEY = "wallet"
"""Hash: hex digest of a coin -> the random bytes that hashed to it (the original's key)."""

WORKER_KEY_PREFIX = "dockercoins:worker:"
"""String per live worker, JSON, expiring: workers announce themselves with a heartbeat."""

REDIS_TIMEOUT = 2.0
"""Seconds a Redis call or connect may take before it fails, unless the caller says otherwise."""


def connect(url: str, timeout: float = REDIS_TIMEOUT, password: str | None = None) -> Redis:
    """The one way this project makes a Redis client: every call and every connect fails after
    `timeout` seconds, and the client never retries on its own, so that an outage is seen at
    once and each caller retries at its own pace (with its backoff, or its next sample).
    `password` serves a URL without one (a password in the URL wins)."""
    return Redis.from_url(
        url,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


@dataclass(frozen=True)
class Totals:
    """One consistent reading of the counters, timestamped by the Redis clock."""

    hashes: int
    coins: int
    now: float


class BadData(DockercoinsError):
    """A key holds something the schema does not allow (a counter that is not a number...)."""


async def read_totals(redis: Redis) -> Totals:
    """Read `hashes`, the wallet size and Redis `TIME` in one round trip.

    Not a MULTI transaction: a Redis at its maxmemory refuses MULTI, and the page must still
    read it. Redis runs the three commands of one pipeline back to back anyway.
    BadData if `hashes` is not a number or a key has the wrong type.
    """
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(HASHES_KEY)
            pipe.hlen(WALLET_KEY)
            pipe.time()
            hashes, coins, (seconds, micros) = await pipe.execute()
    except ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        raise BadData(f"`{HASHES_KEY}` must be a string and `{WALLET_KEY}` a hash: {exc}") from None
    try:
        count = int(hashes or 0)
    except ValueError:
        raise BadData(f"`{HASHES_KEY}` holds {hashes[:40]!r}, not a number") from None
    return Totals(hashes=count, coins=int(coins), now=seconds + micros / 1e6)


FLUSHED_KEY_PREFIX = "dockercoins:flushed:"
"""String per worker: the sequence number of its last count that reached `hashes`."""

_ADD_ONCE = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Heartbeat:
    """A worker saying it is alive for `ttl` seconds, with what it has flushed so far."""

    worker: str
    info: dict[str, Any]
    ttl: float


async def record(
    redis: Redis,
    hashes: int,
    coins: dict[str, bytes],
    writer: str = "",
    sequence: int = 0,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Write coins and add `hashes` to the counter in one round trip.

    With a `writer` and its increasing `sequence`, a count is added at most once: a
    retry after a reply lost on the way back (Redis applied it, then went away) is
    recognised and skipped. Coins need no such care: HSET of the same coin is a no-op.
    A `heartbeat` goes in the same transaction, so what it reports as flushed is exactly
    what the counter holds from this writer, even if the worker dies right after.
    """
    async with redis.pipeline(transaction=heartbeat is not None) as pipe:
        if coins:
            pipe.hset(WALLET_KEY, mapping=coins)  # type: ignore[arg-type]
        if hashes and writer:
            keys = [HASHES_KEY, FLUSHED_KEY_PREFIX + writer]
            pipe.eval(_ADD_ONCE, 2, *keys, hashes, sequence, 86400)
        elif hashes:
            pipe.incrby(HASHES_KEY, hashes)
        if heartbeat is not None:
            pipe.set(
                WORKER_KEY_PREFIX + heartbeat.worker,
                json.dumps(heartbeat.info),
                px=int(heartbeat.ttl * 1000),
            )
        await pipe.execute()


async def announce_worker(redis: Redis, worker_id: str, info: dict[str, Any], ttl: float) -> None:
    """Heartbeat: this worker is alive for the next `ttl` seconds."""
    await redis.set(WORKER_KEY_PREFIX + worker_id, json.dumps(info), px=int(ttl * 1000))


HEARTBEAT_PAGE = 1000
"""Heartbeat keys one SCAN step asks for, and read back with one MGET."""


def is_mining(heartbeat: dict[str, Any]) -> bool:
    """Whether a heartbeat says its worker mines now (one without `mining`, from an older
    worker, does)."""
    return heartbeat.get("mining", True) is not False


async def mining_workers(redis: Redis) -> int:
    """How many workers have a heartbeat that has not expired and say they are mining."""
    return sum(map(is_mining, await live_heartbeats(redis)))


async def live_heartbeats(redis: Redis) -> list[dict[str, Any]]:
    """The heartbeats that have not expired, each a JSON object.

    Reads one page of keys per SCAN step and its values with one MGET, so each round trip
    stays small however many workers there are. BadData if a heartbeat is not a JSON object.
    """
    found: list[dict[str, Any]] = []
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=WORKER_KEY_PREFIX + "*", count=HEARTBEAT_PAGE)
        if keys:
            for key, value in zip(keys, await redis.mget(keys), strict=True):
                if value is None:
                    continue  # expired between SCAN and MGET (or not a string)
                try:
                    info = json.loads(value)
                except ValueError:
                    info = None
                if not isinstance(info, dict):
                    name = key.decode(errors="replace") if isinstance(key, bytes) else key
                    raise BadData(f"worker heartbeat `{name}` is not a JSON object")
                found.append(info)
        if cursor == 0:
            return found
