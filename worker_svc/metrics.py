"""The worker's metrics: its failed and timed calls, and its totals read from its ledger."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dockercoins.metrics import LATENCY_BUCKETS, export
from worker_svc.ledger import Ledger

WORKER_ERRORS = Counter(
    "dockercoins_worker_errors_total",
    "Failed calls to an upstream, by upstream and status (gRPC code or Redis error class).",
    ("upstream", "code"),
)
WORKER_RPC_SECONDS = Histogram(
    "dockercoins_worker_rpc_seconds",
    "Seconds of every successful call the worker makes to rng and hasher.",
    ("upstream",),
    buckets=LATENCY_BUCKETS,
)


class LedgerCollector(Collector):
    """A worker's totals as Prometheus sees them, read from its ledger at scrape time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "dockercoins_worker_hashes", "Hashes this worker computed.", self.ledger.total_hashes
        )
        yield CounterMetricFamily(
            "dockercoins_worker_coins", "Coins this worker found.", self.ledger.total_coins
        )


def watch_ledger(ledger: Ledger, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Export a worker's totals; returns the function that stops exporting them."""
    return export(LedgerCollector(ledger), registry)
