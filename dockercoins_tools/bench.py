"""`dockercoins bench`: the in-process ceiling, the turbo pipeline grid, the cost of stage timing,
plumbing latency, a soak.

Everything runs in one process tree and one run, so that the ratios compare like with like
on a shared, noisy machine: absolute numbers are quoted, never asserted.
"""

import asyncio
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any, TextIO, cast

import grpc
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dockercoins import redis_store
from dockercoins.errors import DockercoinsError
from dockercoins.lifecycle import raise_if_cancelling
from dockercoins.rate import Sample, fit_slope
from dockercoins.stages import StageTimes
from dockercoins_tools.launcher.stack import Stack
from dockercoins_tools.probe import probe
from dockercoins_tools.procstat import cpu_seconds, memory_mb

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


def _stack(
    data_dir: Path, workers: int, log: TextIO, env: dict[str, str], log_level: str = "WARNING"
) -> Stack:
    return Stack.on_free_ports(data_dir, log, env, workers=workers, log_level=log_level)


@dataclass(frozen=True)
class Reading:
    """One reading of the counter: `at` on this process's monotonic clock."""

    at: float
    hashes: int
    redis_time: float


class StackSampler:
    """Every `every` s until stopped: the `hashes` counter (a reading Redis does not answer,
    paused or restarting, is skipped) and, with a `stack`, the VmRSS of each of its processes."""

    def __init__(self, redis: Redis, stack: Stack | None = None, every: float = 0.25) -> None:
        self.redis = redis
        self.stack = stack
        self.every = every
        self.readings: list[Reading] = []
        self.rss: list[tuple[float, dict[str, float]]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Sample until `stop()`; stopped by an event, never cancelled mid-reading."""
        while not self._stop.is_set():
            asked = time.monotonic()
            if self.stack is not None:
                pids = self.stack.pids().items()
                self.rss.append((asked, {name: memory_mb(pid, "VmRSS") for name, pid in pids}))
            try:
                totals = await redis_store.read_totals(self.redis)
            except (RedisError, OSError):  # Redis paused or restarting: no reading this time
                raise_if_cancelling()
            else:
                at = (asked + time.monotonic()) / 2
                self.readings.append(Reading(at, totals.hashes, totals.now))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._stop.wait()

    async def run_for(self, seconds: float) -> None:
        """Sample for `seconds`, then stop."""
        task = asyncio.create_task(self.run())
        await asyncio.sleep(seconds)
        self.stop()
        await task

    def stop(self) -> None:
        self._stop.set()

    def between(self, start: float, end: float = math.inf) -> list[Reading]:
        """The readings taken from `start` to `end` (monotonic clock)."""
        return [r for r in self.readings if start <= r.at <= end]

    def peak_rss(self, name: str, start: float, end: float = math.inf) -> float:
        """The highest VmRSS of process `name` sampled from `start` to `end`, in MB."""
        return max((rss.get(name, 0.0) for at, rss in self.rss if start <= at <= end), default=0)


def flushes(readings: list[Reading]) -> list[Reading]:
    """The readings where the counter had moved: the workers' flushes, as Redis took them."""
    return [r for previous, r in itertools.pairwise(readings) if r.hashes > previous.hashes]


def flush_rate(readings: list[Reading]) -> float:
    """The counter's rate from its first flush to its last in `readings`: a window that
    begins and ends on a flush counts whole flushes only (0 under two flushes)."""
    moved = flushes(readings)
    if len(moved) < 2 or moved[-1].at <= moved[0].at:
        return 0.0
    return (moved[-1].hashes - moved[0].hashes) / (moved[-1].at - moved[0].at)


def recovered_at(readings: list[Reading], rate: float, window: float) -> float | None:
    """The first flush from which the counter's rate over the next `window` seconds is back to
    RECOVERED of `rate`; None if none is yet. The first flush after a fault also carries what
    was mined while Redis could not take it: windows start on it, so it does not count."""
    moved = flushes(readings)
    for index, start in enumerate(moved):
        for end in moved[index + 1 :]:
            if end.at - start.at >= window:
                if (end.hashes - start.hashes) / (end.at - start.at) >= RECOVERED * rate:
                    return start.at
                break
    return None


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
        redis = redis_store.connect(stack.redis_url)
        await asyncio.sleep(warmup)
        pids = stack.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        sampler = StackSampler(redis)
        await sampler.run_for(window)
        fitted = fit_slope([Sample(r.redis_time, r.hashes) for r in sampler.readings])
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

SOAK_DIFFICULTY = 3
"""The soak's coin rule: one coin in 4,096 hashes keeps the wallet near 30 MB over 10 minutes
of turbo; at difficulty 1 (one in 16) it passes the embedded Redis's 1 GiB maxmemory in about
two minutes, after which Redis refuses writes and the worker pauses (nothing lost, but the
soak would measure a full Redis instead of the faults)."""

RECOVERED = 0.8
"""A fault is over once the counter's rate is back to this fraction of the rate before it."""

PAUSE, KILL = "pause", "kill"


@dataclass(frozen=True)
class Fault:
    """What the soak does to one process of the stack: `pause` (SIGSTOP, later SIGCONT) or
    `kill` (SIGKILL: the launcher restarts it)."""

    target: str
    action: str

    @property
    def label(self) -> str:
        return f"{self.action} {self.target}"

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """`rng:pause`, `worker.1:kill`... as given on the command line."""
        target, _, action = text.partition(":")
        if target not in FAULT_TARGETS or action not in (PAUSE, KILL):
            raise ValueError(
                f"expected TARGET:pause or TARGET:kill with TARGET one of "
                f"{', '.join(FAULT_TARGETS)}, got {text!r}"
            )
        return cls(target, action)


FAULT_TARGETS = ("rng", "hasher", "redis", "worker.1")
ALL_FAULTS = tuple(Fault(target, action) for target in FAULT_TARGETS for action in (PAUSE, KILL))
QUICK_FAULTS = (Fault("redis", PAUSE), Fault("worker.1", KILL))


@dataclass(frozen=True)
class SoakPlan:
    """How long the soak lasts and what it does meanwhile: each fault in turn, in a slot of
    `seconds / len(faults)`: the rate before it over the slot's first fifth (at least
    `window` + 0.5 s), a pause of two fifths, then the recovery, watched to the slot's end and
    on, while not recovered, for up to `patience` more seconds."""

    seconds: float = 600.0
    faults: tuple[Fault, ...] = ALL_FAULTS
    window: float = 3.0
    patience: float = 60.0
    difficulty: int = SOAK_DIFFICULTY

    @property
    def slot(self) -> float:
        return self.seconds / max(len(self.faults), 1)

    @property
    def before(self) -> float:
        return max(0.2 * self.slot, self.window + 0.5)

    @property
    def pause(self) -> float:
        return max(0.4 * self.slot, 1.0)


class LineRecorder(io.TextIOBase):
    """The stack's log, passed on to `out`, each line also kept with the time it came."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.out.write(text)
        now = time.monotonic()
        self.lines.extend((now, line) for line in text.splitlines())
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def between(self, start: float, end: float = math.inf) -> list[str]:
        return [line for at, line in self.lines if start <= at <= end]


STOPPED_LINE = re.compile(r"worker stopped: (\d+) hashes, \d+ coins, (\d+) hashes unflushed")


async def _heartbeat_key(redis: Redis, pid: int, timeout: float = 10.0) -> str:
    """The heartbeat key of the worker process `pid`, once it has written one."""
    deadline = time.monotonic() + timeout
    while True:
        keys = [key async for key in redis.scan_iter(match=redis_store.WORKER_KEY_PREFIX + "*")]
        for key, value in zip(keys, await redis.mget(keys) if keys else [], strict=True):
            if value is not None and json.loads(value).get("pid") == pid:
                return key.decode() if isinstance(key, bytes) else str(key)
        if time.monotonic() > deadline:
            raise DockercoinsError(f"worker pid {pid} wrote no heartbeat within {timeout:g} s")
        await asyncio.sleep(0.1)


@dataclass
class FaultResult:
    """What one fault cost: seconds (monotonic) from the fault's end to the recovery."""

    fault: str
    seconds: float
    rate_before: float
    recovered_after: float | None
    rate_after: float
    worker_peak_rss_mb: float
    redis_peak_rss_mb: float
    lines: list[str] = field(default_factory=list)
    flushes: list[tuple[float, int]] = field(default_factory=list)
    """The counter at each flush seen, seconds from the fault's end (negative: before)."""


class FaultSoak:
    """Turbo with faults inflicted in turn on a running stack; what each cost, and whether
    the counter holds exactly what the workers say they counted."""

    def __init__(self, plan: SoakPlan, stack: Stack, redis: Redis, log: LineRecorder) -> None:
        self.plan = plan
        self.stack = stack
        self.redis = redis
        self.log = log
        self.sampler = StackSampler(redis, stack)
        self.paused: set[int] = set()
        self.killed_flushed: list[int] = []

    async def inflict(self, fault: Fault) -> FaultResult:
        """Measure the rate, inflict `fault`, watch the recovery."""
        plan = self.plan
        began = time.monotonic()
        await asyncio.sleep(plan.before)
        struck = time.monotonic()
        before = flush_rate(self.sampler.between(struck - plan.before, struck))
        pid = self.stack.pids()[fault.target]
        if fault.action == PAUSE:
            os.kill(pid, signal.SIGSTOP)
            self.paused.add(pid)
            await asyncio.sleep(plan.pause)
            os.kill(pid, signal.SIGCONT)
            self.paused.discard(pid)
        elif fault.target.startswith("worker"):
            key = await _heartbeat_key(self.redis, pid)
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)  # whatever it had sent has reached Redis
            # Written in the same transaction as its last count: what it flushed, exactly.
            beat = await self.redis.get(key)
            if beat is None:
                raise DockercoinsError(f"the killed worker's heartbeat {key} expired unread")
            self.killed_flushed.append(int(json.loads(beat).get("hashes_flushed", 0)))
        else:
            os.kill(pid, signal.SIGKILL)
        ended = time.monotonic()
        planned, limit = began + plan.slot, began + plan.slot + plan.patience
        while True:
            recovered = recovered_at(self.sampler.between(ended), before, plan.window)
            now = time.monotonic()
            if now >= limit or (now >= planned and recovered is not None):
                break
            await asyncio.sleep(0.25)
        after = self.sampler.between(recovered if recovered is not None else now)
        return FaultResult(
            fault=fault.label,
            seconds=round(plan.pause if fault.action == PAUSE else 0.0, 1),
            rate_before=round(before),
            recovered_after=None if recovered is None else round(recovered - ended, 1),
            rate_after=round(flush_rate(after)),
            worker_peak_rss_mb=round(self.sampler.peak_rss("worker.1", struck), 1),
            redis_peak_rss_mb=round(self.sampler.peak_rss("redis", struck), 1),
            lines=self.log.between(struck)[:40],
            flushes=[
                (round(r.at - ended, 2), r.hashes)
                for r in flushes(self.sampler.between(struck - plan.before))
            ],
        )

    def resume_paused(self) -> None:
        """SIGCONT whatever is still paused (the soak was interrupted mid-fault)."""
        for pid in self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused.clear()

    async def count(self) -> dict[str, Any]:
        """Stop the workers (each flushes and says its total), then compare with the counter."""
        await self.stack.scale_workers(0)
        counter = (await redis_store.read_totals(self.redis)).hashes
        stopped = [
            (int(m.group(1)), int(m.group(2)))
            for line in self.log.between(0.0)
            if (m := STOPPED_LINE.search(line))
        ]
        flushed = sum(total - unflushed for total, unflushed in stopped)
        expected = flushed + sum(self.killed_flushed)
        return {
            "counter": counter,
            "workers_stopped": [total for total, _ in stopped],
            "unflushed": sum(unflushed for _, unflushed in stopped),
            "killed_workers_flushed": self.killed_flushed,
            "expected": expected,
            "exact": counter == expected and all(not u for _, u in stopped),
        }


async def soak(plan: SoakPlan, data_dir: Path, log: TextIO, every: float = 5.0) -> dict[str, Any]:
    """Turbo for `plan.seconds`, with `plan.faults` in turn: per fault the rate before, the
    time to recover and the peak RSS of the worker and Redis; RSS of every process every
    `every` s; at the end, the counter against the sum of the workers' own totals."""
    recorder = LineRecorder(log)
    env = {"DOCKERCOINS_PROFILE": "turbo", "DOCKERCOINS_DIFFICULTY": str(plan.difficulty)}
    stack = _stack(data_dir, 1, cast(TextIO, recorder), env, log_level="INFO")
    redis: Redis | None = None
    try:
        await stack.start()
        redis = redis_store.connect(stack.redis_url, 1.0)
        run = FaultSoak(plan, stack, redis, recorder)
        sampling = asyncio.create_task(run.sampler.run())
        try:
            await _first_flushes(run.sampler, 2)
            started = time.monotonic()
            results = []
            for fault in plan.faults:
                results.append(await run.inflict(fault))
            await asyncio.sleep(max(0.0, started + plan.seconds - time.monotonic()))
            ended = time.monotonic()
        finally:
            run.resume_paused()
            run.sampler.stop()
            await sampling
        restarts = sum(p.restarts for p in stack.processes())
        count = await run.count()
    finally:
        if redis is not None:
            await redis.aclose()
        await stack.stop()
    soaked = run.sampler.between(started, ended)
    series: dict[str, list[float]] = {}
    next_at = started
    for at, rss in run.sampler.rss:
        if started <= at <= ended and at >= next_at:
            next_at = at + every
            for name, mb in rss.items():
                series.setdefault(name, []).append(round(mb, 1))
    hashes = soaked[-1].hashes - soaked[0].hashes if soaked else 0
    span = soaked[-1].redis_time - soaked[0].redis_time if len(soaked) > 1 else 0
    return {
        "seconds": round(ended - started, 1),
        "difficulty": plan.difficulty,
        "hashes": hashes,
        "hashes_per_second": round(hashes / span) if span else 0,
        "restarts": restarts,
        "kills": sum(f.action == KILL for f in plan.faults),
        "faults": [asdict(r) for r in results],
        "count": count,
        "rss_mb": {
            name: {"first": s[0], "last": s[-1], "max": max(s), "samples": s}
            for name, s in series.items()
        },
    }


async def _first_flushes(sampler: StackSampler, count: int, timeout: float = 60.0) -> None:
    """Wait until the counter has moved `count` times: the worker is mining and flushing."""
    deadline = time.monotonic() + timeout
    while len(flushes(sampler.readings)) < count:
        if time.monotonic() > deadline:
            raise DockercoinsError(f"the worker did not flush within {timeout:g} s")
        await asyncio.sleep(0.1)


# -- the whole run ---------------------------------------------------------------------


@dataclass
class BenchOptions:
    """How long and how much: the full run, or a tiny one that keeps the code path alive."""

    window: float = 10.0
    warmup: float = 3.0
    ceiling_seconds: float = 10.0
    latency_calls: int = 100
    grid: tuple[PipelineConfig, ...] = FULL_GRID
    soak: SoakPlan = SoakPlan()
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
