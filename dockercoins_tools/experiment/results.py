"""The experiment's results: one measurement per point, written as JSON, CSV and a chart."""

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dockercoins_tools.experiment.plan import Point

log = logging.getLogger(__name__)


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


def result_files(output: Path) -> list[str]:
    """The files `write_results` writes in `output`."""
    return [str(output / f"experiment.{ext}") for ext in ("json", "csv", "png")]


def write_results(output: Path, data: dict[str, Any], charts: bool) -> None:
    """experiment.json and experiment.csv of `data` (`Experiment.as_json`); experiment.png too
    with `charts`."""
    (output / "experiment.json").write_text(json.dumps(data, indent=2) + "\n")
    with (output / "experiment.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in data["points"]:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if charts:
        try:
            from dockercoins_tools.chart import draw_experiment

            draw_experiment(data, output / "experiment.png")
        except ImportError:
            log.warning(
                "no chart: matplotlib is not installed "
                "(pip install 'dockercoins-grpc[experiment]'); JSON and CSV are written"
            )
