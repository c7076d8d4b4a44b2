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

from dockercoins.native import NATIVE_BUILT
from dockercoins_tools.bench.ceiling import measure_ceiling, measure_native_ceiling, openssl_speed
from dockercoins_tools.bench.faults import QUICK_FAULTS, SoakPlan
from dockercoins_tools.bench.latency import measure_overhead, raw_tcp_floor, simulated_costs
from dockercoins_tools.bench.pipeline import (
    FULL_GRID,
    QUICK_GRID,
    TURBO,
    PipelineConfig,
    PipelineResult,
    measure_pipeline,
    unique,
)
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
        difficulty = TURBO.difficulty
        first = measure_ceilings(options.ceiling_seconds, cores, difficulty, "before the grid", say)
        openssl = openssl_speed(options.ceiling_seconds, cores)
        report["openssl"] = openssl
        if openssl is None or "error" in openssl:
            say(f"openssl speed: {'no openssl' if openssl is None else openssl['error']}")
        else:
            rate, per_core = openssl["hashes_per_second"], openssl["per_core"]
            say(
                f"{openssl['command']} ({openssl['version']}): {rate:,.0f} hashes/s "
                f"({per_core:,.0f} per core)"
            )
        costs = simulated_costs()
        floor = await raw_tcp_floor(min(options.latency_calls, 50), costs["hasher"])
        say(
            f"{'configuration':<52} {'hashes/s':>10} {'± se':>8} "
            f"{'CPU s/M':>8} {'service RSS MB':>15} {'redis MB':>9} {'others':>6}"
        )
        results = []
        for config in unique(options.grid):
            result = await measure_pipeline(config, options.window, options.warmup, data_dir, log)
            results.append(result)
            say_point(result, say)
        # The machine is shared: the ceilings again, and each ratio to the higher of the two.
        second = measure_ceilings(options.ceiling_seconds, cores, difficulty, "after the grid", say)
        ceiling = higher(first[0], second[0])
        native = higher(first[1], second[1]) if first[1] and second[1] else None
        report["ceiling"] = {**ceiling, "runs": [first[0], second[0]]}
        report["native_ceiling"] = {**native, "runs": [first[1], second[1]]} if native else None
        say(
            f"{'ratios to the higher ceilings':<52} {'x loop':>7} {'x native':>8} "
            f"{'CPU x loop':>10} {'CPU x native':>12}"
        )
        for result in results:
            result.ratio_to_ceiling = significant(
                result.hashes_per_second / ceiling["hashes_per_second"]
            )
            if native:
                result.ratio_to_native = significant(
                    result.hashes_per_second / native["hashes_per_second"]
                )
            if result.cpu_seconds_per_million:  # CPU-µs per hash of the whole stack
                result.cpu_ratio_to_ceiling = significant(
                    ceiling["cpu_us_per_hash"] / result.cpu_seconds_per_million
                )
                if native:
                    result.cpu_ratio_to_native = significant(
                        native["cpu_us_per_hash"] / result.cpu_seconds_per_million
                    )
            shown = f"{result.ratio_to_native:>8.3f}" if native else f"{'-':>8}"
            shown_cpu = f"{result.cpu_ratio_to_native:>12.3f}" if native else f"{'-':>12}"
            say(
                f"{result.config.label:<52} {result.ratio_to_ceiling:>7.2f} {shown} "
                f"{result.cpu_ratio_to_ceiling:>10.2f} {shown_cpu}"
            )
        report["pipeline"] = [asdict(r) for r in results]
        at_default = [r for r in results if r.config.difficulty == difficulty] or results
        best = max(at_default, key=lambda r: r.hashes_per_second)
        original_rule = [r for r in results if r.config.difficulty == 1] or results
        best_classic_rule = max(original_rule, key=lambda r: r.hashes_per_second)
        default = next((r for r in results if r.config == TURBO), None)
        report["best"] = summary(best)
        report["best_difficulty_1"] = summary(best_classic_rule)
        report["default"] = summary(default) if default else None
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
    say(f"best: {best.config.label}: {ratios(best)}")
    if default is not None:
        say(f"default turbo ({default.config.label}): {ratios(default)}")
    say(
        f"best with the original's coin rule (difficulty 1): {best_classic_rule.config.label}: "
        f"{ratios(best_classic_rule)}; whole bench {report['duration_seconds']:.0f} s"
    )
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def measure_ceilings(
    seconds: float, cores: int, difficulty: int, when: str, say: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The Python loop's and the native ceiling (None where the extension is not built), said."""
    python = measure_ceiling(seconds, cores, difficulty)
    native = measure_native_ceiling(seconds, cores, difficulty) if NATIVE_BUILT else None
    for name, ceiling in (("Python loop ceiling", python), ("native ceiling", native)):
        if ceiling is None:
            say(f"{name}: not measured, the native extension is not built")
            continue
        say(
            f"{name} (in-process, {cores} cores, difficulty {difficulty}, {when}): "
            f"{ceiling['hashes_per_second']:,.0f} hashes/s ({ceiling['per_core']:,.0f} per core, "
            f"{ceiling['cpu_us_per_hash']:.3f} CPU-µs per hash; load average "
            f"{ceiling['load_average']:.1f})"
        )
    return python, native


def significant(ratio: float, digits: int = 4) -> float:
    """`ratio` to `digits` significant digits: a point far below a ceiling (one hash per message
    on a loaded machine: 0.0004 x) keeps its size, which rounding to decimals made 0.0."""
    return float(f"{ratio:.{digits}g}")


def higher(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    """The higher of two measurements of a ceiling, with the lower of their CPU per hash."""
    best = max(first, second, key=lambda ceiling: ceiling["hashes_per_second"])
    return {**best, "cpu_us_per_hash": min(first["cpu_us_per_hash"], second["cpu_us_per_hash"])}


def say_point(result: PipelineResult, say: Callable[[str], None]) -> None:
    """A grid point's row, then each process's CPU-µs per message and per hash."""
    services = [p.peak_rss_mb for n, p in result.processes.items() if n != "redis"]
    redis_mb = result.processes["redis"].peak_rss_mb if "redis" in result.processes else 0
    say(
        f"{result.config.label:<52} {result.hashes_per_second:>10,.0f} {result.stderr:>8,.0f} "
        f"{result.cpu_seconds_per_million:>8.2f} "
        f"{max(services, default=0):>15.1f} {redis_mb:>9.1f} {result.others_cores:>6.2f}"
    )
    say(
        "    CPU-µs per message / per hash: "
        + ", ".join(
            f"{name} {figures.cpu_us_per_message:,.0f} / {figures.cpu_us_per_hash:.3f}"
            for name, figures in result.processes.items()
            if name != "webui"
        )
    )


def summary(result: PipelineResult) -> dict[str, Any]:
    """A grid point in the report's summary: its label, rate and ratios."""
    return {
        "label": result.config.label,
        "hashes_per_second": result.hashes_per_second,
        "ratio_to_ceiling": result.ratio_to_ceiling,
        "ratio_to_native": result.ratio_to_native,
        "cpu_ratio_to_ceiling": result.cpu_ratio_to_ceiling,
        "cpu_ratio_to_native": result.cpu_ratio_to_native,
    }


def ratios(result: PipelineResult) -> str:
    """A grid point's rate and its ratios to the two ceilings, for a closing line."""
    native = (
        f", {result.ratio_to_native:.3f} x the native ceiling" if result.ratio_to_native else ""
    )
    return (
        f"{result.hashes_per_second:,.0f} hashes/s = {result.ratio_to_ceiling:.2f} x the Python "
        f"loop ceiling{native}; a hash costs the stack {result.cpu_seconds_per_million:.3f} "
        f"CPU-µs, {result.cpu_ratio_to_ceiling:.2f} x less than the Python loop"
    )


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
