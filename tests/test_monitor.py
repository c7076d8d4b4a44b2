"""The web UI's monitor in this process against a real Redis, driven through its bounded run or
one sample at a time: the fitted rate, the chart's points, the marks of the worker count, the
workers it counts and why it cannot read Redis."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY, WORKER_KEY_PREFIX, connect
from tests.stack import wait_until_async
from tests.support import announce_worker
from webui.monitor import SpeedMonitor


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Redis]:
    client: Redis = connect(url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_bounded_run_fits_the_rate_and_marks_where_a_worker_began(redis_url: str) -> None:
    async with redis_client(redis_url) as client:
        monitor = SpeedMonitor(
            client, sample_interval=0.1, point_interval=0.1, window=5, mark_settle=0.3
        )
        second: list[float] = []

        async def mine() -> None:
            """50 hashes a chart point; a second worker after the sixth point."""
            while len(monitor.points) < 12:
                await client.incrby(HASHES_KEY, 50)
                if len(monitor.points) == 6 and not second:
                    second.append(monitor.points[-1].time)
                    await announce_worker(client, "two", {"loops": 1}, ttl=30)
                await monitor.next_point()

        await announce_worker(client, "one", {"loops": 1, "rng_mode": "buffered"}, ttl=30)
        mining = asyncio.create_task(mine())
        await asyncio.wait_for(monitor.run(points=12), 15)
        await asyncio.wait_for(mining, 5)  # a redis-py call may swallow a cancellation
        state = monitor.snapshot()

    assert len(state["points"]) == 12 and monitor.last_seq == 13  # 12 points and a mark
    assert (state["status"], state["rng_mode"], state["workers"]) == ("live", "buffered", 2)
    assert 200 < state["speed"] < 1000  # 50 per ~0.1 s, on a busy machine
    # One mark, "2 workers", where the second one began (not 0.3 s later, when it settled),
    # on the chart's time axis: the point drawn from the sample that first saw it.
    [[marked, workers]] = state["marks"]
    times = [time for time, _ in state["points"]]
    assert workers == 2 and second[0] < marked < second[0] + 0.3
    assert marked == pytest.approx(min(t for t in times if t > second[0]), abs=1e-6)
    newer = monitor.snapshot(after=state["seq"])
    assert newer["points"] == [] and newer["marks"] == [] and not newer["reset"]


async def test_a_run_ends_when_told_and_wakes_whoever_waits_for_a_point(redis_url: str) -> None:
    async with redis_client(redis_url) as client:
        monitor = SpeedMonitor(client, sample_interval=0.02, point_interval=0.05)
        stop = asyncio.Event()
        running = asyncio.create_task(monitor.run(stop))
        await wait_until_async(lambda: len(monitor.points) >= 3, 10, "three points")
        waiting = asyncio.create_task(monitor.next_point())
        stop.set()
        await asyncio.wait_for(running, 5)
        await asyncio.wait_for(waiting, 5)  # a stream waiting for its next point sees the end
    assert monitor.status == "live" and monitor.snapshot()["points"]


async def test_one_scaling_step_draws_one_mark_where_it_began(redis_url: str) -> None:
    async with redis_client(redis_url) as client:
        monitor = SpeedMonitor(client, sample_interval=0.05, point_interval=0.15, mark_settle=0.6)
        for name in range(3):
            await announce_worker(client, f"w{name}", {}, ttl=30)
        await monitor.run(points=1)
        seconds, micros = await client.time()
        began = seconds + micros / 1e6

        async def scale_to_10() -> None:
            """`scale worker=10`: seven heartbeats, one a chart point (about a second)."""
            for name in range(3, 10):
                await announce_worker(client, f"w{name}", {}, ttl=30)
                await monitor.next_point()

        scaling = asyncio.create_task(scale_to_10())
        await monitor.run(points=7)
        await scaling
        assert monitor.workers == 10
        assert monitor.snapshot()["marks"] == [], "not settled yet"
        await monitor.run(points=6)  # 0.9 s: settled
        [[marked, workers]] = monitor.snapshot()["marks"]
        assert workers == 10 and began < marked < began + 0.2, "where it began"

        seq = monitor.last_seq
        await client.delete(WORKER_KEY_PREFIX + "w9")  # a heartbeat missed, then back: no mark
        await monitor.run(points=1)
        assert monitor.workers == 9
        await announce_worker(client, "w9", {}, ttl=30)
        await monitor.run(points=6)
        assert monitor.snapshot(after=seq)["marks"] == []
        assert monitor.workers == 10


async def test_monitor_says_why_when_redis_is_down() -> None:
    async with redis_client(f"redis://127.0.0.1:{free_port()}/0") as client:
        monitor = SpeedMonitor(client)
        await monitor.sample_once()
        point = monitor.add_point()
    assert point.rate is None
    state = monitor.snapshot()
    assert state["status"] == "redis-unreachable"
    assert state["reason"].startswith("Redis unreachable")


async def test_only_mining_workers_are_counted(redis_url: str) -> None:
    async with redis_client(redis_url) as client:
        monitor = SpeedMonitor(client)
        await announce_worker(client, "busy", {"mining": True}, ttl=30)
        await announce_worker(client, "paused", {"mining": False}, ttl=30)
        await announce_worker(client, "older", {"loops": 1}, ttl=30)  # no `mining`: mining
        await monitor.sample_once()
    assert (monitor.status, monitor.workers) == ("live", 2)
