"""Build and run the rng gRPC server."""

import logging
from functools import partial

from dockercoins.grpcserver import GrpcServer, build_service_server, serve_service
from dockercoins.native import random_function
from dockercoins.v1 import rng_pb2_grpc
from rng_svc.config import SERVICE_NAME, RngSettings
from rng_svc.metrics import watch_source
from rng_svc.service import BlockingRng, BufferedRng, RandomSource, RngServicer, SlowEntropySource

log = logging.getLogger(__name__)


def build_source(settings: RngSettings) -> BlockingRng | BufferedRng:
    """The random source for the configured mode and generator (call inside the running loop)."""
    _, generate = random_function(settings.rng_generator)
    entropy = SlowEntropySource(settings.rng_read_cost, generate)
    if settings.rng_mode == "blocking":
        return BlockingRng(entropy)
    buffered = BufferedRng(
        entropy, settings.rng_block_size, settings.rng_buffer_size, settings.max_work_in_progress
    )
    buffered.start()
    return buffered


def build_server(settings: RngSettings, source: RandomSource) -> GrpcServer:
    """An rng server bound to the configured address, not yet started."""
    servicer = RngServicer(
        source,
        settings.rng_max_request,
        settings.request_latency,
        settings.rng_mode,
        settings.rng_log_requests,
    )
    add = partial(rng_pb2_grpc.add_RngServicer_to_server, servicer)
    return build_service_server("rng", SERVICE_NAME, settings, "rng_port", add)


async def serve(settings: RngSettings) -> None:
    """Run rng until a stop signal (SIGTERM, SIGINT, SIGHUP)."""
    source = build_source(settings)
    server = build_server(settings, source)
    if settings.metrics_port:
        watch_source(source)
    generator, _ = random_function(settings.rng_generator)
    built = "" if generator == settings.rng_generator else " (the native extension is not built)"
    details = (
        f"mode {settings.rng_mode}, generator {generator}{built}, "
        f"read cost {settings.rng_read_cost:.3f} s, "
        f"{settings.request_latency:.3f} s per request"
    )
    await serve_service(server, settings, log, details, on_stop=source.close)
