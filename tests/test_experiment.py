"""`dockercoins experiment`: the sweep's shape on real processes; the kubectl backend's commands."""

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from dockercoins.errors import ConfigError
from dockercoins.settings import env_name
from dockercoins_tools.cost_model import expected_rate, profile_costs
from dockercoins_tools.experiment.backends import ExperimentError
from dockercoins_tools.experiment.kubectl import KubectlBackend
from dockercoins_tools.experiment.plan import Point, parse_point, plan
from tests.stack import FAST_COSTS, RunningStack, alive
from tests.support import run_cli, service_env

SCALED_COSTS = (
    "--read-cost", "0.04", "--hasher-latency", "0.02", "--think-time", "0.02",
    "--flush-interval", "0.25",
)  # fmt: skip
"""rng's read cost is half a unit's loop, so one worker asks half the plateau and buffered's four
ask twice it. At half these costs, beside the first phase of make test (both cores busy),
buffered's four workers made 57 h/s of their 100: the stack's CPU, not rng, was their limit, and
they came to 1.26 times the plateau."""
WARMUP, WINDOW = 0.5, 3.0
"""Seconds of each point's warm-up and window: with these costs a point settles in a fraction of
a second and 3 s hold about 75 hashes at the plateau."""
PLATEAU = 1 / 0.04
"""Requests per second one blocking rng serves with a read cost of 0.04 s."""


def test_the_model_gives_the_lesson_numbers() -> None:
    classic = profile_costs("classic")
    blocking = [expected_rate("blocking", n, 1, classic) for n in (1, 2, 3, 5, 10)]
    assert blocking == pytest.approx([10 / 3, 20 / 3, 10, 10, 10])
    assert expected_rate("blocking", 10, 2, classic) == pytest.approx(20)
    buffered = [expected_rate("buffered", n, 1, classic) for n in (1, 2, 3, 5, 10)]
    assert buffered == pytest.approx([10 / 3, 20 / 3, 10, 50 / 3, 100 / 3])


def test_the_plan_changes_rng_as_rarely_as_possible() -> None:
    points = plan(["blocking", "buffered"], [3, 1], [1], [parse_point("blocking:worker=10:rng=2")])
    assert points == [
        Point("blocking", 1, 1),
        Point("blocking", 1, 3),
        Point("blocking", 2, 10),
        Point("buffered", 1, 1),
        Point("buffered", 1, 3),
    ]


@pytest.mark.slow
def test_a_wrong_point_or_mode_is_one_line_and_status_2(tmp_path: Path) -> None:
    for args in (["--extra", "blocking:workers=x"], ["--modes", "fast"], ["--workers", "0"]):
        result = run_cli("experiment", "--output", str(tmp_path), *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("dockercoins experiment: ")
        assert len(result.stderr.strip().splitlines()) == 1


def _by_point(data: dict) -> dict[tuple[str, int, int], float]:
    return {(p["mode"], p["rng_replicas"], p["workers"]): p["rate"] for p in data["points"]}


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.light
def test_local_sweep_blocking_plateaus_buffered_grows_two_rng_double(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = run_cli(
        "experiment",
        "--workers",
        "1,4",
        "--extra",
        "blocking:worker=8",
        "--extra",
        "blocking:worker=8:rng=2",
        *SCALED_COSTS,
        "--warmup",
        str(WARMUP),
        "--window",
        str(WINDOW),
        "--output",
        str(out),
        timeout=150,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The live table: a header, then one row per point as it is measured.
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s*\d+/6 ", line)]
    assert len(rows) == 6, result.stdout
    assert re.search(r"^\s*#\s+mode\s+rng\s+workers\s+h/s", result.stdout, re.M)

    data = json.loads((out / "experiment.json").read_text())
    rate = _by_point(data)
    # Blocking: the plateau is one rng's 1 / read cost whatever the number of workers.
    for workers in (4, 8):
        assert 0.6 * PLATEAU < rate["blocking", 1, workers] < 1.15 * PLATEAU, rate
    assert 0.75 < rate["blocking", 1, 8] / rate["blocking", 1, 4] < 1.3, rate
    assert rate["blocking", 1, 1] < 0.75 * rate["blocking", 1, 4], rate
    # Two rng processes double the plateau.
    assert rate["blocking", 2, 8] > 1.6 * rate["blocking", 1, 8], rate
    # Buffered grows with the workers, past the blocking plateau.
    assert rate["buffered", 1, 4] > 2.5 * rate["buffered", 1, 1], rate
    assert rate["buffered", 1, 4] > 1.5 * rate["blocking", 1, 4], rate
    for point in data["points"]:
        # A sample every 0.25 s over the window, Redis's time from the first to the last.
        assert point["samples"] >= WINDOW / 0.25 - 1 and point["span"] >= WINDOW - 0.5
        assert 0 <= point["stderr"] < 0.2 * point["rate"]
        assert point["stack_cpu"] > 0

    with (out / "experiment.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["mode"], r["workers"]) for r in table][:3] == [
        ("blocking", "1"), ("blocking", "4"), ("blocking", "8"),
    ]  # fmt: skip
    assert (out / "experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["costs"]["rng_read_cost"] == 0.04
    assert data["command"].startswith("dockercoins experiment --workers 1,4")


STAND_IN = """#!{python}
import json, os, subprocess, sys
with open({log!r}, "a") as record:
    record.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
args = sys.argv[1:]
if args[:1] == ["get"] and "json" in args:
    # The pod template of a workload, with the costs the local stack runs with.
    service = args[1].split("/")[1]
    env = [{{"name": k, "value": v}} for k, v in {costs!r}.items()]
    containers = [{{"name": service, "env": env}}]
    print(json.dumps({{"spec": {{"template": {{"spec": {{"containers": containers}}}}}}}}))
if args[:1] == ["scale"]:
    service = {{"deployment/worker": "worker", "deployment/rng": "rng"}}[args[1]]
    replicas = [a.split("=", 1)[1] for a in args if a.startswith("--replicas=")][0]
    env = dict(os.environ, DOCKERCOINS_DATA_DIR={data_dir!r})
    command = [sys.executable, "-m", "dockercoins_tools", "scale", f"{{service}}={{replicas}}"]
    sys.exit(subprocess.run(command, env=env).returncode)
"""


def _stand_in_kubectl(tmp_path: Path, data_dir: Path) -> tuple[Path, Path]:
    """A `kubectl` that records its command line and scales the local stack for real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "kubectl.log"
    script = bin_dir / "kubectl"
    # The costs of tests.stack.RunningStack, as the kubectl test starts it.
    costs = {env_name(k): str(v) for k, v in {**FAST_COSTS, "worker_flush_interval": 0.25}.items()}
    script.write_text(
        STAND_IN.format(python=sys.executable, log=str(log), data_dir=str(data_dir), costs=costs)
    )
    script.chmod(0o755)
    return bin_dir, log


def _commands(log: Path) -> list[str]:
    return [" ".join(json.loads(line)) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_kubectl_backend_scales_with_kubectl_and_reads_the_web_ui(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    stack = RunningStack(data_dir, ("--workers", "1"), worker_flush_interval=0.25)
    try:
        url = stack.ready()
        bin_dir, log = _stand_in_kubectl(tmp_path, data_dir)
        env = service_env()
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        result = run_cli(
            "experiment",
            "--backend",
            "kubectl",
            "--url",
            url,
            "-n",
            "dockercoins",
            "--modes",
            "blocking",
            "--workers",
            "1,3",
            "--warmup",
            "1",
            "--window",
            "3",
            "--output",
            str(tmp_path / "out"),
            env=env,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert _commands(log) == [
            "kubectl get deployment/rng -o json -n dockercoins",
            "kubectl get deployment/hasher -o json -n dockercoins",
            "kubectl get deployment/worker -o json -n dockercoins",
            "kubectl set env deployment/rng DOCKERCOINS_RNG_MODE=blocking -n dockercoins",
            "kubectl scale deployment/rng --replicas=1 -n dockercoins",
            "kubectl rollout status deployment/rng --timeout=120s -n dockercoins",
            "kubectl rollout restart deployment/worker -n dockercoins",
            "kubectl rollout status deployment/worker --timeout=120s -n dockercoins",
            "kubectl scale deployment/worker --replicas=1 -n dockercoins",
            "kubectl scale deployment/worker --replicas=3 -n dockercoins",
        ]
        # The stand-in really scaled: 3 workers run (plus redis, rng, hasher, webui).
        assert len(stack.children()) == 7
        data = json.loads((tmp_path / "out" / "experiment.json").read_text())
        assert data["backend"] == "kubectl"
        # The model's costs are the cluster's, read from its workloads, not the defaults.
        assert data["costs"]["rng_read_cost"] == FAST_COSTS["rng_read_cost"]
        assert data["costs"]["worker_flush_interval"] == 0.25
        rate = _by_point(data)
        assert rate["blocking", 1, 3] > 1.5 * rate["blocking", 1, 1] > 0, rate
    finally:
        stack.kill()


@pytest.mark.slow
async def test_kubectl_backend_names_the_context_and_reports_a_failing_kubectl(
    tmp_path: Path,
) -> None:
    bin_dir, log = _stand_in_kubectl(tmp_path, tmp_path / "no-stack")
    backend = KubectlBackend(
        "http://127.0.0.1:9", "ns1", context="kind-lab", kubectl=str(bin_dir / "kubectl")
    )
    await backend.run("get", "deployment/worker")
    assert _commands(log) == ["kubectl get deployment/worker -n ns1 --context kind-lab"]
    with pytest.raises(ExperimentError, match=r"^cannot read http://127\.0\.0\.1:9/json: "):
        await backend.start()
    missing = KubectlBackend("http://127.0.0.1:9", kubectl=str(tmp_path / "nowhere"))
    with pytest.raises(ExperimentError) as raised:
        await missing.scale_workers(2)
    assert str(raised.value) == f"{tmp_path / 'nowhere'}: not found on PATH"


@pytest.mark.slow
async def test_a_kubectl_that_hangs_is_killed_and_said_not_a_traceback(tmp_path: Path) -> None:
    """kubectl waiting on a cluster that does not answer: the experiment stops with one line
    (a TimeoutError, an OSError on 3.11, used to escape as a traceback) and no kubectl is left."""
    pid_file = tmp_path / "kubectl.pid"
    script = tmp_path / "kubectl"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    script.chmod(0o755)
    backend = KubectlBackend("http://127.0.0.1:9", "ns1", kubectl=str(script), timeout=0.5)
    with pytest.raises(ExperimentError, match=r"`.*kubectl get deployment/worker -n ns1` gave no"):
        await backend.run("get", "deployment/worker")
    assert not alive(int(pid_file.read_text())), "the hung kubectl was left running"


@pytest.mark.slow
async def test_kubectl_backend_leaves_a_daemonset_rng_unscaled(tmp_path: Path) -> None:
    bin_dir, log = _stand_in_kubectl(tmp_path, tmp_path / "no-stack")
    backend = KubectlBackend(
        "http://127.0.0.1:9", "ns1", kubectl=str(bin_dir / "kubectl"), rng_workload="daemonset/rng"
    )
    await backend.configure("buffered", 3)
    assert _commands(log) == [
        "kubectl set env daemonset/rng DOCKERCOINS_RNG_MODE=buffered -n ns1",
        "kubectl rollout status daemonset/rng --timeout=120s -n ns1",
        "kubectl rollout restart deployment/worker -n ns1",
        "kubectl rollout status deployment/worker --timeout=120s -n ns1",
    ]
    with pytest.raises(ConfigError, match="--rng-workload"):
        KubectlBackend("http://127.0.0.1:9", rng_workload="statefulset/rng")


@pytest.mark.slow
def test_kubectl_backend_refuses_cost_flags_it_would_not_use(tmp_path: Path) -> None:
    result = run_cli(
        "experiment", "--backend", "kubectl", "--url", "http://127.0.0.1:9",
        "--read-cost", "0.02", "--output", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "dockercoins experiment: --backend kubectl reads the costs from the cluster; "
        "drop --read-cost\n"
    )


def test_the_documented_run_is_the_one_in_its_files() -> None:
    from tests.support import ROOT

    data = json.loads((ROOT / "docs/experiment/experiment.json").read_text())
    page = (ROOT / "docs/experiment.md").read_text()
    assert f"\n{data['command']}\n" in page
    assert f"{data['duration_seconds']} s" in page
    for index, point in enumerate(data["points"], 1):
        row = (
            f"{index:>2}/{len(data['points']):<2}  {point['mode']:<8} {point['rng_replicas']:>3} "
            f"{point['workers']:>7} {point['rate']:>8.2f} {point['stderr']:>6.2f}"
        )
        assert row in page, row
    with (ROOT / "docs/experiment/experiment.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(data["points"])
    assert (ROOT / "docs/experiment/experiment.png").read_bytes()[:4] == b"\x89PNG"
