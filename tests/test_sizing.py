"""Memory limits against worst cases: every compose service's and every Kubernetes container's
limit covers the worst case that dockercoins_tools/sizing.py computes from the settings that
deployment gives it, and that worst case holds when real clients flood real servers."""

import asyncio
import json
import os
import subprocess
from typing import Any

import grpc
import pytest
import yaml

from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins_tools.procstat import memory_mb
from dockercoins_tools.services import SERVICES
from dockercoins_tools.sizing import (
    MiB,
    RedisServer,
    WorstCase,
    settings_from_env,
    worst_case_memory,
)
from tests.stack import Service
from tests.support import ROOT, compose_binary, tool

COMPOSE_VARIANTS = [
    (),
    ("compose.buffered.yaml",),
    ("compose.turbo.yaml",),
    ("compose.turbo.yaml", "compose.buffered.yaml"),
]
OVERLAYS = ["base", *sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())]
QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
REDIS_UNITS = {
    "": 1,
    "k": 10**3,
    "kb": 1 << 10,
    "m": 10**6,
    "mb": 1 << 20,
    "g": 10**9,
    "gb": 1 << 30,
}
LIMIT_SLACK = 2
"""A compose limit is at most this many times its service's worst case: sized from it, not
merely above it."""


def unit_split(text: str) -> tuple[int, str]:
    digits = len(text) - len(text.lstrip("0123456789"))
    return int(text[:digits]), text[digits:]


def kubernetes_bytes(quantity: str) -> int:
    number, unit = unit_split(quantity)
    return number * QUANTITY[unit]


def redis_bytes(setting: str) -> int:
    number, unit = unit_split(setting.lower())
    return number * REDIS_UNITS[unit]


def worst_case_of(name: str, env: dict[str, str], argv: list[str]) -> WorstCase:
    """The worst case of a deployment's service `name` with its environment and command line."""
    if name == "redis":
        return worst_case_memory(RedisServer(redis_bytes(argv[argv.index("--maxmemory") + 1])))
    if name == "redis-secret":
        return worst_case_memory(None)
    return worst_case_memory(settings_from_env(SERVICES[name].settings, env))


@pytest.mark.slow
@pytest.mark.parametrize("variant", COMPOSE_VARIANTS, ids=lambda v: "+".join(v) or "compose.yaml")
def test_each_compose_limit_covers_its_services_worst_case(variant: tuple[str, ...]) -> None:
    files = [arg for name in ("compose.yaml", *variant) for arg in ("-f", name)]
    result = subprocess.run(
        [compose_binary(), *files, "config", "--format", "json"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"redis-secret", "redis", *SERVICES} == set(services)
    for name, service in services.items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("cpus") and limits.get("pids"), f"{name}: no CPU or pids limit"
        env = {k: v for k, v in (service.get("environment") or {}).items() if v is not None}
        worst = worst_case_of(name, env, service.get("command") or [])
        limit = int(limits["memory"])
        print(f"{worst.describe()}; limit {limit / MiB:.0f} MiB")
        assert worst.total <= limit <= LIMIT_SLACK * worst.total, (
            f"compose {name}: limit {limit / MiB:.0f} MiB against {worst.describe()}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_kubernetes_limit_covers_its_containers_worst_case(overlay: str) -> None:
    path = ROOT / "k8s" / ("base" if overlay == "base" else f"overlays/{overlay}")
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    checked = set()
    for item in yaml.safe_load_all(result.stdout):
        if not item or item["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        for container in item["spec"]["template"]["spec"]["containers"]:
            name = container["name"]
            env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
            argv = [*container.get("command", []), *container.get("args", [])]
            worst = worst_case_of(name, env, argv)
            limit = kubernetes_bytes(container["resources"]["limits"]["memory"])
            print(f"{overlay} {worst.describe()}; limit {limit / MiB:.0f} MiB")
            assert worst.total <= limit, (
                f"{overlay}: {name}'s limit {limit / MiB:.0f} MiB against {worst.describe()}"
            )
            checked.add(name)
    assert {"redis", *SERVICES} <= checked


# --- the model against real floods --------------------------------------------------------------

CALLS = 12
"""Calls of the flood: the server's DOCKERCOINS_MAX_CONCURRENT_RPCS."""
FLOOD_SECONDS = 6.0


async def flood_hashstreams(address: str, request: hasher_pb2.HashRequest) -> None:
    """CALLS HashStreams that send `request` over and over and never read a reply."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hasher_pb2_grpc.HasherStub(channel)

        async def push() -> None:
            call = stub.HashStream(timeout=FLOOD_SECONDS + 10)
            with pytest.raises((asyncio.TimeoutError, grpc.aio.AioRpcError)):
                for _ in range(200):  # held back by flow control long before the end
                    await asyncio.wait_for(call.write(request), FLOOD_SECONDS)
            call.cancel()

        await asyncio.gather(*(push() for _ in range(CALLS)))


async def flood_random_streams(address: str, size: int) -> None:
    """CALLS StreamRandom calls of `size`-byte messages that are never read."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rng_pb2_grpc.RngStub(channel)
        calls = [stub.StreamRandom(rng_pb2.RandomRequest(size=size)) for _ in range(CALLS)]
        await asyncio.sleep(FLOOD_SECONDS)
        for call in calls:
            call.cancel()


HASHER = {
    "max_concurrent_rpcs": CALLS,
    "hasher_latency": 0,
    "hasher_max_request": 512 << 10,
    "hasher_max_reply": 1 << 20,
}
FLOODS: dict[str, tuple[str, dict[str, Any], Any]] = {
    "hasher, raw digests": (
        "hasher",
        HASHER,
        hasher_pb2.HashRequest(data=os.urandom(512 << 10), block_size=32, raw=True),
    ),
    "hasher, hex digests": (
        "hasher",
        HASHER,
        hasher_pb2.HashRequest(data=os.urandom(512 << 10), block_size=64),
    ),
    "rng": ("rng", {"max_concurrent_rpcs": CALLS, "rng_read_cost": 0}, 512 << 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("flood", list(FLOODS))
def test_a_flood_of_the_largest_calls_stays_within_the_worst_case(flood: str) -> None:
    """Every call holds its largest request and reply and the client reads nothing: the
    server's peak RSS stays under the worst case computed from its settings."""
    command, fields, load = FLOODS[flood]
    port = free_port()
    server = Service(command, **{f"{command}_port": port}, **fields)
    try:
        server.wait_for("listening on")
        before = memory_mb(server.proc.pid) * MiB  # VmHWM: the peak so far
        address = f"127.0.0.1:{port}"
        if command == "hasher":
            asyncio.run(flood_hashstreams(address, load))
        else:
            asyncio.run(flood_random_streams(address, load))
        peak = memory_mb(server.proc.pid) * MiB
        env = {f"DOCKERCOINS_{k.upper()}": str(v) for k, v in fields.items()}
        worst = worst_case_of(command, env, [])
        print(f"{flood}: {before / MiB:.0f} -> {peak / MiB:.0f} MiB; {worst.describe()}")
        assert peak > before + CALLS * (256 << 10), "the flood held nothing: no test"
        assert peak <= worst.total, f"{flood}: peak {peak / MiB:.0f} MiB, {worst.describe()}"
        assert server.terminate() == 0
    finally:
        server.kill()


def test_the_worst_case_grows_with_each_bound() -> None:
    """Each bound the model reads moves it: the calls, the sizes, the worker's batch and loops,
    the web UI's streams, Redis's maxmemory."""
    cases = {
        "rng": ("DOCKERCOINS_MAX_CONCURRENT_RPCS", "DOCKERCOINS_RNG_MAX_REQUEST"),
        "hasher": ("DOCKERCOINS_HASHER_MAX_REQUEST", "DOCKERCOINS_HASHER_MAX_REPLY"),
        "worker": ("DOCKERCOINS_WORKER_BATCH", "DOCKERCOINS_WORKER_MAX_PENDING_COINS"),
        "webui": ("DOCKERCOINS_WEBUI_MAX_STREAMS",),
    }
    small = {"DOCKERCOINS_MAX_CONCURRENT_RPCS": "8", "DOCKERCOINS_HASHER_MAX_REPLY": "65536"}
    for name, variables in cases.items():
        base = worst_case_of(name, small, []).total
        for variable in variables:
            doubled = dict(small)
            field = variable.removeprefix("DOCKERCOINS_").lower()
            doubled[variable] = str(2 * int(small.get(variable, SERVICES[name].default(field))))
            assert worst_case_of(name, doubled, []).total > base, f"{name}: {variable}"
    redis = [worst_case_of("redis", {}, ["--maxmemory", size]).total for size in ("1mb", "2mb")]
    assert redis[1] > redis[0]
