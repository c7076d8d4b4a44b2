"""The health watch: whether the worker mines now (readiness) and whether its loops still step
(liveness)."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from worker_svc.config import HEALTH_TICK, WorkerSettings
from worker_svc.units import Units

log = logging.getLogger(__name__)

HealthReport = Callable[[bool, bool], Awaitable[None]]
"""Called with (ready, live) whenever either changes."""


class StuckError(RuntimeError):
    """A mining loop or the flusher made no step for the liveness timeout: a defect."""


class HealthWatch:
    """Keeps `ready` and `live` up to date and reports each change to `report`.

    Readiness is "mining now": no upstream unreachable (`units.outages`), room in the backlog
    (`units.ledger`), a unit finished recently. Liveness is "every loop and the flusher
    still step" (`units.steps`); an outage, however long, does not fail it, so that a
    supervisor never restarts a worker holding a backlog.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        units: Units,
        report: HealthReport | None = None,
    ) -> None:
        self.settings = settings
        self.units = units
        self.report = report
        self.ready: bool = False
        """Readiness: mining now."""
        self.live: bool = True
        """Liveness: every loop and the flusher step."""

    def readiness(self, now: float) -> str:
        """Why the worker is not mining now; empty if it is."""
        if self.units.stopping.is_set():
            return "stopping"
        down = self.units.outages.down()
        if down:
            return f"{', '.join(down)} unreachable"
        ledger = self.units.ledger
        if not ledger.room.is_set():
            return f"mining paused: {ledger.paused_for}"
        idle = self.settings.ready_timeout
        if now - self.units.last_unit > idle:
            return f"no unit of work finished in {idle:g} s"
        return ""

    def stuck(self, now: float) -> list[str]:
        """The loops (and the flusher) without a step in the liveness timeout."""
        if self.units.stopping.is_set():
            return []
        before = now - self.settings.liveness_timeout
        return [name for name, at in self.units.steps.items() if at < before]

    async def run(self) -> None:
        """Watch until cancelled; raise StuckError on a stuck loop."""
        if self.report is not None:
            await self.report(self.ready, self.live)
        reason = "starting"
        while True:
            now = time.monotonic()
            was = reason
            reason = self.readiness(now)
            stuck = self.stuck(now)
            ready, live = not reason, not stuck
            if not was and reason.startswith("no unit"):
                log.warning("not ready: %s", reason)
            if (ready, live) != (self.ready, self.live):
                log.debug("ready %s (%s), live %s", ready, reason or "mining", live)
                self.ready, self.live = ready, live
                if self.report is not None:
                    await self.report(ready, live)
            if stuck:
                raise StuckError(
                    f"no step of {', '.join(stuck)} in {self.settings.liveness_timeout:g} s "
                    "(DOCKERCOINS_WORKER_LIVENESS_TIMEOUT); exiting to be restarted"
                )
            await asyncio.sleep(HEALTH_TICK)
