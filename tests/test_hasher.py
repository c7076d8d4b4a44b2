"""hasher over real gRPC: known digests, batches, concurrency, limits."""

import asyncio
import hashlib
import os
import time

import grpc
import pytest

from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc

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
