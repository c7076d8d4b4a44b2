"""The one counter sampler (web UI, bench, experiment): a real Redis read on a schedule."""

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dockercoins.counter_sampler import CounterSampler
from dockercoins.net import free_port
from dockercoins.rate import fit_slope
from dockercoins.redis_store import HASHES_KEY, Totals, connect


async def test_reads_the_counter_on_schedule_and_keeps_the_last_seconds(redis_url: str) -> None:
    client: Redis = connect(redis_url)
    sampler = CounterSampler.of_redis(client, every=0.05, keep=0.5)

    async def mine() -> None:
        for _ in range(20):
            await client.incrby(HASHES_KEY, 10)
            await asyncio.sleep(0.05)  # the miner's pace: 10 hashes every 0.05 s

    try:
        started = time.monotonic()
        miner = asyncio.create_task(mine())
        await sampler.run_for(1.0)
        await miner
    finally:
        await client.aclose()
    readings = list(sampler.readings)
    # Only the last 0.5 s of Redis time are kept, read every 0.05 s (fewer on a busy machine).
    assert 3 <= len(readings) <= 12, readings
    assert readings[-1].totals.now - readings[0].totals.now <= 0.5
    assert [r.hashes for r in readings] == sorted(r.hashes for r in readings)
    assert readings[-1].hashes > 0
    assert all(started <= r.at <= time.monotonic() for r in readings)
    rate = fit_slope(sampler.samples())
    assert rate is not None and 50 < rate.per_second < 400  # 10 per ~0.05 s, busy machine


async def test_a_redis_that_does_not_answer_is_skipped_then_read_again(redis_url: str) -> None:
    away: Redis = connect(f"redis://127.0.0.1:{free_port()}/0", 0.5)
    sampler = CounterSampler.of_redis(away, every=0.05)
    try:
        assert await sampler.sample_answered() is None
        with pytest.raises(RedisConnectionError):
            await sampler.sample()
    finally:
        await away.aclose()
    assert not sampler.readings

    client: Redis = connect(redis_url)
    await client.set(HASHES_KEY, 42)
    back = CounterSampler.of_redis(client, every=0.05)
    try:
        reading = await back.sample_answered()
    finally:
        await client.aclose()
    assert reading is not None and reading.hashes == 42
    assert list(back.readings) == [reading]


async def test_run_calls_its_step_until_stopped() -> None:
    async def read() -> Totals:
        return Totals(hashes=0, coins=0, now=time.time())

    sampler = CounterSampler(read, every=0.01)
    steps: list[float] = []

    async def step() -> None:
        steps.append(time.monotonic())
        if len(steps) == 5:
            sampler.stop()

    await asyncio.wait_for(sampler.run(step=step), 5)
    assert len(steps) == 5
    assert steps[-1] - steps[0] >= 4 * 0.01 * 0.9  # one step per `every`, not back to back
