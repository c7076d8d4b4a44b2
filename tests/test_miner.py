"""The miner and each of its parts in this process: real rng and hasher servers on free ports in
the test's event loop, the session's real Redis, the miner driven through a bounded run or a
stop; what a user sees of a worker (the counts in Redis, the log lines, the health reports)."""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from dockercoins.backoff import OutageLog
from dockercoins.net import free_port
from dockercoins.redis_store import (
    HASHES_KEY,
    WALLET_KEY,
    WORKER_KEY_PREFIX,
    WorkerHeartbeat,
    connect,
    heartbeats,
)
from dockercoins.settings import load_settings
from tests.stack import wait_until_async
from tests.support import FAST_WORKER, GrpcServers, SourceForwarder
from worker_svc.config import WorkerSettings
from worker_svc.flusher import Flusher
from worker_svc.health import HealthWatch, StuckError
from worker_svc.ledger import COIN_BATCH, Ledger
from worker_svc.miner import Miner
from worker_svc.server import open_miner
from worker_svc.units import Units


class Reports:
    """What a miner reported to its health server, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    async def __call__(self, ready: bool, live: bool) -> None:
        self.seen.append((ready, live))

    @property
    def last(self) -> tuple[bool, bool] | None:
        return self.seen[-1] if self.seen else None


def worker_settings(rng: str, hasher: str, redis_url: str, **fields: Any) -> WorkerSettings:
    """A worker's settings: a 2 s grace, FAST_WORKER's costs unless turbo, then `fields`."""
    fast = {} if fields.get("profile") == "turbo" else FAST_WORKER
    return load_settings(
        WorkerSettings,
        rng_addr=rng,
        hasher_addr=hasher,
        redis_url=redis_url,
        **{**fast, "grace": 2.0, **fields},
    )


@contextlib.asynccontextmanager
async def mining(miner: Miner) -> AsyncIterator[asyncio.Task[None]]:
    """The miner running until the block ends, then stopped (its failure raised, if any)."""
    task = asyncio.create_task(miner.run())
    try:
        yield task
    finally:
        miner.stop()
        await asyncio.wait_for(task, 15)


def said(caplog: pytest.LogCaptureFixture, pattern: str) -> int:
    """How many log lines match `pattern`."""
    return sum(bool(re.search(pattern, record.getMessage())) for record in caplog.records)


def stopped_line(caplog: pytest.LogCaptureFixture) -> re.Match[str]:
    lines = [r.getMessage() for r in caplog.records if "worker stopped" in r.getMessage()]
    assert len(lines) == 1, lines
    found = re.fullmatch(
        r"worker stopped: (\d+) hashes, (\d+) coins, (\d+) hashes unflushed", lines[0]
    )
    assert found, lines[0]
    return found


def assert_counted_once(miner: Miner, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis holds exactly what the miner mined, each coin real; the heartbeat is withdrawn and
    the last line says so."""
    client = redis.Redis.from_url(redis_url)
    ledger = miner.ledger
    assert int(client.get(HASHES_KEY) or 0) == ledger.total_hashes > 0
    wallet = client.hgetall(WALLET_KEY)
    assert len(wallet) == ledger.total_coins
    for digest, block in wallet.items():
        assert len(block) == 32
        assert digest.decode() == hashlib.sha256(block).hexdigest()
        assert digest.startswith(b"0" * miner.settings.difficulty)
    assert not client.keys(WORKER_KEY_PREFIX + "*"), "the heartbeat is withdrawn"
    found = stopped_line(caplog)
    assert (int(found[1]), int(found[2]), int(found[3])) == (
        ledger.total_hashes,
        ledger.total_coins,
        0,
    )


@pytest.fixture(autouse=True)
def worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@contextlib.contextmanager
def redis_writes_paused(redis_url: str) -> Any:
    """Redis refuses no command but answers no write (CLIENT PAUSE WRITE): a silent peer for
    the flusher, while the test's own reads go on. Unpaused when the block ends."""
    client = redis.Redis.from_url(redis_url)
    client.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        yield client
    finally:
        client.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize(
    ("profile", "units", "fields"),
    [
        ("classic", 40, {"worker_loops": 2, "worker_batch": 100}),
        ("turbo", 12, {}),
    ],
)
async def test_a_bounded_run_mines_exactly_its_units_and_counts_them_once(
    servers: GrpcServers,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    profile: str,
    units: int,
    fields: dict[str, Any],
) -> None:
    rng, hasher = await servers.upstreams(0, profile=profile)
    settings = worker_settings(rng, hasher, redis_url, profile=profile, **fields)
    reports = Reports()
    async with open_miner(settings, reports) as miner:
        await asyncio.wait_for(miner.run(units=units), 60)

    assert miner.ledger.total_hashes == units * settings.worker_batch
    assert_counted_once(miner, redis_url, caplog)
    assert reports.seen[0] == (False, True), "not ready before a unit"
    if settings.difficulty == 1:  # about one hash in 16 (4000 hashes: within 4.5 deviations)
        assert 1 / 24 < miner.ledger.total_coins / miner.ledger.total_hashes < 1 / 11
    assert said(caplog, "coin found: 0") == (
        miner.ledger.total_coins if profile == "classic" else 0
    )
    assert not said(caplog, "unreachable")


def established_connections(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local end is `port` (the server side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":
                    count += 1
    return count


@pytest.mark.parametrize("pool_size", [1, 3])
async def test_streaming_loops_share_a_pool_of_n_channels_over_n_connections(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture, pool_size: int
) -> None:
    rng, hasher = await servers.upstreams(0)
    settings = worker_settings(
        rng,
        hasher,
        redis_url,
        worker_streaming=True,
        worker_batch=100,
        worker_loops=3,
        worker_pool_size=pool_size,
        worker_think_time=0,
    )
    async with open_miner(settings) as miner, mining(miner):
        await wait_until_async(lambda: miner.ledger.flushed_hashes > 20_000, 30, "mining")
        # Three loops share the pool: one connection per channel, whatever the loop count.
        rng_port, hasher_port = int(rng.rsplit(":", 1)[1]), int(hasher.rsplit(":", 1)[1])
        assert established_connections(rng_port) == pool_size
        assert established_connections(hasher_port) == pool_size
    assert miner.ledger.total_hashes % 100 == 0, "whole batches only"
    assert_counted_once(miner, redis_url, caplog)


def failed_calls(upstream: str) -> float:
    """The worker's metric of failed calls to `upstream` (UNAVAILABLE), in this process."""
    labels = {"upstream": upstream, "code": "UNAVAILABLE"}
    return REGISTRY.get_sample_value("dockercoins_worker_errors_total", labels) or 0.0


async def test_an_unreachable_upstream_is_said_once_and_mining_resumes_by_itself(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng_port = free_port()
    hasher = await servers.hasher(hasher_latency=0)
    settings = worker_settings(f"127.0.0.1:{rng_port}", hasher, redis_url)
    before = failed_calls("rng")
    async with open_miner(settings) as miner, mining(miner):
        await wait_until_async(lambda: said(caplog, "rng unreachable: UNAVAILABLE"), 10, "outage")
        await wait_until_async(lambda: failed_calls("rng") >= 5 + before, 10, "retries")
        await servers.rng(port=rng_port, rng_read_cost=0)
        await wait_until_async(lambda: miner.ledger.flushed_hashes > 20, 15, "mining")
    assert said(caplog, "rng unreachable") == 1
    assert said(caplog, r"rng is back after [\d.]+ s \(\d+ failed attempts\)") == 1
    assert_counted_once(miner, redis_url, caplog)


async def test_readiness_follows_the_upstreams_and_liveness_holds_through_an_outage(
    servers: GrpcServers, redis_url: str
) -> None:
    rng, hasher = await servers.upstreams(0)
    reports = Reports()
    settings = worker_settings(rng, hasher, redis_url, rpc_timeout=1.0)
    async with open_miner(settings, reports) as miner, mining(miner):
        await wait_until_async(lambda: reports.last == (True, True), 10, "ready")
        await servers.at(hasher).stop(0)
        await wait_until_async(lambda: reports.last == (False, True), 10, "not ready")
        assert miner.health.readiness(asyncio.get_running_loop().time()) == "hasher unreachable"
        await servers.hasher(port=int(hasher.rsplit(":", 1)[1]), hasher_latency=0)
        await wait_until_async(lambda: reports.last == (True, True), 15, "ready again")
    assert reports.seen[:2] == [(False, True), (True, True)]
    assert all(live for _, live in reports.seen), "an outage never fails liveness"


async def test_counts_wait_out_a_redis_outage_and_go_in_once(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng, hasher = await servers.upstreams(0)
    port = free_port()
    settings = worker_settings(rng, hasher, f"redis://127.0.0.1:{port}/0")
    session = redis.Redis.from_url(redis_url)
    host = session.connection_pool.connection_kwargs
    forwarder = SourceForwarder(f"{host['host']}:{host['port']}", "127.0.0.1")
    try:
        async with open_miner(settings) as miner, mining(miner):
            await wait_until_async(lambda: said(caplog, "redis unreachable"), 10, "the outage")
            await wait_until_async(lambda: miner.ledger.unflushed_hashes > 50, 10, "mining")
            await forwarder.start(port)  # Redis is back at the worker's address
            held = miner.ledger.total_hashes
            await wait_until_async(lambda: miner.ledger.flushed_hashes >= held, 15, "the backlog")
        assert said(caplog, "redis unreachable") == 1
        assert said(caplog, "redis is back after") == 1
        assert_counted_once(miner, redis_url, caplog)
    finally:
        await forwarder.close()


async def test_streams_ended_by_the_server_are_reopened_without_an_outage(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker_svc.stream")
    rng, hasher = await servers.upstreams(0, max_connection_age=0.5)
    settings = worker_settings(
        rng, hasher, redis_url, worker_streaming=True, worker_batch=10, worker_think_time=0.001
    )
    async with open_miner(settings) as miner, mining(miner):
        await wait_until_async(lambda: said(caplog, "reopening") >= 3, 30, "three reconnections")
        mined = miner.ledger.flushed_hashes
        await wait_until_async(lambda: miner.ledger.flushed_hashes > mined, 10, "mining on")
    assert not said(caplog, "unreachable")
    assert_counted_once(miner, redis_url, caplog)


async def test_a_stream_ended_while_mining_is_paused_is_not_an_outage(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Mining paused at the unflushed bound for several of the servers' idle timeouts: the
    servers end the streams left idle; the worker reopens them once it resumes, and says
    nothing of rng or hasher (it used to log `hasher unreachable`, then `is back`)."""
    idle = 0.3
    rng, hasher = await servers.upstreams(0, profile="turbo", call_idle_timeout=idle)
    settings = worker_settings(
        rng,
        hasher,
        redis_url,
        profile="turbo",
        worker_loops=1,
        worker_flush_interval=0.1,
        redis_timeout=0.2,
        worker_max_unflushed=0.5,
    )
    async with open_miner(settings) as miner, mining(miner):
        await wait_until_async(lambda: miner.ledger.flushed_hashes > 0, 10, "mining")
        with redis_writes_paused(redis_url):
            await wait_until_async(lambda: said(caplog, "mining paused: "), 10, "the pause")
            await wait_until_async(lambda: said(caplog, "waited on its client"), 10, "an end")
            # Several idle timeouts more: a pair reopened during the pause would be ended too.
            await wait_until_async(lambda: miner.ledger.unflushed_seconds() > 8 * idle, 10)
            assert not miner.ledger.room.is_set()
        await wait_until_async(lambda: said(caplog, "mining resumed"), 10, "resuming")
        resumed = miner.ledger.total_hashes
        await wait_until_async(lambda: miner.ledger.flushed_hashes > resumed, 10, "mining on")
    assert not said(caplog, r"(rng|hasher) (unreachable|is back)"), caplog.text
    assert said(caplog, "redis unreachable") == 1 and said(caplog, "mining paused") == 1
    assert_counted_once(miner, redis_url, caplog)


async def test_the_pending_coins_bound_pauses_mining_until_redis_takes_them(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng, hasher = await servers.upstreams(0)
    reports = Reports()
    settings = worker_settings(
        rng,
        hasher,
        redis_url,
        worker_batch=1000,
        worker_think_time=0,
        worker_max_pending_coins=4 * COIN_BATCH,
        redis_timeout=0.2,
    )
    async with open_miner(settings, reports) as miner, mining(miner):
        await wait_until_async(lambda: reports.last == (True, True), 10, "ready")
        with redis_writes_paused(redis_url):
            await wait_until_async(lambda: not miner.ledger.room.is_set(), 20, "the pause")
            bound = f"(DOCKERCOINS_WORKER_MAX_PENDING_COINS={4 * COIN_BATCH})"
            assert said(caplog, r"mining paused: \d+ coins not yet in Redis " + re.escape(bound))
            held = miner.ledger.total_hashes
            await wait_until_async(lambda: reports.last == (False, True), 5, "not ready")
            assert miner.health.readiness(0.0).startswith("redis unreachable")
            assert miner.ledger.total_hashes == held, "paused: no unit starts"
        await wait_until_async(lambda: said(caplog, "mining resumed"), 10, "resuming")
        await wait_until_async(lambda: miner.ledger.total_hashes > held, 10, "mining on")
    assert said(caplog, "mining paused") == 1
    assert_counted_once(miner, redis_url, caplog)


async def test_a_stopped_miner_with_redis_silent_says_what_it_could_not_flush_within_the_grace(
    servers: GrpcServers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng, hasher = await servers.upstreams(0)
    settings = worker_settings(rng, hasher, redis_url, grace=1.0, redis_timeout=0.3)
    async with open_miner(settings) as miner:
        task = asyncio.create_task(miner.run())
        await wait_until_async(lambda: miner.ledger.flushed_hashes > 0, 10, "mining")
        with redis_writes_paused(redis_url):
            await wait_until_async(lambda: miner.ledger.unflushed_hashes > 0, 10, "a backlog")
            miner.stop()
            took = await wait_until_async(task.done, 5, "the stop")
            await task
    assert took < settings.grace + 1
    found = stopped_line(caplog)
    assert int(found[3]) == miner.ledger.unflushed_hashes > 0
    assert said(caplog, rf"could not flush {found[3]} hashes and \d+ coins") == 1


async def test_a_stuck_loop_fails_liveness_and_ends_the_miner(
    servers: GrpcServers, redis_url: str
) -> None:
    class HungLoops:
        """Loops that await something that never comes: the defect liveness is for."""

        async def run(self, index: int) -> None:
            await asyncio.Event().wait()

    rng, hasher = await servers.upstreams(0)
    reports = Reports()
    settings = worker_settings(rng, hasher, redis_url, rpc_timeout=0.2, worker_liveness_timeout=2.5)
    async with open_miner(settings, reports) as miner:
        miner.loops = HungLoops()  # type: ignore[assignment]
        started = asyncio.get_running_loop().time()
        with pytest.raises(StuckError, match=r"no step of loop-0 in 2.5 s"):
            await asyncio.wait_for(miner.run(), 15)
    assert 2.5 <= asyncio.get_running_loop().time() - started < 6
    assert reports.seen[0] == (False, True) and reports.last == (False, False)


async def test_a_flusher_that_dies_ends_the_miner_after_a_last_flush(
    servers: GrpcServers, redis_url: str
) -> None:
    class BrokenFlusher(Flusher):
        async def run(self) -> None:
            await wait_until_async(lambda: self.ledger.total_hashes > 0, 10, "a unit")
            raise ValueError("a defect in the flusher")

    rng, hasher = await servers.upstreams(0)
    settings = worker_settings(rng, hasher, redis_url)
    async with open_miner(settings) as miner:
        miner.flusher = BrokenFlusher(settings, miner.flusher.redis, miner.units, miner.health)
        with pytest.raises(ValueError, match="a defect in the flusher"):
            await asyncio.wait_for(miner.run(), 15)
    assert miner.ledger.total_hashes > 0
    client = redis.Redis.from_url(redis_url)
    assert int(client.get(HASHES_KEY)) == miner.ledger.total_hashes, "counted before the end"


def parts(
    clock: Any = time.monotonic, **fields: Any
) -> tuple[WorkerSettings, Ledger, Units, OutageLog]:
    """A worker's settings (Redis and upstreams unused), a ledger on `clock`, units and an
    outage log."""
    settings = worker_settings("127.0.0.1:1", "127.0.0.1:2", "redis://127.0.0.1:3/0", **fields)
    ledger = Ledger("w", max_unflushed=settings.worker_max_unflushed, clock=clock)
    outages = OutageLog(logging.getLogger("test"))
    return settings, ledger, Units(settings, ledger, outages), outages


def unit(blocks: int) -> tuple[bytes, bytes]:
    """A unit's random bytes and their digests, as hasher returns them."""
    data = os.urandom(32 * blocks)
    digests = [hashlib.sha256(data[i : i + 32]).digest() for i in range(0, len(data), 32)]
    return data, b"".join(digests)


async def test_units_start_none_past_the_limit_and_stop_the_miner_at_the_last() -> None:
    _, ledger, units, _ = parts(worker_think_time=0)
    units.limit = 3
    assert [await units.next_unit("loop-0") for _ in range(3)] == [0.0, 0.0, 0.0]
    blocked = asyncio.create_task(units.next_unit("loop-1"))
    await wait_until_async(lambda: "loop-1" in units.steps, 5, "a step while held at the limit")
    assert not blocked.done()
    units.give_back(1)  # a unit of a broken stream: it may start again
    assert await asyncio.wait_for(blocked, 5) == 0.0
    data, digests = unit(2)
    for _ in range(2):
        units.record("loop-0", data, digests)
        assert not units.stopping.is_set()
    units.record("loop-0", data, digests)
    assert units.stopping.is_set(), "the last unit stops the miner"
    assert await units.next_unit("loop-0") is None
    assert ledger.total_hashes == 6 and set(units.steps) == {"loop-0", "loop-1"}


async def test_the_health_watch_says_why_the_worker_is_not_ready() -> None:
    found_at = [0.0]
    settings, ledger, units, outages = parts(
        lambda: found_at[0], worker_max_unflushed=5, worker_ready_timeout=2
    )
    health = HealthWatch(settings, units)
    assert health.readiness(time.monotonic()) == "no unit of work finished in 2 s"
    units.step("loop-0")
    units.record("loop-0", *unit(1))
    now = units.last_unit
    assert health.readiness(now) == ""
    outages.failed("hasher", "UNAVAILABLE: gone")
    assert health.readiness(now) == "hasher unreachable"
    outages.recovered("hasher")
    found_at[0] = 6.0  # the hash found at 0 is not in Redis yet
    ledger.add(1, {})
    assert health.readiness(now) == (
        "mining paused: 2 hashes not yet in Redis, the oldest found 6.0 s ago "
        "(DOCKERCOINS_WORKER_MAX_UNFLUSHED=5 s)"
    )
    assert health.stuck(now + settings.liveness_timeout + 1) == ["loop-0"]
    units.stop()
    assert health.readiness(now) == "stopping"
    assert health.stuck(now + settings.liveness_timeout + 1) == []


async def test_the_flusher_sends_the_count_with_the_heartbeat_and_says_an_outage_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings, ledger, units, _ = parts(worker_loops=3)
    health = HealthWatch(settings, units)
    health.ready = True
    units.rng_modes_seen.update({"buffered", ""})
    units.step("loop-0")
    units.record("loop-0", *unit(2))
    redis_client: Redis = connect(redis_url)
    try:
        flusher = Flusher(settings, redis_client, units, health)
        assert await flusher.flush_counters()
        [beat] = [beat async for beat in heartbeats(redis_client)]
        assert isinstance(beat, WorkerHeartbeat) and beat.key == WORKER_KEY_PREFIX + "w"
        assert (beat.info.mining, beat.info.rng_mode) == (True, "buffered")
        assert beat.info.latency is not None
        assert int(await redis_client.get(HASHES_KEY)) == 2 == ledger.flushed_hashes

        away: Redis = connect(f"redis://127.0.0.1:{free_port()}/0")
        flusher.redis = away
        units.record("loop-0", *unit(1))
        assert not await flusher.flush_counters() and not await flusher.flush_counters()
        assert said(caplog, "redis unreachable: ConnectionError") == 1
        await away.aclose()
        flusher.redis = redis_client
        await flusher.final_flush(time.monotonic() + 5)
        assert int(await redis_client.get(HASHES_KEY)) == 3 == ledger.flushed_hashes
        assert await redis_client.hlen(WALLET_KEY) == ledger.total_coins
        assert [beat async for beat in heartbeats(redis_client)] == [], "withdrawn"
    finally:
        await redis_client.aclose()
