"""The rng servicer and its two random sources over one slow entropy source."""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Protocol

import grpc

from dockercoins.calls import client_address
from dockercoins.errors import InvalidArgument
from dockercoins.fairshare import FairShare
from dockercoins.grpcserver import write_or_gone
from dockercoins.v1 import rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE

log = logging.getLogger(__name__)


MESSAGE_COST = 8192
"""What producing one message costs rng besides its bytes, in blocks of 32 bytes (the unit of
`random_cost`): in turbo, rng spends 100-200 CPU-µs per message whatever its size and 0.03 µs
per further block (measured, one process reading 4 streams: 1 block 112 µs, 1000 blocks 100 µs,
8192 blocks 313 µs; 256 streams of 1 and 1000 blocks: 148 and 203 µs), so a message is worth
3,000-7,000 blocks. Without it a flood of small messages would take rng's time per message
nearly free of charge."""


def random_cost(size: int) -> int:
    """What producing a message of `size` random bytes costs, in blocks (`FairShare`)."""
    return -(-size // BLOCK_SIZE) + MESSAGE_COST


class SlowEntropySource:
    """os.urandom (or `generate`) behind one lock, each read costing `read_cost` seconds: one
    read at a time. The lock goes to the callers' addresses in turn (`FairShare`), FIFO within
    an address: with a read cost every read holds it for that cost, whatever its size, so reads
    go round-robin across addresses; without one (turbo), a read costs what it generates."""

    def __init__(self, read_cost: float, generate: Callable[[int], bytes] = os.urandom) -> None:
        self.read_cost = read_cost
        self.generate = generate
        self.reads = 0
        self.turns = FairShare(1)

    async def read(self, size: int, address: str = "") -> bytes:
        """Wait for the lock in `address`'s turn, pay the read cost, return `size` random
        bytes."""
        turns = self.turns
        await turns.acquire(address, 1 if self.read_cost else random_cost(size))
        try:
            if self.read_cost:
                await asyncio.sleep(self.read_cost)
            self.reads += 1
            return self.generate(size)
        finally:
            turns.release()


class RandomSource(Protocol):
    """Where the servicer takes its bytes from."""

    async def take(self, size: int, address: str) -> bytes: ...

    async def close(self) -> None: ...


class BlockingRng:
    """The baseline: every request does its own read of the slow source, under its lock."""

    def __init__(self, source: SlowEntropySource) -> None:
        self.source = source

    async def take(self, size: int, address: str) -> bytes:
        return await self.source.read(size, address)

    async def close(self) -> None:
        return None


class BufferedRng:
    """The fix: a producer reads large blocks into a bounded buffer; requests take from it, at
    most `takers` at once, the others waiting in their address's turn (`FairShare`), so that
    the bytes go to the addresses fairly when the producer cannot keep up."""

    def __init__(
        self, source: SlowEntropySource, block_size: int, buffer_size: int, takers: int
    ) -> None:
        self.source = source
        self.turns = FairShare(takers)
        self.block_size = min(block_size, buffer_size)
        self.buffer_size = buffer_size
        self.refills = 0
        self.underruns = 0
        self._buffer = bytearray()
        self._changed = asyncio.Condition()
        self._producer: asyncio.Task[None] | None = None

    @property
    def level(self) -> int:
        """Bytes in the buffer now."""
        return len(self._buffer)

    def start(self) -> None:
        """Start the background producer (inside the running loop)."""
        self._producer = asyncio.create_task(self._produce(), name="rng-producer")

    async def _produce(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: len(self._buffer) + self.block_size <= self.buffer_size
                )
            block = await self.source.read(self.block_size)
            async with self._changed:
                self._buffer += block
                self.refills += 1
                self._changed.notify_all()

    async def take(self, size: int, address: str) -> bytes:
        turns = self.turns
        await turns.acquire(address, random_cost(size))
        try:
            async with self._changed:
                if len(self._buffer) < size:
                    self.underruns += 1
                    await self._changed.wait_for(lambda: len(self._buffer) >= size)
                data = bytes(self._buffer[:size])
                del self._buffer[:size]
                self._changed.notify_all()
                return data
        finally:
            turns.release()

    async def close(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer


def check_request(size: int, count: int, max_request: int) -> int:
    """Validate a request and return how many blocks it asks for."""
    if size < 1:
        raise InvalidArgument(f"size must be at least 1 byte, got {size}")
    if count < 0:
        raise InvalidArgument(f"count must be 0 (one block) or more, got {count}")
    blocks = count or 1
    if size * blocks > max_request:
        raise InvalidArgument(
            f"size x count = {size * blocks} bytes is more than DOCKERCOINS_RNG_MAX_REQUEST "
            f"({max_request} bytes)"
        )
    return blocks


class RngServicer(rng_pb2_grpc.RngServicer):
    """Answers GetRandom and StreamRandom from an injected RandomSource.

    A reply never leaves sooner than `latency` seconds after its request arrived: the
    original's time per request, spent concurrently (not under the source's lock).
    In blocking mode the read under the lock usually covers it; in buffered mode it
    is all a request costs while the buffer holds bytes. Every reply names the `mode`.
    With `log_requests`, each call is logged (INFO) with its size and its peer. A request
    out of bounds raises a RequestError, which the server's interceptor answers with its code.
    """

    def __init__(
        self,
        source: RandomSource,
        max_request: int,
        latency: float = 0.0,
        mode: str = "",
        log_requests: bool = False,
    ) -> None:
        self.source = source
        self.max_request = max_request
        self.latency = latency
        self.mode = mode
        self.log_requests = log_requests

    async def _reply(self, size: int, blocks: int, address: str) -> rng_pb2.RandomReply:
        """`blocks` blocks of `size` bytes (a checked request) for a client at `address`, no
        sooner than `latency`."""
        if not self.latency:
            data = await self.source.take(size * blocks, address)
            return rng_pb2.RandomReply(data=data, size=size, mode=self.mode)
        loop = asyncio.get_running_loop()
        answer_at = loop.time() + self.latency
        data = await self.source.take(size * blocks, address)
        remaining = answer_at - loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
        return rng_pb2.RandomReply(data=data, size=size, mode=self.mode)

    async def GetRandom(
        self, request: rng_pb2.RandomRequest, context: grpc.aio.ServicerContext
    ) -> rng_pb2.RandomReply:
        blocks = check_request(request.size, request.count, self.max_request)
        if self.log_requests:  # off: one test per call, nothing formatted
            log.info("GetRandom %d x %d bytes for %s", blocks, request.size, context.peer())
        return await self._reply(request.size, blocks, client_address(context))

    async def StreamRandom(
        self, request: rng_pb2.StreamRandomRequest, context: grpc.aio.ServicerContext
    ) -> None:
        blocks = check_request(request.size, request.count, self.max_request)
        if request.messages < 0:
            raise InvalidArgument(f"messages must be 0 (no limit) or more, got {request.messages}")
        if self.log_requests:
            log.info(
                "StreamRandom %d x %d bytes, %s messages, for %s",
                blocks,
                request.size,
                request.messages or "unlimited",
                context.peer(),
            )
        address = client_address(context)
        sent = 0
        while not request.messages or sent < request.messages:
            reply = await self._reply(request.size, blocks, address)
            if not await write_or_gone(context, reply, "StreamRandom"):
                return
            sent += 1
