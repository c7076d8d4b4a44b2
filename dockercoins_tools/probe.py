"""`dockercoins probe`: time real calls against a running service, as httping does."""

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.channels import normalize_target
from dockercoins.tls import open_channel
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from hasher_svc import config as hasher_config
from rng_svc import config as rng_config

SERVICE_NAMES = {"rng": rng_config.SERVICE_NAME, "hasher": hasher_config.SERVICE_NAME, "worker": ""}
"""The health service name each target answers for by default (the worker: its readiness)."""


@dataclass
class ProbeResult:
    """Latencies of the calls that succeeded, and the errors of those that did not."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """httping's last line: min/avg/max in milliseconds, and the counts."""
        total = len(self.latencies) + len(self.errors)
        if not self.latencies:
            return f"{total} calls, 0 ok, {len(self.errors)} failed"
        ms = [latency * 1000 for latency in self.latencies]
        return (
            f"{total} calls, {len(ms)} ok, {len(self.errors)} failed, "
            f"round-trip min/avg/max = {min(ms):.1f}/{statistics.fmean(ms):.1f}/{max(ms):.1f} ms"
        )


def _call_for(
    service: str, channel: grpc.aio.Channel, health: bool, health_service: str | None
) -> Callable[[float], Any]:
    if health:
        stub = health_pb2_grpc.HealthStub(channel)
        name = SERVICE_NAMES[service] if health_service is None else health_service
        request = health_pb2.HealthCheckRequest(service=name)

        async def check(timeout: float) -> None:
            reply = await stub.Check(request, timeout=timeout)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                raise RuntimeError(f"status {name}")

        return check
    if service == "rng":
        rng = rng_pb2_grpc.RngStub(channel)
        return lambda timeout: rng.GetRandom(rng_pb2.RandomRequest(size=32), timeout=timeout)
    hasher = hasher_pb2_grpc.HasherStub(channel)
    return lambda timeout: hasher.Hash(hasher_pb2.HashRequest(data=b"x" * 32), timeout=timeout)


async def probe(
    service: str,
    address: str,
    count: int,
    interval: float,
    timeout: float,
    health: bool,
    out: TextIO,
    credentials: grpc.ChannelCredentials | None = None,
    health_service: str | None = None,
) -> ProbeResult:
    """Call `service` at `address` `count` times, one line each, then the summary.

    With `credentials` the calls go over TLS. `health_service` names the health service
    to check instead of the target's default (a worker's `liveness`, say).
    """
    if service not in SERVICE_NAMES:
        raise ValueError(f"can only probe {', '.join(SERVICE_NAMES)}, not {service!r}")
    if service == "worker" and not health:
        raise ValueError("a worker serves health only: probe it with --health")
    result = ProbeResult()
    if health_service is not None and not health:
        raise ValueError("--service names a health service: give --health too")
    what = f"{service} health" if health else service
    async with open_channel(normalize_target(address), credentials) as channel:
        call = _call_for(service, channel, health, health_service)
        for seq in range(1, count + 1):
            started = time.perf_counter()
            try:
                await call(timeout)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except RuntimeError as exc:
                error = str(exc)
            else:
                error = ""
            elapsed = time.perf_counter() - started
            if error:
                result.errors.append(error)
                out.write(f"{what} {address}: seq={seq} error {error}\n")
            else:
                result.latencies.append(elapsed)
                out.write(f"{what} {address}: seq={seq} time={elapsed * 1000:.1f} ms\n")
            out.flush()
            if seq < count:
                await asyncio.sleep(interval)
    out.write(f"--- {what} {address} ---\n{result.summary()}\n")
    out.flush()
    return result
