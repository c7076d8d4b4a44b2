"""Bad requests against real rng and hasher processes: each gets its status code, servers stay
healthy and their memory stays flat. Property-based (hypothesis) over every request field."""

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from tests.stack import Service

pytestmark = pytest.mark.slow

MAX_REQUEST = 4096
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL = st.integers(min_value=-3, max_value=MAX_REQUEST + 3)
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def rng() -> tuple[Service, grpc.Channel, str]:
    port = free_port()
    server = Service("rng", rng_port=port, rng_read_cost=0, rng_max_request=MAX_REQUEST)
    server.wait_for("listening on")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel, f"127.0.0.1:{port}"
    channel.close()
    assert server.terminate() == 0
    server.kill()


@pytest.fixture(scope="module")
def hasher() -> tuple[Service, grpc.Channel, str]:
    port = free_port()
    server = Service("hasher", hasher_port=port, hasher_latency=0, hasher_max_request=MAX_REQUEST)
    server.wait_for("listening on")
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]
    )
    yield server, channel, f"127.0.0.1:{port}"
    channel.close()
    assert server.terminate() == 0
    server.kill()


def assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def rng_valid(size: int, count: int) -> bool:
    return size >= 1 and count >= 0 and size * max(count, 1) <= MAX_REQUEST


@PROPERTY
@given(size=st.one_of(SMALL, INT64), count=st.one_of(st.integers(-2, 200), INT64))
def test_get_random_answers_or_refuses_with_invalid_argument(rng, size, count) -> None:
    _, channel, _ = rng
    stub = rng_pb2_grpc.RngStub(channel)
    request = rng_pb2.RandomRequest(size=size, count=count)
    if rng_valid(size, count):
        reply = stub.GetRandom(request, timeout=5)
        assert len(reply.data) == size * max(count, 1)
        assert reply.size == size
    else:
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetRandom(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details()


@PROPERTY
@given(
    size=st.one_of(SMALL, INT64),
    count=st.integers(-2, 20),
    messages=st.one_of(st.integers(-2, 5), INT64),
)
def test_stream_random_sends_what_was_asked_or_refuses(rng, size, count, messages) -> None:
    _, channel, _ = rng
    stream = rng_pb2_grpc.RngStub(channel).StreamRandom(
        rng_pb2.StreamRandomRequest(size=size, count=count, messages=messages), timeout=5
    )
    if rng_valid(size, count) and messages >= 0:
        wanted = messages if 0 < messages <= 5 else 3
        replies = []
        for reply in stream:
            replies.append(reply)
            if len(replies) == wanted:
                break
        stream.cancel()  # halfway through an endless or long stream: the client walks away
        assert len(replies) == wanted
        assert all(len(r.data) == size * max(count, 1) for r in replies)
    else:
        with pytest.raises(grpc.RpcError) as refused:
            list(stream)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def hasher_error(data: bytes, block_size: int) -> grpc.StatusCode | None:
    if len(data) > MAX_REQUEST:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if block_size < 0 or (block_size and (not data or len(data) % block_size)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


def expected_digests(data: bytes, block_size: int) -> list[str]:
    if block_size == 0:
        return [hashlib.sha256(data).hexdigest()]
    blocks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
    return [hashlib.sha256(block).hexdigest() for block in blocks]


BLOCK_SIZES = st.one_of(st.sampled_from([0, 1, 16, 32, 64]), st.integers(-3, 100), INT64)
DATA = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 200).map(lambda n: b"\x01" * (32 * n)),
    st.integers(MAX_REQUEST - 2, MAX_REQUEST + 64).map(lambda n: b"\x02" * n),
)


@PROPERTY
@given(data=DATA, block_size=BLOCK_SIZES, raw=st.booleans())
def test_hash_answers_sha256_or_the_right_code(hasher, data, block_size, raw) -> None:
    _, channel, _ = hasher
    stub = hasher_pb2_grpc.HasherStub(channel)
    request = hasher_pb2.HashRequest(data=data, block_size=block_size, raw=raw)
    error = hasher_error(data, block_size)
    if error is None:
        reply = stub.Hash(request, timeout=5)
        wanted = expected_digests(data, block_size)
        assert reply.digests.hex() == "".join(wanted)
        assert list(reply.hexdigests) == ([] if raw else wanted)
    else:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Hash(request, timeout=5)
        assert refused.value.code() == error
        assert refused.value.details()


@PROPERTY
@given(
    requests=st.lists(st.tuples(DATA, BLOCK_SIZES), max_size=6),
)
def test_hash_stream_answers_until_the_first_bad_request(hasher, requests) -> None:
    _, channel, _ = hasher
    stream = hasher_pb2_grpc.HasherStub(channel).HashStream(
        iter([hasher_pb2.HashRequest(data=d, block_size=b, raw=True) for d, b in requests]),
        timeout=5,
    )
    first_bad = next((i for i, (d, b) in enumerate(requests) if hasher_error(d, b)), None)
    replies = []
    if first_bad is None:
        replies = list(stream)
        assert len(replies) == len(requests)
    else:
        with pytest.raises(grpc.RpcError) as refused:
            for reply in stream:
                replies.append(reply)
        assert refused.value.code() == hasher_error(*requests[first_bad])
        assert len(replies) == first_bad
    for reply, (data, block_size) in zip(replies, requests, strict=False):
        assert reply.digests.hex() == "".join(expected_digests(data, block_size))


def test_a_message_over_the_grpc_limit_is_refused_and_the_server_lives_on(hasher) -> None:
    server, channel, _ = hasher
    with pytest.raises(grpc.RpcError) as refused:
        hasher_pb2_grpc.HasherStub(channel).Hash(
            hasher_pb2.HashRequest(data=b"\0" * (1 << 20)), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(channel)
    assert server.proc.poll() is None


VANISHING_CLIENT = """
import sys, grpc
from dockercoins.v1 import rng_pb2, rng_pb2_grpc, hasher_pb2, hasher_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
for reply in rng_pb2_grpc.RngStub(channel).StreamRandom(
        rng_pb2.StreamRandomRequest(size=32, count=64)):
    print("streaming", flush=True)
"""

VANISHING_HASH_CLIENT = """
import sys, time, grpc
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
requests = iter(lambda: hasher_pb2.HashRequest(data=bytes(4096), block_size=32), None)
replies = hasher_pb2_grpc.HasherStub(channel).HashStream(requests)
next(replies)
print("streaming", flush=True)
time.sleep(60)  # requests go on, replies are not read: the hasher waits to write
"""


def test_abuse_leaves_servers_healthy_with_flat_memory(rng, hasher, record_property) -> None:
    """Thousands of refused requests, cancelled streams and clients killed with -9."""
    rng_server, rng_channel, address = rng
    hasher_server, hasher_channel, hasher_address = hasher
    rng_stub = rng_pb2_grpc.RngStub(rng_channel)
    hasher_stub = hasher_pb2_grpc.HasherStub(hasher_channel)

    def abuse(rounds: int) -> None:
        for _ in range(rounds):
            for call in (
                lambda: rng_stub.GetRandom(rng_pb2.RandomRequest(size=0), timeout=5),
                lambda: rng_stub.GetRandom(
                    rng_pb2.RandomRequest(size=MAX_REQUEST + 1 + rounds), timeout=5
                ),
                lambda: hasher_stub.Hash(hasher_pb2.HashRequest(data=b"x" * 33, block_size=32)),
                lambda: hasher_stub.Hash(hasher_pb2.HashRequest(data=b"y" * (MAX_REQUEST + 1))),
            ):
                with pytest.raises(grpc.RpcError):
                    call()
            stream = rng_stub.StreamRandom(rng_pb2.StreamRandomRequest(size=32, count=16))
            next(stream)
            stream.cancel()

    abuse(300)  # warm up: the allocator's arenas and gRPC's caches reach their size
    before = (rss_kib(rng_server.proc.pid), rss_kib(hasher_server.proc.pid))
    started = time.monotonic()
    abuse(1500)
    for script, target in [
        (VANISHING_CLIENT, address),
        (VANISHING_HASH_CLIENT, hasher_address),
    ] * 3:
        client = subprocess.Popen([sys.executable, "-c", script, target], stdout=subprocess.PIPE)
        assert client.stdout is not None
        assert client.stdout.readline().strip() == b"streaming"
        time.sleep(0.3)  # a while mid-stream
        client.kill()  # kill -9: no goodbye, the connection just drops
        client.wait(10)
    after = (rss_kib(rng_server.proc.pid), rss_kib(hasher_server.proc.pid))
    for channel in (rng_channel, hasher_channel):
        assert_serving(channel)
    growth = [a - b for a, b in zip(after, before, strict=True)]
    record_property("rss_growth_kib", growth)
    record_property("abuse_seconds", round(time.monotonic() - started, 1))
    print(f"RSS before {before} KiB, after {after} KiB, growth {growth} KiB")
    assert max(growth) < 10 * 1024, f"RSS grew by {growth} KiB over 7500 bad calls"
    assert rng_stub.GetRandom(rng_pb2.RandomRequest(size=32), timeout=5).data
    # A client gone mid-stream is the end of that stream, not an error with a traceback.
    for server in (rng_server, hasher_server):
        assert "Traceback" not in server.output, server.output
