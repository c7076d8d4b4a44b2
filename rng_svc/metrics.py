"""rng's metrics: its entropy source and buffer, read at scrape time."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dockercoins.metrics import export
from rng_svc.service import BlockingRng, BufferedRng


class RngSourceCollector(Collector):
    """rng's source as Prometheus sees it: reads of the entropy source; in buffered mode the
    buffer's level and capacity, its refills and underruns."""

    def __init__(self, source: BlockingRng | BufferedRng) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "dockercoins_rng_entropy_reads",
            "Reads of the slow entropy source.",
            value=self.source.source.reads,
        )
        if not isinstance(self.source, BufferedRng):
            return  # blocking mode: no buffer
        yield GaugeMetricFamily(
            "dockercoins_rng_buffer_bytes",
            "Random bytes in the buffer now.",
            value=self.source.level,
        )
        yield GaugeMetricFamily(
            "dockercoins_rng_buffer_capacity_bytes",
            "Random bytes the buffer holds at most.",
            value=self.source.buffer_size,
        )
        yield CounterMetricFamily(
            "dockercoins_rng_refills",
            "Blocks the producer read from the source into the buffer.",
            value=self.source.refills,
        )
        yield CounterMetricFamily(
            "dockercoins_rng_underruns",
            "Requests that found the buffer too empty and had to wait.",
            value=self.source.underruns,
        )


def watch_source(
    source: BlockingRng | BufferedRng, registry: CollectorRegistry = REGISTRY
) -> Callable[[], None]:
    """Export `source`'s metrics; returns the function that stops exporting them."""
    return export(RngSourceCollector(source), registry)
