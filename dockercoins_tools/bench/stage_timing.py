"""The cost of the workers' stage timing: two turbo workers side by side, one timing."""

import asyncio
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from dockercoins.stages import StageTimes
from dockercoins_tools.bench.pipeline import TURBO
from dockercoins_tools.bench.stacks import bench_stack, settings_env
from dockercoins_tools.launcher import Stack
from dockercoins_tools.procstat import cpu_seconds

STAGE_TIMING_CONFIG = TURBO
"""The turbo defaults, run with the workers' stage timing on and off."""


async def measure_stage_timing_cost(
    halves: int, rounds: int, window: float, warmup: float, data_dir: Path, log: TextIO
) -> dict[str, Any]:
    """The workers' stage timing, on in one worker and off in another, side by side.

    Two turbo workers of one stack share rng, hasher, Redis and the machine's load at the
    same moments; each one's CPU seconds per million hashes (its CPU from /proc, its hashes
    from its own /metrics) is compared over `rounds` windows, in `halves` stacks that swap
    which worker times (the first starts first). CPU per hash: a shared machine moves the
    rate by tens of percent from one run to the next, far less the work per hash.
    """
    ratios: list[float] = []
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}  # timing -> [CPU s, hashes]
    for half in range(halves):
        first_times = half % 2 == 0
        config = replace(STAGE_TIMING_CONFIG, stage_timing=first_times)
        env = {**settings_env(profile="turbo"), **config.env()}
        stack = bench_stack(data_dir, 1, log, env, metrics_port=1)
        try:
            await stack.start()
            stack.child_env.update(replace(config, stage_timing=not first_times).env())
            await stack.scale_workers(2)
            timing = {"worker.1": first_times, "worker.2": not first_times}
            await _metrics_served(stack, set(timing))
            await asyncio.sleep(warmup)
            before = _worker_work(stack)
            for _ in range(rounds):
                await asyncio.sleep(window)
                after = _worker_work(stack)
                per_hash = {}
                for name, on in timing.items():
                    cpu, hashes = (a - b for a, b in zip(after[name], before[name], strict=True))
                    per_hash[on] = cpu / hashes if hashes else 0.0
                    totals[on][0] += cpu
                    totals[on][1] += hashes
                if per_hash[False]:
                    ratios.append(per_hash[True] / per_hash[False])
                before = after
        finally:
            await stack.stop()

    def per_million(on: bool) -> float:
        cpu, hashes = totals[on]
        return round(cpu / hashes * 1e6, 3) if hashes else 0.0

    return {
        "config": STAGE_TIMING_CONFIG.label,
        "in_process": stage_timing_cpu(),
        "windows": len(ratios),
        "window_seconds": window,
        "worker_cpu_seconds_per_million": {"on": per_million(True), "off": per_million(False)},
        "hashes": {"on": totals[True][1], "off": totals[False][1]},
        "overhead": _ratio(per_million(True), per_million(False)),
        "overhead_median": round(median(ratios) - 1, 4) if ratios else 0.0,
        "overhead_per_window": [round(r - 1, 4) for r in ratios],
    }


def stage_timing_cpu(units: int = 100_000) -> dict[str, float]:
    """The stage timing's own CPU, in process: µs per unit (StageTimes.add) and per heartbeat
    (the summary of a full window: `units` units over its 10 slots)."""
    now = [0.0]
    times = StageTimes(10.0, clock=lambda: now[0])
    spent = 0.0
    for _ in range(10):
        started = time.process_time()
        for _ in range(units // 10):
            times.add(1e-6, 1.2e-4, 1.7e-2, 2.3e-5)
        spent += time.process_time() - started
        times.summary(STAGE_TIMING_CONFIG.batch)
        now[0] += 1.0
    started = time.process_time()
    times.summary(STAGE_TIMING_CONFIG.batch)
    summary = time.process_time() - started
    return {"per_unit_us": round(spent / units * 1e6, 2), "per_heartbeat_us": round(summary * 1e6)}


async def _metrics_served(stack: Stack, workers: set[str], timeout: float = 60.0) -> None:
    """Wait until every one of `workers` serves its /metrics (a worker starts in a second or
    two, more on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if set(_worker_work(stack)) >= workers:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{', '.join(sorted(workers))}: no /metrics within {timeout:g} s")
        await asyncio.sleep(0.2)


def _worker_work(stack: Stack) -> dict[str, tuple[float, float]]:
    """Worker name -> (CPU seconds, hashes computed) now, from /proc and its own /metrics (a
    worker whose /metrics has no hash count yet, as it starts, is left out)."""
    pids = stack.pids()
    work = {}
    for name, port in stack.metrics_ports.items():
        if name.startswith("worker.") and name in pids:
            url = f"http://{stack.client_host}:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            hashes = next(
                (
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "dockercoins_worker_hashes_total"
                ),
                None,
            )
            if hashes is not None:
                work[name] = (cpu_seconds(pids[name]), hashes)
    return work


def _ratio(new: float, old: float) -> float:
    """new / old - 1, rounded; 0 when old is 0."""
    return round(new / old - 1, 4) if old else 0.0
