"""Hostile requests against real rng and hasher servers: each refused before it costs, with its
status code and the setting it hit; health answers meanwhile; normal requests are served after."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE, MAX_BATCH
from dockercoins_tools.procstat import memory_mb
from tests.stack import Service
from tests.support import grpcurl

UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
HEALTH_BOUND = 0.1  # seconds a health check may take while the hasher works


@pytest.fixture
def hasher_process(request: pytest.FixtureRequest) -> Iterator[tuple[Service, str]]:
    """A fresh hasher process (its peak RSS its own) with the test's settings; its address."""
    port = free_port()
    fields = getattr(request, "param", {})
    server = Service("hasher", hasher_port=port, hasher_latency=0, **fields)
    server.wait_for("listening on")
    yield server, f"127.0.0.1:{port}"
    assert server.terminate() == 0
    server.kill()


def health_latencies(address: str, until: grpc.Future) -> list[float]:
    """Seconds of each health Check made back to back, on a channel of its own, until `until`."""
    latencies = []
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected before the work
        while not until.done() or not latencies:
            began = time.perf_counter()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies.append(time.perf_counter() - began)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.005)
    return latencies


def hash_of(data: bytes, address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = hasher_pb2_grpc.HasherStub(channel).Hash(
            hasher_pb2.HashRequest(data=data), timeout=5
        )
    return reply.hexdigests[0]


async def open_streams(stub: hasher_pb2_grpc.HasherStub, count: int) -> list:
    """`count` HashStreams, each answered once: open and running on the server. When one
    fails, all are cancelled (none left holding a slot) and its error raised."""
    streams = [stub.HashStream() for _ in range(count)]
    try:
        for stream in streams:
            await stream.write(hasher_pb2.HashRequest(data=b"open"))
            await stream.read()
    except grpc.aio.AioRpcError:
        for stream in streams:
            stream.cancel()
        raise
    return streams


RAISED = {"hasher_max_request": 1 << 20, "hasher_max_blocks": 1 << 18, "hasher_max_reply": 16 << 20}
"""The hasher's bounds raised 16-fold: 1 MiB in 4-byte blocks."""


@pytest.mark.parametrize(
    ("hasher_process", "blocks", "block_size", "raw"),
    [
        # The defaults' largest: the batch cap's blocks (512 KiB), hex digests (1.6 MB reply),
        # by the native path and by hashlib's.
        ({}, MAX_BATCH, BLOCK_SIZE, False),
        ({"hasher_native": False}, MAX_BATCH, BLOCK_SIZE, False),
        # Raised bounds: a quarter of a million digests, hashed off the event loop.
        (RAISED, 1 << 18, 4, True),
        ({**RAISED, "hasher_native": False}, 1 << 18, 4, True),
    ],
    indirect=["hasher_process"],
    ids=["defaults", "defaults-hashlib", "raised-bounds", "raised-bounds-hashlib"],
)
def test_health_answers_during_the_largest_accepted_request(
    hasher_process, blocks, block_size, raw, record_property
) -> None:
    server, address = hasher_process
    before = memory_mb(server.proc.pid)
    data = os.urandom(blocks * block_size)
    with grpc.insecure_channel(address, options=UNLIMITED) as channel:
        call = hasher_pb2_grpc.HasherStub(channel).Hash.future(
            hasher_pb2.HashRequest(data=data, block_size=block_size, raw=raw), timeout=60
        )
        latencies = health_latencies(address, call)
        reply = call.result()
    assert len(reply.digests) == 32 * blocks
    assert len(reply.hexdigests) == (0 if raw else blocks)
    peak = memory_mb(server.proc.pid)
    record_property("peak_rss_mb", round(peak, 1))
    record_property("health_max_ms", round(max(latencies) * 1000, 1))
    print(f"peak RSS {before:.1f} -> {peak:.1f} MB; {len(latencies)} health checks, ", end="")
    print(f"slowest {max(latencies) * 1000:.1f} ms")
    assert max(latencies) < HEALTH_BOUND
    assert peak - before < 64  # MB; the reported request took 1.3 GB
    assert hash_of(b"after", address)


def test_hostile_hashes_are_refused_before_any_work(hasher_process) -> None:
    """The reported request (4 MiB in 1-byte blocks), 32 times the batch cap, a 64 MiB message."""
    server, address = hasher_process
    before = memory_mb(server.proc.pid)
    hostile = [
        (hasher_pb2.HashRequest(data=os.urandom(4 << 20), block_size=1), "larger than max"),
        (
            hasher_pb2.HashRequest(data=os.urandom(MAX_BATCH * BLOCK_SIZE), block_size=1),
            "MAX_BLOCKS",
        ),
        (hasher_pb2.HashRequest(data=bytes(64 << 20)), "larger than max"),
    ]
    with grpc.insecure_channel(address, options=UNLIMITED) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        for request, words in hostile:
            call = stub.Hash.future(request, timeout=30)
            latencies = health_latencies(address, call)
            with pytest.raises(grpc.RpcError) as refused:
                call.result()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert words in refused.value.details()
            assert max(latencies) < HEALTH_BOUND
    # Neither hashed nor read whole: the peak grew by far less than the 64 MiB message or the
    # 51 MB of half a million hex digests (gRPC's own buffers take a few MB, more on a busy
    # machine).
    assert memory_mb(server.proc.pid) - before < 32
    assert hash_of(b"after", address)


async def test_blocks_and_reply_are_bounded_hex_digests_counted(servers) -> None:
    address = await servers.hasher(hasher_latency=0, hasher_max_blocks=100, hasher_max_reply=4096)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        refused = [
            (hasher_pb2.HashRequest(data=bytes(101), block_size=1, raw=True), "MAX_BLOCKS (100)"),
            # 50 digests: 1606 bytes raw, 4906 with their hex strings.
            (hasher_pb2.HashRequest(data=bytes(1600), block_size=32), "MAX_REPLY (4096 bytes)"),
        ]
        for request, words in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Hash(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert words in caught.value.details()
        raw = await stub.Hash(hasher_pb2.HashRequest(data=bytes(1600), block_size=32, raw=True))
        assert len(raw.digests) == 50 * 32
        most = await stub.Hash(hasher_pb2.HashRequest(data=bytes(100), block_size=1, raw=True))
        assert len(most.digests) == 100 * 32


def refused_count(method: str) -> float:
    """Calls to dockercoins.v1.Hasher/`method` the metrics counted as RESOURCE_EXHAUSTED."""
    labels = {"grpc_service": "dockercoins.v1.Hasher", "grpc_method": method}
    labels |= {"grpc_type": "unary", "grpc_code": "RESOURCE_EXHAUSTED"}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


async def test_the_concurrency_bound_counts_application_calls_only(servers) -> None:
    """Four open streams fill a bound of 4: the next call is refused at once, naming the
    setting, and counted; health (checks and more watches than the bound) and reflection are
    served meanwhile; streams that end, however they end, give their slots back."""
    address = await servers.hasher(
        hasher_latency=0,
        max_concurrent_rpcs=4,
        metrics_port=free_port(),  # metrics on
    )
    refused_before = refused_count("Hash")
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as probe,
    ):
        stub = hasher_pb2_grpc.HasherStub(channel)
        streams = await open_streams(stub, 4)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Hash(hasher_pb2.HashRequest(data=b"one too many"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "DOCKERCOINS_MAX_CONCURRENT_RPCS" in caught.value.details()
        assert refused_count("Hash") == refused_before + 1

        health = health_pb2_grpc.HealthStub(probe)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(8)]
        for watch in watches:
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(10):
            began = time.perf_counter()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.perf_counter() - began < 5 * HEALTH_BOUND
        code, out = await grpcurl(address, "list")
        assert code == 0 and "dockercoins.v1.Hasher" in out.split(), out
        for watch in watches:
            watch.cancel()

        await streams[0].done_writing()
        assert await streams[0].code() == grpc.StatusCode.OK
        streams[1].cancel()  # the client gives up: the server learns it from the transport
        await streams[2].done_writing()
        await streams[3].done_writing()
        await asyncio.gather(*(stream.code() for stream in streams[2:]))
        again = await eventually_open(stub, 4)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Hash(hasher_pb2.HashRequest(data=b"full again"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in again:
            stream.cancel()


async def eventually_open(stub: hasher_pb2_grpc.HasherStub, count: int) -> list:
    """`count` open HashStreams, retried while the server still counts streams that ended."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await open_streams(stub, count)
        except grpc.aio.AioRpcError as refused:
            if refused.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            assert time.monotonic() < deadline, "slots not given back"
            await asyncio.sleep(0.05)


async def test_a_connection_past_its_stream_bound_waits_others_do_not(servers) -> None:
    address = await servers.hasher(hasher_latency=0, max_concurrent_streams=2)
    local = [("grpc.use_local_subchannel_pool", 1)]  # two channels, two connections
    async with (
        grpc.aio.insecure_channel(address, options=local) as busy,
        grpc.aio.insecure_channel(address, options=local) as other,
    ):
        stub = hasher_pb2_grpc.HasherStub(busy)
        streams = await open_streams(stub, 2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Hash(hasher_pb2.HashRequest(data=b"third"), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        other_stub = hasher_pb2_grpc.HasherStub(other)
        assert (await other_stub.Hash(hasher_pb2.HashRequest(data=b"x"), timeout=5)).hexdigests
        waiting = asyncio.ensure_future(stub.Hash(hasher_pb2.HashRequest(data=b"3"), timeout=5))
        await streams[0].done_writing()
        assert (await waiting).hexdigests
        streams[1].cancel()


@pytest.mark.parametrize(
    ("min_ping_interval", "survives"),
    [(3.0, False), (0.5, True)],
    ids=["pings-too-often", "pings-allowed"],
)
async def test_keepalive_pings_faster_than_allowed_close_the_connection(
    servers, min_ping_interval, survives
) -> None:
    """A client pinging every second (the fastest grpcio pings) against the server's policy."""
    address = await servers.hasher(hasher_latency=0, min_ping_interval=min_ping_interval)
    pinging = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(address, options=pinging) as channel:
        (stream,) = await open_streams(hasher_pb2_grpc.HasherStub(channel), 1)
        silent = asyncio.ensure_future(stream.read())  # nothing comes: only pings go by
        done, _ = await asyncio.wait([silent], timeout=10 if not survives else 3.5)
        if survives:
            assert not done
            stream.cancel()
            return
        assert done, "the server bore a ping every second"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            silent.result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ping" in caught.value.details().lower()


async def test_idle_connections_are_closed_and_clients_come_back(servers) -> None:
    address = await servers.hasher(hasher_latency=0, max_connection_idle=0.3)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        (stream,) = await open_streams(stub, 1)
        await asyncio.sleep(1)
        assert channel.get_state() == grpc.ChannelConnectivity.READY  # a call in flight
        await stream.done_writing()
        await stream.code()
        await asyncio.sleep(1)
        assert channel.get_state() == grpc.ChannelConnectivity.IDLE  # closed by the server
        assert (await stub.Hash(hasher_pb2.HashRequest(data=b"back"), timeout=5)).hexdigests


SILENT_CLIENT = """
import asyncio, sys
import grpc
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE, MAX_BATCH

async def hold(address, method):
    async with grpc.aio.insecure_channel(address) as channel:
        if method == "HashStream":  # the server waits for the next request
            stream = hasher_pb2_grpc.HasherStub(channel).HashStream()
            await stream.write(hasher_pb2.HashRequest(data=b"open"))
        else:  # the server writes replies nobody reads
            request = rng_pb2.StreamRandomRequest(size=32, count=1000)
            stream = rng_pb2_grpc.RngStub(channel).StreamRandom(request)
        await stream.read()
        print("open", flush=True)
        await asyncio.Event().wait()

asyncio.run(hold(*sys.argv[1:]))
"""


@pytest.mark.parametrize("method", ["HashStream", "StreamRandom"])
async def test_a_paused_client_gives_its_slot_back_after_keepalive(servers, method) -> None:
    """A client process holds the only slot with an open stream, then is SIGSTOPped: the
    server's unanswered ping frees the slot within keepalive time + timeout."""
    keepalive = {"max_concurrent_rpcs": 1, "keepalive_time": 1, "keepalive_timeout": 1}
    if method == "HashStream":
        address = await servers.hasher(hasher_latency=0, **keepalive)
        other = hasher_pb2_grpc.HasherStub
        one_call = ("Hash", hasher_pb2.HashRequest(data=b"mine now"))
    else:
        address = await servers.rng(rng_read_cost=0, **keepalive)
        other = rng_pb2_grpc.RngStub
        one_call = ("GetRandom", rng_pb2.RandomRequest(size=32))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SILENT_CLIENT, address, method, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert await asyncio.wait_for(client.stdout.readline(), 20) == b"open\n"
        async with grpc.aio.insecure_channel(address) as channel:
            call = getattr(other(channel), one_call[0])
            await asyncio.sleep(2.5)  # the live client answers the server's pings: kept
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(one_call[1], timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.send_signal(signal.SIGSTOP)
            paused = time.monotonic()
            while True:
                try:
                    await call(one_call[1], timeout=5)
                    break
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() - paused < 6, "the paused client kept its slot"
                    await asyncio.sleep(0.1)
            print(f"slot back {time.monotonic() - paused:.2f} s after SIGSTOP")
    finally:
        client.kill()
        await client.wait()


async def test_rng_reads_only_small_requests(servers) -> None:
    address = await servers.rng(rng_read_cost=0)
    async with grpc.aio.insecure_channel(address, options=UNLIMITED) as channel:
        # Not a RandomRequest: 64 KiB in an unknown field, refused from its length prefix.
        padded = channel.unary_unary("/dockercoins.v1.Rng/GetRandom")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await padded(b"\x22\x80\x80\x04" + bytes(1 << 16), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub = rng_pb2_grpc.RngStub(channel)
        reply = await stub.GetRandom(rng_pb2.RandomRequest(size=32, count=1000), timeout=5)
        assert len(reply.data) == 32000
