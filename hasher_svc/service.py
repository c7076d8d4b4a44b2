"""The hasher servicer: SHA-256 per block, a simulated latency per request that never queues."""

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc

from dockercoins.errors import InvalidArgument, RequestError, ResourceExhausted
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc

DIGEST_SIZE = 32


def hash_blocks(data: bytes, block_size: int) -> bytes:
    """The SHA-256 digests of `data` (block_size 0) or of each block, concatenated."""
    if block_size == 0:
        return hashlib.sha256(data).digest()
    sha256 = hashlib.sha256
    view = memoryview(data)
    return b"".join(
        [sha256(view[i : i + block_size]).digest() for i in range(0, len(data), block_size)]
    )


def hex_digests(digests: bytes) -> list[str]:
    """Split concatenated digests into lowercase hex strings."""
    text = digests.hex()
    width = DIGEST_SIZE * 2
    return [text[i : i + width] for i in range(0, len(text), width)]


class HasherServicer(hasher_pb2_grpc.HasherServicer):
    """Hashes what it is sent after `latency` seconds; concurrent requests wait side by side."""

    def __init__(self, latency: float, max_request: int) -> None:
        self.latency = latency
        self.max_request = max_request

    def _check(self, request: hasher_pb2.HashRequest) -> None:
        size = len(request.data)
        if size > self.max_request:
            raise ResourceExhausted(
                f"request of {size} bytes is more than the largest accepted, "
                f"{self.max_request} bytes"
            )
        if request.block_size < 0:
            raise InvalidArgument(f"block_size must be 0 or more, got {request.block_size}")
        if request.block_size:
            if size == 0:
                raise InvalidArgument("a batch (block_size > 0) needs at least one block")
            if size % request.block_size:
                raise InvalidArgument(
                    f"data of {size} bytes is not a whole number of "
                    f"{request.block_size}-byte blocks"
                )

    async def _answer(self, request: hasher_pb2.HashRequest) -> hasher_pb2.HashReply:
        self._check(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        digests = hash_blocks(request.data, request.block_size)
        if request.raw:
            return hasher_pb2.HashReply(digests=digests)
        return hasher_pb2.HashReply(digests=digests, hexdigests=hex_digests(digests))

    async def Hash(
        self, request: hasher_pb2.HashRequest, context: grpc.aio.ServicerContext
    ) -> hasher_pb2.HashReply:
        try:
            return await self._answer(request)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
            raise

    async def HashStream(
        self,
        request_iterator: AsyncIterator[hasher_pb2.HashRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[hasher_pb2.HashReply]:
        async for request in request_iterator:
            try:
                yield await self._answer(request)
            except RequestError as exc:
                await context.abort(exc.code, str(exc))
