"""rng over real gRPC: the blocking bottleneck pinned, the buffered fix, health under load."""

import asyncio
import statistics
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.native import random_function
from dockercoins.net import free_port
from dockercoins.v1 import rng_pb2, rng_pb2_grpc
from rng_svc.config import RngSettings
from tests.stack import Service, wait_until_async

READ_COST = 0.05  # scaled down: at most 20 reads/s, few enough that a busy neighbour (the first
# phase of `make test` beside it) cannot hold back the buffered rng's 200 a second


async def _hammer(address: str, clients: int, seconds: float) -> tuple[float, list[float]]:
    """`clients` concurrent callers for `seconds`: calls per second in total, and latencies."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        await stub.GetRandom(rng_pb2.RandomRequest(size=32), timeout=10)
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                reply = await stub.GetRandom(rng_pb2.RandomRequest(size=32), timeout=10)
                assert len(reply.data) == 32
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


@pytest.mark.alone
@pytest.mark.light
async def test_blocking_rng_plateaus_whatever_the_number_of_clients(servers) -> None:
    address = await servers.rng(rng_mode="blocking", rng_read_cost=READ_COST)
    one_rate, one_latencies = await _hammer(address, 1, 1.5)
    ten_rate, ten_latencies = await _hammer(address, 10, 1.5)
    ceiling = 1 / READ_COST
    assert 0.5 * ceiling < one_rate <= 1.1 * ceiling
    # Ten clients share the same ceiling: no more calls, each one waiting in the queue.
    assert ten_rate <= 1.1 * ceiling
    assert ten_rate < 1.3 * one_rate
    assert statistics.median(ten_latencies) > 5 * statistics.median(one_latencies)


@pytest.mark.alone
@pytest.mark.light
async def test_buffered_rng_serves_ten_clients_far_faster(servers) -> None:
    address = await servers.rng(rng_mode="buffered", rng_read_cost=READ_COST)
    blocking = await servers.rng(rng_mode="blocking", rng_read_cost=READ_COST)
    buffered_rate, latencies = await _hammer(address, 10, 1.5)
    blocking_rate, blocked = await _hammer(blocking, 10, 1.5)
    assert buffered_rate > 5 * blocking_rate
    # Each request still takes its time per request (by default the read cost), side by
    # side: nobody waits in a queue, while blocking clients wait for nine others.
    assert READ_COST <= statistics.median(latencies) < 2.5 * READ_COST
    assert statistics.median(blocked) > 5 * READ_COST


@pytest.mark.alone
@pytest.mark.light
async def test_rng_latency_is_the_least_time_of_a_request_never_a_queue(servers) -> None:
    address = await servers.rng(rng_mode="buffered", rng_read_cost=0.001, rng_latency=0.05)
    instant = await servers.rng(rng_mode="buffered", rng_read_cost=0.001, rng_latency=0)
    rate, latencies = await _hammer(address, 10, 1.5)
    assert min(latencies) >= 0.05
    assert statistics.median(latencies) < 0.1
    assert rate > 0.5 * 10 / 0.05  # ten at a time, not one
    _, fast = await _hammer(instant, 10, 1.0)
    assert statistics.median(fast) < 0.05


async def test_health_answers_at_once_while_the_lock_has_a_queue(servers) -> None:
    address = await servers.rng(rng_mode="blocking", rng_read_cost=0.1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        queue = [
            asyncio.ensure_future(stub.GetRandom(rng_pb2.RandomRequest(size=32), timeout=30))
            for _ in range(20)
        ]
        budget = servers.at(address).budgets.app
        await wait_until_async(lambda: budget.in_use == 20, 5, "20 calls at rng")
        began = time.perf_counter()
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="dockercoins.v1.Rng"), timeout=5
        )
        waited = time.perf_counter() - began
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert waited < 0.5  # the queue ahead holds the lock for about 2 s
        assert not all(call.done() for call in queue)
        for call in queue:
            call.cancel()


async def test_a_batch_is_count_blocks_of_size_bytes(servers) -> None:
    address = await servers.rng(rng_read_cost=0)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        reply = await stub.GetRandom(rng_pb2.RandomRequest(size=32, count=100), timeout=5)
        assert reply.size == 32
        assert len(reply.data) == 3200
        stream = stub.StreamRandom(rng_pb2.StreamRandomRequest(size=32, count=10, messages=3))
        replies = [r async for r in stream]
        assert [len(r.data) for r in replies] == [320, 320, 320]


@pytest.mark.parametrize(
    ("size", "count", "words"),
    [
        (0, 0, "size must be at least 1"),
        (-5, 0, "size must be at least 1"),
        (32, -1, "count must be 0"),
        (2_000_000, 0, "DOCKERCOINS_RNG_MAX_REQUEST"),
        (32, 100_000, "DOCKERCOINS_RNG_MAX_REQUEST (1048576 bytes)"),
    ],
)
async def test_bad_requests_get_invalid_argument_and_the_server_stays_up(
    servers, size: int, count: int, words: str
) -> None:
    address = await servers.rng(rng_read_cost=0, rng_max_request=1 << 20)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRandom(rng_pb2.RandomRequest(size=size, count=count), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in caught.value.details()
        stream = stub.StreamRandom(rng_pb2.StreamRandomRequest(size=size, count=count))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reply = await stub.GetRandom(rng_pb2.RandomRequest(size=32), timeout=5)
        assert len(reply.data) == 32


async def test_rng_logs_each_call_and_its_caller_only_when_asked(servers, caplog) -> None:
    """DOCKERCOINS_RNG_LOG_REQUESTS: one line per call naming the caller, for the labels lab's
    `kubectl logs -f` on an rng pod; off by default, and then not one line."""
    quiet = await servers.rng(rng_read_cost=0.0)
    chatty = await servers.rng(rng_read_cost=0.0, rng_log_requests=True)
    caplog.set_level("INFO", logger="rng_svc.service")
    for address in (quiet, chatty):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = rng_pb2_grpc.RngStub(channel)
            await stub.GetRandom(rng_pb2.RandomRequest(size=32, count=2), timeout=10)
            stream = stub.StreamRandom(rng_pb2.StreamRandomRequest(size=32, messages=2), timeout=10)
            assert len([reply async for reply in stream]) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "rng_svc.service"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("GetRandom 2 x 32 bytes for ipv4:127.0.0.1:")
    assert lines[1].startswith("StreamRandom 1 x 32 bytes, 2 messages, for ipv4:127.0.0.1:")


@pytest.mark.parametrize("generator", ["aes-256-ctr", "chacha20"])
def test_a_keystream_generator_gives_fresh_uniform_bytes_at_every_read(generator) -> None:
    """A fresh key from the OS at every read: two reads never repeat, and the bytes look
    uniform (each byte value about 1/256 of 1 MiB, no run of zeros as a bare cipher would)."""
    runs, random_bytes = random_function(generator)
    assert runs == generator, "the native extension is built on this kind of machine"
    first, second = random_bytes(1 << 20), random_bytes(1 << 20)
    assert len(first) == len(second) == 1 << 20 and first != second
    assert first[:32] != second[:32]
    counts = Counter(first)
    assert len(counts) == 256
    assert 3000 < min(counts.values()) <= max(counts.values()) < 5200  # 4096 expected
    assert random_bytes(0) == b"" and len(random_bytes(33)) == 33


@pytest.mark.parametrize(
    ("profile", "generator"), [("classic", "urandom"), ("turbo", "aes-256-ctr")]
)
async def test_turbo_serves_a_keystream_and_classic_the_os_behind_its_cost(
    servers, profile, generator
) -> None:
    settings = RngSettings(profile=profile)
    assert settings.rng_generator == generator
    assert settings.rng_read_cost == (0.1 if profile == "classic" else 0.0)
    address = await servers.rng(profile=profile, rng_read_cost=0.01)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        replies = [
            await stub.GetRandom(rng_pb2.RandomRequest(size=32, count=4096), timeout=5)
            for _ in range(2)
        ]
    assert [len(reply.data) for reply in replies] == [32 * 4096] * 2
    assert replies[0].data != replies[1].data


@pytest.mark.slow
def test_the_start_line_names_the_generator() -> None:
    for profile, words in (("classic", "generator urandom"), ("turbo", "generator aes-256-ctr")):
        server = Service("rng", rng_port=free_port(), profile=profile)
        try:
            assert words in server.wait_for_line("listening on").string
        finally:
            assert server.terminate() == 0
            server.kill()
