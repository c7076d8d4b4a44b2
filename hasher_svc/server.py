"""Build and run the hasher gRPC server."""

import logging
from functools import partial

from dockercoins.grpcserver import GrpcServer, build_service_server, serve_service
from dockercoins.native import choose_hash_path, describe_hash_path
from dockercoins.v1 import hasher_pb2_grpc
from dockercoins.wire import MESSAGE_FRAMING
from hasher_svc.config import SERVICE_NAME, HasherSettings
from hasher_svc.metrics import watch_path
from hasher_svc.service import HasherServicer

log = logging.getLogger(__name__)


def build_server(settings: HasherSettings) -> GrpcServer:
    """A hasher server bound to the configured address, not yet started."""
    add = partial(hasher_pb2_grpc.add_HasherServicer_to_server, HasherServicer(settings))
    max_receive = settings.hasher_max_request + MESSAGE_FRAMING
    return build_service_server("hasher", SERVICE_NAME, settings, "hasher_port", add, max_receive)


async def serve(settings: HasherSettings) -> None:
    """Run hasher until a stop signal (SIGTERM, SIGINT, SIGHUP)."""
    server = build_server(settings)
    path = choose_hash_path(settings.hasher_native)  # the servicer's
    if settings.metrics_port:
        watch_path(path)
    details = f"latency {settings.hasher_latency:.3f} s, {describe_hash_path(path)}"
    await serve_service(server, settings, log, details)
