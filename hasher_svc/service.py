"""The hasher servicer: SHA-256 per block, a simulated latency per request that never queues."""

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from dockercoins.calls import client_address
from dockercoins.errors import InvalidArgument, ResourceExhausted
from dockercoins.fairshare import FairShare
from dockercoins.grpcserver import write_or_gone
from dockercoins.native import HashBlocks, HashPath, choose_hash_path, hash_function
from dockercoins.settings import env_name
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc
from dockercoins.wire import DIGEST_SIZE, reply_bytes
from hasher_svc.config import HasherSettings

MAX_BLOCKS_SETTING = env_name("hasher_max_blocks")
MAX_REPLY_SETTING = env_name("hasher_max_reply")

MESSAGE_COST = 2048
"""What one message costs the hasher besides its hashing, in blocks (the unit of `hash_cost`:
one SHA-256 compression, a 32-byte block and its digest in and out): in turbo the hasher
spends 175-260 CPU-µs per message and 0.13 µs per further block (measured, raw digests, one
process sending 4 or 256 streams: 1 block 175 and 258 µs, 1000 blocks 250 and 367 µs, 8192
blocks 1,146 µs), so a message is worth 1,400-2,100 blocks."""

HEX_COST = 3
"""What a hex digest in a reply costs besides its block, in blocks: building the strings and
sending 66 more bytes, 0.25-0.36 µs per digest (1000 and 8192 blocks: 537 and 4,375 µs a
message with hex digests, 288 and 1,458 µs raw)."""


def hex_digests(digests: bytes) -> list[str]:
    """Split concatenated digests into lowercase hex strings."""
    text = digests.hex()
    width = DIGEST_SIZE * 2
    return [text[i : i + width] for i in range(0, len(text), width)]


def build_reply(
    hash_blocks: HashBlocks, data: bytes, request: hasher_pb2.HashRequest
) -> hasher_pb2.HashReply:
    """The reply to a checked request whose `data` was read: all the hashing work, by
    `hash_blocks`."""
    digests = hash_blocks(data, request.block_size)
    if request.raw:
        return hasher_pb2.HashReply(digests=digests)
    return hasher_pb2.HashReply(digests=digests, hexdigests=hex_digests(digests))


def hash_cost(size: int, request: hasher_pb2.HashRequest, blocks: int) -> int:
    """What answering a checked request of `size` bytes and `blocks` blocks costs, in blocks
    (`FairShare`): its SHA-256 compressions (a 32-byte block takes one, a padded block of
    n bytes (n + 72) // 64), its hex digests, a message."""
    if request.block_size:
        compressions = blocks * ((request.block_size + 72) // 64)
    else:
        compressions = (size + 72) // 64
    hexes = 0 if request.raw else HEX_COST * blocks
    return compressions + hexes + MESSAGE_COST


class HasherServicer(hasher_pb2_grpc.HasherServicer):
    """Hashes what it is sent after a latency; concurrent requests wait side by side.

    Every bound is checked before any work. Small requests are hashed on the event loop
    (a thread hop would cost the fast path more than the hashing); larger ones in one
    thread, one at a time, so that the loop keeps answering health checks meanwhile (the
    native path releases the GIL: the loop runs on while the thread hashes). The hashing,
    after the latency, goes to the callers' addresses in turn by its cost (`FairShare`),
    DOCKERCOINS_MAX_WORK_IN_PROGRESS requests at once, so that one address's many streams
    cannot take the thread or the loop from the others. A request out of bounds raises a
    RequestError, which the server's interceptor answers with its code.
    """

    def __init__(self, settings: HasherSettings, path: HashPath | None = None) -> None:
        self.latency = settings.hasher_latency
        self.max_request = settings.hasher_max_request
        self.max_blocks = settings.hasher_max_blocks
        self.max_reply = settings.hasher_max_reply
        self.inline_blocks = settings.hasher_inline_blocks
        self.inline_bytes = settings.hasher_inline_bytes
        self.path = path or choose_hash_path(settings.hasher_native)
        """Which batch SHA-256 runs: native (one C call per batch) or hashlib (per block)."""
        self.hash_blocks = hash_function(self.path)
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hasher-large")
        self.turns = FairShare(settings.max_work_in_progress)

    def _check(self, size: int, request: hasher_pb2.HashRequest) -> int:
        """Refuse a request of `size` bytes outside the bounds; return how many blocks it asks
        for."""
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

    async def _answer(self, request: hasher_pb2.HashRequest, address: str) -> hasher_pb2.HashReply:
        data = request.data  # read once: each read of a bytes field copies it
        blocks = self._check(len(data), request)
        if self.latency:
            await asyncio.sleep(self.latency)
        turns = self.turns
        await turns.acquire(address, hash_cost(len(data), request, blocks))
        try:
            if blocks <= self.inline_blocks and len(data) <= self.inline_bytes:
                return build_reply(self.hash_blocks, data, request)
            loop = asyncio.get_running_loop()
            large = self._large
            return await loop.run_in_executor(large, build_reply, self.hash_blocks, data, request)
        finally:
            turns.release()

    async def Hash(
        self, request: hasher_pb2.HashRequest, context: grpc.aio.ServicerContext
    ) -> hasher_pb2.HashReply:
        return await self._answer(request, client_address(context))

    async def HashStream(
        self,
        request_iterator: AsyncIterator[hasher_pb2.HashRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        address = client_address(context)
        async for request in request_iterator:
            reply = await self._answer(request, address)
            if not await write_or_gone(context, reply, "HashStream"):
                return
