"""The turbo pipeline grid: how the worker talks to rng and hasher, measured end to end."""

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from dockercoins import redis_store
from dockercoins.counter_sampler import CounterSampler
from dockercoins.rate import fit_slope
from dockercoins_tools.bench.stacks import SAMPLE_EVERY, bench_stack, settings_env
from dockercoins_tools.procstat import cpu_seconds, memory_mb
from worker_svc.config import WorkerSettings


@dataclass(frozen=True)
class PipelineConfig:
    """One point of the grid: how the worker talks to rng and hasher."""

    batch: int
    loops: int
    pool: int
    workers: int = 1
    difficulty: int = 1
    stage_timing: bool = True

    @property
    def label(self) -> str:
        label = f"batch {self.batch}, {self.loops} loops, {self.pool} ch, {self.workers} wk"
        label += f", diff {self.difficulty}" if self.difficulty != 1 else ""
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
"""The worker's turbo defaults (batch 1000, 4 loops, 2 channels): the grid varies them."""

FULL_GRID = (
    replace(TURBO, batch=1),
    replace(TURBO, batch=1, workers=2),
    replace(TURBO, batch=10),
    replace(TURBO, batch=100),
    replace(TURBO, loops=1, pool=1),
    replace(TURBO, pool=1),
    TURBO,
    replace(TURBO, loops=2 * TURBO.loops, pool=2 * TURBO.pool),
    replace(TURBO, workers=2),
    replace(TURBO, difficulty=4),
)
QUICK_GRID = (PipelineConfig(batch=1, loops=2, pool=1), PipelineConfig(batch=100, loops=2, pool=2))


@dataclass
class ProcessFigures:
    """What one process of the stack used."""

    cpu_seconds: float
    peak_rss_mb: float


@dataclass
class PipelineResult:
    """One grid point measured end to end."""

    config: PipelineConfig
    hashes_per_second: float
    stderr: float
    ratio_to_ceiling: float
    cpu_seconds_per_million: float
    processes: dict[str, ProcessFigures] = field(default_factory=dict)


async def measure_pipeline(
    config: PipelineConfig,
    ceiling: float,
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
        counter = CounterSampler.of_redis(redis, SAMPLE_EVERY)
        await counter.run_for(window)
        fitted = fit_slope(counter.samples())
        rate, stderr = (fitted.per_second, fitted.stderr) if fitted else (0.0, 0.0)
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        processes = {
            name: ProcessFigures(round(used[name], 2), round(memory_mb(pid), 1))
            for name, pid in pids.items()
        }
        await redis.aclose()
    finally:
        await stack.stop()
    hashed = rate * window
    return PipelineResult(
        config=config,
        hashes_per_second=round(rate),
        stderr=round(stderr),
        ratio_to_ceiling=round(rate / ceiling, 3) if ceiling else 0.0,
        cpu_seconds_per_million=round(sum(used.values()) / hashed * 1e6, 2) if hashed else 0.0,
        processes=processes,
    )
