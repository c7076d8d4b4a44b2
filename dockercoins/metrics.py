"""Prometheus metrics every service shares: per-method gRPC server metrics, the latency buckets,
exporting a collector, /metrics. Each service defines its own metrics in its `metrics.py`."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.registry import Collector

from dockercoins.net import ensure_free
from dockercoins.settings import env_name

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
"""Seconds; from the turbo profile's sub-millisecond calls to the classic rng queue's seconds."""

# The names and labels of go-grpc-prometheus, so existing dashboards work unchanged.
_SERVER_LABELS = ("grpc_type", "grpc_service", "grpc_method")
SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _SERVER_LABELS)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status code.",
    (*_SERVER_LABELS, "grpc_code"),
)
SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Seconds from the start of an RPC to its end, on the server.",
    _SERVER_LABELS,
    buckets=LATENCY_BUCKETS,
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Stream messages received by the server.", _SERVER_LABELS
)
SERVER_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Stream messages sent by the server.", _SERVER_LABELS
)


class CallMetrics:
    """One call's metrics: started at once; handled, timed and its messages counted after."""

    __slots__ = ("labels", "received", "sent", "started_at")

    def __init__(self, rpc_type: str, service: str, method: str) -> None:
        self.labels = (rpc_type, service, method)
        SERVER_STARTED.labels(*self.labels).inc()
        self.received = SERVER_MSG_RECEIVED.labels(*self.labels)
        self.sent = SERVER_MSG_SENT.labels(*self.labels)
        self.started_at = time.perf_counter()

    @contextlib.contextmanager
    def measured(self, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Count the call as handled, with its status code, and time it, however it ends."""
        failed: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if isinstance(failed, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = _code_of(context) or (
                    grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
                )
            SERVER_HANDLED.labels(*self.labels, code.name).inc()
            SERVER_HANDLING_SECONDS.labels(*self.labels).observe(
                time.perf_counter() - self.started_at
            )


def _code_of(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:  # older grpcio return the raw integer
        if status.value[0] == code:
            return status
    return None


def export(collector: Collector, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Register `collector` (read at every scrape); returns the function that unregisters it."""
    registry.register(collector)
    return lambda: registry.unregister(collector)


class MetricsEndpoint:
    """The HTTP server of /metrics, in a thread of its own (prometheus-client's)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def start_metrics_endpoint(
    host: str, port: int, setting: str = env_name("metrics_port")
) -> MetricsEndpoint | None:
    """Serve /metrics on host:port; None when `port` is 0 (off). A busy port: PortInUseError."""
    if not port:
        return None
    ensure_free(setting, host, port)
    endpoint = MetricsEndpoint(host, port)
    log.info("metrics on http://%s:%d/metrics", host, endpoint.port)
    return endpoint
