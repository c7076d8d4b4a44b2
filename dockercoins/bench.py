"""`dockercoins bench`: the in-process ceiling, the turbo pipeline grid, the cost of stage timing,
plumbing latency, a soak.

Everything runs in one process tree and one run, so that the ratios compare like with like
on a shared, noisy machine: absolute numbers are quoted, never asserted.
"""

import asyncio
import hashlib
import io
import json
import os
import platform
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any, TextIO

import grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from dockercoins import schema
from dockercoins.launcher import Stack
from dockercoins.probe import probe
from dockercoins.procstat import cpu_seconds, memory_mb
from dockercoins.rate import Sample, fit_slope
from dockercoins.stages import StageTimes

CLASSIC_COST = 0.1


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
        return {
            "DOCKERCOINS_WORKER_BATCH": str(self.batch),
            "DOCKERCOINS_WORKER_LOOPS": str(self.loops),
            "DOCKERCOINS_WORKER_POOL_SIZE": str(self.pool),
            "DOCKERCOINS_DIFFICULTY": str(self.difficulty),
            "DOCKERCOINS_WORKER_STAGE_TIMING": str(self.stage_timing).lower(),
        }


FULL_GRID = (
    PipelineConfig(batch=1, loops=4, pool=2),
    PipelineConfig(batch=1, loops=4, pool=2, workers=2),
    PipelineConfig(batch=10, loops=4, pool=2),
    PipelineConfig(batch=100, loops=4, pool=2),
    PipelineConfig(batch=1000, loops=1, pool=1),
    PipelineConfig(batch=1000, loops=4, pool=1),
    PipelineConfig(batch=1000, loops=4, pool=2),
    PipelineConfig(batch=1000, loops=8, pool=4),
    PipelineConfig(batch=1000, loops=4, pool=2, workers=2),
    PipelineConfig(batch=1000, loops=4, pool=2, difficulty=4),
)
QUICK_GRID = (PipelineConfig(batch=1, loops=2, pool=1), PipelineConfig(batch=100, loops=2, pool=2))
STAGE_TIMING_CONFIG = PipelineConfig(batch=1000, loops=4, pool=2)
"""The turbo defaults, run with the workers' stage timing on and off."""


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


# -- (a) the ceiling -------------------------------------------------------------------


def ceiling_loop(seconds: float, batch: int = 1000) -> int:
    """Hashes one core does in `seconds`: urandom in batches, sha256, the coin check."""
    sha256 = hashlib.sha256
    done = coins = 0
    block = 32
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        view = memoryview(os.urandom(block * batch))
        for start in range(0, block * batch, block):
            if sha256(view[start : start + block]).digest()[0] < 16:
                coins += 1
        done += batch
    return done


def measure_ceiling(seconds: float, cores: int) -> dict[str, float]:
    """The in-process ceiling on every core at once."""
    with ProcessPoolExecutor(max_workers=cores) as pool:
        started = time.perf_counter()
        counts = list(pool.map(ceiling_loop, [seconds] * cores))
        elapsed = time.perf_counter() - started
    total = sum(counts) / seconds
    return {"hashes_per_second": total, "per_core": total / cores, "cores": cores, "wall": elapsed}


# -- (b) the pipeline ------------------------------------------------------------------


async def _counter_rate(redis: Redis, seconds: float, every: float = 0.25) -> tuple[float, float]:
    samples: list[Sample] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        totals = await schema.read_totals(redis)
        samples.append(Sample(totals.now, totals.hashes))
        await asyncio.sleep(every)
    rate = fit_slope(samples)
    return (rate.per_second, rate.stderr) if rate else (0.0, 0.0)


def _stack(data_dir: Path, workers: int, log: TextIO, env: dict[str, str]) -> Stack:
    return Stack.on_free_ports(data_dir, log, env, workers=workers, log_level="WARNING")


async def measure_pipeline(
    config: PipelineConfig,
    ceiling: float,
    window: float,
    warmup: float,
    data_dir: Path,
    log: TextIO,
) -> PipelineResult:
    """Run the turbo stack with `config` and measure the counter's rate over `window`."""
    env = {"DOCKERCOINS_PROFILE": "turbo", **config.env()}
    stack = _stack(data_dir, config.workers, log, env)
    try:
        await stack.start()
        redis = Redis.from_url(stack.redis_url)
        await asyncio.sleep(warmup)
        pids = stack.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        rate, stderr = await _counter_rate(redis, window)
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
        env = {"DOCKERCOINS_PROFILE": "turbo", **config.env()}
        stack = Stack.on_free_ports(
            data_dir, log, env, workers=1, log_level="WARNING", metrics_port=1
        )
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
    """Worker name -> (CPU seconds, hashes computed) now, from /proc and its own /metrics."""
    pids = stack.pids()
    work = {}
    for name, port in stack.metrics_ports.items():
        if name.startswith("worker.") and name in pids:
            url = f"http://{stack.client_host}:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            hashes = next(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "dockercoins_worker_hashes_total"
            )
            work[name] = (cpu_seconds(pids[name]), hashes)
    return work


def _ratio(new: float, old: float) -> float:
    """new / old - 1, rounded; 0 when old is 0."""
    return round(new / old - 1, 4) if old else 0.0


# -- (c) latency overhead --------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def timer_overshoot(calls: int, seconds: float = CLASSIC_COST) -> dict[str, float]:
    """How late asyncio.sleep wakes up on this machine: the floor under any simulated cost."""
    late = []
    for _ in range(calls):
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        late.append((time.perf_counter() - began - seconds) * 1000)
    return {"p50_ms": round(_percentile(late, 0.5), 3), "p99_ms": round(_percentile(late, 0.99), 3)}


def _echo_after(port_queue: Any, seconds: float) -> None:
    """In a child process: a bare asyncio TCP server that answers each line after `seconds`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            await asyncio.sleep(seconds)
            writer.write(b"ok\n")
            await writer.drain()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(serve())


async def raw_tcp_floor(calls: int, seconds: float = CLASSIC_COST) -> dict[str, float]:
    """The same wait behind a bare TCP socket in another process: what no RPC stack can beat."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # before any gRPC use in this process
    ports = context.Queue()
    server = context.Process(target=_echo_after, args=(ports, seconds), daemon=True)
    server.start()
    try:
        port = await asyncio.to_thread(ports.get, True, 30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        late = []
        for _ in range(calls):
            began = time.perf_counter()
            writer.write(b"go\n")
            await writer.drain()
            await reader.readline()
            late.append((time.perf_counter() - began - seconds) * 1000)
        writer.close()
    finally:
        server.terminate()
        server.join(5)
    return {"p50_ms": round(_percentile(late, 0.5), 3), "p99_ms": round(_percentile(late, 0.99), 3)}


async def measure_overhead(calls: int, data_dir: Path, log: TextIO) -> dict[str, Any]:
    """Probe latency minus the simulated cost, classic profile, one caller at a time."""
    env = {"DOCKERCOINS_PROFILE": "classic"}
    stack = _stack(data_dir, 0, log, env)
    figures: dict[str, Any] = {}
    try:
        await stack.start()
        targets = {
            "rng": f"{stack.client_host}:{stack.ports['rng']}",
            "hasher": f"{stack.client_host}:{stack.ports['hasher']}",
        }
        for service, address in targets.items():
            result = await probe(service, address, calls, 0.0, 10.0, False, io.StringIO())
            overhead = [(latency - CLASSIC_COST) * 1000 for latency in result.latencies]
            figures[service] = {
                "calls": len(overhead),
                "errors": len(result.errors),
                "p50_ms": round(_percentile(overhead, 0.50), 3),
                "p99_ms": round(_percentile(overhead, 0.99), 3),
                "max_ms": round(max(overhead), 3),
            }
    finally:
        await stack.stop()
    figures["timer_overshoot"] = await timer_overshoot(min(calls, 50))
    return figures


# -- soak ------------------------------------------------------------------------------


async def soak(seconds: float, data_dir: Path, log: TextIO, every: float = 5.0) -> dict[str, Any]:
    """Turbo for `seconds`: RSS of every process sampled, errors counted."""
    stack = _stack(data_dir, 1, log, {"DOCKERCOINS_PROFILE": "turbo"})
    series: dict[str, list[float]] = {}
    try:
        await stack.start()
        redis = Redis.from_url(stack.redis_url)
        first = await schema.read_totals(redis)
        end = time.monotonic() + seconds
        while True:
            for name, pid in stack.pids().items():
                series.setdefault(name, []).append(round(memory_mb(pid, "VmRSS"), 1))
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(every, max(0.0, end - time.monotonic())))
        last = await schema.read_totals(redis)
        await redis.aclose()
        restarts = sum(p.restarts for p in stack.processes())
    finally:
        await stack.stop()
    return {
        "seconds": seconds,
        "hashes": last.hashes - first.hashes,
        "hashes_per_second": round((last.hashes - first.hashes) / (last.now - first.now)),
        "restarts": restarts,
        "rss_mb": {
            name: {"first": s[0], "last": s[-1], "max": max(s), "samples": s}
            for name, s in series.items()
        },
    }


# -- the whole run ---------------------------------------------------------------------


@dataclass
class BenchOptions:
    """How long and how much: the full run, or a tiny one that keeps the code path alive."""

    window: float = 10.0
    warmup: float = 3.0
    ceiling_seconds: float = 10.0
    latency_calls: int = 100
    soak_seconds: float = 60.0
    grid: tuple[PipelineConfig, ...] = FULL_GRID
    stage_timing_halves: int = 2
    stage_timing_rounds: int = 4

    @classmethod
    def quick(cls) -> "BenchOptions":
        return cls(1.5, 1.0, 1.0, 5, 2.0, QUICK_GRID, stage_timing_halves=1, stage_timing_rounds=1)


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
        "options": {k: v for k, v in asdict(options).items() if k != "grid"},
    }
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="dockercoins-bench-") as tmp,
        (out_dir / "bench-stack.log").open("w") as log,
    ):
        data_dir = Path(tmp)
        ceiling = measure_ceiling(options.ceiling_seconds, cores)
        report["ceiling"] = ceiling
        floor = await raw_tcp_floor(min(options.latency_calls, 50))
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
            f"asyncio.sleep(0.1) alone wakes late by p50 {timer['p50_ms']:.2f} ms, "
            f"p99 {timer['p99_ms']:.2f} ms on this machine"
        )
        overhead["raw_tcp_floor"] = floor
        say(
            f"floor: a bare asyncio TCP round trip to another process sleeping 0.1 s: "
            f"p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms over the 0.1 s"
        )
        for service in ("rng", "hasher"):
            figures = overhead[service]
            say(
                f"{service} plumbing over the simulated 0.1 s: p50 {figures['p50_ms']:.2f} ms, "
                f"p99 {figures['p99_ms']:.2f} ms ({figures['calls']} calls)"
            )
        if options.soak_seconds:
            soaked = await soak(options.soak_seconds, data_dir, log)
            report["soak"] = soaked
            for name, rss in soaked["rss_mb"].items():
                say(
                    f"soak {name}: RSS {rss['first']:.1f} -> {rss['last']:.1f} MB "
                    f"(max {rss['max']:.1f})"
                )
            say(
                f"soak: {soaked['hashes_per_second']:,.0f} hashes/s for {soaked['seconds']:.0f} s, "
                f"{soaked['restarts']} restarts"
            )
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
