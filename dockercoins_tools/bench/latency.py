"""The plumbing's latency: probes of rng and hasher over their simulated cost, and the floors
under it (the timer, a bare TCP round trip)."""

import asyncio
import io
import multiprocessing
import time
from pathlib import Path
from typing import Any, TextIO

from dockercoins_tools.bench.stacks import bench_stack, settings_env
from dockercoins_tools.cost_model import profile_costs
from dockercoins_tools.probe import probe


def simulated_costs() -> dict[str, float]:
    """Seconds one call of rng and of hasher costs by design (classic), as their settings say."""
    classic = profile_costs("classic")
    return {"rng": classic.rng_request, "hasher": classic.hasher_latency}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _p50_p99(late_ms: list[float]) -> dict[str, float]:
    """The median and 99th percentile of these milliseconds late, rounded to the µs."""
    return {
        "p50_ms": round(_percentile(late_ms, 0.5), 3),
        "p99_ms": round(_percentile(late_ms, 0.99), 3),
    }


async def timer_overshoot(calls: int, seconds: float) -> dict[str, float]:
    """How late asyncio.sleep wakes up on this machine: the floor under any simulated cost."""
    late = []
    for _ in range(calls):
        began = time.perf_counter()
        await asyncio.sleep(seconds)
        late.append((time.perf_counter() - began - seconds) * 1000)
    return _p50_p99(late)


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


async def raw_tcp_floor(calls: int, seconds: float) -> dict[str, float]:
    """The same wait behind a bare TCP socket in another process: what no RPC stack can beat."""
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
    return _p50_p99(late)


async def measure_overhead(calls: int, data_dir: Path, log: TextIO) -> dict[str, Any]:
    """Probe latency minus the simulated cost, classic profile, one caller at a time."""
    costs = simulated_costs()
    stack = bench_stack(data_dir, 0, log, settings_env(profile="classic"))
    figures: dict[str, Any] = {}
    try:
        await stack.start()
        targets = {
            "rng": f"{stack.client_host}:{stack.ports['rng']}",
            "hasher": f"{stack.client_host}:{stack.ports['hasher']}",
        }
        for service, address in targets.items():
            result = await probe(service, address, calls, 0.0, 10.0, False, io.StringIO())
            overhead = [(latency - costs[service]) * 1000 for latency in result.latencies]
            figures[service] = {
                "calls": len(overhead),
                "errors": len(result.errors),
                **_p50_p99(overhead),
                "max_ms": round(max(overhead), 3),
            }
    finally:
        await stack.stop()
    figures["timer_overshoot"] = await timer_overshoot(min(calls, 50), costs["hasher"])
    return figures
