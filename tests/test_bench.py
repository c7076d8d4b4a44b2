"""`dockercoins bench` at tiny scale, through the code path of `make bench`, so it cannot rot."""

import json
import os
import shutil
import subprocess

import pytest

from dockercoins_tools.bench.pipeline import TURBO
from dockercoins_tools.cost_model import profile_costs
from tests.support import run_cli

pytestmark = pytest.mark.slow


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli("bench", "--quick", *args, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.alone
def test_quick_bench_measures_every_part_and_writes_json(tmp_path) -> None:
    result = bench("--soak", "0", "--out", str(tmp_path))
    assert "best:" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())

    # Both ceilings hash on every core of this machine, at turbo's difficulty, before and after
    # the grid, and say so; the ratios are to the higher of the two (the machine is shared).
    cores = os.cpu_count()
    difficulty = TURBO.difficulty
    for key, name in (("ceiling", "Python loop ceiling"), ("native_ceiling", "native ceiling")):
        ceiling = report[key]
        assert report["machine"]["cores"] == ceiling["cores"] == cores
        for run, when in zip(ceiling["runs"], ("before", "after"), strict=True):
            line = f"{name} (in-process, {cores} cores, difficulty {difficulty}, {when} the grid): "
            assert line + f"{run['hashes_per_second']:,.0f} hashes/s" in result.stdout
            assert run["per_core"] * cores == pytest.approx(run["hashes_per_second"])
        rate = ceiling["hashes_per_second"]
        assert rate == max(run["hashes_per_second"] for run in ceiling["runs"]) > 0
        cpu = ceiling["cpu_us_per_hash"]
        assert cpu == min(run["cpu_us_per_hash"] for run in ceiling["runs"]) > 0
    # The same work, natively: the native ceiling is the faster (by far, on any machine).
    assert report["native_ceiling"]["hashes_per_second"] > report["ceiling"]["hashes_per_second"]
    openssl = report["openssl"]
    if shutil.which("openssl"):
        assert openssl["hashes_per_second"] > 0 and openssl["cores"] == cores
        assert f"speed -evp sha256 -bytes 32 -multi {cores}" in openssl["command"]
        assert f"{openssl['hashes_per_second']:,.0f} hashes/s" in result.stdout
    else:
        assert openssl is None and "openssl speed: no openssl" in result.stdout
    assert len(report["pipeline"]) == 2
    for point in report["pipeline"]:
        assert point["hashes_per_second"] > 0
        assert point["ratio_to_ceiling"] == pytest.approx(
            point["hashes_per_second"] / report["ceiling"]["hashes_per_second"], abs=0.001
        )
        assert 0 <= point["ratio_to_native"] < point["ratio_to_ceiling"]
        # CPU per hash: the Python loop's over the whole stack's, in the same run.
        assert point["cpu_ratio_to_ceiling"] == pytest.approx(
            report["ceiling"]["cpu_us_per_hash"] / point["cpu_seconds_per_million"], abs=0.001
        )
        assert point["cpu_seconds_per_million"] > 0
        assert {"redis", "rng", "hasher", "webui", "worker.1"} <= set(point["processes"])
        assert all(p["peak_rss_mb"] > 0 for p in point["processes"].values())
        # Each process's CPU per message is its CPU per hash times the batch.
        batch = point["config"]["batch"]
        for name in ("rng", "hasher", "worker.1"):
            figures = point["processes"][name]
            assert figures["cpu_us_per_hash"] > 0
            assert figures["cpu_us_per_message"] == pytest.approx(
                figures["cpu_us_per_hash"] * batch, rel=0.01, abs=0.1
            )
        assert "CPU-µs per message / per hash: " in result.stdout
    # Batching pays: 100 hashes per message beats one per message by far.
    one, hundred = report["pipeline"]
    assert hundred["hashes_per_second"] > 5 * one["hashes_per_second"]
    assert hundred["ratio_to_native"] > 0

    # The plumbing is what a call takes over the cost its service's settings simulate.
    classic = profile_costs("classic")
    for service, cost in (("rng", classic.rng_request), ("hasher", classic.hasher_latency)):
        latency = report["latency_overhead"][service]
        assert latency["calls"] == 5 and latency["errors"] == 0
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"]
        assert f"{service} plumbing over the simulated {cost:g} s: p50" in result.stdout
    timing = report["stage_timing"]
    assert timing["windows"] == 1 and timing["hashes"]["on"] > 0 < timing["hashes"]["off"]
    assert timing["worker_cpu_seconds_per_million"]["on"] > 0
    assert f"stage timing ({TURBO.label}" in result.stdout
    assert "soak" not in report


@pytest.mark.alone
def test_fault_soak_recovers_from_each_fault_and_counts_every_hash_once(tmp_path) -> None:
    """Redis paused past the worker's Redis timeout, then the worker killed with -9. Alone: the
    recovery is a rate against the rate before the fault, which tests starting beside it skew
    (beside the first phase of `make test`, at nice 10, the worker flushed on at a fifth of its
    rate before the pause while two busy loops ran, and never "recovered")."""
    result = bench("--soak-only", "--out", str(tmp_path))
    soaked = json.loads((tmp_path / "soak.json").read_text())

    faults = {fault["fault"]: fault for fault in soaked["faults"]}
    assert list(faults) == ["pause redis", "kill worker.1"]
    for fault in faults.values():
        assert fault["rate_before"] > 0
        # Back to 80 % of the rate before, well within the 20 s the quick soak waits.
        assert fault["recovered_after"] is not None, (
            f"{fault['fault']}: never back to 80 % of {fault['rate_before']:,} hashes/s; "
            f"flushes (s from its end, counter): {fault['flushes']}"
        )
        assert fault["worker_peak_rss_mb"] > 0 and fault["redis_peak_rss_mb"] > 0
    assert faults["pause redis"]["seconds"] > 2  # longer than the worker's Redis timeout
    assert "worker.1  | exited with status -9; restarting" in "\n".join(
        faults["kill worker.1"]["lines"]
    )
    # The launcher restarted the killed worker, and nothing else; every process was sampled.
    assert soaked["restarts"] == soaked["kills"] == 1
    assert soaked["hashes"] > 0
    assert set(soaked["rss_mb"]) >= {"redis", "rng", "hasher", "worker.1"}

    # Nothing lost, nothing twice: the counter holds the stopped worker's own total plus
    # what the killed one had flushed (its last heartbeat), to the hash.
    count = soaked["count"]
    (killed,) = count["killed_workers_flushed"]
    (stopped,) = count["workers_stopped"]
    assert killed > 0 and stopped > 0 and count["unflushed"] == 0
    assert count["counter"] == stopped + killed
    assert count["exact"]
    assert f"counter {count['counter']:,} = workers' totals" in result.stdout
    assert "pause redis" in result.stdout and "kill worker.1" in result.stdout
