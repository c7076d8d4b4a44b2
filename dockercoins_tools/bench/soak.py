"""The fault soak: turbo with faults inflicted in turn, each one's cost, and an exact count."""

import asyncio
import contextlib
import io
import json
import math
import os
import re
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO, cast

from redis.asyncio import Redis

from dockercoins import redis_store
from dockercoins.counter_sampler import CounterSampler
from dockercoins.errors import DockercoinsError
from dockercoins_tools.bench.faults import (
    KILL,
    PAUSE,
    Fault,
    FaultResult,
    SoakPlan,
    flush_rate,
    flushes,
    recovered_at,
)
from dockercoins_tools.bench.stacks import SAMPLE_EVERY, bench_stack, settings_env
from dockercoins_tools.launcher import Stack
from dockercoins_tools.procstat import memory_mb


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


class FaultSoak:
    """Turbo with faults inflicted in turn on a running stack; what each cost, and whether
    the counter holds exactly what the workers say they counted."""

    def __init__(self, plan: SoakPlan, stack: Stack, redis: Redis, log: LineRecorder) -> None:
        self.plan = plan
        self.stack = stack
        self.redis = redis
        self.log = log
        self.counter = CounterSampler.of_redis(redis, SAMPLE_EVERY)
        self.rss: list[tuple[float, dict[str, float]]] = []
        """At each reading of the counter (monotonic clock): every process's VmRSS, in MB."""
        self.paused: set[int] = set()
        self.killed_flushed: list[int] = []

    async def sample(self) -> None:
        """One step of the counter's sampler: every process's VmRSS, then the counter (no
        reading while Redis does not answer, paused or restarting)."""
        pids = self.stack.pids().items()
        self.rss.append((time.monotonic(), {name: memory_mb(pid, "VmRSS") for name, pid in pids}))
        await self.counter.sample_answered()

    def peak_rss(self, name: str, start: float, end: float = math.inf) -> float:
        """The highest VmRSS of process `name` sampled from `start` to `end`, in MB."""
        return max((rss.get(name, 0.0) for at, rss in self.rss if start <= at <= end), default=0)

    async def inflict(self, fault: Fault) -> FaultResult:
        """Measure the rate, inflict `fault`, watch the recovery."""
        plan = self.plan
        began = time.monotonic()
        await asyncio.sleep(plan.before)
        struck = time.monotonic()
        before = flush_rate(self.counter.between(struck - plan.before, struck))
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
            recovered = recovered_at(self.counter.between(ended), before, plan.window)
            now = time.monotonic()
            if now >= limit or (now >= planned and recovered is not None):
                break
            await asyncio.sleep(0.25)
        after = self.counter.between(recovered if recovered is not None else now)
        return FaultResult(
            fault=fault.label,
            seconds=round(plan.pause if fault.action == PAUSE else 0.0, 1),
            rate_before=round(before),
            recovered_after=None if recovered is None else round(recovered - ended, 1),
            rate_after=round(flush_rate(after)),
            worker_peak_rss_mb=round(self.peak_rss("worker.1", struck), 1),
            redis_peak_rss_mb=round(self.peak_rss("redis", struck), 1),
            lines=self.log.between(struck)[:40],
            flushes=[
                (round(r.at - ended, 2), r.hashes)
                for r in flushes(self.counter.between(struck - plan.before))
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
    env = settings_env(profile="turbo", difficulty=plan.difficulty)
    stack = bench_stack(data_dir, 1, cast(TextIO, recorder), env, log_level="INFO")
    redis: Redis | None = None
    try:
        await stack.start()
        redis = redis_store.connect(stack.redis_url, 1.0)
        run = FaultSoak(plan, stack, redis, recorder)
        sampling = asyncio.create_task(run.counter.run(step=run.sample))
        try:
            await _first_flushes(run.counter, 2)
            started = time.monotonic()
            results = []
            for fault in plan.faults:
                results.append(await run.inflict(fault))
            await asyncio.sleep(max(0.0, started + plan.seconds - time.monotonic()))
            ended = time.monotonic()
        finally:
            run.resume_paused()
            run.counter.stop()
            await sampling
        restarts = sum(p.restarts for p in stack.processes())
        count = await run.count()
    finally:
        if redis is not None:
            await redis.aclose()
        await stack.stop()
    soaked = run.counter.between(started, ended)
    series: dict[str, list[float]] = {}
    next_at = started
    for at, rss in run.rss:
        if started <= at <= ended and at >= next_at:
            next_at = at + every
            for name, mb in rss.items():
                series.setdefault(name, []).append(round(mb, 1))
    hashes = soaked[-1].hashes - soaked[0].hashes if soaked else 0
    span = soaked[-1].totals.now - soaked[0].totals.now if len(soaked) > 1 else 0
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


async def _first_flushes(sampler: CounterSampler, count: int, timeout: float = 60.0) -> None:
    """Wait until the counter has moved `count` times: the worker is mining and flushing."""
    deadline = time.monotonic() + timeout
    while len(flushes(sampler.readings)) < count:
        if time.monotonic() > deadline:
            raise DockercoinsError(f"the worker did not flush within {timeout:g} s")
        await asyncio.sleep(0.1)
