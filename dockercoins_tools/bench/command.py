"""`dockercoins bench`: every part in turn, a table as it goes, bench.json and soak.json."""

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc

from dockercoins_tools.bench.ceiling import measure_ceiling
from dockercoins_tools.bench.faults import QUICK_FAULTS, SoakPlan
from dockercoins_tools.bench.latency import measure_overhead, raw_tcp_floor, simulated_costs
from dockercoins_tools.bench.pipeline import FULL_GRID, QUICK_GRID, PipelineConfig, measure_pipeline
from dockercoins_tools.bench.soak import soak
from dockercoins_tools.bench.stage_timing import STAGE_TIMING_CONFIG, measure_stage_timing_cost


@dataclass
class BenchOptions:
    """How long and how much: the full run, or a tiny one that keeps the code path alive."""

    window: float = 10.0
    warmup: float = 3.0
    ceiling_seconds: float = 10.0
    latency_calls: int = 100
    grid: tuple[PipelineConfig, ...] = FULL_GRID
    soak: SoakPlan = field(default_factory=SoakPlan)
    stage_timing_halves: int = 2
    stage_timing_rounds: int = 4

    @classmethod
    def quick(cls) -> "BenchOptions":
        soak = SoakPlan(seconds=12.0, faults=QUICK_FAULTS, window=2.0, patience=20.0)
        return cls(1.5, 1.0, 1.0, 5, QUICK_GRID, soak, stage_timing_halves=1, stage_timing_rounds=1)


async def run_bench(
    options: BenchOptions, out_dir: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every part, print a table as it goes, write `bench.json` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    cores = os.cpu_count() or 1
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": cores,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "options": {k: v for k, v in asdict(options).items() if k not in ("grid", "soak")},
    }
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="dockercoins-bench-") as tmp,
        (out_dir / "bench-stack.log").open("w") as log,
    ):
        data_dir = Path(tmp)
        ceiling = measure_ceiling(options.ceiling_seconds, cores)
        report["ceiling"] = ceiling
        costs = simulated_costs()
        floor = await raw_tcp_floor(min(options.latency_calls, 50), costs["hasher"])
        say(
            f"ceiling (in-process, {cores} cores): {ceiling['hashes_per_second']:,.0f} hashes/s "
            f"({ceiling['per_core']:,.0f} per core)"
        )
        say(
            f"{'configuration':<42} {'hashes/s':>10} {'± se':>8} {'ceiling':>8} "
            f"{'CPU s/M':>8} {'service RSS MB':>15} {'redis MB':>9}"
        )
        results = []
        for config in options.grid:
            result = await measure_pipeline(
                config,
                ceiling["hashes_per_second"],
                options.window,
                options.warmup,
                data_dir,
                log,
            )
            results.append(result)
            services = [p.peak_rss_mb for n, p in result.processes.items() if n != "redis"]
            redis_mb = result.processes["redis"].peak_rss_mb if "redis" in result.processes else 0
            say(
                f"{config.label:<42} {result.hashes_per_second:>10,.0f} {result.stderr:>8,.0f} "
                f"{result.ratio_to_ceiling:>8.1%} {result.cpu_seconds_per_million:>8.2f} "
                f"{max(services, default=0):>15.1f} {redis_mb:>9.1f}"
            )
        report["pipeline"] = [asdict(r) for r in results]
        best = max(results, key=lambda r: r.hashes_per_second)
        original_rule = [r for r in results if r.config.difficulty == 1] or results
        best_classic_rule = max(original_rule, key=lambda r: r.hashes_per_second)
        report["best"] = {
            "label": best.config.label,
            "hashes_per_second": best.hashes_per_second,
            "ratio_to_ceiling": best.ratio_to_ceiling,
        }
        report["best_difficulty_1"] = {
            "label": best_classic_rule.config.label,
            "hashes_per_second": best_classic_rule.hashes_per_second,
            "ratio_to_ceiling": best_classic_rule.ratio_to_ceiling,
        }
        if options.stage_timing_halves:
            timing = await measure_stage_timing_cost(
                options.stage_timing_halves,
                options.stage_timing_rounds,
                options.window,
                options.warmup,
                data_dir,
                log,
            )
            report["stage_timing"] = timing
            cpu = timing["worker_cpu_seconds_per_million"]
            own = timing["in_process"]
            say(
                f"stage timing ({timing['config']}; two workers side by side, one timing, "
                f"{timing['windows']} windows of {timing['window_seconds']:g} s): worker CPU s "
                f"per million hashes {cpu['on']:.3f} with, {cpu['off']:.3f} without: "
                f"{timing['overhead']:+.1%} (median window {timing['overhead_median']:+.1%}); "
                f"in process {own['per_unit_us']:.1f} µs per unit of {STAGE_TIMING_CONFIG.batch} "
                f"hashes, {own['per_heartbeat_us']:.0f} µs per heartbeat"
            )
        overhead = await measure_overhead(options.latency_calls, data_dir, log)
        report["latency_overhead"] = overhead
        timer = overhead["timer_overshoot"]
        say(
            f"asyncio.sleep({costs['hasher']:g}) alone wakes late by p50 {timer['p50_ms']:.2f} ms, "
            f"p99 {timer['p99_ms']:.2f} ms on this machine"
        )
        overhead["raw_tcp_floor"] = floor
        say(
            f"floor: a bare asyncio TCP round trip to another process sleeping "
            f"{costs['hasher']:g} s: p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms "
            f"over the {costs['hasher']:g} s"
        )
        for service in ("rng", "hasher"):
            figures = overhead[service]
            say(
                f"{service} plumbing over the simulated {costs[service]:g} s: "
                f"p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms "
                f"({figures['calls']} calls)"
            )
        if options.soak.seconds:
            report["soak"] = await run_soak(options.soak, out_dir, say, data_dir, log)
    report["duration_seconds"] = round(time.monotonic() - started, 1)
    say(
        f"best: {best.config.label}: {best.hashes_per_second:,.0f} hashes/s = "
        f"{best.ratio_to_ceiling:.1%} of the in-process ceiling"
    )
    say(
        f"best with the original's coin rule (difficulty 1): {best_classic_rule.config.label}: "
        f"{best_classic_rule.hashes_per_second:,.0f} hashes/s = "
        f"{best_classic_rule.ratio_to_ceiling:.1%} of the ceiling; whole bench "
        f"{report['duration_seconds']:.0f} s"
    )
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


async def run_soak(
    plan: SoakPlan,
    out_dir: Path,
    say: Callable[[str], None] = print,
    data_dir: Path | None = None,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Run the fault soak, print its table, write `soak.json` (and, run alone, its stack's log
    `soak-stack.log`) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    with contextlib.ExitStack() as closing:
        if data_dir is None:
            data_dir = Path(
                closing.enter_context(tempfile.TemporaryDirectory(prefix="dockercoins-soak-"))
            )
        if log is None:
            log = closing.enter_context((out_dir / "soak-stack.log").open("w"))
        faults = f"{len(plan.faults)} faults in turn, one every {plan.slot:.0f} s"
        say(
            f"soak: {plan.seconds:.0f} s of turbo at difficulty {plan.difficulty}, "
            f"{faults if plan.faults else 'no fault'}"
        )
        soaked = await soak(plan, data_dir, log)
    if soaked["faults"]:
        say(
            f"{'fault':<24} {'rate before':>12} {'recovered':>10} {'rate after':>12} "
            f"{'worker MB':>10} {'redis MB':>9}"
        )
    for fault in soaked["faults"]:
        what = fault["fault"] + (f" {fault['seconds']:.0f} s" if fault["seconds"] else "")
        back = fault["recovered_after"]
        say(
            f"{what:<24} {fault['rate_before']:>12,.0f} "
            f"{'never' if back is None else f'{back:.1f} s':>10} {fault['rate_after']:>12,.0f} "
            f"{fault['worker_peak_rss_mb']:>10.1f} {fault['redis_peak_rss_mb']:>9.1f}"
        )
    for name, rss in soaked["rss_mb"].items():
        say(f"soak {name}: RSS {rss['first']:.1f} -> {rss['last']:.1f} MB (max {rss['max']:.1f})")
    count = soaked["count"]
    say(
        f"soak: {soaked['hashes_per_second']:,.0f} hashes/s over {soaked['seconds']:.0f} s, "
        f"{soaked['restarts']} restarts ({soaked['kills']} kills); counter {count['counter']:,} "
        f"{'=' if count['exact'] else '!='} workers' totals {sum(count['workers_stopped']):,} "
        f"+ killed workers' flushed {sum(count['killed_workers_flushed']):,}"
        + (f", {count['unflushed']:,} unflushed" if count["unflushed"] else "")
    )
    (out_dir / "soak.json").write_text(json.dumps(soaked, indent=2) + "\n")
    return soaked
