"""Redis keys, compatible with the original DockerCoins, the few added beside them, and every
read and write of them.

Every value read back is validated here, where it enters, and nowhere else: a counter is a
count, a heartbeat is a bounded JSON object of the schema a worker writes (`HeartbeatInfo`), a
key holds the type it should. What is not is `BadData` (the counters) or a `BadHeartbeat` (one
worker's heartbeat, skipped), naming the key; the callers never see an unvalidated value.
"""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from dockercoins.errors import DockercoinsError
from dockercoins.settings import REDIS_TIMEOUT
from dockercoins.stages import Summary

HASHES_KEY = "hashes"
"""Counter: every hash any worker computed (the original's key)."""

WALLET_KEY = "wallet"
"""Hash: hex digest of a coin -> the random bytes that hashed to it (the original's key)."""

WORKER_KEY_PREFIX = "dockercoins:worker:"
"""String per live worker, JSON, expiring: workers announce themselves with a heartbeat."""


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


class BadWrite(BadData):
    """A write Redis refused for what a key holds. `counted`: whether the count went in all the
    same, in the same transaction as the refused write (Redis does not roll one back)."""

    def __init__(self, message: str, counted: bool) -> None:
        super().__init__(message)
        self.counted = counted


COUNTER_DIGITS = 19
"""Digits of the largest count Redis keeps (INCRBY stops at 2**63 - 1)."""

SHOWN = 40
"""Characters of a bad value or key quoted in a message."""


def _shown(raw: bytes | str) -> str:
    """A key or value as a message quotes it: decoded, cut to SHOWN characters."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


def parse_counter(key: str, raw: bytes) -> int:
    """The count a counter key holds (empty: 0); BadData unless it is 0 to 2**63 - 1."""
    if not raw:
        return 0
    if len(raw) > COUNTER_DIGITS or not raw.isdigit() or int(raw) >= 2**63:
        raise BadData(f"`{key}` holds {_shown(raw)!r}, not a number of hashes")
    return int(raw)


def _check_replies(replies: list[Any], written: list[tuple[str, str]]) -> None:
    """Raise what a pipeline's replies hold: BadData, naming the key, for a key of the wrong
    type (WRONGTYPE), a counter that cannot count, or what a script found bad (BADDATA); any
    other error of Redis as it is. `written`: per command, its key and what it must hold."""
    for reply, (key, holds) in zip(replies, written, strict=True):
        if not isinstance(reply, ResponseError):
            continue
        message = str(reply)
        if "BADDATA " in message:
            raise BadData(message.split("BADDATA ", 1)[1].split(" script:", 1)[0]) from None
        if "WRONGTYPE" in message:
            raise BadData(f"`{key}` holds another type than {holds} (WRONGTYPE)") from None
        if "not an integer" in message or "overflow" in message:
            raise BadData(f"`{key}` cannot count: {message}") from None
        raise reply


async def read_totals(redis: Redis) -> Totals:
    """Read `hashes`, the wallet size and Redis `TIME` in one round trip.

    Not a MULTI transaction: a Redis at its maxmemory refuses MULTI, and the page must still
    read it. Redis runs the three commands of one pipeline back to back anyway. At most
    COUNTER_DIGITS + 1 bytes of `hashes` are read, whatever it holds.
    BadData if `hashes` is not a count or a key has the wrong type.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.getrange(HASHES_KEY, 0, COUNTER_DIGITS)
        pipe.hlen(WALLET_KEY)
        pipe.time()
        replies = await pipe.execute(raise_on_error=False)
    _check_replies(replies, [(HASHES_KEY, "a counter"), (WALLET_KEY, "a hash"), ("", "")])
    hashes, coins, (seconds, micros) = replies
    return Totals(
        hashes=parse_counter(HASHES_KEY, hashes), coins=int(coins), now=seconds + micros / 1e6
    )


FLUSHED_KEY_PREFIX = "dockercoins:flushed:"
"""String per worker: the sequence number of its last count that reached `hashes`."""

SEQUENCE_DIGITS = 15
"""Digits a flush sequence number may have: exact in Lua's numbers (doubles)."""

_ADD_ONCE = f"""
local function bad(why) return redis.error_reply('BADDATA `' .. KEYS[2] .. '` ' .. why) end
local last, shown = 0, '0'
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind == 'string' then
  local raw = redis.call('GETRANGE', KEYS[2], 0, {SHOWN} - 1)
  if redis.call('STRLEN', KEYS[2]) > {SEQUENCE_DIGITS} or not string.match(raw, '^%d+$') then
    return bad('holds ' .. string.format('%q', raw) ..
      ', not the sequence number of a flush')
  end
  last, shown = tonumber(raw), raw
elseif kind ~= 'none' then
  return bad('is a ' .. kind .. ', not the sequence number of a flush')
end
if tonumber(ARGV[2]) == last then return 0 end
if tonumber(ARGV[2]) < last then
  return bad('says flush ' .. shown .. ' is in, ahead of this flush ' .. ARGV[2] ..
    ': not counted, kept')
end
local added = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(added) == 'table' and added['err'] then
  return redis.error_reply('BADDATA `' .. KEYS[1] .. '` cannot count: ' .. added['err'])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""
"""Add ARGV[1] hashes to KEYS[1] unless the writer's last counted flush (KEYS[2]) is ARGV[2]
already (a resend of it). Every value it reads is checked first: a BADDATA error, and nothing
written, if one is not what this script writes or is ahead of ARGV[2] (a writer's flushes are
sent in order, each until it is in)."""


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

    BadWrite, naming the key, if a key written holds what it should not (the wallet another
    type than a hash, `hashes` no count, the writer's last flush number garbled or ahead of
    `sequence`); it says whether the count went in all the same.
    """
    written: list[tuple[str, str]] = []
    """The key each command writes, and what it must hold, for the errors."""
    count = -1
    """Which reply is the count's (-1: none sent)."""
    async with redis.pipeline(transaction=heartbeat is not None) as pipe:
        if coins:
            pipe.hset(WALLET_KEY, mapping=coins)  # type: ignore[arg-type]
            written.append((WALLET_KEY, "a hash"))
        if hashes and writer:
            keys = [HASHES_KEY, FLUSHED_KEY_PREFIX + writer]
            pipe.eval(_ADD_ONCE, 2, *keys, hashes, sequence, 86400)
            count = len(written)
            written.append((HASHES_KEY, "a counter"))
        elif hashes:
            pipe.incrby(HASHES_KEY, hashes)
            count = len(written)
            written.append((HASHES_KEY, "a counter"))
        if heartbeat is not None:
            pipe.set(
                WORKER_KEY_PREFIX + heartbeat.worker,
                json.dumps(heartbeat.info),
                px=int(heartbeat.ttl * 1000),
            )
            written.append((WORKER_KEY_PREFIX + heartbeat.worker, "a string"))
        replies = await pipe.execute(raise_on_error=False)
    try:
        _check_replies(replies, written)
    except BadData as exc:
        counted = count >= 0 and not isinstance(replies[count], Exception)
        raise BadWrite(str(exc), counted) from None


async def withdraw_heartbeat(redis: Redis, worker: str) -> None:
    """Take a stopping worker's heartbeat away: it no longer counts among the live workers."""
    await redis.delete(WORKER_KEY_PREFIX + worker)


HEARTBEAT_PAGE = 100
"""Heartbeat keys one SCAN step asks for, and read back in one round trip: at most
HEARTBEAT_PAGE x MAX_HEARTBEAT_BYTES in hand at once."""

MAX_HEARTBEATS = 1000
"""Heartbeats read per sample; more are bad data (the launcher starts at most 200 workers)."""

MAX_HEARTBEAT_BYTES = 64 * 1024
"""Longest heartbeat read: a worker's is 1-5 KB, and at most about 60 KB (every bucket of every
stage filled)."""


RNG_MODES = r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+){0,7}$"
"""A heartbeat's `rng_mode`: one to eight names, comma-separated (shown on the page and used as
a metric's label, so no other characters)."""


class HeartbeatInfo(BaseModel):
    """What the readers of a heartbeat use of it, validated; the rest is not read."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    mining: bool = True
    """Whether the worker mines now (one from an older worker, without it, does)."""
    rng_mode: Annotated[str, Field(pattern=RNG_MODES, max_length=200)] | None = None
    """The mode(s) its rng named lately, comma-separated."""
    latency: Summary | None = None
    """Its stage times (dockercoins.stages)."""


@dataclass(frozen=True)
class WorkerHeartbeat:
    """A heartbeat that has not expired, validated."""

    key: str
    info: HeartbeatInfo

    @property
    def mining(self) -> bool:
        return self.info.mining


@dataclass(frozen=True)
class BadHeartbeat:
    """A key among the heartbeats that is not one: skipped, and said why."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"worker heartbeat `{_shown(self.key)}` skipped: {self.reason}"


def _first_error(exc: ValidationError) -> str:
    """The first problem pydantic found, in one line: where, and what."""
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where + ': ' if where else ''}{error['msg']}{more}"


def parse_heartbeat(
    key: bytes | str, kind: bytes | str, value: bytes
) -> WorkerHeartbeat | BadHeartbeat | None:
    """One heartbeat key as read back (its TYPE and its first MAX_HEARTBEAT_BYTES + 1 bytes):
    the validated heartbeat, a BadHeartbeat saying why not, or None if it has expired."""
    name = key.decode(errors="replace") if isinstance(key, bytes) else key
    kind = kind.decode(errors="replace") if isinstance(kind, bytes) else kind
    if kind == "none":
        return None
    if kind != "string":
        return BadHeartbeat(name, f"a {kind}, not a string")
    if len(value) > MAX_HEARTBEAT_BYTES:
        return BadHeartbeat(name, f"longer than {MAX_HEARTBEAT_BYTES} bytes")
    try:
        return WorkerHeartbeat(name, HeartbeatInfo.model_validate_json(value))
    except ValidationError as exc:
        return BadHeartbeat(name, _first_error(exc))


async def heartbeats(redis: Redis) -> AsyncIterator[WorkerHeartbeat | BadHeartbeat]:
    """Every heartbeat that has not expired, validated, or a BadHeartbeat for each that is not
    one; past MAX_HEARTBEATS keys, one BadHeartbeat for the rest, which are not read.

    One page of keys per SCAN step, read back in one round trip (TYPE and GETRANGE: at most
    MAX_HEARTBEAT_BYTES + 1 bytes of each), so that a round trip, and the memory in hand,
    stay small however many workers there are and whatever their keys hold.
    """
    cursor = 0
    seen: set[bytes | str] = set()
    while True:
        cursor, keys = await redis.scan(cursor, match=WORKER_KEY_PREFIX + "*", count=HEARTBEAT_PAGE)
        keys = [key for key in keys if key not in seen]
        if len(seen) + len(keys) > MAX_HEARTBEATS:
            yield BadHeartbeat(
                WORKER_KEY_PREFIX + "*", f"more than {MAX_HEARTBEATS} heartbeats: the rest unread"
            )
            return
        seen.update(keys)
        if keys:
            async with redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.type(key)
                    pipe.getrange(key, 0, MAX_HEARTBEAT_BYTES)
                replies = await pipe.execute(raise_on_error=False)
            for key, kind, value in zip(keys, replies[::2], replies[1::2], strict=True):
                if isinstance(kind, Exception):
                    raise kind
                if isinstance(value, Exception) and kind == b"string":
                    raise value
                heartbeat = parse_heartbeat(
                    key, kind, b"" if isinstance(value, Exception) else value
                )
                if heartbeat is not None:
                    yield heartbeat
        if cursor == 0:
            return


async def mining_workers(redis: Redis) -> int:
    """How many workers have a valid heartbeat that has not expired and say they are mining."""
    mining = 0
    async for heartbeat in heartbeats(redis):
        mining += isinstance(heartbeat, WorkerHeartbeat) and heartbeat.mining
    return mining
