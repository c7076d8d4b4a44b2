"""`dockercoins bench` at tiny scale, through the code path of `make bench`, so it cannot rot."""

import json
import subprocess

from tests.conftest import dockercoins_cmd, service_env


def test_quick_bench_measures_every_part_and_writes_json(tmp_path) -> None:
    result = subprocess.run(
        dockercoins_cmd("bench", "--quick", "--out", str(tmp_path)),
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ceiling (in-process" in result.stdout
    assert "best:" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())

    assert report["machine"]["cores"] >= 1
    assert report["ceiling"]["hashes_per_second"] > 0
    assert len(report["pipeline"]) == 2
    for point in report["pipeline"]:
        assert point["hashes_per_second"] > 0
        assert 0 < point["ratio_to_ceiling"] < 1
        assert point["cpu_seconds_per_million"] > 0
        assert {"redis", "rng", "hasher", "webui", "worker.1"} <= set(point["processes"])
        assert all(p["peak_rss_mb"] > 0 for p in point["processes"].values())
    # Batching pays: 100 hashes per message beats one per message by far.
    one, hundred = report["pipeline"]
    assert hundred["hashes_per_second"] > 5 * one["hashes_per_second"]

    for service in ("rng", "hasher"):
        latency = report["latency_overhead"][service]
        assert latency["calls"] == 5 and latency["errors"] == 0
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"]
    timing = report["stage_timing"]
    assert timing["windows"] == 1 and timing["hashes"]["on"] > 0 < timing["hashes"]["off"]
    assert timing["worker_cpu_seconds_per_million"]["on"] > 0
    assert "stage timing (batch 1000" in result.stdout
    assert report["soak"]["restarts"] == 0
    assert report["soak"]["hashes"] > 0
    assert set(report["soak"]["rss_mb"]) >= {"rng", "hasher", "worker.1"}
