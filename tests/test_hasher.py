"""hasher over real gRPC: known digests, batches, concurrency, limits."""

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockercoins.native import HASHLIB_CHUNK_BLOCKS, NATIVE_BUILT, choose_hash_path, hash_function
from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc
from dockercoins.wire import BATCH_BYTES, BLOCK_SIZE, MAX_BATCH
from tests.stack import Service

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.fixture
async def hasher(servers) -> hasher_pb2_grpc.HasherStub:
    address = await servers.hasher(hasher_latency=0, hasher_max_request=4096)
    channel = grpc.aio.insecure_channel(address)
    yield hasher_pb2_grpc.HasherStub(channel)
    await channel.close()


async def test_known_digests(hasher) -> None:
    empty = await hasher.Hash(hasher_pb2.HashRequest(data=b""), timeout=5)
    assert list(empty.hexdigests) == [EMPTY_SHA256]
    block = bytes(range(32))
    reply = await hasher.Hash(hasher_pb2.HashRequest(data=block), timeout=5)
    assert reply.hexdigests == [hashlib.sha256(block).hexdigest()]
    assert reply.digests == hashlib.sha256(block).digest()


async def test_a_batch_gets_one_digest_per_block_in_order(hasher) -> None:
    blocks = [os.urandom(32) for _ in range(50)]
    reply = await hasher.Hash(
        hasher_pb2.HashRequest(data=b"".join(blocks), block_size=32), timeout=5
    )
    assert list(reply.hexdigests) == [hashlib.sha256(b).hexdigest() for b in blocks]
    raw = await hasher.Hash(
        hasher_pb2.HashRequest(data=b"".join(blocks), block_size=32, raw=True), timeout=5
    )
    assert raw.digests == b"".join(hashlib.sha256(b).digest() for b in blocks)
    assert not raw.hexdigests


async def test_the_stream_answers_each_request_in_order(hasher) -> None:
    blocks = [os.urandom(32) for _ in range(5)]
    stream = hasher.HashStream(
        iter(hasher_pb2.HashRequest(data=b, block_size=32, raw=True) for b in blocks)
    )
    replies = [reply.digests async for reply in stream]
    assert replies == [hashlib.sha256(b).digest() for b in blocks]


async def test_latency_does_not_serialize_requests(servers) -> None:
    address = await servers.hasher(hasher_latency=0.05)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        await stub.Hash(hasher_pb2.HashRequest(data=b"warm-up"), timeout=5)
        began = time.perf_counter()
        await asyncio.gather(
            *(stub.Hash(hasher_pb2.HashRequest(data=b"x" * 32), timeout=5) for _ in range(10))
        )
        elapsed = time.perf_counter() - began
    assert elapsed >= 0.05
    assert elapsed < 0.5 * 10 * 0.05  # ten in a row would take 0.5 s


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        # Within gRPC's limit (the bound plus a request's framing): refused by the bound.
        ({"data": b"x" * 4097}, grpc.StatusCode.RESOURCE_EXHAUSTED, "MAX_REQUEST (4096 bytes)"),
        ({"data": b"x" * 5000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ({"data": b"x" * 32, "block_size": -1}, grpc.StatusCode.INVALID_ARGUMENT, "block_size"),
        ({"data": b"x" * 33, "block_size": 32}, grpc.StatusCode.INVALID_ARGUMENT, "whole number"),
        ({"data": b"", "block_size": 32}, grpc.StatusCode.INVALID_ARGUMENT, "at least one block"),
    ],
)
async def test_limits_and_bad_batches(hasher, request_fields, code, words) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hasher.Hash(hasher_pb2.HashRequest(**request_fields), timeout=5)
    assert caught.value.code() == code
    assert words in caught.value.details()
    stream = hasher.HashStream(iter([hasher_pb2.HashRequest(**request_fields)]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == code
    ok = await hasher.Hash(hasher_pb2.HashRequest(data=b"still up"), timeout=5)
    assert ok.hexdigests == [hashlib.sha256(b"still up").hexdigest()]


# The digests of both paths (the native batch call and hashlib per block), against hashlib.

PATHS = ("native", "hashlib")
EDGE_BLOCK_SIZES = (1, 55, 56, 63, 64, 65, 100)
"""Around SHA-256's padding: 55 bytes fit one compression with the length, 56 need two."""


def expected(data: bytes, block_size: int) -> bytes:
    if block_size == 0:
        return hashlib.sha256(data).digest()
    return b"".join(
        hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size)
    )


def test_make_setup_built_the_native_extension() -> None:
    """`make setup` (pip install -e) compiles dockercoins/_native.c here: gcc, Python's and
    OpenSSL's headers are on every machine of this kind. Elsewhere the hashlib path runs."""
    assert NATIVE_BUILT, "dockercoins._native did not build: see pip's output of `make setup`"
    assert choose_hash_path() == "native" and choose_hash_path(native=False) == "hashlib"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_size", EDGE_BLOCK_SIZES)
def test_both_paths_agree_with_hashlib_at_every_block_size(path, block_size) -> None:
    hash_blocks = hash_function(path)
    for blocks in (1, 2, 37, HASHLIB_CHUNK_BLOCKS + 3):
        data = os.urandom(blocks * block_size)
        assert hash_blocks(data, block_size) == expected(data, block_size)


@pytest.mark.parametrize("path", PATHS)
def test_both_paths_agree_on_whole_data_empty_data_and_the_largest_batch(path) -> None:
    hash_blocks = hash_function(path)
    assert hash_blocks(b"", 0).hex() == EMPTY_SHA256
    for data in (b"x", os.urandom(BATCH_BYTES), os.urandom(1 << 20)):
        assert hash_blocks(data, 0) == hashlib.sha256(data).digest()
    largest = os.urandom(MAX_BATCH * BLOCK_SIZE)
    assert hash_blocks(largest, BLOCK_SIZE) == expected(largest, BLOCK_SIZE)
    assert hash_blocks(memoryview(largest), BLOCK_SIZE) == expected(largest, BLOCK_SIZE)
    for data, block_size in ((b"", 32), (b"x" * 33, 32), (b"x" * 32, -1)):
        with pytest.raises(ValueError, match="whole, non-empty number"):
            hash_blocks(data, block_size)


@pytest.mark.parametrize("profile", ["classic", "turbo"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "hashlib"])
async def test_hash_and_hash_stream_agree_with_hashlib_in_both_profiles_and_paths(
    servers, profile, native
) -> None:
    """Every edge block size, whole data (empty too) and the largest accepted batch, through
    Hash and HashStream; classic's latency scaled down (its requests wait side by side)."""
    address = await servers.hasher(profile=profile, hasher_native=native, hasher_latency=0.01)
    requests = [(b"", 0), (os.urandom(1000), 0)]
    requests += [(os.urandom(size * 40), size) for size in EDGE_BLOCK_SIZES]
    requests.append((os.urandom(MAX_BATCH * BLOCK_SIZE), BLOCK_SIZE))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)
        for data, block_size in requests:
            reply = await stub.Hash(
                hasher_pb2.HashRequest(data=data, block_size=block_size, raw=True), timeout=10
            )
            assert reply.digests == expected(data, block_size), (len(data), block_size)
        stream = stub.HashStream(
            hasher_pb2.HashRequest(data=data, block_size=block_size, raw=True)
            for data, block_size in requests
        )
        replies = [reply.digests async for reply in stream]
    assert replies == [expected(data, block_size) for data, block_size in requests]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("native", "words"),
    [(True, "native batch SHA-256 over OpenSSL"), (False, "hashlib per block")],
    ids=["native", "hashlib"],
)
def test_the_start_line_and_metrics_say_which_path_runs(native, words) -> None:
    port, metrics = free_port(), free_port()
    server = Service(
        "hasher", hasher_port=port, metrics_port=metrics, hasher_native=native, profile="turbo"
    )
    try:
        line = server.wait_for_line("listening on").string
        assert words in line
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        (sample,) = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "dockercoins_hasher_path_info"
        ]
        assert sample.labels["path"] == ("native" if native else "hashlib")
        assert words in sample.labels["detail"] and sample.value == 1
    finally:
        assert server.terminate() == 0
        server.kill()


@pytest.mark.slow
def test_without_the_extension_hashlib_and_urandom_take_over() -> None:
    """Where dockercoins._native could not be built (here: its import made to fail), the hasher
    runs hashlib, rng urandom, and both say so; the digests are the same."""
    script = textwrap.dedent(
        """
        import hashlib, sys
        sys.modules["dockercoins._native"] = None  # an import of it now raises ImportError
        from dockercoins import native
        from hasher_svc.config import HasherSettings
        from hasher_svc.service import HasherServicer
        path = HasherServicer(HasherSettings(profile="turbo")).path
        generator, generate = native.random_function("aes-256-ctr")
        data = generate(64 * 32)
        same = native.sha256_blocks(data, 32) == b"".join(
            hashlib.sha256(data[i : i + 32]).digest() for i in range(0, len(data), 32)
        )
        print(native.NATIVE_BUILT, path, generator, len(data), same)
        print(native.describe_hash_path(path))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0].split() == ["False", "hashlib", "urandom", "2048", "True"]
    assert out[1] == "hashlib per block (the native extension is not built)"
