"""`dockercoins experiment`: scale workers and rng, measure the honest rate, compare with the model.

One code path drives every backend: for each point of the sweep it sets the rng
mode and replicas, scales the workers, waits until that many workers are really
mining, waits a warm-up, then samples the `hashes` counter (timestamped by Redis
`TIME`) over a window and fits a least-squares slope with its standard error
(`dockercoins.rate`). A backend only decides how to scale and where to read:
`LocalBackend` runs the stack as local processes, `KubectlBackend` runs
`kubectl scale` and reads the web UI's `/json`.
"""

import asyncio
import contextlib
import csv
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TextIO

from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins.rate import Rate, Sample, fit_slope
from dockercoins.redis_store import connect
from dockercoins.service_main import exit_status
from dockercoins.settings import SettingsT, env_name, load_settings
from dockercoins_tools.cost_model import PROFILES, Costs, expected_rate
from dockercoins_tools.procstat import cpu_seconds, machine_busy_cpu

log = logging.getLogger(__name__)

MODES = ("blocking", "buffered")
DEFAULT_WORKERS = (1, 2, 3, 5, 10)


class ExperimentError(DockercoinsError):
    """The experiment could not scale, read or wait as it needed to."""


@dataclass(frozen=True, order=True)
class Point:
    """One point of the sweep: rng mode, rng processes, worker processes."""

    mode: str
    rng_replicas: int
    workers: int

    def label(self) -> str:
        return f"{self.mode} rng={self.rng_replicas} workers={self.workers}"


def parse_point(text: str) -> Point:
    """`blocking:worker=10:rng=2` (rng defaults to 1) as a Point."""
    mode, *parts = text.split(":")
    counts = {"worker": 0, "rng": 1}
    for part in parts:
        name, _, number = part.partition("=")
        if name not in counts or not number.isdigit() or int(number) < 1:
            raise ConfigError(f"expected MODE:worker=N[:rng=K], got {text!r}")
        counts[name] = int(number)
    if mode not in MODES or not counts["worker"]:
        raise ConfigError(f"expected MODE:worker=N[:rng=K] with MODE in {MODES}, got {text!r}")
    return Point(mode, counts["rng"], counts["worker"])


def plan(
    modes: Sequence[str],
    workers: Sequence[int],
    rng_replicas: Sequence[int] = (1,),
    extra: Sequence[Point] = (),
) -> list[Point]:
    """Every point, grouped so that rng changes as rarely as possible: modes in the given
    order, then rng replicas ascending, then workers ascending."""
    points = {Point(m, k, n) for m in modes for k in rng_replicas for n in workers}
    points.update(extra)
    order = {mode: index for index, mode in enumerate(modes)}
    return sorted(
        points, key=lambda p: (order.get(p.mode, len(order)), p.mode, p.rng_replicas, p.workers)
    )


@dataclass(frozen=True)
class Timing:
    """How long to wait and to measure at each point, in seconds."""

    warmup: float = 5.0
    window: float = 20.0
    sample_interval: float = 0.25
    ready_timeout: float = 60.0


@dataclass
class Measurement:
    """The measured rate at one point, the model's, and what the measuring machine was doing."""

    point: Point
    rate: float
    stderr: float
    samples: int
    span: float
    expected: float
    redis_time: float
    ready_seconds: float
    stack_cpu: float | None = None
    machine_cpu: float | None = None

    def row(self) -> dict[str, Any]:
        """A flat dict for JSON and CSV."""
        data = asdict(self)
        data.update(asdict(self.point))
        del data["point"]
        return data


CSV_FIELDS = (
    "mode",
    "rng_replicas",
    "workers",
    "rate",
    "stderr",
    "expected",
    "samples",
    "span",
    "redis_time",
    "ready_seconds",
    "stack_cpu",
    "machine_cpu",
)


class Backend(Protocol):
    """How to scale and where to read: the only part that differs between backends."""

    name: str

    async def start(self) -> None: ...

    async def deployed_costs(self) -> "Costs | None":
        """The costs the stack already runs with (a cluster's), or None: it runs the given ones."""

    async def configure(self, mode: str, rng_replicas: int) -> None:
        """Run rng in `mode` with `rng_replicas` processes (workers may restart)."""

    async def scale_workers(self, count: int) -> None: ...

    async def running_workers(self) -> int:
        """Workers that are alive and announcing themselves (their heartbeat in Redis)."""

    async def read(self) -> Sample:
        """The `hashes` counter, timestamped by Redis `TIME`."""

    def cpu_seconds(self) -> tuple[float, float] | None:
        """CPU seconds used so far by the stack's processes, and by the whole machine."""

    async def close(self) -> None: ...


# -- local backend -------------------------------------------------------------------------


class LocalBackend:
    """The stack as local processes (the launcher's `Stack`), restarted when rng's mode changes."""

    name = "local"

    def __init__(self, costs: Costs, log_out: TextIO) -> None:
        self.costs = costs
        self.log_out = log_out
        self.stack: Any = None
        self.redis: Any = None
        self._data_dir: Path | None = None

    async def start(self) -> None:
        return None

    async def deployed_costs(self) -> Costs | None:
        return None

    async def configure(self, mode: str, rng_replicas: int) -> None:
        if self.stack is not None and self.stack.settings.rng_mode == mode:
            if len(self.stack.rngs) != rng_replicas:
                await self.stack.scale("rng", rng_replicas)
            return
        await self._stop_stack()
        await self._start_stack(mode, rng_replicas)

    async def _start_stack(self, mode: str, rng_replicas: int) -> None:
        from dockercoins_tools.launcher.stack import Stack

        self._data_dir = Path(tempfile.mkdtemp(prefix="dockercoins-experiment-"))
        self.log_out.write(f"--- stack: rng mode {mode}, {rng_replicas} rng ---\n")
        self.stack = Stack.on_free_ports(
            self._data_dir,
            self.log_out,
            self.costs.env(),
            workers=0,
            rng_mode=mode,
            rng_replicas=rng_replicas,
        )
        try:
            await self.stack.start()
        except BaseException:
            await self._stop_stack()
            raise
        self.redis = connect(self.stack.redis_url, 5.0)

    async def _stop_stack(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.stack is not None:
            await self.stack.stop()
            self.stack = None
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    async def scale_workers(self, count: int) -> None:
        await self.stack.scale("worker", count)

    async def running_workers(self) -> int:
        from dockercoins.redis_store import mining_workers

        alive = sum(1 for worker in self.stack.workers if worker.running)
        return min(alive, await mining_workers(self.redis))

    async def read(self) -> Sample:
        from dockercoins.redis_store import read_totals

        totals = await read_totals(self.redis)
        return Sample(totals.now, totals.hashes)

    def cpu_seconds(self) -> tuple[float, float] | None:
        if self.stack is None:
            return None
        used = sum(cpu_seconds(pid) for pid in self.stack.pids().values())
        return used, machine_busy_cpu()

    async def close(self) -> None:
        await self._stop_stack()


# -- kubectl backend -----------------------------------------------------------------------


def settings_of_container(
    cls: type[SettingsT], env: dict[str, str], fields: Sequence[str]
) -> SettingsT:
    """`cls` as a container with this environment gets it (this process's environment aside)."""

    class FromContainer(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: Any, init_settings: Any, **_: Any
        ) -> tuple[Any, ...]:
            return (init_settings,)

    given = {field: env[env_name(field)] for field in fields if env_name(field) in env}
    settings: SettingsT = load_settings(FromContainer, **given)
    return settings


def costs_of_containers(envs: dict[str, dict[str, str]]) -> Costs:
    """The simulated costs of rng, hasher and worker containers with these environments."""
    from hasher_svc.config import HasherSettings
    from rng_svc.config import RngSettings
    from worker_svc.config import WorkerSettings

    rng = settings_of_container(
        RngSettings, envs["rng"], ("profile", "rng_read_cost", "rng_latency")
    )
    hasher = settings_of_container(HasherSettings, envs["hasher"], ("profile", "hasher_latency"))
    worker = settings_of_container(
        WorkerSettings,
        envs["worker"],
        ("profile", "worker_think_time", "worker_flush_interval"),
    )
    return Costs(
        rng_read_cost=rng.rng_read_cost,
        hasher_latency=hasher.hasher_latency,
        worker_think_time=worker.worker_think_time,
        worker_flush_interval=worker.worker_flush_interval,
        rng_latency=rng.rng_latency,
        profile=worker.profile,
    )


class KubectlBackend:
    """A cluster: `kubectl scale deployment/worker`, the counter from the web UI's `/json`.

    The costs of the model are the cluster's own (its containers' DOCKERCOINS_* variables), and
    every change of rng restarts the workers, so that none keeps a connection to an old rng.
    """

    name = "kubectl"

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        context: str | None = None,
        kubectl: str = "kubectl",
        timeout: float = 120.0,
        rng_workload: str = "deployment/rng",
    ) -> None:
        kind, _, name = rng_workload.partition("/")
        if kind not in ("deployment", "daemonset") or not name:
            raise ConfigError(
                f"--rng-workload: expected deployment/NAME or daemonset/NAME, got {rng_workload!r}"
            )
        self.rng_workload = rng_workload
        self.url = url.rstrip("/")
        self.namespace = namespace
        self.context = context
        self.kubectl = kubectl
        self.timeout = timeout
        self.commands: list[list[str]] = []

    async def run(self, *args: str) -> str:
        """Run kubectl with these arguments in the namespace (and context); its output."""
        argv = [self.kubectl, *args, "-n", self.namespace]
        if self.context:
            argv += ["--context", self.context]
        self.commands.append(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise ExperimentError(f"{self.kubectl}: not found on PATH") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:  # an OSError too on 3.11: said here, not taken for a network error
            raise ExperimentError(
                f"`{' '.join(argv)}` gave no answer within {self.timeout:g} s"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: no kubectl left behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode:
            detail = (err or out).decode(errors="replace").strip().splitlines()
            raise ExperimentError(
                f"`{' '.join(argv)}` failed ({proc.returncode}): {detail[-1] if detail else ''}"
            )
        return out.decode(errors="replace")

    async def start(self) -> None:
        await self._json()  # fail early, with the URL in the message, if the web UI is not there

    async def deployed_costs(self) -> Costs:
        envs = {}
        for service, workload in (
            ("rng", self.rng_workload),
            ("hasher", "deployment/hasher"),
            ("worker", "deployment/worker"),
        ):
            try:
                spec = json.loads(await self.run("get", workload, "-o", "json"))
                containers = spec["spec"]["template"]["spec"]["containers"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ExperimentError(f"{workload}: no pod template in its JSON ({exc})") from None
            (container,) = [c for c in containers if c["name"] == service] or containers[:1]
            envs[service] = {
                e["name"]: e["value"] for e in container.get("env", []) if "value" in e
            }
        try:
            return costs_of_containers(envs)
        except ConfigError as exc:
            raise ExperimentError(f"the cluster's settings: {exc}") from None

    async def configure(self, mode: str, rng_replicas: int) -> None:
        # `set env` to the value it already has changes nothing and restarts nothing.
        rng = self.rng_workload
        await self.run("set", "env", rng, f"{env_name('rng_mode')}={mode}")
        if rng.startswith("deployment/"):
            await self.run("scale", rng, f"--replicas={rng_replicas}")
        # A DaemonSet runs one rng per node (the course's fix): nothing to scale; give the
        # node count as --rng-replicas so that the model expects the right ceiling.
        await self.run("rollout", "status", rng, f"--timeout={self.timeout:.0f}s")
        # Workers would keep their connections to the old rng pods until the servers'
        # connection age ends them: new workers resolve the new ones at once.
        await self.run("rollout", "restart", "deployment/worker")
        await self.run("rollout", "status", "deployment/worker", f"--timeout={self.timeout:.0f}s")

    async def scale_workers(self, count: int) -> None:
        await self.run("scale", "deployment/worker", f"--replicas={count}")

    async def _json(self) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            with urllib.request.urlopen(self.url + "/json", timeout=5) as reply:
                data: dict[str, Any] = json.loads(reply.read())
                return data

        try:
            return await asyncio.to_thread(fetch)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ExperimentError(f"cannot read {self.url}/json: {exc}") from None

    async def running_workers(self) -> int:
        return int((await self._json()).get("workers") or 0)

    async def read(self) -> Sample:
        data = await self._json()
        return Sample(float(data["now"]), float(data["hashes"]))

    def cpu_seconds(self) -> tuple[float, float] | None:
        return None

    async def close(self) -> None:
        return None


# -- the experiment ------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Report:
    """The live table (one row per point as it is measured) and a progress line on a terminal."""

    HEADER = (
        f"{'#':>5}  {'mode':<8} {'rng':>3} {'workers':>7} {'h/s':>8} {'±':>6} "
        f"{'model':>7} {'ratio':>6} {'cpu':>5}"
    )

    def __init__(self, out: TextIO, total: int, per_point: float) -> None:
        self.out = out
        self.total = total
        self.per_point = per_point
        self.started = time.monotonic()
        self.live = out.isatty()
        self._status = False

    def header(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.write(self.HEADER + "\n")
        self.out.flush()

    def progress(self, index: int, point: Point, phase: str, left_here: float = 0.0) -> None:
        """`[3/11] blocking rng=1 workers=3: measuring, 12 s left (9.8 h/s so far); all: ~4 min`."""
        if not self.live:
            return
        left = (self.total - index) * self.per_point + max(left_here, 0)
        text = f"[{index}/{self.total}] {point.label()}: {phase}; all done in ~{_duration(left)}"
        self.out.write("\r\x1b[K" + text)
        self.out.flush()
        self._status = True

    def row(self, index: int, m: Measurement) -> None:
        if self._status:
            self.out.write("\r\x1b[K")
            self._status = False
        ratio = m.rate / m.expected if m.expected else float("nan")
        cpu = f"{m.stack_cpu:.2f}" if m.stack_cpu is not None else "-"
        self.out.write(
            f"{index:>2}/{self.total:<2}  {m.point.mode:<8} {m.point.rng_replicas:>3} "
            f"{m.point.workers:>7} {m.rate:>8.2f} {m.stderr:>6.2f} {m.expected:>7.2f} "
            f"{ratio:>6.2f} {cpu:>5}\n"
        )
        self.out.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


async def _wait_for_workers(backend: Backend, count: int, limit: float, tick: Any) -> float:
    """Wait until exactly `count` workers are alive and announcing; seconds it took."""
    started = time.monotonic()
    while True:
        running = await backend.running_workers()
        if running == count:
            return time.monotonic() - started
        waited = time.monotonic() - started
        if waited > limit:
            raise ExperimentError(
                f"{running} workers running instead of {count} after {limit:.0f} s"
            )
        tick(running)
        await asyncio.sleep(0.2)


async def measure_point(
    backend: Backend,
    point: Point,
    costs: Costs,
    timing: Timing,
    report: Report,
    index: int,
) -> Measurement:
    """Scale, wait for the workers, warm up, then fit the rate over the window."""
    await backend.scale_workers(point.workers)
    ready = await _wait_for_workers(
        backend,
        point.workers,
        timing.ready_timeout,
        lambda running: report.progress(
            index,
            point,
            f"waiting for workers ({running} of {point.workers} running)",
            timing.warmup + timing.window,
        ),
    )
    warm_until = time.monotonic() + timing.warmup
    while (left := warm_until - time.monotonic()) > 0:
        report.progress(index, point, f"warming up, {left:.0f} s left", left + timing.window)
        await asyncio.sleep(min(left, 0.5))
    cpu_before = backend.cpu_seconds()
    samples: list[Sample] = []
    started = time.monotonic()
    next_at = started
    while True:
        samples.append(await backend.read())
        elapsed = time.monotonic() - started
        if elapsed >= timing.window:
            break
        so_far = fit_slope(samples)
        phase = f"measuring, {timing.window - elapsed:.0f} s left"
        if so_far:
            phase += f" ({so_far.per_second:.1f} h/s so far)"
        report.progress(index, point, phase, timing.window - elapsed)
        next_at += timing.sample_interval
        await asyncio.sleep(max(next_at - time.monotonic(), 0))
    cpu_after = backend.cpu_seconds()
    wall = time.monotonic() - started
    rate: Rate | None = fit_slope(samples)
    if rate is None:
        raise ExperimentError(f"{point.label()}: too few readings of the counter")
    stack_cpu = machine_cpu = None
    if cpu_before is not None and cpu_after is not None and wall > 0:
        stack_cpu = (cpu_after[0] - cpu_before[0]) / wall
        machine_cpu = (cpu_after[1] - cpu_before[1]) / wall
    return Measurement(
        point=point,
        rate=rate.per_second,
        stderr=rate.stderr,
        samples=rate.samples,
        span=rate.span,
        expected=expected_rate(point.mode, point.workers, point.rng_replicas, costs),
        redis_time=samples[0].time,
        ready_seconds=ready,
        stack_cpu=stack_cpu,
        machine_cpu=machine_cpu,
    )


@dataclass
class Experiment:
    """What to sweep and how; `run` measures every point and writes the result files."""

    backend: Backend
    points: list[Point]
    costs: Costs
    timing: Timing
    output: Path
    profile: str = "classic"
    command: str = ""
    results: list[Measurement] = field(default_factory=list)
    started_at: float = 0.0
    duration: float = 0.0

    async def run(self, out: TextIO) -> list[Measurement]:
        """Measure every point in order, printing the table and writing files as it goes."""
        self.output.mkdir(parents=True, exist_ok=True)
        await self.backend.start()
        self.costs = await self.backend.deployed_costs() or self.costs
        per_point = self.timing.warmup + self.timing.window + 2 * self.costs.worker_flush_interval
        report = Report(out, len(self.points), per_point)
        c = self.costs
        report.header(
            [
                f"dockercoins experiment: {len(self.points)} points, backend {self.backend.name}, "
                f"profile {self.profile}",
                f"costs: rng read {c.rng_read_cost} s, hasher {c.hasher_latency} s, "
                f"think {c.worker_think_time} s, flush every {c.worker_flush_interval} s; "
                f"warm-up {self.timing.warmup} s, window {self.timing.window} s",
                f"results in {self.output}/",
            ]
        )
        self.started_at = time.time()
        try:
            current: tuple[str, int] | None = None
            for index, point in enumerate(self.points, 1):
                if current != (point.mode, point.rng_replicas):
                    report.progress(index, point, f"starting rng ({point.mode})", per_point)
                    await self.backend.configure(point.mode, point.rng_replicas)
                    current = (point.mode, point.rng_replicas)
                measured = await measure_point(
                    self.backend, point, self.costs, self.timing, report, index
                )
                self.results.append(measured)
                report.row(index, measured)
                self.duration = report.elapsed()
                self.write_files(charts=False)
        finally:
            with contextlib.suppress(Exception):
                await self.backend.close()
            self.duration = report.elapsed()
            if self.results:
                self.write_files(charts=True)
        out.write(f"done in {self.duration / 60:.1f} min: {', '.join(self.files())}\n")
        out.flush()
        return self.results

    def files(self) -> list[str]:
        return [str(self.output / f"experiment.{ext}") for ext in ("json", "csv", "png")]

    def as_json(self) -> dict[str, Any]:
        """Everything needed to read the results again without this run."""
        return {
            "command": self.command,
            "backend": self.backend.name,
            "profile": self.profile,
            "costs": asdict(self.costs),
            "timing": asdict(self.timing),
            "started_at": self.started_at,
            "duration_seconds": round(self.duration, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "model": {
                "blocking": "min(workers / (think + max(rng request, read) + hasher), "
                "rng_replicas / read)",
                "buffered": "workers / (think + rng request + hasher)",
            },
            "points": [m.row() for m in self.results],
        }

    def write_files(self, charts: bool) -> None:
        """experiment.json and experiment.csv now; experiment.png too with `charts`."""
        data = self.as_json()
        (self.output / "experiment.json").write_text(json.dumps(data, indent=2) + "\n")
        with (self.output / "experiment.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in data["points"]:
                writer.writerow(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                )
        if charts:
            try:
                from dockercoins_tools.chart import draw_experiment

                draw_experiment(data, self.output / "experiment.png")
            except ImportError:
                log.warning(
                    "no chart: matplotlib is not installed "
                    "(pip install 'dockercoins-grpc[experiment]'); JSON and CSV are written"
                )


def costs_from(profile: str, **overrides: float | None) -> Costs:
    """The profile's costs with single costs overridden (None: keep the profile's)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    given: dict[str, Any] = {name: value for name, value in overrides.items() if value is not None}
    for name, value in given.items():
        if value < 0 or (name == "worker_flush_interval" and value <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return replace(PROFILES[profile], **given)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it again."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["dockercoins", *(shlex.quote(a) for a in args)])


def _numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"expected numbers >= 1 separated by commas, got {text!r}")
    return values


def add_arguments(parser: Any) -> None:
    """The flags of `dockercoins experiment`."""
    sweep = parser.add_argument_group("the sweep")
    sweep.add_argument("--modes", default=",".join(MODES), help="rng modes (default: %(default)s)")
    sweep.add_argument(
        "--workers",
        default=",".join(map(str, DEFAULT_WORKERS)),
        help="worker counts (default: %(default)s)",
    )
    sweep.add_argument("--rng-replicas", default="1", help="rng process counts (default: 1)")
    sweep.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="MODE:worker=N[:rng=K]",
        help="one more point, e.g. blocking:worker=10:rng=2 (repeatable)",
    )
    costs = parser.add_argument_group("costs (local; kubectl reads the cluster's own settings)")
    costs.add_argument(
        "--profile", default="classic", choices=sorted(PROFILES), help="named set of costs"
    )
    for dest, (flag, meaning) in COST_FLAGS.items():
        costs.add_argument(flag, type=float, dest=dest, help=meaning)
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=float, default=Timing.warmup, help="s (default 5)")
    timing.add_argument("--window", type=float, default=Timing.window, help="s (default 20)")
    timing.add_argument("--sample-interval", type=float, default=Timing.sample_interval)
    timing.add_argument("--ready-timeout", type=float, default=Timing.ready_timeout)
    parser.add_argument("--output", "-o", default="experiment-results", help="result directory")
    parser.add_argument("--backend", choices=["local", "kubectl"], default="local")
    cluster = parser.add_argument_group("kubectl backend")
    cluster.add_argument("--url", help="the web UI's URL (its /json is read)")
    cluster.add_argument("--namespace", "-n", default="dockercoins", help="(default: %(default)s)")
    cluster.add_argument("--context", help="kubectl context (default: the current one)")
    cluster.add_argument("--kubectl", default="kubectl", help="the kubectl executable")
    cluster.add_argument(
        "--rng-workload",
        default="deployment/rng",
        help="deployment/rng (scaled to --rng-replicas) or daemonset/rng (one per node, "
        "the daemonset overlay)",
    )


COST_FLAGS = {
    "rng_read_cost": ("--read-cost", "rng read, s"),
    "rng_latency": ("--rng-latency", "rng time per request, s"),
    "hasher_latency": ("--hasher-latency", "s"),
    "worker_think_time": ("--think-time", "s"),
    "worker_flush_interval": ("--flush-interval", "s"),
}
"""The flags that override single costs of the profile: Costs field -> (flag, help)."""


def run(options: dict[str, Any], argv: Sequence[str] | None = None) -> int:
    """`dockercoins experiment` from parsed options; exit status."""
    given = [name for name in COST_FLAGS if options.get(name) is not None]
    if options["backend"] == "kubectl" and given:
        flags = ", ".join(COST_FLAGS[name][0] for name in given)
        raise ConfigError(f"--backend kubectl reads the costs from the cluster; drop {flags}")
    costs = costs_from(options["profile"], **{name: options.get(name) for name in COST_FLAGS})
    modes = [m.strip() for m in options["modes"].split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes: expected some of {', '.join(MODES)}, got {options['modes']!r}")
    points = plan(
        modes,
        _numbers(options["workers"]),
        _numbers(options["rng_replicas"]),
        [parse_point(text) for text in options["extra"]],
    )
    timing = Timing(
        options["warmup"], options["window"], options["sample_interval"], options["ready_timeout"]
    )
    if timing.window < 2 * timing.sample_interval or timing.warmup < 0:
        raise ConfigError("--window must hold at least two samples and --warmup be >= 0")
    output = Path(options["output"])
    output.mkdir(parents=True, exist_ok=True)
    backend: Backend
    with contextlib.ExitStack() as closing:
        if options["backend"] == "kubectl":
            if not options.get("url"):
                raise ConfigError("--backend kubectl needs --url, the web UI's address")
            backend = KubectlBackend(
                options["url"],
                options["namespace"],
                options.get("context"),
                options["kubectl"],
                rng_workload=options["rng_workload"],
            )
        else:
            log_out = closing.enter_context((output / "experiment.log").open("w"))
            backend = LocalBackend(costs, log_out)
        experiment = Experiment(
            backend, points, costs, timing, output, options["profile"], command_line(argv)
        )

        def measure() -> None:
            asyncio.run(experiment.run(sys.stdout))

        return exit_status("dockercoins experiment", measure, progress=True)
