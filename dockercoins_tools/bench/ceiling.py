"""The in-process ceilings: what the machine's cores hash with no service, no network.

- the Python loop: what a user could write instead of three processes: `os.urandom`, then
  `hashlib.sha256` of each 32-byte block, then the coin rule over the batch;
- the native ceiling: the same work with the pipeline's own native pieces, rng's turbo
  keystream and the hasher's batch SHA-256, then the same coin rule;
- `openssl speed -evp sha256 -bytes 32 -multi <cores>`, when `openssl` is on the PATH.
"""

import hashlib
import multiprocessing
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

from dockercoins.native import hash_function, random_function
from dockercoins.wire import BLOCK_SIZE, MAX_BATCH
from rng_svc.config import RngSettings
from worker_svc.coins import find_coins

PYTHON_BATCH = 1000
"""Blocks the Python loop draws from os.urandom at a time."""


def python_loop(seconds: float, difficulty: int, batch: int = PYTHON_BATCH) -> tuple[int, float]:
    """Hashes one core does in `seconds` (and the CPU seconds it used): urandom in batches,
    hashlib per block, the coin rule."""
    sha256 = hashlib.sha256
    done = 0
    cpu = time.process_time()
    size = BLOCK_SIZE * batch
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        data = os.urandom(size)
        view = memoryview(data)
        digests = b"".join(
            [sha256(view[i : i + BLOCK_SIZE]).digest() for i in range(0, size, BLOCK_SIZE)]
        )
        find_coins(data, digests, difficulty)
        done += batch
    return done, time.process_time() - cpu


def native_loop(seconds: float, difficulty: int, batch: int = MAX_BATCH) -> tuple[int, float]:
    """Hashes one core does in `seconds` (and the CPU seconds it used) with the pipeline's
    native pieces: rng's turbo keystream, the hasher's batch SHA-256 (one call per batch), the
    coin rule."""
    generator = RngSettings(profile="turbo").rng_generator
    _, random_bytes = random_function(generator)
    hash_blocks = hash_function("native")
    done = 0
    cpu = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        data = random_bytes(BLOCK_SIZE * batch)
        find_coins(data, hash_blocks(data, BLOCK_SIZE), difficulty)
        done += batch
    return done, time.process_time() - cpu


def _on_every_core(
    loop: Callable[..., tuple[int, float]], seconds: float, cores: int, difficulty: int
) -> dict[str, float]:
    """`loop` on every core at once: hashes per second, and CPU-µs per hash (which a shared
    machine's load does not inflate as it does the rate)."""
    # Spawned, not forked: after the grid this process has run gRPC, whose fork handlers can
    # crash a forked child (grpc/grpc#43055), and forking a process with threads is unsafe.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cores, mp_context=spawn) as pool:
        started = time.perf_counter()
        done = list(pool.map(partial(loop, difficulty=difficulty), [seconds] * cores))
        elapsed = time.perf_counter() - started
    hashes, cpu = sum(count for count, _ in done), sum(used for _, used in done)
    total = hashes / seconds
    return {
        "hashes_per_second": total,
        "per_core": total / cores,
        "cpu_us_per_hash": cpu / hashes * 1e6 if hashes else 0.0,
        "cores": cores,
        "wall": elapsed,
        "load_average": os.getloadavg()[0],
    }


def measure_ceiling(seconds: float, cores: int, difficulty: int = 1) -> dict[str, float]:
    """The Python loop on every core at once."""
    return _on_every_core(python_loop, seconds, cores, difficulty)


def measure_native_ceiling(seconds: float, cores: int, difficulty: int = 1) -> dict[str, float]:
    """The native loop on every core at once."""
    return _on_every_core(native_loop, seconds, cores, difficulty)


OPENSSL_TOTAL = re.compile(r"^\+F:\d+:sha256:([0-9.]+)$", re.MULTILINE)
"""openssl speed -mr's total line: bytes per second over all processes."""


def openssl_speed(seconds: float, cores: int) -> dict[str, Any] | None:
    """`openssl speed -evp sha256 -bytes 32 -multi <cores>`: SHA-256 of 32-byte inputs through
    EVP (one call per input) in `cores` processes; None without `openssl`."""
    binary = shutil.which("openssl")
    if binary is None:
        return None
    command = [binary, "speed", "-evp", "sha256", "-bytes", str(BLOCK_SIZE), "-multi", str(cores)]
    command += ["-seconds", str(max(1, round(seconds))), "-mr"]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds * 3 + 60, check=False
    )
    found = OPENSSL_TOTAL.search(out.stdout)
    if out.returncode or found is None:
        return {"command": " ".join(command[:8]), "error": (out.stderr or out.stdout)[-300:]}
    total = float(found.group(1)) / BLOCK_SIZE
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
    return {
        "command": " ".join(command[1:8]),
        "version": version.stdout.strip(),
        "hashes_per_second": total,
        "per_core": total / cores,
        "cores": cores,
    }
