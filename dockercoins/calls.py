"""The server interceptor: every call's budget, in total and per client address (one for the
application's calls, one for health and reflection), an end to calls that wait on their client
too long, a request the servicer refuses (`RequestError`) answered with its status code and, with
metrics on, every call counted and timed.

grpcio's own `maximum_concurrent_rpcs` is not used: it counts every call together and refuses
before any interceptor runs, so that one client holding streams made every other client's
health Check fail. Here each method's handler is wrapped once into one that reads its requests
itself (`context.read()`, a request stream whatever the method's kind), so that it runs from the
call's first byte: a call holds its place from then until its last reply and status are sent,
and a wait on its client is visible to the watch.
"""

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any
from urllib.parse import unquote

import grpc

from dockercoins.errors import RequestError
from dockercoins.metrics import CallMetrics
from dockercoins.settings import CallBoundSettings, GrpcServerSettings, env_name

log = logging.getLogger(__name__)

IDLE_SETTING = env_name("call_idle_timeout")


def peer_address(peer: str) -> str:
    """The client's address in a gRPC peer string, without its port: `ipv4:10.0.0.7:51234` ->
    `10.0.0.7`, `ipv6:%5B2001:db8::7%5D:51234` -> `2001:db8::7` (an IPv4-mapped one as the
    IPv4 address); any other (`unix:/path`, where every client is local) whole."""
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return rest.rpartition(":")[0]
    if scheme == "ipv6":
        host = unquote(rest).rpartition(":")[0].strip("[]")
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        return str(address.ipv4_mapped or address)
    return peer


class Budget:
    """Calls of one kind in flight: at most `limit` in all, `per_peer` from one address.

    A call holds its place from its start to its end (a stream until it closes, however it
    closes); one that finds no place is refused at once. Calls taken with `in_total=False`
    count against their address's share only (a health Check: never refused for others' calls).
    """

    __slots__ = ("by_peer", "in_use", "limit", "limit_setting", "peer_setting", "per_peer", "what")

    def __init__(
        self, what: str, limit: int, limit_setting: str, per_peer: int, peer_setting: str
    ) -> None:
        self.what = what
        self.limit, self.limit_setting = limit, limit_setting
        self.per_peer, self.peer_setting = per_peer, peer_setting
        self.in_use = 0
        self.by_peer: dict[str, int] = {}

    def take(self, address: str, in_total: bool = True) -> str | None:
        """A place for a call from `address`; None if taken, else why it is refused."""
        held = self.by_peer.get(address, 0)
        if held >= self.per_peer:
            return (
                f"{address} has {held} {self.what} in flight, the most {self.peer_setting} "
                "allows one address: retry later"
            )
        if in_total:
            if self.in_use >= self.limit:
                return (
                    f"{self.in_use} {self.what} in flight, the most {self.limit_setting} "
                    "allows: retry later"
                )
            self.in_use += 1
        self.by_peer[address] = held + 1
        return None

    def give(self, address: str, in_total: bool = True) -> None:
        """Give back the place a call from `address` took."""
        if in_total:
            self.in_use -= 1
        held = self.by_peer[address] - 1
        if held:
            self.by_peer[address] = held
        else:
            del self.by_peer[address]


class Call:
    """One call in flight: its client's address, its task, since when it waits on its client
    (0.0: it does not) and whether the watch ended it for that."""

    __slots__ = ("address", "idle", "task", "waiting_since")

    def __init__(self, address: str, task: "asyncio.Task[Any] | None") -> None:
        self.address = address
        self.task = task
        self.waiting_since = 0.0
        self.idle = False


class IdleWatch:
    """The calls in flight; ends, within 1.25 x `timeout`, each that waited on its client for
    `timeout` seconds: a stream with no next request, a reply its client does not read."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.calls: set[Call] = set()

    async def run(self) -> None:
        """Look every quarter of the timeout, until cancelled."""
        while True:
            await asyncio.sleep(self.timeout / 4)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """End every call that has waited on its client since `timeout` before `now`."""
        for call in self.calls:
            since = call.waiting_since
            if since and now - since >= self.timeout and not call.idle and call.task:
                call.idle = True
                call.task.cancel()


class TrackedContext:
    """A call's servicer context whose reads and writes note when the call waits on its client
    and count its stream messages on `received` and `sent` (None: not counted); `address` is
    the client's address the call's budget counts it under; everything else passes through."""

    def __init__(
        self, context: grpc.aio.ServicerContext, call: Call, received: Any, sent: Any
    ) -> None:
        self._context = context
        self._call = call
        self._received = received
        self._sent = sent
        self.address = call.address

    async def request(self) -> Any:
        """The one request of a unary-request call; None if the client sent none."""
        call = self._call
        call.waiting_since = time.monotonic()
        request = await self._context.read()
        call.waiting_since = 0.0
        return None if request is grpc.aio.EOF else request

    async def requests(self) -> AsyncIterator[Any]:
        """The client's requests, until it closes its side."""
        read, call, received, clock = self._context.read, self._call, self._received, time.monotonic
        while True:
            call.waiting_since = clock()
            request = await read()
            call.waiting_since = 0.0
            if request is grpc.aio.EOF:
                return
            if received is not None:
                received.inc()
            yield request

    async def write(self, reply: Any) -> None:
        """Send one reply, waiting for room (HTTP/2 flow control) as long as the watch allows."""
        call = self._call
        call.waiting_since = time.monotonic()
        await self._context.write(reply)
        call.waiting_since = 0.0
        if self._sent is not None:
            self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The address of a call's client, as its budget counts it: read from the interceptor's
    context (parsed once per call), or from the peer string of a context that did not come
    through it."""
    if isinstance(context, TrackedContext):
        return context.address
    return peer_address(context.peer())


def _wrap(
    behavior: Callable[..., Any],
    labels: tuple[str, str, str],
    streaming: tuple[bool, bool],
    budget: Budget,
    in_total: bool,
    watch: IdleWatch,
    metered: bool,
) -> Callable[..., Any]:
    """`behavior` as a handler that reads its requests itself (a request stream, whatever the
    method's kind, so that it runs from the call's first byte): the call holds a place in
    `budget` until it has ended, its last reply and status sent; it is ended (UNAVAILABLE)
    when `watch` finds it waited on its client too long; a RequestError that `behavior`
    raises ends it with the error's status code and message; when `metered`, it is counted and
    timed.

    A refused call is counted too, with its code. A streaming handler either yields its
    replies or writes them with `context.write()` (rng's StreamRandom, the health service's
    Watch): both go through the same write. A unary reply goes back to gRPC, which sends it
    with the status in one batch.
    """
    streaming_in, streaming_out = streaming
    yields = inspect.isasyncgenfunction(behavior)

    async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics = CallMetrics(*labels) if metered else None
        with metrics.measured(context) if metrics is not None else contextlib.nullcontext():
            call = Call(peer_address(context.peer()), asyncio.current_task())
            refused = budget.take(call.address, in_total)
            if refused is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            watch.calls.add(call)
            # Given back once gRPC has sent the last reply and the status too: a reply its
            # client does not read keeps the call's place.
            context.add_done_callback(lambda _: _release(call, budget, in_total, watch))
            tracked = TrackedContext(
                context,
                call,
                metrics.received if metrics is not None and streaming_in else None,
                metrics.sent if metrics is not None and streaming_out else None,
            )
            try:
                if streaming_in:
                    request: Any = tracked.requests()
                else:
                    request = await tracked.request()
                    if request is None:
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT, "a unary call needs its request"
                        )
                if not yields:
                    return await behavior(request, tracked)
                async for reply in behavior(request, tracked):
                    await tracked.write(reply)
                return None
            except RequestError as exc:
                await context.abort(exc.code, str(exc))
            except asyncio.CancelledError:
                if not call.idle:
                    raise
                if call.task is not None:
                    call.task.uncancel()
                log.info(
                    "ended a %s call from %s: it waited on its client for %g s (%s)",
                    labels[2],
                    call.address,
                    watch.timeout,
                    IDLE_SETTING,
                )
                # Its status follows the replies already queued: a client that never reads
                # them keeps the call, and its place, until its connection ends.
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the call waited on its client for {watch.timeout:g} s, the most "
                    f"{IDLE_SETTING} allows: ended, open a new one",
                )

    return handle


def _release(call: Call, budget: Budget, in_total: bool, watch: IdleWatch) -> None:
    watch.calls.discard(call)
    budget.give(call.address, in_total)


class CallBudgets:
    """The budgets of one server: the application's calls, health and reflection calls."""

    def __init__(self, app: GrpcServerSettings, probes: CallBoundSettings) -> None:
        self.app = Budget(
            "calls",
            app.max_concurrent_rpcs,
            env_name("max_concurrent_rpcs"),
            app.max_peer_rpcs,
            env_name("max_peer_rpcs"),
        )
        self.probes = Budget(
            "health and reflection calls",
            probes.max_probe_streams,
            env_name("max_probe_streams"),
            probes.max_peer_probe_calls,
            env_name("max_peer_probe_calls"),
        )
        self.watch = IdleWatch(probes.call_idle_timeout)


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Gives every call a place in its budget (the calls of `app_services` in `budgets.app`,
    every other in `budgets.probes`, a unary one there per address only), watches it for
    waits on its client and, when `metered`, counts and times it by method and status code."""

    def __init__(self, app_services: Collection[str], budgets: CallBudgets, metered: bool) -> None:
        self.app_services = frozenset(app_services)
        self.budgets = budgets
        self.metered = metered
        # method -> (its handler, that handler wrapped): wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        known = self._wrapped.get(full)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap_handler(handler, full)
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, full: str) -> grpc.RpcMethodHandler:
        _, service, method = full.rsplit("/", 2) if full.count("/") >= 2 else ("", "", full)
        streaming = (handler.request_streaming, handler.response_streaming)
        kinds = (
            (handler.unary_unary, "unary"),
            (handler.unary_stream, "server_stream"),
            (handler.stream_unary, "client_stream"),
            (handler.stream_stream, "bidi_stream"),
        )
        behavior, rpc_type = next((b, kind) for b, kind in kinds if b)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"{full}: only grpc.aio (async) handlers can be bounded")
        if service in self.app_services:
            budget, in_total = self.budgets.app, True
        else:
            budget, in_total = self.budgets.probes, any(streaming)
        labels = (rpc_type, service, method)
        wrapped = _wrap(
            behavior, labels, streaming, budget, in_total, self.budgets.watch, self.metered
        )
        make = (
            grpc.stream_stream_rpc_method_handler
            if streaming[1]
            else grpc.stream_unary_rpc_method_handler
        )
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
