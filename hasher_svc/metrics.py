"""hasher's metrics: which SHA-256 path runs."""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import InfoMetricFamily
from prometheus_client.registry import Collector

from dockercoins.metrics import export
from dockercoins.native import HashPath, describe_hash_path


class HashPathCollector(Collector):
    """The hasher's path as Prometheus sees it: `dockercoins_hasher_path_info{path=...} 1`."""

    def __init__(self, path: HashPath) -> None:
        self.path = path

    def collect(self) -> Iterator[Any]:
        yield InfoMetricFamily(
            "dockercoins_hasher_path",
            "Which batch SHA-256 the hasher runs: native (one C call per batch) or hashlib.",
            value={"path": self.path, "detail": describe_hash_path(self.path)},
        )


def watch_path(path: HashPath, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Export the hasher's path; returns the function that stops exporting it."""
    return export(HashPathCollector(path), registry)
