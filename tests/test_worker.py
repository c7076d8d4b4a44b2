"""The worker as a real process against real rng, hasher and Redis."""

import asyncio
import hashlib
import json
import re
import signal

import pytest
import redis

from dockercoins.net import free_port
from tests.stack import wait_until_async as wait_for
from tests.support import FAST_WORKER, run_cli_async


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
    rng, hasher = await servers.upstreams(0.002)
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "worker.log"
    worker = await start_worker(log, rng_addr=rng, hasher_addr=hasher, redis_url=redis_url)
    await wait_for(lambda: int(client.get("hashes") or 0) > 400, timeout=30)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0

    wallet = client.hgetall("wallet")
    assert wallet
    for digest, block in wallet.items():
        assert len(block) == 32
        assert digest.decode() == hashlib.sha256(block).hexdigest()
        assert digest.startswith(b"0")
    text = log.read_text()
    reported = re.search(r"worker stopped: (\d+) hashes, (\d+) coins, 0 hashes unflushed", text)
    assert reported, text
    assert int(reported.group(1)) == int(client.get("hashes"))
    assert int(reported.group(2)) == len(wallet)
    # Coins are about one hash in 16 (bounds: over 4 standard deviations for 400 hashes).
    assert 1 / 40 < len(wallet) / int(client.get("hashes")) < 1 / 8
    assert not client.keys("dockercoins:worker:*"), "the heartbeat is withdrawn on exit"


@pytest.mark.slow
async def test_worker_logs_an_outage_once_and_resumes_by_itself(
    start_worker, servers, redis_url, tmp_path
) -> None:
    rng_port = free_port()
    hasher = await servers.hasher(hasher_latency=0)
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "worker.log"
    worker = await start_worker(
        log, rng_addr=f"127.0.0.1:{rng_port}", hasher_addr=hasher, redis_url=redis_url
    )
    # Many retries against nothing: the worker up and failing (it may take seconds to start
    # on a loaded machine), then a while longer.
    await wait_for(lambda: "rng unreachable" in log.read_text(), 30)
    await asyncio.sleep(1.5)
    await servers.rng(port=rng_port, rng_read_cost=0)
    await wait_for(lambda: int(client.get("hashes") or 0) > 20)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0
    text = log.read_text()
    assert text.count("rng unreachable") == 1, text
    assert text.count("rng is back") == 1, text


@pytest.mark.slow
async def test_worker_keeps_counts_while_redis_is_down(start_worker, servers, tmp_path) -> None:
    rng, hasher = await servers.upstreams(0)
    redis_port = free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    log = tmp_path / "worker.log"
    worker = await start_worker(log, rng_addr=rng, hasher_addr=hasher, redis_url=url)
    await wait_for(lambda: "redis unreachable" in log.read_text(), 30)  # mining without Redis
    await asyncio.sleep(1)
    from dockercoins_tools.embedded_redis import redis_server_argv

    server = await asyncio.create_subprocess_exec(
        *redis_server_argv("127.0.0.1", redis_port, None),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        client = redis.Redis.from_url(url)
        await wait_for(lambda: _safe_int(client, "hashes") > 50)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 15) == 0
        text = log.read_text()
        assert text.count("redis unreachable") == 1, text
        reported = re.search(r"worker stopped: (\d+) hashes, (\d+) coins", text)
        assert reported
        assert int(reported.group(1)) == int(client.get("hashes"))
        assert int(reported.group(2)) == client.hlen("wallet")
    finally:
        server.terminate()
        await server.wait()


def _safe_int(client: redis.Redis, key: str) -> int:
    try:
        return int(client.get(key) or 0)
    except redis.ConnectionError:
        return 0


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


@pytest.mark.slow
@pytest.mark.parametrize("pool_size", [1, 3])
async def test_streaming_worker_batches_and_a_pool_of_n_channels_makes_n_connections(
    start_worker, servers, redis_url, tmp_path, pool_size: int
) -> None:
    rng, hasher = await servers.upstreams(0)
    client = redis.Redis.from_url(redis_url)
    worker = await start_worker(
        tmp_path / "worker.log",
        rng_addr=rng,
        hasher_addr=hasher,
        redis_url=redis_url,
        worker_streaming=True,
        worker_batch=100,
        worker_loops=3,
        worker_pool_size=pool_size,
        worker_think_time=0,
    )
    await wait_for(lambda: int(client.get("hashes") or 0) > 20_000, timeout=30)
    # Three loops share the pool: one connection per channel, whatever the loop count.
    rng_port, hasher_port = int(rng.rsplit(":", 1)[1]), int(hasher.rsplit(":", 1)[1])
    assert established_connections(rng_port) == pool_size
    assert established_connections(hasher_port) == pool_size
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0
    text = (tmp_path / "worker.log").read_text()
    reported = re.search(r"worker stopped: (\d+) hashes, (\d+) coins, 0 hashes unflushed", text)
    assert reported, text
    assert int(reported.group(1)) == int(client.get("hashes"))
    assert int(reported.group(1)) % 100 == 0  # whole batches only
    assert int(reported.group(2)) == client.hlen("wallet")
    for digest, block in client.hscan_iter("wallet", count=1000):
        assert digest.decode() == hashlib.sha256(block).hexdigest()
        assert digest.startswith(b"0")


@pytest.mark.slow
async def test_streams_are_reopened_when_the_server_ends_them(
    start_worker, servers, redis_url, tmp_path
):
    rng, hasher = await servers.upstreams(0, max_connection_age=0.5)
    client = redis.Redis.from_url(redis_url)
    log = tmp_path / "worker.log"
    worker = await start_worker(
        log,
        rng_addr=rng,
        hasher_addr=hasher,
        redis_url=redis_url,
        worker_streaming=True,
        worker_batch=10,
        worker_think_time=0.001,
    )
    await wait_for(lambda: int(client.get("hashes") or 0) > 0, timeout=30)
    await asyncio.sleep(3)  # several connection ages
    before = int(client.get("hashes"))
    await asyncio.sleep(1.5)
    assert int(client.get("hashes")) > before, "mining goes on across reconnections"
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), 15) == 0
    assert "unreachable" not in log.read_text()


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
    await wait_for(lambda: len(client.keys("dockercoins:worker:*")) == 2, timeout=30)
    await asyncio.sleep(2)
    beats = {key: json.loads(client.get(key)) for key in client.keys("dockercoins:worker:*")}
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
    assert int(client.get("hashes")) == int(reported.group(1)) + doomed_flushed
    for digest, block in client.hscan_iter("wallet"):
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


class _Reports:
    """What a Miner reported to its health server, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    async def __call__(self, ready: bool, live: bool) -> None:
        self.seen.append((ready, live))


def _miner(cls, servers_addr: tuple[str, str], redis_url: str, reports: _Reports, **fields):
    from dockercoins.channels import ChannelPool
    from dockercoins.redis_store import connect
    from worker_svc.config import WorkerSettings

    settings = WorkerSettings(
        rng_addr=servers_addr[0],
        hasher_addr=servers_addr[1],
        redis_url=redis_url,
        **{**FAST_WORKER, "grace": 1.0, **fields},
    )
    rng, hasher = ChannelPool(settings.rng_addr), ChannelPool(settings.hasher_addr)
    return cls(settings, rng, hasher, connect(redis_url), report_health=reports)


async def test_a_stuck_loop_fails_liveness_and_ends_the_worker(servers, redis_url) -> None:
    from worker_svc.service import Miner, StuckError

    class HungLoop(Miner):
        """A loop that awaits something that never comes: the defect liveness is for."""

        async def _unary_loop(self, index: int) -> None:
            await asyncio.Event().wait()

    reports = _Reports()
    upstreams = await servers.upstreams(0)
    miner = _miner(
        HungLoop, upstreams, redis_url, reports, rpc_timeout=0.2, worker_liveness_timeout=2.5
    )
    started = asyncio.get_running_loop().time()
    with pytest.raises(StuckError, match=r"no step of loop-0 in 2.5 s"):
        await asyncio.wait_for(miner.run(), 15)
    assert 2.5 <= asyncio.get_running_loop().time() - started < 6
    assert reports.seen[0] == (False, True) and reports.seen[-1][1] is False


async def test_a_flusher_that_dies_takes_the_worker_down_after_a_last_flush(
    servers, redis_url
) -> None:
    from worker_svc.service import Miner

    class BrokenFlusher(Miner):
        async def _flush_periodically(self) -> None:
            await asyncio.sleep(1.0)
            raise ValueError("a defect in the flusher")

    reports = _Reports()
    upstreams = await servers.upstreams(0)
    miner = _miner(BrokenFlusher, upstreams, redis_url, reports)
    with pytest.raises(ValueError, match="a defect in the flusher"):
        await asyncio.wait_for(miner.run(), 15)
    client = redis.Redis.from_url(redis_url)
    assert miner.ledger.total_hashes > 0
    assert int(client.get("hashes")) == miner.ledger.total_hashes, "counted before the end"
