"""The hasher servicer: SHA-256 per block, a simulated latency per request that never queues."""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from dockercoins.errors import InvalidArgument, RequestError, ResourceExhausted
from dockercoins.grpcserver import write_or_gone
from dockercoins.settings import env_name
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc
from hasher_svc.config import HasherSettings

MAX_BLOCKS_SETTING = env_name("hasher_max_blocks")
MAX_REPLY_SETTING = env_name("hasher_max_reply")

DIGEST_SIZE = 32
HEX_ENTRY_BYTES = 2 + 2 * DIGEST_SIZE
"""One hex digest on the wire: a field tag, a length byte and 64 characters."""
CHUNK_BLOCKS = 1024
"""Blocks hashed between two offers of the GIL, and whose digests are held as separate
objects at once (about half a millisecond, under 100 KB)."""
REQUEST_FRAMING = 32
"""Bytes of a HashRequest besides its data: tags, the data's length, block_size, raw (<= 19)."""


def hash_blocks(data: bytes, block_size: int) -> bytes:
    """The SHA-256 digests of `data` (block_size 0) or of each block, concatenated."""
    if block_size == 0:
        return hashlib.sha256(data).digest()
    step = block_size * CHUNK_BLOCKS
    if len(data) <= step:
        return _hash_chunk(memoryview(data), block_size)
    return b"".join(_hash_chunks(data, block_size))


def _hash_chunk(view: memoryview, block_size: int) -> bytes:
    sha256 = hashlib.sha256
    return b"".join(
        [sha256(view[i : i + block_size]).digest() for i in range(0, len(view), block_size)]
    )


def _hash_chunks(data: bytes, block_size: int) -> Iterator[bytes]:
    """Digests of CHUNK_BLOCKS blocks at a time, the GIL offered to other threads between."""
    view = memoryview(data)
    step = block_size * CHUNK_BLOCKS
    for start in range(0, len(data), step):
        yield _hash_chunk(view[start : start + step], block_size)
        time.sleep(0)


def hex_digests(digests: bytes) -> list[str]:
    """Split concatenated digests into lowercase hex strings."""
    text = digests.hex()
    width = DIGEST_SIZE * 2
    return [text[i : i + width] for i in range(0, len(text), width)]


def reply_bytes(blocks: int, raw: bool) -> int:
    """An upper bound of the size of the reply to a request of `blocks` blocks."""
    digests = 6 + DIGEST_SIZE * blocks  # a tag, a length of at most 5 bytes, the digests
    return digests if raw else digests + HEX_ENTRY_BYTES * blocks


def build_reply(request: hasher_pb2.HashRequest) -> hasher_pb2.HashReply:
    """The reply to a checked request: all the hashing work."""
    digests = hash_blocks(request.data, request.block_size)
    if request.raw:
        return hasher_pb2.HashReply(digests=digests)
    return hasher_pb2.HashReply(digests=digests, hexdigests=hex_digests(digests))


class HasherServicer(hasher_pb2_grpc.HasherServicer):
    """Hashes what it is sent after a latency; concurrent requests wait side by side.

    Every bound is checked before any work. Small requests are hashed on the event loop
    (a thread hop would cost the fast path more than the hashing); larger ones in one
    thread, one at a time, so that the loop keeps answering health checks meanwhile.
    """

    def __init__(self, settings: HasherSettings) -> None:
        self.latency = settings.hasher_latency
        self.max_request = settings.hasher_max_request
        self.max_blocks = settings.hasher_max_blocks
        self.max_reply = settings.hasher_max_reply
        self.inline_blocks = settings.hasher_inline_blocks
        self.inline_bytes = settings.hasher_inline_bytes
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hasher-large")

    def _check(self, request: hasher_pb2.HashRequest) -> int:
        """Refuse a request outside the bounds; return how many blocks it asks for."""
        size = len(request.data)
        if size > self.max_request:
            raise ResourceExhausted(
                f"request of {size} bytes is more than DOCKERCOINS_HASHER_MAX_REQUEST "
                f"({self.max_request} bytes)"
            )
        if request.block_size < 0:
            raise InvalidArgument(f"block_size must be 0 or more, got {request.block_size}")
        blocks = 1
        if request.block_size:
            if size == 0:
                raise InvalidArgument("a batch (block_size > 0) needs at least one block")
            if size % request.block_size:
                raise InvalidArgument(
                    f"data of {size} bytes is not a whole number of "
                    f"{request.block_size}-byte blocks"
                )
            blocks = size // request.block_size
        if blocks > self.max_blocks:
            raise ResourceExhausted(
                f"a batch of {blocks} blocks is more than {MAX_BLOCKS_SETTING} "
                f"({self.max_blocks}): send fewer or larger blocks"
            )
        reply = reply_bytes(blocks, request.raw)
        if reply > self.max_reply:
            raise ResourceExhausted(
                f"the reply to {blocks} blocks would be {reply} bytes, more than "
                f"{MAX_REPLY_SETTING} ({self.max_reply} bytes): ask for raw digests "
                "or fewer blocks"
            )
        return blocks

    async def _answer(self, request: hasher_pb2.HashRequest) -> hasher_pb2.HashReply:
        blocks = self._check(request)
        if self.latency:
            await asyncio.sleep(self.latency)
        if blocks <= self.inline_blocks and len(request.data) <= self.inline_bytes:
            return build_reply(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._large, build_reply, request)

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
    ) -> None:
        async for request in request_iterator:
            try:
                reply = await self._answer(request)
            except RequestError as exc:
                await context.abort(exc.code, str(exc))
                raise  # unreachable: abort raises
            if not await write_or_gone(context, reply, "HashStream"):
                return
