"""The fast path as a unit source: rng's batches streamed to hasher, digests streamed back, the
streams reopened whenever they end."""

import asyncio
import logging
import time
from collections import deque
from typing import Any

import grpc

from dockercoins.backoff import Backoff
from dockercoins.lifecycle import cancel_all
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE
from worker_svc.config import HEALTH_TICK, WorkerSettings
from worker_svc.metrics import WORKER_ERRORS, WORKER_RPC_SECONDS
from worker_svc.units import Units, UnitSource

log = logging.getLogger(__name__)


class StreamLoops(UnitSource):
    """Mining loops of one pair of streams each (a session), over the channel pools: loop n
    streams over the n-th channel of each pool.

    A session that ends is replaced at once when it worked (a server going away, a connection
    reaching its maximum age), or once mining resumes when it ended while mining was paused (a
    server ends a stream left idle that long: not an outage); one that failed or stalled is an
    outage, said once, and the next is opened after a backoff.
    """

    def session(self, index: int, step: str) -> "StreamSession":
        """A new pair of streams for loop `index`."""
        rng, hasher = self.rng.channels, self.hasher.channels
        return StreamSession(
            self.settings, rng[index % len(rng)], hasher[index % len(hasher)], self.units, step
        )

    async def run(self, index: int) -> None:
        """Loop `index`: an rng stream feeding a hasher stream, reopened whenever one ends."""
        step = f"loop-{index}"
        units = self.units
        backoff = Backoff()
        while not units.stopping.is_set():
            units.step(step)
            try:
                answered = await self.session(index, step).run()
            except StreamBroken as broken:
                WORKER_ERRORS.labels(broken.upstream, broken.code).inc()
                if broken.paused and not broken.stalled:
                    # Ended while this worker held it idle, mining paused (a server ends such a
                    # stream after DOCKERCOINS_CALL_IDLE_TIMEOUT): reopened once mining resumes.
                    log.debug("stream to %s ended while paused: %s", broken.upstream, broken.reason)
                    await units.wait_for_room(step)
                    backoff.reset()
                    continue
                if broken.answered and not broken.stalled:
                    # A stream that worked and then ended (a server going away, a connection
                    # reaching its maximum age) is reopened at once, without an outage.
                    log.debug("stream to %s ended: %s; reopening", broken.upstream, broken.reason)
                    backoff.reset()
                    continue
                units.outages.failed(broken.upstream, broken.reason, broken.started)
            else:
                if answered:  # rng ended its stream cleanly: reopen at once
                    backoff.reset()
                    continue
            units.step(step)
            if await units.stopped_within(backoff.next_delay()):
                return


class StreamBroken(Exception):
    """A stream to `upstream` failed or stalled; the loop reopens both streams.

    `code`: the gRPC status code's name, or the cause's class name; `started`: when the
    failed wait began (time.monotonic()); `stalled`: the peer was silent past the deadline;
    `answered`: batches the session had answered before; `paused`: mining was paused since the
    session last sent a batch (or is paused now), so that the session sat idle.
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
        self.paused = False


class StreamSession:
    """One pair of streams: a writer sends rng's batches to hasher, a reader takes the digests.

    `run` returns the number of batches answered when the miner stops (after the batches in
    flight are answered) or when rng ends its stream cleanly. It raises StreamBroken when a
    stream fails, or when a peer keeps the worker waiting longer than the deadline: rng for
    its next batch, hasher for the oldest unanswered one or for the end of the stream. The
    session then cancels both calls and its three tasks, whatever they wait on (a read, a
    write held by HTTP/2 flow control, the window).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        rng: grpc.aio.Channel,
        hasher: grpc.aio.Channel,
        units: Units,
        step: str,
    ) -> None:
        self.units = units
        self.step = step
        self.opened = time.monotonic()
        """When the session began (time.monotonic()): a failure to open dates from then."""
        self.randoms = rng_pb2_grpc.RngStub(rng).StreamRandom(
            rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=settings.worker_batch)
        )
        self.hashes = hasher_pb2_grpc.HasherStub(hasher).HashStream()
        self.deadline = settings.rpc_timeout
        self.in_flight: deque[tuple[bytes, float, float, float, float]] = deque()
        """Batches at hasher: data, when sent, and the unit's think, rng and pause seconds."""
        self.window = asyncio.Semaphore(settings.worker_stream_window)
        self.rng_asked: float | None = None
        """Since when the writer waits for rng's next batch; None while it does not."""
        self.closing: float | None = None
        """When the writer half-closed the hasher stream; None before."""
        self.answered = 0
        """Batches hasher answered."""
        self.begun = 0
        """Units the writer began (answered, in flight, or in hand)."""
        self.idle_paused = False
        """Whether the writer waited for room (mining paused) since it last sent a batch."""

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
            broken.paused = self.idle_paused or not self.units.ledger.room.is_set()
            if broken.started is None:
                broken.started = self.opened
            raise
        finally:
            self.randoms.cancel()
            self.hashes.cancel()
            await cancel_all(list(tasks))
            self.units.give_back(self.begun - self.answered)

    async def _send_batches(self) -> None:
        """The writer: a unit's place in the window, its think time, rng's batch, to hasher."""
        # Locals, not attributes, in the loop: it runs once per batch on the fast path.
        units, step, randoms, hashes = self.units, self.step, self.randoms, self.hashes
        window, in_flight, steps = self.window, self.in_flight, units.steps
        next_unit, recovered = units.next_unit, units.outages.recovered
        rng_seconds = WORKER_RPC_SECONDS.labels("rng")
        rng_modes = units.rng_modes_seen
        clock = time.monotonic
        while True:
            await window.acquire()
            started = clock()  # a unit starts when it has its place in the window
            paused = await next_unit(step)
            if paused is None:
                break
            self.begun += 1
            self.idle_paused = paused > 0
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
        step, hashes = self.step, self.hashes
        window, in_flight = self.window, self.in_flight
        record, recovered = self.units.record, self.units.outages.recovered
        hasher_seconds = WORKER_RPC_SECONDS.labels("hasher")
        stage_times = self.units.stage_times
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
