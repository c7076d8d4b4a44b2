"""The experiment's terminal report: a live table, one row per point, and a progress line."""

import time
from collections.abc import Sequence
from typing import TextIO

from dockercoins_tools.experiment.plan import Point
from dockercoins_tools.experiment.results import Measurement


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
