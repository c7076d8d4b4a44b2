"""The bounds every gRPC server holds (dockercoins/grpcserver.py, dockercoins/calls.py), under
hostile requests against real rng and hasher servers: each refused before it costs, with its
status code and the setting it hit; health answers meanwhile; normal requests are served after;
one client address holds its share and no more, even in a flood against a whole stack."""

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from dockercoins.calls import Call, TrackedContext, client_address, peer_address
from dockercoins.grpcserver import serve_service
from dockercoins.net import free_port
from dockercoins.rate import Sample, fit_slope
from dockercoins.redis_store import HASHES_KEY
from dockercoins.settings import GrpcServerSettings
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE, MAX_BATCH
from dockercoins_tools.healthcheck import check as container_check
from dockercoins_tools.procstat import memory_mb
from hasher_svc.config import HasherSettings
from hasher_svc.server import build_server
from tests.stack import (
    FAST_COSTS,
    LoggedProcess,
    RunningStack,
    Service,
    wait_until,
    wait_until_async,
)
from tests.support import SourceForwarder, flood_cmd, grpcurl, hold_calls, service_env

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
            time.sleep(0.005)  # the checks' pace: one every few milliseconds
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


async def test_a_stop_signal_the_moment_the_start_line_appears_stops_gracefully() -> None:
    """The start line is what a supervisor or a test waits for: a SIGTERM sent the moment it is
    logged finds the handler. (Logged before the handler, a fast SIGTERM killed rng: -15.)"""

    class SignalOnTheStartLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "listening on" in record.getMessage():
                os.kill(os.getpid(), signal.SIGTERM)

    service_log = logging.getLogger("tests.start-line")
    service_log.setLevel(logging.INFO)
    service_log.addHandler(handler := SignalOnTheStartLine())
    stopped: list[bool] = []

    async def on_stop() -> None:
        stopped.append(True)

    settings = HasherSettings(hasher_port=0)
    try:
        await asyncio.wait_for(
            serve_service(build_server(settings), settings, service_log, "test", on_stop), 10
        )
    finally:
        service_log.removeHandler(handler)
    assert stopped == [True]


@pytest.mark.slow
@pytest.mark.alone
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


@pytest.mark.slow
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


def refused_count(method: str, kind: str = "unary") -> float:
    """Calls to dockercoins.v1.Hasher/`method` the metrics counted as RESOURCE_EXHAUSTED."""
    labels = {"grpc_service": "dockercoins.v1.Hasher", "grpc_method": method}
    labels |= {"grpc_type": kind, "grpc_code": "RESOURCE_EXHAUSTED"}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


@pytest.mark.slow
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
        # Counted by the server's interceptor once the refusal is sent: soon after, not before.
        counted = refused_before + 1
        await wait_until_async(lambda: refused_count("Hash") == counted, 5, "the refusal counted")

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
    opened: list = []

    async def open_all() -> None:
        opened[:] = await open_streams(stub, count)

    await wait_until_async(lambda: answered(open_all()), 5, f"{count} slots given back")
    return opened


async def answered(call: Awaitable[Any]) -> bool:
    """Whether `call` was answered; False when the server refused it RESOURCE_EXHAUSTED."""
    try:
        await call
    except grpc.aio.AioRpcError as refused:
        if refused.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


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
        await asyncio.sleep(1)  # past the idle time, with a call in flight: kept
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        await stream.done_writing()
        await stream.code()
        idle = grpc.ChannelConnectivity.IDLE
        await wait_until_async(lambda: channel.get_state() == idle, 5, "closed by the server")
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


@pytest.mark.slow
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
            await asyncio.sleep(2.5)  # past a keepalive ping: the live client answers, is kept
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(one_call[1], timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.send_signal(signal.SIGSTOP)
            took = await wait_until_async(
                lambda: answered(call(one_call[1], timeout=5)),
                6,
                "the paused client's slot given back",
                interval=0.1,
            )
            print(f"slot back {took:.2f} s after SIGSTOP")
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


# --- one client against the others (issue 18) ------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:%5B2001:db8::7%5D:51234", "2001:db8::7"),
        ("ipv6:[2001:db8::7]:51234", "2001:db8::7"),
        ("ipv6:%5B::ffff:10.0.0.7%5D:51234", "10.0.0.7"),
        ("unix:/run/dockercoins.sock", "unix:/run/dockercoins.sock"),
    ],
)
def test_a_client_is_known_by_its_address_not_its_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_a_servicer_keys_its_fair_share_by_the_address_its_budget_counted() -> None:
    """Behind the interceptor a servicer reads the address the call's budget was taken under
    (parsed once per call); a context from elsewhere has its peer string parsed."""

    class Intercepted:  # the interceptor parsed the peer already: not again
        def peer(self) -> str:
            raise AssertionError("the peer string parsed a second time")

    class Direct:
        def peer(self) -> str:
            return "ipv4:10.0.0.8:40000"

    tracked = TrackedContext(Intercepted(), Call("10.0.0.7", None), None, None)  # type: ignore[arg-type]
    assert client_address(tracked) == "10.0.0.7"  # type: ignore[arg-type]
    assert client_address(Direct()) == "10.0.0.8"  # type: ignore[arg-type]


async def refusal(target: str, call: str) -> str:
    """The details of the refusal of one call (`hash`, `check` or `watch`) to `target`."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if call == "hash":
                request = hasher_pb2.HashRequest(data=b"x")
                await hasher_pb2_grpc.HasherStub(channel).Hash(request, timeout=5)
            elif call == "check":
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            else:
                await health.Watch(health_pb2.HealthCheckRequest(), timeout=5).read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    return caught.value.details()


async def hash_answers(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        assert (await stub.Hash(hasher_pb2.HashRequest(data=b"x"), timeout=5)).hexdigests


async def check_answers(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
async def test_one_address_holds_its_share_and_others_are_served(servers) -> None:
    """127.0.0.2 and 127.0.0.3 (through forwarders) against 127.0.0.1: each address holds at
    most its share of application calls and of health and reflection calls; the totals hold
    too; a Check is refused only to an address that has its whole probe share in flight."""
    address = await servers.hasher(
        hasher_latency=0,
        max_concurrent_rpcs=6,
        max_peer_rpcs=4,
        max_probe_streams=5,
        max_peer_probe_calls=3,
        metrics_port=free_port(),  # metrics on: the server's own count of its refusals
    )

    async def refused_streams(source: str, count: int, held: int) -> list:
        """`count` HashStreams from `source`: `held` of them held, the others refused, which
        the server counts as RESOURCE_EXHAUSTED. (The client sees that code, or, when its first
        message crosses the refusal, what grpc core makes of it: INTERNAL, seen once in a
        fresh-clone `make test`.)"""
        before = refused_count("HashStream", "bidi_stream")
        streams, refused = await hold_calls(source, "hashstream", count)
        assert len(streams) == held and sum(refused.values()) == count - held, refused
        assert set(refused) <= {"RESOURCE_EXHAUSTED", "INTERNAL"}, refused
        counted = before + count - held
        await wait_until_async(
            lambda: refused_count("HashStream", "bidi_stream") == counted, 5, "refusals counted"
        )
        return streams

    second = SourceForwarder(address, "127.0.0.2")
    third = SourceForwarder(address, "127.0.0.3")
    try:
        from_2, from_3 = await second.start(), await third.start()
        streams_2 = await refused_streams(from_2, 6, 4)
        assert "127.0.0.2 has 4 calls in flight" in await refusal(from_2, "hash")
        assert "DOCKERCOINS_MAX_PEER_RPCS" in await refusal(from_2, "hash")
        await hash_answers(address)  # the total has room: others are served
        streams_3 = await refused_streams(from_3, 3, 2)
        assert "DOCKERCOINS_MAX_CONCURRENT_RPCS" in await refusal(address, "hash")

        watches_2, refused = await hold_calls(from_2, "watch", 5)
        assert (len(watches_2), refused) == (3, {"RESOURCE_EXHAUSTED": 2})
        assert "DOCKERCOINS_MAX_PEER_PROBE_CALLS" in await refusal(from_2, "watch")
        assert "DOCKERCOINS_MAX_PEER_PROBE_CALLS" in await refusal(from_2, "check")
        watches_3, _ = await hold_calls(from_3, "watch", 2)
        assert len(watches_3) == 2
        assert "DOCKERCOINS_MAX_PROBE_STREAMS" in await refusal(address, "watch")
        await check_answers(address)  # Checks never count against the total
        await check_answers(from_3)
        code, out = await grpcurl(address, "list")  # a reflection stream: no room left
        assert code != 0 and "DOCKERCOINS_MAX_PROBE_STREAMS" in out, out

        for call in watches_3 + streams_3:
            call.cancel()

        async def listed() -> bool:  # a cancelled call frees its place once the server hears
            return (await grpcurl(address, "list"))[0] == 0

        await wait_until_async(listed, 5, "places given back")
        await hash_answers(address)
        for call in watches_2 + streams_2:
            call.cancel()
    finally:
        await second.close()
        await third.close()


async def test_an_address_is_an_address_over_ipv6_and_ipv4_mapped(servers) -> None:
    """A dual-stack server sees 127.0.0.1 as ::ffff:127.0.0.1: still the same address."""
    address = await servers.hasher(host="::", hasher_latency=0, max_peer_rpcs=1)
    port = address.rpartition(":")[2]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ipv4,
        grpc.aio.insecure_channel(f"ipv6:[::ffff:127.0.0.1]:{port}") as mapped,
        grpc.aio.insecure_channel(f"ipv6:[::1]:{port}") as ipv6,
    ):
        (stream,) = await open_streams(hasher_pb2_grpc.HasherStub(ipv4), 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hasher_pb2_grpc.HasherStub(mapped).Hash(hasher_pb2.HashRequest(data=b"x"))
        assert "127.0.0.1 has 1 calls in flight" in caught.value.details()
        reply = await hasher_pb2_grpc.HasherStub(ipv6).Hash(hasher_pb2.HashRequest(data=b"x"))
        assert reply.hexdigests
        stream.cancel()


IDLE = 0.5
"""Seconds a call may wait on its client in the tests below (DOCKERCOINS_CALL_IDLE_TIMEOUT)."""


async def ended_within(call: Any, seconds: float) -> tuple[grpc.StatusCode, str, float]:
    """Read `call` until it ends: its code, its details, and how long it took."""
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await asyncio.wait_for(call.read(), seconds) is not grpc.aio.EOF:
            pass
    return caught.value.code(), caught.value.details(), time.monotonic() - began


async def test_calls_that_wait_on_their_client_are_ended(servers) -> None:
    """A HashStream with no next request, a unary call whose request never comes: ended
    UNAVAILABLE after the idle timeout, naming the setting, their place free again. A health
    Watch waits on nobody between two changes: it stays."""
    address = await servers.hasher(hasher_latency=0, call_idle_timeout=IDLE, max_concurrent_rpcs=1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        (stream,) = await open_streams(stub, 1)
        code, details, took = await ended_within(stream, 5)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "DOCKERCOINS_CALL_IDLE_TIMEOUT" in details
        assert IDLE <= took < 3 * IDLE
        assert (await stub.Hash(hasher_pb2.HashRequest(data=b"x"), timeout=5)).hexdigests

        async def never_sent() -> AsyncIterator[bytes]:
            await asyncio.Event().wait()
            yield b""

        headers_only = channel.stream_unary("/dockercoins.v1.Hasher/Hash")(never_sent())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(headers_only, 5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await stub.Hash(hasher_pb2.HashRequest(data=b"x"), timeout=5)).hexdigests
        assert not watch.done()
        watch.cancel()


async def test_a_stream_its_client_does_not_read_is_ended_and_keeps_its_place_until_read(
    servers,
) -> None:
    """rng stops writing to a client that reads nothing for the idle timeout and queues its
    UNAVAILABLE behind the replies sent; the stream's place is held until the client takes
    them (or goes), so that unread replies stay within the bound on calls."""
    address = await servers.rng(rng_read_cost=0, call_idle_timeout=IDLE, max_concurrent_rpcs=1)
    request = rng_pb2.StreamRandomRequest(size=32, count=1000)
    async with (
        grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as reader,
        grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as other,
    ):
        stream = rng_pb2_grpc.RngStub(reader).StreamRandom(request)
        await stream.read()
        await asyncio.sleep(3 * IDLE)  # past the idle timeout: the server's writes stalled, ended
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rng_pb2_grpc.RngStub(other).GetRandom(rng_pb2.RandomRequest(size=32))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, details, _ = await ended_within(stream, 5)  # the queued replies, then the end
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "DOCKERCOINS_CALL_IDLE_TIMEOUT" in details
        reply = await rng_pb2_grpc.RngStub(other).GetRandom(rng_pb2.RandomRequest(size=32))
        assert len(reply.data) == 32


# --- the flood of issue 18 against a whole stack ---------------------------------------------

FLOOD = {"watch": 5000, "hashstream": 1100}
"""Calls the flood opens: health Watches on each server, idle HashStreams on hasher."""

TURBO_COSTS = {"rng_read_cost": 0, "hasher_latency": 0, "worker_think_time": 0}


def counter_rate(client: redis.Redis, seconds: float = 3, windows: int = 2) -> float:
    """Hashes per second the `hashes` counter grows by: the best of `windows` slopes, each
    fitted over `seconds` of samples at Redis's own time (the best: other jobs on the machine
    only ever slow it down)."""
    rates = []
    for _ in range(windows):
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pipe = client.pipeline(transaction=False)
            (now, micros), hashes = pipe.time().get(HASHES_KEY).execute()
            samples.append(Sample(now + micros / 1e6, int(hashes or 0)))
            time.sleep(0.1)  # a sample every 0.1 s of the window
        fitted = fit_slope(samples)
        assert fitted, samples
        rates.append(fitted.per_second)
    return max(rates)


def service_pids(stack: RunningStack) -> dict[str, int]:
    """The pids of the stack's rng, hasher and worker."""
    pids = {}
    for pid in stack.children():
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for name in ("rng", "hasher", "worker"):
            if f"{name}_svc".encode() in command:
                pids[name] = pid
    assert set(pids) == {"rng", "hasher", "worker"}, pids
    return pids


def a_new_client(target: str) -> tuple[float, Any]:
    """One health Check from a new client (its own connection) within 1 s: its seconds, its
    status."""
    began = time.perf_counter()
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
    return time.perf_counter() - began, reply.status


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.parametrize("profile", ["classic", "turbo"])
def test_a_flood_from_one_address_leaves_every_other_client_served(
    tmp_path, profile, record_property
) -> None:
    """127.0.0.2 opens 5,000 health Watches on rng, hasher and the worker's health port and
    1,100 idle HashStreams on hasher, and holds what it gets.
    Meanwhile clients from 127.0.0.1 (new connections) get their Check SERVING within 1 s on
    all three, their Hash and GetRandom answered and grpcurl's reflection; the stack mines at
    80 % or more of its rate before."""
    health_port = free_port()
    costs = FAST_COSTS if profile == "classic" else TURBO_COSTS
    stack = RunningStack(
        tmp_path / "data",
        ("--workers", "1"),
        profile=profile,
        worker_health_port=health_port,
        **costs,
    )
    flood = None
    try:
        stack.ready()
        targets = {
            "rng": stack.wait_for_line(r"^rng (\S+)$").group(1),
            "hasher": stack.wait_for_line(r"^hasher (\S+)$").group(1),
            "worker": f"127.0.0.1:{health_port}",
        }
        counter = redis.Redis.from_url(stack.redis_url(), socket_timeout=5)
        wait_until(lambda: int(counter.get(HASHES_KEY) or 0) > 0, 30, "mining", stack)
        pids = service_pids(stack)
        before = counter_rate(counter)
        rss_before = {name: memory_mb(pid, "VmRSS") for name, pid in pids.items()}

        specs = [f"watch:{FLOOD['watch']}:{target}" for target in targets.values()]
        specs.append(f"hashstream:{FLOOD['hashstream']}:{targets['hasher']}")
        flood = LoggedProcess(flood_cmd("127.0.0.2", *specs), service_env())
        held = json.loads(flood.wait_for_line(r"^flood (.*)", 120).group(1))

        checks = {
            name: [a_new_client(target) for _ in range(10)] for name, target in targets.items()
        }
        # What compose runs in each container, from 127.0.0.1 too.
        named = {"rng": "dockercoins.v1.Rng", "hasher": "dockercoins.v1.Hasher"}
        container_checks = {
            name: container_check(target, named.get(name, "liveness"), 2.0)
            for name, target in targets.items()
        }
        with grpc.insecure_channel(targets["hasher"]) as channel:
            hashed = hasher_pb2_grpc.HasherStub(channel).Hash(
                hasher_pb2.HashRequest(data=b"visitor"), timeout=5
            )
        with grpc.insecure_channel(targets["rng"]) as channel:
            random = rng_pb2_grpc.RngStub(channel).GetRandom(
                rng_pb2.RandomRequest(size=32), timeout=5
            )
        listed = asyncio.run(grpcurl(targets["hasher"], "list"))
        during = counter_rate(counter)
        rss_during = {name: memory_mb(pid, "VmRSS") for name, pid in pids.items()}
    finally:
        if flood is not None:
            flood.kill()
        stack.stop()
        stack.kill()

    slowest = {name: max(seconds for seconds, _ in answers) for name, answers in checks.items()}
    print(f"\n{profile}: flood held {json.dumps(held)}")
    print(f"{profile}: slowest Check of a new client (ms): ", end="")
    print({name: round(seconds * 1000, 1) for name, seconds in slowest.items()})
    print(f"{profile}: RSS MB before -> during: ", end="")
    print({name: f"{rss_before[name]:.1f} -> {rss_during[name]:.1f}" for name in pids})
    print(f"{profile}: mining {before:.1f} hashes/s before, {during:.1f} during the flood")
    record_property("held", held)
    record_property("slowest_check_ms", {k: round(v * 1000, 1) for k, v in slowest.items()})
    record_property("rss_mb", {name: (rss_before[name], rss_during[name]) for name in pids})
    record_property("rate", (round(before, 1), round(during, 1)))

    defaults = GrpcServerSettings.model_construct()
    for spec, result in held.items():
        kind = spec.split(":")[0]
        share = defaults.max_peer_probe_calls if kind == "watch" else defaults.max_peer_rpcs
        assert result["held"] == share, held  # the flood held its address's share, no more
        assert sum(result["refused"].values()) == FLOOD[kind] - share, held
    for answers in checks.values():
        assert all(status == health_pb2.HealthCheckResponse.SERVING for _, status in answers)
    assert max(slowest.values()) < 1.0
    assert container_checks == dict.fromkeys(targets, ""), container_checks
    assert len(hashed.hexdigests) == 1 and len(random.data) == 32
    assert listed[0] == 0 and "dockercoins.v1.Hasher" in listed[1], listed
    assert during >= 0.8 * before, f"{during:.1f} hashes/s during the flood, {before:.1f} before"


UNARY_CLIENT = """
import asyncio, os, sys
import grpc
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc

async def ask(address):  # a window of 64 KiB, as the worker's
    async with grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        request = hasher_pb2.HashRequest(data=os.urandom(1 << 19), block_size=32)  # the largest
        call = hasher_pb2_grpc.HasherStub(channel).Hash(request)  # a 1.6 MB reply
        print("sent", flush=True)  # the test then waits for the call to reach the server
        await call

asyncio.run(ask(sys.argv[1]))
"""


@pytest.mark.slow
async def test_a_unary_reply_its_client_does_not_take_keeps_the_calls_place(servers) -> None:
    """A client process asks for a 1.6 MB reply and is SIGSTOPped before it comes: the reply,
    stuck behind HTTP/2 flow control once the handler has returned, keeps the call's place
    (the only one) until keepalive ends the connection, not a moment less."""
    address = await servers.hasher(
        hasher_latency=1, max_concurrent_rpcs=1, keepalive_time=3, keepalive_timeout=3
    )
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UNARY_CLIENT, address, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert await asyncio.wait_for(client.stdout.readline(), 20) == b"sent\n"
        budget = servers.at(address).budgets.app
        await wait_until_async(lambda: budget.in_use == 1, 10)  # its call has reached the server
        client.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = hasher_pb2_grpc.HasherStub(channel)
            await asyncio.sleep(3)  # 2 s past the handler's return (1 s): its reply waits
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Hash(hasher_pb2.HashRequest(data=b"mine"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            mine = hasher_pb2.HashRequest(data=b"mine")
            await wait_until_async(
                lambda: answered(stub.Hash(mine, timeout=5)),
                12 - (time.monotonic() - paused),
                "the paused client's place given back",
                interval=0.1,
            )
    finally:
        client.kill()
        await client.wait()
