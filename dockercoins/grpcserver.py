"""What every DockerCoins gRPC server shares: binding, health, reflection and graceful shutdown."""

import array
import asyncio
import contextlib
import fcntl
import functools
import logging
import socket
import termios
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dockercoins.calls import CallBudgets, CallInterceptor
from dockercoins.errors import PortInUseError
from dockercoins.lifecycle import stop_event_on_signals
from dockercoins.metrics import start_metrics_endpoint
from dockercoins.net import ensure_free, host_port
from dockercoins.reflection import enable_reflection
from dockercoins.settings import CallBoundSettings, GrpcServerSettings, TlsSettings, env_name
from dockercoins.tls import server_credentials
from dockercoins.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


SMALL_REQUEST_BYTES = 4096
"""Receive limit of a server whose requests are all small: rng's (at most 33 bytes), health
checks and reflection requests."""


async def write_or_gone(context: grpc.aio.ServicerContext, reply: object, method: str) -> bool:
    """Write one reply of a server stream; False if the client has gone.

    A write fails once the client went away (killed, or a worker stopping cancels its
    stream): nobody is left to answer, so the handler ends quietly, where a handler that
    yields its replies would have grpcio log an `ExecuteBatchError` traceback.
    """
    try:
        await context.write(reply)
    except Exception as exc:  # grpcio raises a private ExecuteBatchError here
        log.debug("%s ended by its client: %s", method, type(exc).__name__)
        return False
    return True


def take_wakeups_at_once(loop: asyncio.AbstractEventLoop) -> bool:
    """Make grpc.aio on `loop` take all its completion queue's pending wake-ups at once; False
    if its reader is not found (a grpcio whose insides differ: nothing is changed).

    grpc.aio's poller thread takes each event of gRPC core's completion queue (a message read or
    written, a call arrived), queues it and writes one byte to a socket the loop reads; its
    reader (`PollerCompletionQueue._handle_events`) reads one byte and handles every event
    queued. Under a steady stream of events (hundreds of busy streams) the bytes pile up faster
    than one per pass of the loop until the socket is full; from then on the poller thread
    blocks on each write and events reach the loop one per pass, in order: a health Check's
    request waits behind an event of every busy stream (40-150 ms with 256 streams reading rng
    as fast as they can, the poller thread blocked in write() in 99 % of py-spy's samples).
    Here the reader counts the pending bytes, runs as before, and only once it has returned
    reads the others counted, so that the poller never blocks: their events were queued before
    their bytes, so that call handled them, and every byte written after the count wakes the loop
    again. If the call raises (grpc.aio hands an event to its event loop, and a loop closed
    since raises RuntimeError: seen when one process runs loop after loop, as tests do), nothing
    more is read: each byte left wakes the loop to handle the rest. Reading them first, as this
    did at first, lost those wake-ups, and a server's stop waited forever on an event queued.
    """
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return False
    for key in list(selector.get_map().values()):
        reader = key.data[0] if isinstance(key.data, tuple) else None
        handle = getattr(reader, "_callback", None)
        if getattr(handle, "takes_all_wakeups", False):
            return True  # done already, by another server of this loop
        method = handle.func if isinstance(handle, functools.partial) else handle
        if (
            callable(handle)
            and getattr(method, "__name__", "") == "_handle_events"
            and isinstance(key.fileobj, socket.socket)
        ):
            loop.remove_reader(key.fd)
            loop.add_reader(key.fileobj, _all_wakeups_then(handle, key.fileobj))
            return True
    return False


def _all_wakeups_then(handle: Callable[[], object], wakeups: socket.socket) -> Callable[[], None]:
    pending = array.array("i", [0])

    def take_all_but_one() -> None:
        fcntl.ioctl(wakeups.fileno(), termios.FIONREAD, pending)
        handle()  # reads one byte, handles every event queued; if it raises, the rest stay
        if pending[0] > 1:
            with contextlib.suppress(BlockingIOError):  # another loop's reader took them
                wakeups.recv(pending[0] - 1, socket.MSG_DONTWAIT)

    take_all_but_one.takes_all_wakeups = True  # type: ignore[attr-defined]
    return take_all_but_one


BASE_OPTIONS: Sequence[tuple[str, int]] = (
    # Off, or a second server on a busy port starts silently and steals connections.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients may keep a connection alive with pings, calls or not (the worker pings every
    # 10 s at most): allowed down to `min_ping_interval`, strikes beyond. The server's own
    # keepalive pings go to connections without calls too.
    ("grpc.keepalive_permit_without_calls", 1),
    # As the clients (channels.py): without it, window growth lets a client that sends large
    # requests and reads nothing park tens of megabytes per stream here (51 MB measured);
    # dockercoins_tools.sizing's bound on a server's memory counts on it.
    ("grpc.http2.bdp_probe", 0),
)


def server_options(settings: GrpcServerSettings, max_receive: int) -> list[tuple[str, int]]:
    """gRPC core options of a server: its bounds from `settings`, its receive limit in bytes."""
    options = [
        *BASE_OPTIONS,
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval * 1000)),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
        # The server pings a client silent for `keepalive_time` (with or without calls, see
        # BASE_OPTIONS) and drops it when no answer comes in `keepalive_timeout`: a paused or
        # vanished client gives back its connection and its calls' slots. Clients never
        # police a server's pings; servers send them at most every keepalive_time / 2.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout * 1000)),
    ]
    if settings.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", int(settings.max_connection_idle * 1000)))
    if settings.max_connection_age:
        age_ms = int(settings.max_connection_age * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", age_ms),
        ]
    return options


class GrpcServer:
    """A grpc.aio server with health and reflection, bound to one address.

    Its bounds (concurrent calls, streams per connection, keepalive policy, idle and
    connection age) come from `settings`, the defaults when None; `max_receive` is the
    largest request message it accepts, in bytes: gRPC refuses larger ones with
    RESOURCE_EXHAUSTED from the message's length prefix, before reading it.

    Every call has a place in a budget, in total and per client address (`calls.py`): the
    calls of `service_names` in the application's (`settings.max_concurrent_rpcs`,
    `max_peer_rpcs`), health and reflection in their own (`calls`: `max_probe_streams`,
    `max_peer_probe_calls`; `settings` when None), so that neither starves the other and a
    health Check is refused only for its own address's calls. A call that waits on its
    client longer than `calls.call_idle_timeout` is ended.
    """

    def __init__(
        self,
        name: str,
        service_names: Sequence[str],
        settings: GrpcServerSettings | None = None,
        max_receive: int = SMALL_REQUEST_BYTES,
        calls: CallBoundSettings | None = None,
    ) -> None:
        self.name = name
        self.service_names = list(service_names)
        if settings is None:
            settings = GrpcServerSettings.model_construct()  # the defaults, no environment
        options = server_options(settings, max(max_receive, SMALL_REQUEST_BYTES))
        self.budgets = CallBudgets(settings, settings if calls is None else calls)
        interceptor = CallInterceptor(self.service_names, self.budgets, bool(settings.metrics_port))
        self.server = grpc.aio.server(options=options, interceptors=[interceptor])
        self._idle_watch: asyncio.Task[None] | None = None
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
        address = host_port(host, port)
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

    def listen(self, settings: TlsSettings, port_field: str) -> int:
        """Listen on DOCKERCOINS_HOST and the port of the field `port_field` of `settings`, over
        TLS when they name a certificate; a busy port raises PortInUseError naming its variable."""
        port = getattr(settings, port_field)
        return self.bind(settings.host, port, env_name(port_field), server_credentials(settings))

    async def start(self, serving: bool = True) -> None:
        """Start serving and the watch on idle calls; report SERVING for the server and each
        service unless `serving` is False (the caller reports its own statuses)."""
        await self.server.start()
        if not take_wakeups_at_once(asyncio.get_running_loop()):
            log.debug("grpc.aio's completion queue reader not found: its wake-ups left as they are")
        self._idle_watch = asyncio.create_task(self.budgets.watch.run(), name="idle-calls")
        if serving:
            for name in ("", *self.service_names):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, then let in-flight calls finish for up to `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_watch

    async def serve_until_signalled(
        self,
        grace: float,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        """Take the stop signals, start, run `on_start` (the start line), run until a stop
        signal, then stop gracefully and run `on_stop`. A signal that follows the start line
        always finds the handler: logged before it, a fast SIGTERM killed the process (-15)."""
        stop = stop_event_on_signals()
        await self.start()
        if on_start is not None:
            on_start()
        await stop.wait()
        log.info("%s stopping (grace %.1f s)", self.name, grace)
        await self.stop(grace)
        if on_stop is not None:
            await on_stop()
        log.info("%s stopped", self.name)


def build_service_server(
    name: str,
    service_name: str,
    settings: GrpcServerSettings,
    port_field: str,
    add_servicer: Callable[[grpc.aio.Server], Any],
    max_receive: int = SMALL_REQUEST_BYTES,
) -> GrpcServer:
    """The server of one gRPC service, bound as `settings` say, not yet started.

    `add_servicer` adds the service's servicer to the grpc.aio server (a generated
    `add_..._to_server`); `port_field` names the settings field of its port.
    """
    server = GrpcServer(name, [service_name], settings, max_receive)
    add_servicer(server.server)
    server.listen(settings, port_field)
    return server


async def serve_service(
    server: GrpcServer,
    settings: GrpcServerSettings,
    service_log: logging.Logger,
    details: str,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start /metrics (when DOCKERCOINS_METRICS_PORT is set) and the server; once it serves and
    takes stop signals, say on the service's own log where it listens, with `details`; serve
    until a stop signal (then `on_stop`)."""
    start_metrics_endpoint(settings.host, settings.metrics_port)

    def say_where() -> None:
        service_log.info(
            "%s listening on %s:%d (%s)", server.name, settings.host, server.port, details
        )

    await server.serve_until_signalled(settings.grace, on_stop, say_where)
