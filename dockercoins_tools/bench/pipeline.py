"""The turbo pipeline grid: how the worker talks to rng and hasher, measured end to end."""

import asyncio
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from dockercoins import redis_store
from dockercoins.counter_sampler import CounterSampler
from dockercoins.rate import fit_slope
from dockercoins.wire import MAX_BATCH
from dockercoins_tools.bench.stacks import SAMPLE_EVERY, bench_stack, settings_env
from dockercoins_tools.procstat import cpu_seconds, machine_busy_cpu, memory_mb
from worker_svc.config import WorkerSettings


@dataclass(frozen=True)
class PipelineConfig:
    """One point of the grid: how the worker talks to rng and hasher."""

    batch: int
    loops: int
    pool: int
    workers: int = 1
    difficulty: int = 1
    window: int = 4
    stage_timing: bool = True

    @property
    def label(self) -> str:
        label = f"batch {self.batch}, {self.loops} loops, {self.pool} ch, {self.window} win"
        label += f", {self.workers} wk, diff {self.difficulty}"
        return label + ("" if self.stage_timing else ", no stage timing")

    def env(self) -> dict[str, str]:
        """The worker's settings for this point, as its environment."""
        return settings_env(
            **{setting: getattr(self, name) for name, setting in WORKER_SETTINGS.items()}
        )


WORKER_SETTINGS = {
    "batch": "worker_batch",
    "loops": "worker_loops",
    "pool": "worker_pool_size",
    "difficulty": "difficulty",
    "window": "worker_stream_window",
    "stage_timing": "worker_stage_timing",
}
"""PipelineConfig field -> the worker's setting it gives."""

TURBO = PipelineConfig(
    **{
        name: WorkerSettings.TURBO_DEFAULTS[setting]
        for name, setting in WORKER_SETTINGS.items()
        if setting in WorkerSettings.TURBO_DEFAULTS
    }
)
"""The worker's turbo defaults (`dockercoins up --profile turbo`, 1 worker): the grid varies
them."""

FULL_GRID = (
    replace(TURBO, batch=1),
    replace(TURBO, batch=10),
    replace(TURBO, batch=100),
    replace(TURBO, batch=1000),
    replace(TURBO, batch=4096),
    replace(TURBO, batch=8192),
    replace(TURBO, batch=MAX_BATCH),
    TURBO,
    replace(TURBO, loops=TURBO.loops * 2),
    replace(TURBO, loops=max(1, TURBO.loops // 2)),
    replace(TURBO, pool=TURBO.pool * 2),
    replace(TURBO, window=TURBO.window * 2),
    replace(TURBO, window=max(1, TURBO.window // 2)),
    replace(TURBO, workers=2),
    replace(TURBO, difficulty=1),
)
"""Batches from 1 to the batch cap, then each of the turbo defaults halved and doubled, two
workers, and the original's coin rule (difficulty 1); duplicates are measured once."""

QUICK_GRID = (
    PipelineConfig(batch=1, loops=2, pool=1, difficulty=TURBO.difficulty),
    PipelineConfig(batch=100, loops=2, pool=2, difficulty=TURBO.difficulty),
)


def unique(grid: tuple[PipelineConfig, ...]) -> tuple[PipelineConfig, ...]:
    """The grid's points in order, each once."""
    return tuple(dict.fromkeys(grid))


@dataclass
class ProcessFigures:
    """What one process of the stack used: CPU in all, per message of the pipeline and per hash
    (CPU-µs), and its peak RSS."""

    cpu_seconds: float
    peak_rss_mb: float
    cpu_us_per_message: float = 0.0
    cpu_us_per_hash: float = 0.0


@dataclass
class PipelineResult:
    """One grid point measured end to end."""

    config: PipelineConfig
    hashes_per_second: float
    stderr: float
    cpu_seconds_per_million: float
    processes: dict[str, ProcessFigures] = field(default_factory=dict)
    others_cores: float = 0.0
    """Cores the rest of the machine (other jobs, the bench itself) kept busy meanwhile."""
    ratio_to_ceiling: float = 0.0
    """To the Python loop's ceiling of the same run (set once both are measured)."""
    ratio_to_native: float = 0.0
    """To the native ceiling of the same run (0: none measured)."""
    cpu_ratio_to_ceiling: float = 0.0
    """The Python loop's CPU per hash over the whole stack's: how many times less CPU a hash
    costs here (what a busy machine does not distort, unlike rates)."""
    cpu_ratio_to_native: float = 0.0
    """The native loop's CPU per hash over the whole stack's."""


async def measure_pipeline(
    config: PipelineConfig,
    window: float,
    warmup: float,
    data_dir: Path,
    log: TextIO,
) -> PipelineResult:
    """Run the turbo stack with `config` and measure the counter's rate over `window`."""
    env = {**settings_env(profile="turbo"), **config.env()}
    stack = bench_stack(data_dir, config.workers, log, env)
    try:
        await stack.start()
        redis = redis_store.connect(stack.redis_url)
        await asyncio.sleep(warmup)
        pids = stack.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine_before, started = machine_busy_cpu(), time.monotonic()
        counter = CounterSampler.of_redis(redis, SAMPLE_EVERY)
        await counter.run_for(window)
        fitted = fit_slope(counter.samples())
        rate, stderr = (fitted.per_second, fitted.stderr) if fitted else (0.0, 0.0)
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        machine = machine_busy_cpu() - machine_before
        others = max(0.0, machine - sum(used.values())) / (time.monotonic() - started)
        await redis.aclose()
        hashed = rate * window
        per_hash = {name: used[name] / hashed * 1e6 if hashed else 0.0 for name in used}
        processes = {
            name: ProcessFigures(
                round(used[name], 2),
                round(memory_mb(pid), 1),
                round(per_hash[name] * config.batch, 1),
                round(per_hash[name], 4),
            )
            for name, pid in pids.items()
        }
    finally:
        await stack.stop()
    return PipelineResult(
        config=config,
        hashes_per_second=round(rate),
        stderr=round(stderr),
        cpu_seconds_per_million=round(sum(used.values()) / hashed * 1e6, 2) if hashed else 0.0,
        processes=processes,
        others_cores=round(others, 2),
    )
