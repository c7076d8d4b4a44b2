"""The in-process ceiling: what the machine's cores hash with no service, no network."""

import hashlib
import os
import time
from concurrent.futures import ProcessPoolExecutor


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
