"""The original's loop as a unit source: think, then one unary call to rng and one to hasher."""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from dockercoins.backoff import Backoff
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE
from worker_svc.metrics import WORKER_ERRORS, WORKER_RPC_SECONDS
from worker_svc.units import UnitSource

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")


class UnaryLoops(UnitSource):
    """Mining loops of one unary call to rng and one to hasher per unit, over the channel pools
    round-robin.

    A failed call is retried with backoff until it succeeds (each failure counted, an outage
    said once); the unit in hand is given up only when the miner stops.
    """

    async def run(self, index: int) -> None:
        """Loop `index`: mine units until the miner stops."""
        step = f"loop-{index}"
        next_unit = self.units.next_unit
        while True:
            started = time.monotonic()
            paused = await next_unit(step)
            if paused is None:
                return
            try:
                await self.mine_once(step, started, paused)
            except _Abandoned:
                return

    async def mine_once(self, step: str, started: float, paused: float) -> None:
        """One unit of work: random bytes from rng, their hashes, the coin check; its stages
        timed from `started` (when the unit began, before `paused` seconds waiting for room
        and its think time)."""
        units, timeout = self.units, self.settings.rpc_timeout
        thought = time.monotonic()
        random = await self._call(
            "rng",
            step,
            lambda: rng_pb2_grpc.RngStub(self.rng.next()).GetRandom(
                rng_pb2.RandomRequest(size=BLOCK_SIZE, count=self.settings.worker_batch),
                timeout=timeout,
            ),
        )
        units.rng_modes_seen.add(random.mode)
        data = random.data  # each read of a bytes field copies it
        fetched = time.monotonic()
        hashed = await self._call(
            "hasher",
            step,
            lambda: hasher_pb2_grpc.HasherStub(self.hasher.next()).Hash(
                hasher_pb2.HashRequest(data=data, block_size=BLOCK_SIZE, raw=True),
                timeout=timeout,
            ),
        )
        answered = time.monotonic()
        for digest in units.record(step, data, hashed.digests):
            log.info("coin found: %s...", digest[:8])
        if units.stage_times is not None:
            units.stage_times.add(
                thought - started - paused,
                fetched - thought,
                answered - fetched,
                paused + time.monotonic() - answered,
            )

    async def _call(self, name: str, step: str, attempt: Callable[[], Awaitable[Reply]]) -> Reply:
        """Call until it succeeds, backing off; give up only when stopping."""
        backoff = Backoff()
        while True:
            started = time.monotonic()
            try:
                reply = await attempt()
            except grpc.aio.AioRpcError as exc:
                self.units.step(step)
                WORKER_ERRORS.labels(name, exc.code().name).inc()
                self.units.outages.failed(name, f"{exc.code().name}: {exc.details()}", started)
                if await self.units.stopped_within(backoff.next_delay()):
                    raise _Abandoned from None
                continue
            self.units.step(step)
            WORKER_RPC_SECONDS.labels(name).observe(time.monotonic() - started)
            self.units.outages.recovered(name)
            return reply


class _Abandoned(Exception):
    """The unit in hand was given up because the miner is stopping during an outage."""
