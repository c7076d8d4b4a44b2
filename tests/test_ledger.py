"""The worker's ledger against a real Redis whose replies can be lost on the way back."""

import asyncio
import contextlib
import logging

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dockercoins.redis_store import (
    FLUSHED_KEY_PREFIX,
    HASHES_KEY,
    WALLET_KEY,
    BadWrite,
    Heartbeat,
)
from worker_svc.ledger import COIN_BATCH, Ledger


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, when armed, lets a command through and drops its reply."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.drop_next_reply = False
        self.replies_before_drop: int | None = None
        """When set: let that many replies through, then drop the next one."""
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def upstream() -> None:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if self.replies_before_drop is not None:
                    self.replies_before_drop -= 1
                    self.drop_next_reply = self.replies_before_drop < 0
                if self.drop_next_reply:
                    self.replies_before_drop = None
                    self.drop_next_reply = False
                    client_w.close()  # Redis did the work; the client never hears of it
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        redis_w.close()
        with contextlib.suppress(Exception):
            client_w.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def lossy(redis_url):
    """(direct client, proxy, client through the proxy with retries on or off) for a test."""
    direct = Redis.from_url(redis_url)
    proxy = ReplyDroppingProxy(direct.connection_pool.connection_kwargs["port"])
    await proxy.start()
    clients: list[Redis] = []

    def through_proxy(retries: bool) -> Redis:
        retry = {} if retries else {"retry": Retry(NoBackoff(), 0)}  # redis-py retries by default
        clients.append(Redis(port=proxy.port, socket_timeout=2, **retry))
        return clients[-1]

    yield direct, proxy, through_proxy
    for client in clients:
        await client.aclose()
    await direct.aclose()
    await proxy.stop()


async def lose_the_next_reply(proxy: ReplyDroppingProxy, client: Redis) -> None:
    await client.ping()  # connected: the next reply is the flush's
    proxy.drop_next_reply = True


async def test_a_count_whose_reply_was_lost_is_added_once(lossy) -> None:
    direct, proxy, through_proxy = lossy
    client = through_proxy(retries=False)
    ledger = Ledger("worker-under-test")
    ledger.add(100, {"0abc": b"x" * 32})
    await lose_the_next_reply(proxy, client)
    with pytest.raises((RedisConnectionError, OSError)):
        await ledger.flush(client)
    assert int(await direct.get(HASHES_KEY)) == 100, "Redis applied it"
    assert ledger.unflushed_hashes == 100, "the worker cannot know"

    ledger.add(50, {})
    await ledger.flush(client)  # resends the 100 as it was, then the 50
    assert int(await direct.get(HASHES_KEY)) == 150
    assert ledger.unflushed_hashes == 0
    assert await direct.hget(WALLET_KEY, "0abc") == b"x" * 32
    assert ledger.total_hashes == 150


async def test_the_clients_own_retry_after_a_lost_reply_counts_once(lossy) -> None:
    direct, proxy, through_proxy = lossy
    client = through_proxy(retries=True)
    ledger = Ledger("worker-under-test")
    ledger.add(100, {})
    await lose_the_next_reply(proxy, client)
    await ledger.flush(client)
    assert int(await direct.get(HASHES_KEY)) == 100  # sent twice, added once


async def test_two_writers_never_skip_each_others_counts(redis_url) -> None:
    redis = Redis.from_url(redis_url)
    first, second = Ledger("a"), Ledger("b")
    for ledger in (first, second, first, second):
        ledger.add(10, {})
        await ledger.flush(redis)
    assert int(await redis.get(HASHES_KEY)) == 40
    await redis.aclose()


async def test_a_chunked_drain_cut_short_resumes_and_counts_once(lossy) -> None:
    direct, proxy, through_proxy = lossy
    client = through_proxy(retries=False)
    ledger = Ledger("worker-under-test", chunk=10)
    coins = {f"0{n:063x}": bytes([n]) * 32 for n in range(55)}
    for start in range(0, 55, 5):  # units of 5 coins: chunks of 10, 10, 10, 10, 10, 5
        ledger.add(20, dict(list(coins.items())[start : start + 5]))
    await client.ping()
    proxy.replies_before_drop = 2  # two chunks answered, the third applied but not answered
    with pytest.raises((RedisConnectionError, OSError)):
        await ledger.flush(client)
    assert await direct.hlen(WALLET_KEY) == 30
    assert await direct.get(HASHES_KEY) is None, "the count goes last, with the last chunk"
    assert ledger.pending_coins == 35 and ledger.unflushed_hashes == 220

    await ledger.flush(client)
    assert await direct.hgetall(WALLET_KEY) == {k.encode(): v for k, v in coins.items()}
    assert int(await direct.get(HASHES_KEY)) == 220
    assert ledger.pending_coins == 0 and ledger.unflushed_hashes == 0
    await ledger.flush(client)
    assert int(await direct.get(HASHES_KEY)) == 220


async def test_the_backlog_bound_pauses_mining_until_redis_takes_half(redis_url, caplog) -> None:
    """Coins worth a write wake the flusher; at the bound mining pauses (said once), and it
    resumes (said once) only after a flush that leaves half the bound or less."""
    redis = Redis.from_url(redis_url)
    ledger = Ledger("worker-under-test", chunk=COIN_BATCH, max_pending=2 * COIN_BATCH)
    units = iter(range(1_000_000))

    def unit(coins: int) -> dict[str, bytes]:
        return {f"0{next(units):063x}": b"c" * 32 for _ in range(coins)}

    caplog.set_level(logging.INFO, logger="worker_svc.ledger")
    ledger.add(10, unit(COIN_BATCH - 1))
    assert not ledger.coins_waiting.is_set() and ledger.room.is_set()
    ledger.add(10, unit(1))
    assert ledger.coins_waiting.is_set() and ledger.room.is_set()
    ledger.add(10, unit(COIN_BATCH))
    ledger.add(10, unit(COIN_BATCH // 2))
    assert not ledger.room.is_set()
    paused = [r.getMessage() for r in caplog.records if "mining paused" in r.getMessage()]
    assert paused == [
        f"mining paused: {2 * COIN_BATCH} coins not yet in Redis "
        f"(DOCKERCOINS_WORKER_MAX_PENDING_COINS={2 * COIN_BATCH}); resuming once Redis takes them"
    ]
    ledger.make_room()
    assert not ledger.room.is_set(), "nothing written yet"

    await ledger.flush(redis, coins_only=True)
    ledger.make_room()
    assert ledger.room.is_set() and ledger.pending_coins == 0
    assert await redis.hlen(WALLET_KEY) == 2 * COIN_BATCH + COIN_BATCH // 2
    assert [r.getMessage() for r in caplog.records if "mining" in r.getMessage()] == [
        paused[0],
        "mining resumed: Redis took the backlog",
    ]
    await redis.aclose()


async def test_the_unflushed_bound_pauses_mining_once_until_redis_takes_the_work(
    redis_url, caplog
) -> None:
    """At DOCKERCOINS_WORKER_MAX_UNFLUSHED seconds since the oldest hash not yet in Redis was
    found, mining pauses (said once) until a flush puts the work in Redis (said once)."""
    redis = Redis.from_url(redis_url)
    now = [100.0]
    ledger = Ledger("worker-under-test", max_unflushed=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="worker_svc.ledger")
    ledger.add(1000, {})
    now[0] = 109.9
    ledger.add(1000, {})
    assert ledger.room.is_set() and ledger.unflushed_seconds() == pytest.approx(9.9)
    now[0] = 110.0
    ledger.add(1000, {})
    now[0] = 111.0
    ledger.add(1000, {})  # a unit that was in flight: counted, not said again
    assert not ledger.room.is_set()
    said = [r.getMessage() for r in caplog.records if "mining" in r.getMessage()]
    assert said == [
        "mining paused: 3000 hashes not yet in Redis, the oldest found 10.0 s ago "
        "(DOCKERCOINS_WORKER_MAX_UNFLUSHED=10 s); resuming once Redis takes them"
    ]
    assert ledger.paused_for.startswith("3000 hashes not yet in Redis")
    await ledger.flush(redis)
    ledger.make_room()
    assert ledger.room.is_set() and ledger.unflushed_seconds() == 0.0
    assert int(await redis.get(HASHES_KEY)) == 4000
    assert [r.getMessage() for r in caplog.records if "mining" in r.getMessage()][1:] == [
        "mining resumed: Redis took the backlog"
    ]
    await redis.aclose()


async def test_a_count_refused_for_bad_data_is_kept_and_counted_once_later(redis_url) -> None:
    """A flush Redis refuses because a key holds what it should not is BadWrite, naming the
    key: a count that did not go in stays pending (and its age runs on), one that went in
    with a refused write beside it is flushed; once the keys are mended, all is counted once."""
    redis = Redis.from_url(redis_url)
    now = [0.0]
    ledger = Ledger("w", clock=lambda: now[0])
    flushed = FLUSHED_KEY_PREFIX + "w"
    for garbage in ("1e999", "999999999"):  # garbled, and ahead of this writer's flushes
        await redis.set(flushed, garbage)
        ledger.add(100, {})
        with pytest.raises(BadWrite, match=f"`{flushed}`") as refused:
            await ledger.flush(redis)
        assert not refused.value.counted
    now[0] = 5.0
    assert ledger.unflushed_hashes == 200 and ledger.unflushed_seconds() == 5.0
    await redis.delete(flushed)
    await redis.set(WALLET_KEY, "not a hash")
    ledger.add(50, {"0abc": b"x" * 32})
    heartbeat = Heartbeat("w", {}, 10)  # in a transaction: the count goes in, the coin not
    with pytest.raises(BadWrite, match="`wallet` holds another type than a hash") as refused:
        await ledger.flush(redis, heartbeat=heartbeat)
    assert refused.value.counted
    assert int(await redis.get(HASHES_KEY)) == 250 and ledger.unflushed_hashes == 0
    assert ledger.pending_coins == 1
    await redis.delete(WALLET_KEY)
    await ledger.flush(redis, heartbeat=heartbeat)
    assert int(await redis.get(HASHES_KEY)) == 250
    assert await redis.hget(WALLET_KEY, "0abc") == b"x" * 32
    await redis.aclose()
