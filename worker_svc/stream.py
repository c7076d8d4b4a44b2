"""The fast path's stream session: rng's batches streamed to hasher, digests streamed back."""

import asyncio
import time
from collections import deque
from typing import Any, Protocol

import grpc

from dockercoins.backoff import OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.lifecycle import cancel_all
from dockercoins.stages import StageTimes
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE
from worker_svc.config import HEALTH_TICK, WorkerSettings
from worker_svc.metrics import WORKER_RPC_SECONDS


class Mining(Protocol):
    """What a session needs of the miner whose loop runs it."""

    @property
    def settings(self) -> WorkerSettings: ...

    @property
    def rng(self) -> ChannelPool: ...

    @property
    def hasher(self) -> ChannelPool: ...

    @property
    def outages(self) -> OutageLog: ...

    @property
    def stage_times(self) -> StageTimes | None: ...

    @property
    def steps(self) -> dict[str, float]:
        """Last step (time.monotonic()) of each loop, by name."""
        ...

    @property
    def rng_modes_seen(self) -> set[str]:
        """The modes rng named in its replies since the last heartbeat."""
        ...

    async def next_unit(self, step: str) -> float | None:
        """Wait for room and think; the seconds waited for room, None once stopping."""
        ...

    def record(self, step: str, data: bytes, digests: bytes) -> dict[str, bytes]:
        """Count a finished unit of `data` hashed to `digests`; its coins."""
        ...


class StreamBroken(Exception):
    """A stream to `upstream` failed or stalled; the loop reopens both streams.

    `code`: the gRPC status code's name, or the cause's class name; `started`: when the
    failed wait began (time.monotonic()); `stalled`: the peer was silent past the deadline;
    `answered`: batches the session had answered before.
    """

    def __init__(
        self,
        upstream: str,
        cause: BaseException,
        started: float | None = None,
        stalled: bool = False,
    ) -> None:
        if isinstance(cause, grpc.aio.AioRpcError):
            self.code, detail = cause.code().name, cause.details()
        else:
            self.code, detail = type(cause).__name__, str(cause)
        self.reason = f"{self.code}: {detail}"
        super().__init__(f"{upstream}: {self.reason}")
        self.upstream = upstream
        self.started = started
        self.stalled = stalled
        self.answered = 0


class StreamSession:
    """One pair of streams: a writer sends rng's batches to hasher, a reader takes the digests.

    `run` returns the number of batches answered when the worker stops (after the batches in
    flight are answered) or when rng ends its stream cleanly. It raises StreamBroken when a
    stream fails, or when a peer keeps the worker waiting longer than the deadline: rng for
    its next batch, hasher for the oldest unanswered one or for the end of the stream. The
    session then cancels both calls and its three tasks, whatever they wait on (a read, a
    write held by HTTP/2 flow control, the window).
    """

    def __init__(self, miner: Mining, index: int, step: str) -> None:
        self.miner = miner
        self.step = step
        rng_stub = rng_pb2_grpc.RngStub(miner.rng.channels[index % len(miner.rng.channels)])
        hasher_stub = hasher_pb2_grpc.HasherStub(
            miner.hasher.channels[index % len(miner.hasher.channels)]
        )
        self.opened = time.monotonic()
        self.randoms = rng_stub.StreamRandom(
            rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=miner.settings.worker_batch)
        )
        self.hashes = hasher_stub.HashStream()
        self.deadline = miner.settings.rpc_timeout
        self.in_flight: deque[tuple[bytes, float, float, float, float]] = deque()
        """Batches at hasher: data, when sent, and the unit's think, rng and pause seconds."""
        self.window = asyncio.Semaphore(miner.settings.worker_stream_window)
        self.rng_asked: float | None = None
        """Since when the writer waits for rng's next batch; None while it does not."""
        self.closing: float | None = None
        """When the writer half-closed the hasher stream; None before."""
        self.answered = 0
        """Batches hasher answered."""

    async def run(self) -> int:
        """Run the writer, the reader and the watchdog until the reader ends or one fails."""
        writer = asyncio.create_task(self._send_batches(), name=f"{self.step}-writer")
        reader = asyncio.create_task(self._take_digests(), name=f"{self.step}-reader")
        watchdog = asyncio.create_task(self._watch(), name=f"{self.step}-watchdog")
        tasks = {writer: "rng", reader: "hasher", watchdog: ""}
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if watchdog in done:
                    upstream, since = watchdog.result()
                    raise StreamBroken(
                        upstream, TimeoutError(f"no reply within {self.deadline:g} s"), since, True
                    )
                for task in done:
                    if task.cancelled():  # grpc.aio raises CancelledError for a cancelled call
                        raise StreamBroken(tasks[task], asyncio.CancelledError("call cancelled"))
                    task.result()
                if reader in done:
                    return self.answered
        except StreamBroken as broken:
            broken.answered = self.answered
            if broken.started is None:
                broken.started = self.opened
            raise
        finally:
            self.randoms.cancel()
            self.hashes.cancel()
            await cancel_all(list(tasks))

    async def _send_batches(self) -> None:
        """The writer: a unit's place in the window, its think time, rng's batch, to hasher."""
        # Locals, not attributes, in the loop: it runs once per batch on the fast path.
        miner, step, randoms, hashes = self.miner, self.step, self.randoms, self.hashes
        window, in_flight, steps = self.window, self.in_flight, miner.steps
        next_unit, recovered = miner.next_unit, miner.outages.recovered
        rng_seconds = WORKER_RPC_SECONDS.labels("rng")
        rng_modes = miner.rng_modes_seen
        clock = time.monotonic
        while True:
            await window.acquire()
            started = clock()  # a unit starts when it has its place in the window
            paused = await next_unit(step)
            if paused is None:
                break
            asked = self.rng_asked = clock()
            reply = await _read(randoms, "rng")
            if reply is None:
                break  # rng ended the stream (e.g. max connection age): reopen
            sent = steps[step] = clock()
            rng_seconds.observe(sent - asked)
            self.rng_asked = None
            rng_modes.add(reply.mode)
            data = reply.data  # each read of a bytes field copies it
            in_flight.append((data, sent, asked - started - paused, sent - asked, paused))
            await _write(hashes, hasher_pb2.HashRequest(data=data, block_size=BLOCK_SIZE, raw=True))
            recovered("rng")
        self.rng_asked = None
        self.closing = clock()
        await _write(hashes, None)

    async def _take_digests(self) -> None:
        """The reader: hasher's digests of the oldest batch in flight, recorded; its place freed."""
        miner, step, hashes = self.miner, self.step, self.hashes
        window, in_flight = self.window, self.in_flight
        record, recovered = miner.record, miner.outages.recovered
        hasher_seconds = WORKER_RPC_SECONDS.labels("hasher")
        stage_times = miner.stage_times
        clock = time.monotonic
        while True:
            reply = await _read(hashes, "hasher")
            if reply is None:
                return
            if not in_flight:
                raise StreamBroken("hasher", ValueError("a reply to no request"))
            data, sent, think, rng, paused = in_flight.popleft()
            hashed = clock()
            hasher_seconds.observe(hashed - sent)
            self.answered += 1
            record(step, data, reply.digests)
            if stage_times is not None:
                stage_times.add(think, rng, hashed - sent, paused + clock() - hashed)
            recovered("hasher")
            window.release()

    async def _watch(self) -> tuple[str, float]:
        """The first peer to keep this session waiting past the deadline, and since when."""
        deadline, in_flight, clock = self.deadline, self.in_flight, time.monotonic
        while True:
            waits = []
            asked = self.rng_asked
            if asked is not None:
                waits.append((asked, "rng"))
            if in_flight:
                waits.append((in_flight[0][1], "hasher"))
            elif self.closing is not None:
                waits.append((self.closing, "hasher"))
            now = clock()
            if not waits:
                await asyncio.sleep(min(deadline / 4, HEALTH_TICK))
                continue
            since, upstream = min(waits)
            if now - since >= deadline:
                return upstream, since
            await asyncio.sleep(since + deadline - now)


async def _read(call: Any, upstream: str) -> Any:
    """The next message of a stream, None at its end; failures become StreamBroken."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise StreamBroken(upstream, exc) from None
    return None if reply is grpc.aio.EOF else reply


async def _write(call: Any, request: Any) -> None:
    """Send `request` on a client stream, or half-close it (None); failures become StreamBroken."""
    try:
        if request is None:
            await call.done_writing()
        else:
            await call.write(request)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        raise StreamBroken("hasher", exc) from None
