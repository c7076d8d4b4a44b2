"""Units of work, as the mining loops share them: when the next may start, what a finished one
leaves, and each loop's last step."""

import asyncio
import contextlib
import sys
import time

from dockercoins.backoff import OutageLog
from dockercoins.channels import ChannelPool
from dockercoins.lifecycle import raise_if_cancelling
from dockercoins.stages import StageTimes
from dockercoins.wire import BLOCK_SIZE
from worker_svc.coins import find_coins
from worker_svc.config import WorkerSettings
from worker_svc.ledger import Ledger

PAUSE_TICK = 1.0
"""Seconds between two liveness steps of a loop waiting for room in the backlog."""


class Units:
    """The units of work of one miner, whichever loops (unary or streaming) mine them.

    A unit starts once the ledger has room and the think time has passed; a finished one is
    checked for coins, recorded in the ledger, its stages timed (think, rng, hasher, its wait
    on Redis) and rng's mode noted, for the heartbeat. `steps` holds the last step of every
    loop (and of the flusher), which liveness watches; `outages`, the upstreams (Redis among
    them) that fail now, which readiness watches. With a `limit`, no unit starts past it, and
    the miner is told to stop once the last one has finished.
    """

    def __init__(self, settings: WorkerSettings, ledger: Ledger, outages: OutageLog) -> None:
        self.think_time = settings.worker_think_time
        self.difficulty = settings.difficulty
        self.ledger = ledger
        self.outages = outages
        self.stopping = asyncio.Event()
        self.steps: dict[str, float] = {}
        """Last step (time.monotonic()) of each loop and of the flusher, by name."""
        self.last_unit = float("-inf")
        """When the last unit finished (time.monotonic())."""
        self.stage_times = (
            StageTimes(settings.worker_stage_window) if settings.worker_stage_timing else None
        )
        """Each stage of the recent units, for the heartbeat; None when timing is off."""
        self.rng_modes_seen: set[str] = set()
        """The modes rng named in its replies since the last heartbeat."""
        self.rng_mode = ""
        """The mode(s) rng named lately, comma-separated if several rng disagree."""
        self.limit = sys.maxsize
        """Units to mine in all (a bounded run); none starts past it."""
        self.started = 0
        self.finished = 0

    def stop(self) -> None:
        """Ask the loops to finish the unit in hand and return."""
        self.stopping.set()
        self.ledger.room.set()  # wakes a loop waiting for room

    def step(self, name: str) -> None:
        """Note a step of the loop (or flusher) `name`: it is alive."""
        self.steps[name] = time.monotonic()

    async def stopped_within(self, seconds: float) -> bool:
        """Wait `seconds` (a backoff); True if the miner is stopping."""
        return await wait_for_event(self.stopping, seconds)

    async def wait_for_room(self, step: str) -> float:
        """Wait until the ledger has room, stepping `step` meanwhile; the seconds waited."""
        room = self.ledger.room
        if room.is_set():
            return 0.0
        started = time.monotonic()
        while not room.is_set():
            self.step(step)
            await wait_for_event(room, PAUSE_TICK)
        return time.monotonic() - started

    async def next_unit(self, step: str) -> float | None:
        """Wait for room in the backlog, then think; the seconds spent waiting for room (for
        Redis to take the backlog), or None once the miner is stopping (or at its limit)."""
        while self.started >= self.limit:
            if await wait_for_event(self.stopping, PAUSE_TICK):
                return None
            self.step(step)
        self.started += 1
        paused = 0.0 if self.ledger.room.is_set() else await self.wait_for_room(step)
        if self.think_time:
            if await wait_for_event(self.stopping, self.think_time):
                self.started -= 1
                return None
        elif self.stopping.is_set():
            self.started -= 1
            return None
        return paused

    def give_back(self, units: int) -> None:
        """Units started and never finished (their stream broke): started again later."""
        self.started -= units

    def record(self, step: str, data: bytes, digests: bytes) -> dict[str, bytes]:
        """Count a finished unit (the ledger wakes the flusher, or pauses, as the backlog
        grows); its coins."""
        coins = find_coins(data, digests, self.difficulty)
        self.ledger.add(len(data) // BLOCK_SIZE, coins)
        self.last_unit = self.steps[step] = time.monotonic()
        self.finished += 1
        if self.finished >= self.limit:
            self.stop()
        return coins

    def take_rng_mode(self) -> str:
        """The mode(s) rng named since the last call, comma-separated, or the last known if it
        named none since ("": an rng that does not name its mode)."""
        seen = sorted(self.rng_modes_seen - {""})
        self.rng_modes_seen.clear()
        if seen:
            self.rng_mode = ",".join(seen)
        return self.rng_mode


class UnitSource:
    """Mining loops over a pool of channels to rng and one to hasher (`run(index)`: loop
    `index` until the miner stops), recording each unit in `units`; an upstream that fails
    is an outage, said once on `units.outages`."""

    def __init__(
        self, settings: WorkerSettings, rng: ChannelPool, hasher: ChannelPool, units: Units
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.hasher = hasher
        self.units = units

    async def run(self, index: int) -> None:
        """Loop `index`: mine units until the miner stops."""
        raise NotImplementedError


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set, for at most `seconds`; whether it is set.

    asyncio.timeout, unlike wait_for on Python 3.11, starts no task and tells its own expiry
    from a cancellation of the caller.
    """
    if not event.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        raise_if_cancelling()
    return event.is_set()
