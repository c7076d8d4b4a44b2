"""The server interceptor: one wrapper per call that bounds the application's calls in flight
and, with metrics on, counts and times every call."""

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from dockercoins.metrics import CallMetrics, CountingContext
from dockercoins.settings import env_name

BOUND_SETTING = env_name("max_concurrent_rpcs")


class CallSlots:
    """The application's calls in flight, at most `limit`.

    A call holds its slot from its start to its end (a stream until it closes, however it
    closes); a call that finds none free is refused RESOURCE_EXHAUSTED at once.
    """

    __slots__ = ("in_use", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    @contextlib.asynccontextmanager
    async def held(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """A slot for the body; none free: abort the call with RESOURCE_EXHAUSTED."""
        if self.in_use >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.in_use} calls in flight, the most {BOUND_SETTING} allows: retry later",
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1


def _split_method(full: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    _, service, method = full.rsplit("/", 2) if full.count("/") >= 2 else ("", "", full)
    return service, method


def _wrap(
    behavior: Callable[..., Any],
    labels: tuple[str, str, str],
    streaming: tuple[bool, bool],
    slots: CallSlots | None,
    metered: bool,
) -> Callable[..., Any]:
    """`behavior` holding a slot of `slots` (None: unbounded) for the call's whole life and,
    when `metered`, with the call counted and timed and its stream messages counted.

    A refused call is counted too, with its code. A streaming handler either yields its
    replies or writes them with `context.write()` (rng's StreamRandom, the health service's
    Watch): both are counted.
    """
    streaming_in, streaming_out = streaming

    def begin(request: Any, context: Any) -> tuple[CallMetrics | None, Any, Any]:
        if not metered:
            return None, request, context
        call = CallMetrics(*labels)
        if streaming_in:
            request = call.count_received(request)
        if streaming_out:
            context = CountingContext(context, call.sent)
        return call, request, context

    def measured(call: CallMetrics | None, context: Any) -> contextlib.AbstractContextManager[Any]:
        return call.measured(context) if call is not None else contextlib.nullcontext()

    def held(context: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        return slots.held(context) if slots is not None else contextlib.nullcontext()

    if streaming_out and inspect.isasyncgenfunction(behavior):

        async def yielding(request: Any, context: Any) -> AsyncIterator[Any]:
            call, request, counted = begin(request, context)
            with measured(call, context):
                async with held(context):
                    async for reply in behavior(request, counted):
                        if call is not None:
                            call.sent.inc()
                        yield reply

        return yielding

    async def returning(request: Any, context: Any) -> Any:
        call, request, counted = begin(request, context)
        with measured(call, context):
            async with held(context):
                return await behavior(request, counted)

    return returning


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Bounds the calls of `bounded_services` with `slots` and, when `metered`, counts and
    times every call by method and status code. Other calls (health, reflection) pass
    untouched, metrics aside: a busy server still answers its probes."""

    def __init__(self, bounded_services: Collection[str], slots: CallSlots, metered: bool) -> None:
        self.bounded_services = frozenset(bounded_services)
        self.slots = slots
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
        wrapped = self._wrap_handler(handler, *_split_method(full))
        self._wrapped[full] = (handler, wrapped)
        return wrapped

    def _wrap_handler(
        self, handler: grpc.RpcMethodHandler, service: str, method: str
    ) -> grpc.RpcMethodHandler:
        slots = self.slots if service in self.bounded_services else None
        if slots is None and not self.metered:
            return handler
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        kinds = (
            (handler.unary_unary, "unary", grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, "server_stream", grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, "client_stream", grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, "bidi_stream", grpc.stream_stream_rpc_method_handler),
        )
        for behavior, rpc_type, make in kinds:
            if behavior:
                streaming = (handler.request_streaming, handler.response_streaming)
                labels = (rpc_type, service, method)
                return make(_wrap(behavior, labels, streaming, slots, self.metered), **codec)
        return handler
