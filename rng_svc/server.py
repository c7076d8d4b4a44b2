"""Build and run the rng gRPC server."""

import logging

from dockercoins.grpcserver import GrpcServer
from dockercoins.metrics import start_metrics_endpoint
from dockercoins.tls import server_credentials
from dockercoins.v1 import rng_pb2_grpc
from rng_svc.config import SERVICE_NAME, RngSettings
from rng_svc.metrics import watch_source
from rng_svc.service import BlockingRng, BufferedRng, RandomSource, RngServicer, SlowEntropySource

log = logging.getLogger(__name__)


def build_source(settings: RngSettings) -> BlockingRng | BufferedRng:
    """The random source for the configured mode (call inside the running loop)."""
    entropy = SlowEntropySource(settings.rng_read_cost)
    if settings.rng_mode == "blocking":
        return BlockingRng(entropy)
    buffered = BufferedRng(entropy, settings.rng_block_size, settings.rng_buffer_size)
    buffered.start()
    return buffered


def build_server(settings: RngSettings, source: RandomSource) -> GrpcServer:
    """An rng server bound to the configured address, not yet started."""
    server = GrpcServer("rng", [SERVICE_NAME], settings)
    rng_pb2_grpc.add_RngServicer_to_server(
        RngServicer(source, settings.rng_max_request, settings.request_latency, settings.rng_mode),
        server.server,
    )
    server.bind(
        settings.host, settings.rng_port, "DOCKERCOINS_RNG_PORT", server_credentials(settings)
    )
    return server


async def serve(settings: RngSettings) -> None:
    """Run rng until SIGTERM or SIGINT."""
    source = build_source(settings)
    server = build_server(settings, source)
    metrics = start_metrics_endpoint(settings.host, settings.metrics_port)
    if metrics is not None:
        watch_source(source)
    log.info(
        "rng listening on %s:%d (mode %s, read cost %.3f s, %.3f s per request)",
        settings.host,
        server.port,
        settings.rng_mode,
        settings.rng_read_cost,
        settings.request_latency,
    )
    await server.serve_until_signalled(settings.grace, on_stop=source.close)
