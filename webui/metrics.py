"""The web UI's metrics: its door (streams held, clients refused or dropped), and the workers'
stage times and rng modes, read from its monitor at scrape time (the same figures as /json's
`latency`, `latency_share` and `rng_modes`)."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dockercoins.metrics import export
from webui.monitor import SpeedMonitor

WEBUI_STREAMS = Gauge("dockercoins_webui_streams", "Live /events streams (open pages).")
WEBUI_REFUSED = Counter(
    "dockercoins_webui_refused_total",
    "Clients turned away, by bound: streams-per-client (429), streams (503), "
    "connections-per-client (reset at once).",
    ("reason",),
)
WEBUI_DROPPED = Counter(
    "dockercoins_webui_dropped_total",
    "Connections ended by the web UI, by reason: stopped-reading (the write timeout), "
    "no-request (no complete request in time).",
    ("reason",),
)
WEBUI_RENEWED = Counter(
    "dockercoins_webui_streams_renewed_total",
    "/events streams ended at their lifetime (the page reconnects where it left off).",
)


class StageCollector(Collector):
    """The web UI's view of the workers' stage times and rng modes."""

    def __init__(self, monitor: SpeedMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        merged = self.monitor.stages
        latency = GaugeMetricFamily(
            "dockercoins_stage_latency_seconds",
            "Seconds a unit of work spends in each stage (think, rng, hasher, redis), p50 and "
            "p99 over every live worker's recent units.",
            labels=("stage", "quantile"),
        )
        share = GaugeMetricFamily(
            "dockercoins_stage_share",
            "Share of a unit of work's time each stage takes, over every live worker.",
            labels=("stage",),
        )
        if merged is not None:
            for stage, figures in merged["latency"].items():
                for name, quantile in (("p50", "0.5"), ("p99", "0.99")):
                    if figures[name] is not None:
                        latency.add_metric((stage, quantile), figures[name])
                if merged["share"][stage] is not None:
                    share.add_metric((stage,), merged["share"][stage])
        yield latency
        yield share
        modes = GaugeMetricFamily(
            "dockercoins_rng_mode_workers",
            "Live workers whose rng named this mode lately.",
            labels=("mode",),
        )
        for mode, workers in self.monitor.rng_modes.items():
            modes.add_metric((mode,), workers)
        yield modes


def watch_stages(
    monitor: SpeedMonitor, registry: CollectorRegistry = REGISTRY
) -> Callable[[], None]:
    """Export a web UI monitor's stage times; returns the function that stops exporting them."""
    return export(StageCollector(monitor), registry)
