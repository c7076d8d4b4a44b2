"""The worker as a real process against real rng, hasher and Redis: what only a process shows
(signals, exit statuses, the log a user reads, its health port). The miner itself is tested in
this process, in tests/test_miner.py."""

import asyncio
import hashlib
import json
import re
import signal

import pytest
import redis

from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY, WALLET_KEY, WORKER_KEY_PREFIX
from tests.stack import wait_until_async as wait_for
from tests.support import run_cli_async


async def probe_worker(port: int, *args: str) -> tuple[int, str]:
    """`dockercoins probe worker --health -c 1` at the worker's health port: status, output."""
    return await run_cli_async(
        "probe", "worker", "--health", "-c", "1", "--addr", f"127.0.0.1:{port}", *args
    )


async def probe_worker_until_ok(port: int, *args: str, timeout: float = 20) -> str:
    """`probe_worker` again every 0.2 s until it exits 0; its output."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (result := await probe_worker(port, *args))[0]:
        assert asyncio.get_running_loop().time() < deadline, result[1]
        await asyncio.sleep(0.2)
    return result[1]


@pytest.mark.slow
async def test_worker_mines_real_coins_and_flushes_its_count_on_sigterm(
    start_worker, servers, redis_url, tmp_path
) -> None:
    client = redis.Redis.from_url(redis_url)
    rng, hasher = await servers.upstreams(0.002)
    log = tmp_path / "worker.log"
    worker = await start_worker(log, rng_addr=rng, hasher_addr=hasher, redis_url=redis_url)
    await wait_for(lambda: int(client.get(HASHES_KEY) or 0) > 400, timeout=30)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0

    wallet = client.hgetall(WALLET_KEY)
    assert wallet
    for digest, block in wallet.items():
        assert len(block) == 32
        assert digest.decode() == hashlib.sha256(block).hexdigest()
        assert digest.startswith(b"0")
    text = log.read_text()
    reported = re.search(r"worker stopped: (\d+) hashes, (\d+) coins, 0 hashes unflushed", text)
    assert reported, text
    assert int(reported.group(1)) == int(client.get(HASHES_KEY))
    assert int(reported.group(2)) == len(wallet)
    # Coins are about one hash in 16 (bounds: over 4 standard deviations for 400 hashes).
    assert 1 / 40 < len(wallet) / int(client.get(HASHES_KEY)) < 1 / 8
    assert not client.keys(WORKER_KEY_PREFIX + "*"), "the heartbeat is withdrawn on exit"


@pytest.mark.slow
async def test_kill_9_loses_only_what_the_worker_had_not_flushed(
    start_worker, servers, redis_url, tmp_path
) -> None:
    rng, hasher = await servers.upstreams(0.002)
    client = redis.Redis.from_url(redis_url)
    steady = await start_worker(
        tmp_path / "steady.log", rng_addr=rng, hasher_addr=hasher, redis_url=redis_url
    )
    doomed = await start_worker(
        tmp_path / "doomed.log", rng_addr=rng, hasher_addr=hasher, redis_url=redis_url
    )

    def flushed() -> dict[bytes, dict[str, int]]:
        """Each worker's last heartbeat, once both have counted some work."""
        beats = {key: json.loads(client.get(key)) for key in client.keys(WORKER_KEY_PREFIX + "*")}
        return beats if len(beats) == 2 and all(b["hashes_flushed"] for b in beats.values()) else {}

    await wait_for(flushed, timeout=30, what="both workers counting")
    beats = flushed()
    doomed_key = next(k for k, v in beats.items() if v["pid"] == doomed.pid)
    doomed.kill()  # SIGKILL: no last flush, no goodbye
    await doomed.wait()
    # Its last heartbeat was written in the same transaction as its last count.
    doomed_flushed = json.loads(client.get(doomed_key))["hashes_flushed"]
    assert doomed_flushed > 0

    steady.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(steady.wait(), 15) == 0
    reported = re.search(r"worker stopped: (\d+) hashes", (tmp_path / "steady.log").read_text())
    assert reported
    # The counter holds exactly what both flushed: the steady one's total, the killed
    # one's flushed part; the killed one lost only its unflushed work (under a second).
    assert int(client.get(HASHES_KEY)) == int(reported.group(1)) + doomed_flushed
    for digest, block in client.hscan_iter(WALLET_KEY):
        assert digest.decode() == hashlib.sha256(block).hexdigest()


@pytest.mark.slow
async def test_probe_reaches_the_workers_own_health_port(
    start_worker, servers, redis_url, tmp_path
) -> None:
    rng, hasher = await servers.upstreams(0.01)
    port = free_port()
    worker = await start_worker(
        tmp_path / "worker.log",
        rng_addr=rng,
        hasher_addr=hasher,
        redis_url=redis_url,
        worker_health_port=port,
    )

    assert "1 calls, 1 ok, 0 failed" in await probe_worker_until_ok(port)
    # Without --health: refused, a worker serves health only.
    code, out = await run_cli_async("probe", "worker", "-c", "1", "--addr", f"127.0.0.1:{port}")
    assert code == 2 and "probe it with --health" in out
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0
    code, out = await probe_worker(port, "--timeout", "1")
    assert code == 1 and "0 ok, 1 failed" in out


@pytest.mark.slow
async def test_probe_checks_the_workers_liveness_apart_from_its_readiness(
    start_worker, redis_url, tmp_path
) -> None:
    port = free_port()
    # Nothing listens at rng or hasher: the worker cannot mine, but it is alive.
    worker = await start_worker(
        tmp_path / "worker.log",
        rng_addr=f"127.0.0.1:{free_port()}",
        hasher_addr=f"127.0.0.1:{free_port()}",
        redis_url=redis_url,
        worker_health_port=port,
    )

    await probe_worker_until_ok(port, "--service", "liveness")
    for args in ((), ("--service", "readiness")):
        code, out = await probe_worker(port, *args)
        assert code == 1 and "status NOT_SERVING" in out, out
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"worker_keepalive_time": 5},
            "DOCKERCOINS_WORKER_KEEPALIVE_TIME: Input should be greater than or equal to 10",
        ),
        (
            {"worker_max_pending_coins": 0},
            "DOCKERCOINS_WORKER_MAX_PENDING_COINS: Input should be greater than or equal to 1",
        ),
        (
            {"worker_liveness_timeout": 5},
            "DOCKERCOINS_WORKER_LIVENESS_TIMEOUT must be longer than",
        ),
        (
            {"worker_ready_timeout": 0.05, "worker_think_time": 0.1},
            "DOCKERCOINS_WORKER_READY_TIMEOUT must be longer than",
        ),
    ],
)
async def test_a_bound_out_of_range_stops_the_worker_with_one_line(
    start_worker, env: dict[str, object], line: str, tmp_path
) -> None:
    log = tmp_path / "worker.log"
    worker = await start_worker(log, **env)
    try:
        assert await asyncio.wait_for(worker.wait(), 30) == 2
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    text = log.read_text()
    assert line in text and "Traceback" not in text, text
