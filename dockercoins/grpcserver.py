"""What every DockerCoins gRPC server shares: binding, health, reflection and graceful shutdown."""

import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dockercoins.errors import PortInUseError
from dockercoins.lifecycle import stop_event_on_signals
from dockercoins.net import ensure_free
from dockercoins.reflection import enable_reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 80 << 20
BASE_OPTIONS: Sequence[tuple[str, int]] = (
    # Off, or a second server on a busy port starts silently and steals connections.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


class GrpcServer:
    """A grpc.aio server with health and reflection, bound to one address."""

    def __init__(
        self,
        name: str,
        service_names: Sequence[str],
        max_connection_age: float = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.name = name
        self.service_names = list(service_names)
        options = list(BASE_OPTIONS)
        if max_connection_age:
            age_ms = int(max_connection_age * 1000)
            options += [
                ("grpc.max_connection_age_ms", age_ms),
                ("grpc.max_connection_age_grace_ms", age_ms),
            ]
        self.server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, [*self.service_names, health.SERVICE_NAME])
        self.port = 0

    def bind(
        self,
        host: str,
        port: int,
        setting: str,
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """Listen on host:port (port 0: any free one), over TLS with `credentials`.

        A busy port raises PortInUseError.
        """
        if port:
            ensure_free(setting, host, port)  # before gRPC core logs its own error
        address = f"{host}:{port}"
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise PortInUseError(setting, host, port)
        return self.port

    async def start(self) -> None:
        """Start serving and report SERVING for the server and each service."""
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then let in-flight calls finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def serve_until_signalled(
        self, grace: float, on_stop: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully and run `on_stop`."""
        stop = stop_event_on_signals()
        await self.start()
        await stop.wait()
        log.info("%s stopping (grace %.1f s)", self.name, grace)
        await self.stop(grace)
        if on_stop is not None:
            await on_stop()
        log.info("%s stopped", self.name)
