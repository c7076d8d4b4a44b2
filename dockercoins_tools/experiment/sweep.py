"""The sweep measured: each point scaled, waited for, warmed up and fitted, in turn."""

import asyncio
import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dockercoins.counter_sampler import CounterSampler
from dockercoins.rate import Rate, fit_slope
from dockercoins_tools.cost_model import Costs, expected_rate
from dockercoins_tools.experiment.backends import Backend, ExperimentError
from dockercoins_tools.experiment.plan import Point, Timing
from dockercoins_tools.experiment.report import Report
from dockercoins_tools.experiment.results import Measurement, result_files, write_results


async def _wait_for_workers(
    backend: Backend, count: int, limit: float, tick: Callable[[int], None]
) -> float:
    """Wait until exactly `count` workers are alive and announcing; seconds it took."""
    started = time.monotonic()
    while True:
        running = await backend.running_workers()
        if running == count:
            return time.monotonic() - started
        waited = time.monotonic() - started
        if waited > limit:
            raise ExperimentError(
                f"{running} workers running instead of {count} after {limit:.0f} s"
            )
        tick(running)
        await asyncio.sleep(0.2)


async def measure_point(
    backend: Backend,
    point: Point,
    costs: Costs,
    timing: Timing,
    report: Report,
    index: int,
) -> Measurement:
    """Scale, wait for the workers, warm up, then fit the rate over the window."""
    await backend.scale_workers(point.workers)
    ready = await _wait_for_workers(
        backend,
        point.workers,
        timing.ready_timeout,
        lambda running: report.progress(
            index,
            point,
            f"waiting for workers ({running} of {point.workers} running)",
            timing.warmup + timing.window,
        ),
    )
    warm_until = time.monotonic() + timing.warmup
    while (left := warm_until - time.monotonic()) > 0:
        report.progress(index, point, f"warming up, {left:.0f} s left", left + timing.window)
        await asyncio.sleep(min(left, 0.5))
    cpu_before = backend.cpu_seconds()
    counter = CounterSampler(backend.read, timing.sample_interval)
    started = time.monotonic()

    async def sample_and_say() -> None:
        await counter.sample()
        elapsed = time.monotonic() - started
        if elapsed >= timing.window:
            counter.stop()
            return
        so_far = fit_slope(counter.samples())
        phase = f"measuring, {timing.window - elapsed:.0f} s left"
        if so_far:
            phase += f" ({so_far.per_second:.1f} h/s so far)"
        report.progress(index, point, phase, timing.window - elapsed)

    await counter.run(step=sample_and_say)
    cpu_after = backend.cpu_seconds()
    wall = time.monotonic() - started
    samples = counter.samples()
    rate: Rate | None = fit_slope(samples)
    if rate is None:
        raise ExperimentError(f"{point.label()}: too few readings of the counter")
    stack_cpu = machine_cpu = None
    if cpu_before is not None and cpu_after is not None and wall > 0:
        stack_cpu = (cpu_after[0] - cpu_before[0]) / wall
        machine_cpu = (cpu_after[1] - cpu_before[1]) / wall
    return Measurement(
        point=point,
        rate=rate.per_second,
        stderr=rate.stderr,
        samples=rate.samples,
        span=rate.span,
        expected=expected_rate(point.mode, point.workers, point.rng_replicas, costs),
        redis_time=samples[0].time,
        ready_seconds=ready,
        stack_cpu=stack_cpu,
        machine_cpu=machine_cpu,
    )


@dataclass
class Experiment:
    """What to sweep and how; `run` measures every point and writes the result files."""

    backend: Backend
    points: list[Point]
    costs: Costs
    timing: Timing
    output: Path
    profile: str = "classic"
    command: str = ""
    results: list[Measurement] = field(default_factory=list)
    started_at: float = 0.0
    duration: float = 0.0

    async def run(self, out: TextIO) -> list[Measurement]:
        """Measure every point in order, printing the table and writing files as it goes."""
        self.output.mkdir(parents=True, exist_ok=True)
        await self.backend.start()
        self.costs = await self.backend.deployed_costs() or self.costs
        per_point = self.timing.warmup + self.timing.window + 2 * self.costs.worker_flush_interval
        report = Report(out, len(self.points), per_point)
        c = self.costs
        report.header(
            [
                f"dockercoins experiment: {len(self.points)} points, backend {self.backend.name}, "
                f"profile {self.profile}",
                f"costs: rng read {c.rng_read_cost} s, hasher {c.hasher_latency} s, "
                f"think {c.worker_think_time} s, flush every {c.worker_flush_interval} s; "
                f"warm-up {self.timing.warmup} s, window {self.timing.window} s",
                f"results in {self.output}/",
            ]
        )
        self.started_at = time.time()
        try:
            current: tuple[str, int] | None = None
            for index, point in enumerate(self.points, 1):
                if current != (point.mode, point.rng_replicas):
                    report.progress(index, point, f"starting rng ({point.mode})", per_point)
                    await self.backend.configure(point.mode, point.rng_replicas)
                    current = (point.mode, point.rng_replicas)
                measured = await measure_point(
                    self.backend, point, self.costs, self.timing, report, index
                )
                self.results.append(measured)
                report.row(index, measured)
                self.duration = report.elapsed()
                self.write_files(charts=False)
        finally:
            with contextlib.suppress(Exception):
                await self.backend.close()
            self.duration = report.elapsed()
            if self.results:
                self.write_files(charts=True)
        out.write(f"done in {self.duration / 60:.1f} min: {', '.join(result_files(self.output))}\n")
        out.flush()
        return self.results

    def as_json(self) -> dict[str, Any]:
        """Everything needed to read the results again without this run."""
        return {
            "command": self.command,
            "backend": self.backend.name,
            "profile": self.profile,
            "costs": asdict(self.costs),
            "timing": asdict(self.timing),
            "started_at": self.started_at,
            "duration_seconds": round(self.duration, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "model": {
                "blocking": "min(workers / (think + max(rng request, read) + hasher), "
                "rng_replicas / read)",
                "buffered": "workers / (think + rng request + hasher)",
            },
            "points": [m.row() for m in self.results],
        }

    def write_files(self, charts: bool) -> None:
        """experiment.json and experiment.csv now; experiment.png too with `charts`."""
        write_results(self.output, self.as_json(), charts)
