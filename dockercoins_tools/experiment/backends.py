"""Where the experiment scales and reads: what a backend does, and the local one."""

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, TextIO

from dockercoins.errors import DockercoinsError
from dockercoins.redis_store import Totals, connect, mining_workers, read_totals
from dockercoins_tools.cost_model import Costs
from dockercoins_tools.procstat import cpu_seconds, machine_busy_cpu


class ExperimentError(DockercoinsError):
    """The experiment could not scale, read or wait as it needed to."""


class Backend(Protocol):
    """How to scale and where to read: the only part that differs between backends."""

    name: str

    async def start(self) -> None: ...

    async def deployed_costs(self) -> Costs | None:
        """The costs the stack already runs with (a cluster's), or None: it runs the given ones."""

    async def configure(self, mode: str, rng_replicas: int) -> None:
        """Run rng in `mode` with `rng_replicas` processes (workers may restart)."""

    async def scale_workers(self, count: int) -> None: ...

    async def running_workers(self) -> int:
        """Workers that are alive and announcing themselves (their heartbeat in Redis)."""

    async def read(self) -> Totals:
        """The counters, timestamped by Redis `TIME`."""

    def cpu_seconds(self) -> tuple[float, float] | None:
        """CPU seconds used so far by the stack's processes, and by the whole machine."""

    async def close(self) -> None: ...


class LocalBackend:
    """The stack as local processes (the launcher's `Stack`), restarted when rng's mode changes."""

    name = "local"

    def __init__(self, costs: Costs, log_out: TextIO) -> None:
        self.costs = costs
        self.log_out = log_out
        self.stack: Any = None
        self.redis: Any = None
        self._data_dir: Path | None = None

    async def start(self) -> None:
        return None

    async def deployed_costs(self) -> Costs | None:
        return None

    async def configure(self, mode: str, rng_replicas: int) -> None:
        if self.stack is not None and self.stack.settings.rng_mode == mode:
            if len(self.stack.rngs) != rng_replicas:
                await self.stack.scale("rng", rng_replicas)
            return
        await self._stop_stack()
        await self._start_stack(mode, rng_replicas)

    async def _start_stack(self, mode: str, rng_replicas: int) -> None:
        from dockercoins_tools.launcher import Stack  # not for `dockercoins --help`

        self._data_dir = Path(tempfile.mkdtemp(prefix="dockercoins-experiment-"))
        self.log_out.write(f"--- stack: rng mode {mode}, {rng_replicas} rng ---\n")
        self.stack = Stack.on_free_ports(
            self._data_dir,
            self.log_out,
            self.costs.env(),
            workers=0,
            rng_mode=mode,
            rng_replicas=rng_replicas,
        )
        try:
            await self.stack.start()
        except BaseException:
            await self._stop_stack()
            raise
        self.redis = connect(self.stack.redis_url, 5.0)

    async def _stop_stack(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.stack is not None:
            await self.stack.stop()
            self.stack = None
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    async def scale_workers(self, count: int) -> None:
        await self.stack.scale("worker", count)

    async def running_workers(self) -> int:
        alive = sum(1 for worker in self.stack.workers if worker.running)
        return min(alive, await mining_workers(self.redis))

    async def read(self) -> Totals:
        return await read_totals(self.redis)

    def cpu_seconds(self) -> tuple[float, float] | None:
        if self.stack is None:
            return None
        used = sum(cpu_seconds(pid) for pid in self.stack.pids().values())
        return used, machine_busy_cpu()

    async def close(self) -> None:
        await self._stop_stack()
