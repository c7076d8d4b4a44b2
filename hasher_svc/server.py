"""Build and run the hasher gRPC server."""

import logging

from dockercoins.grpcserver import GrpcServer
from dockercoins.metrics import start_metrics_endpoint
from dockercoins.tls import server_credentials
from dockercoins.v1 import hasher_pb2_grpc
from hasher_svc.config import SERVICE_NAME, HasherSettings
from hasher_svc.service import REQUEST_FRAMING, HasherServicer

log = logging.getLogger(__name__)


def build_server(settings: HasherSettings) -> GrpcServer:
    """A hasher server bound to the configured address, not yet started."""
    server = GrpcServer(
        "hasher",
        [SERVICE_NAME],
        settings,
        settings.hasher_max_request + REQUEST_FRAMING,
    )
    servicer = HasherServicer(settings)
    hasher_pb2_grpc.add_HasherServicer_to_server(servicer, server.server)
    server.bind(
        settings.host,
        settings.hasher_port,
        "DOCKERCOINS_HASHER_PORT",
        server_credentials(settings),
    )
    return server


async def serve(settings: HasherSettings) -> None:
    """Run hasher until SIGTERM or SIGINT."""
    server = build_server(settings)
    start_metrics_endpoint(settings.host, settings.metrics_port)
    log.info(
        "hasher listening on %s:%d (latency %.3f s)",
        settings.host,
        server.port,
        settings.hasher_latency,
    )
    await server.serve_until_signalled(settings.grace)
