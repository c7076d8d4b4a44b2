"""The web UI's HTTP server: /json, /events (Server-Sent Events), the page, and probes."""

import asyncio
import contextlib
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dockercoins.errors import DockercoinsError, PortInUseError
from dockercoins.lifecycle import stop_event_on_signals, watch_task
from dockercoins.redis_store import BadData, connect, read_totals
from dockercoins.settings import env_name
from webui.config import WebuiSettings
from webui.connections import PerClient, client_key, guarded_h11
from webui.metrics import WEBUI_REFUSED, WEBUI_RENEWED, WEBUI_STREAMS, watch_stages
from webui.monitor import SpeedMonitor, bad_data_reason, latency_fields, redis_reason

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

BACKLOG = 128
"""Connections the listening socket queues before the app accepts them."""

SSE_RETRY_MS = 1000
"""How soon a page's EventSource reconnects after losing the stream."""

SSE_KEEPALIVE = 2.0
"""Seconds after which a stream sends a state even without a new chart point."""

STREAMS_RETRY_AFTER = 10
"""Seconds a client turned away for too many streams is told to wait (Retry-After)."""

EVENT_ID_DIGITS = 12
"""Digits of the sequence number in an event's id (`<boot>-<seq>`) that a page may send back."""

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
"""On every response: only this origin's scripts, styles and connections; never in a frame."""


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response, streams included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class CountedStream(StreamingResponse):
    """A streaming response that calls `release` when it ends, however it ends."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def unavailable(reason: str, status: str = "unavailable") -> JSONResponse:
    """503 with the reason, the answer of every endpoint that needs Redis while it is away."""
    return JSONResponse({"status": status, "reason": reason}, status_code=503)


def create_app(settings: WebuiSettings) -> FastAPI:
    """The web UI application; Redis is connected when the app starts, not before."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.stopping = asyncio.Event()
        redis = connect(settings.redis_url, settings.redis_timeout, settings.redis_password())
        monitor = SpeedMonitor(
            redis, mark_settle=settings.webui_mark_settle, read_timeout=settings.redis_timeout
        )
        unwatch = watch_stages(monitor)
        app.state.redis = redis
        app.state.monitor = monitor
        sampler = asyncio.create_task(monitor.run(app.state.stopping), name="webui-sampler")
        watch_task(sampler, crash)
        try:
            yield
        finally:
            app.state.stopping.set()
            await asyncio.gather(sampler, return_exceptions=True)
            unwatch()
            await redis.aclose()

    def crash(why: str) -> None:
        app.state.failure = why
        app.state.failed.set()

    app = FastAPI(title="DockerCoins web UI", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(SecurityHeaders)
    app.state.stopping = asyncio.Event()
    app.state.failed = asyncio.Event()
    app.state.failure = ""
    app.state.streams = PerClient(settings.webui_max_streams_per_client, settings.webui_max_streams)
    app.state.boot = secrets.token_hex(4)
    """This process's mark in the events' ids: a page's Last-Event-ID from another is not
    resumed from."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers; no I/O."""
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", response_model=None)
    async def readyz(request: Request) -> dict[str, str] | JSONResponse:
        """Readiness: Redis answers a PING (a dead Redis gives a 503, not a hang)."""
        try:
            async with asyncio.timeout(settings.redis_timeout):
                await request.app.state.redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            return unavailable(redis_reason(exc))
        return {"status": "ready"}

    @app.get("/json", response_model=None)
    async def totals(request: Request) -> dict[str, object] | JSONResponse:
        """The original's numbers (`coins`, `hashes`, `now`), plus the windowed speed."""
        try:
            async with asyncio.timeout(settings.redis_timeout):
                read = await read_totals(request.app.state.redis)
        except BadData as exc:
            return unavailable(bad_data_reason(exc), "bad-data")
        except (RedisError, OSError, TimeoutError) as exc:
            return unavailable(redis_reason(exc))
        monitor: SpeedMonitor = request.app.state.monitor
        return {
            "coins": read.coins,
            "hashes": read.hashes,
            "now": read.now,
            "hashes_per_second": monitor.rate.per_second if monitor.rate else None,
            "workers": monitor.workers,
            "rng_mode": monitor.rng_mode,
            "rng_modes": monitor.rng_modes,
            **latency_fields(monitor.stages),
            "status": monitor.status,
            "reason": monitor.error,
        }

    @app.get("/events", response_model=None)
    async def events(request: Request) -> StreamingResponse | JSONResponse:
        """Server-Sent Events: the full history first, then what is new about once a second.

        At most DOCKERCOINS_WEBUI_MAX_STREAMS at once, DOCKERCOINS_WEBUI_MAX_STREAMS_PER_CLIENT
        per client address; each lasts DOCKERCOINS_WEBUI_STREAM_LIFETIME, then ends with a
        `renew` event, and the page's EventSource reconnects by itself with the id of the last
        state it got (Last-Event-ID), from which it resumes. Each stream runs in its request's
        own task (no task of its own), so a closed stream leaves nothing behind.
        """
        state = request.app.state
        streams: PerClient = state.streams
        client = client_key(request.client.host if request.client else None)
        full = streams.full_for(client)
        if full is not None:
            return refuse_stream(streams, client, full)
        monitor: SpeedMonitor = state.monitor
        stopping: asyncio.Event = state.stopping
        boot: str = state.boot
        lifetime = settings.webui_stream_lifetime
        after = resume_after(request.headers.get("last-event-id"), boot, monitor.last_seq)

        async def stream(after: int) -> AsyncIterator[str]:
            yield f"retry: {SSE_RETRY_MS}\n\n"
            loop = asyncio.get_running_loop()
            ends = loop.time() + lifetime
            while not stopping.is_set():
                snapshot = monitor.snapshot(after)
                after = snapshot["seq"]
                yield f"id: {boot}-{after}\nevent: state\ndata: {json.dumps(snapshot)}\n\n"
                left = ends - loop.time()
                if left <= 0:
                    WEBUI_RENEWED.inc()
                    yield "event: renew\ndata: {}\n\n"
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(SSE_KEEPALIVE, left)):
                        await monitor.next_point()

        def release() -> None:
            streams.give_back(client)
            WEBUI_STREAMS.dec()

        streams.take(client)
        WEBUI_STREAMS.inc()
        return CountedStream(
            stream(after),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "close"},
        )

    return app


def refuse_stream(streams: PerClient, client: str, full: str) -> JSONResponse:
    """429 for a client at its own bound, 503 when every stream is taken; with the reason,
    Retry-After, and the connection closed (it holds nothing while the page polls /json)."""
    if full == "client":
        held = streams.holds(client)
        reason = (
            f"{held} live stream{'s' * (held != 1)} from {client} already, the most one "
            f"address may hold ({env_name('webui_max_streams_per_client')})"
        )
        status, code = "too-many", 429
    else:
        reason = (
            f"{streams.held} live streams already, the most this web UI serves "
            f"({env_name('webui_max_streams')})"
        )
        status, code = "busy", 503
    WEBUI_REFUSED.labels("streams-per-client" if full == "client" else "streams").inc()
    return JSONResponse(
        {"status": status, "reason": reason},
        status_code=code,
        headers={"Retry-After": str(STREAMS_RETRY_AFTER), "Connection": "close"},
    )


def resume_after(last_event_id: str | None, boot: str, newest: int) -> int:
    """The sequence number a reconnecting page saw last (its Last-Event-ID), if this process
    sent it; 0 (the whole history) otherwise."""
    mark, _, seq = (last_event_id or "").partition("-")
    if mark != boot or not seq.isdigit() or len(seq) > EVENT_ID_DIGITS:
        return 0
    return int(seq) if int(seq) <= newest else 0


def server_config(app: FastAPI, settings: WebuiSettings) -> uvicorn.Config:
    """uvicorn for the web UI: h11 with its guards (webui.connections), the request timeout
    also its keep-alive timeout. No `limit_concurrency`: it counts every client's connections
    together, so one flood would turn every visitor away with 503, the door this closes."""
    connections = PerClient(settings.webui_max_connections_per_client)
    return uvicorn.Config(
        app,
        http=guarded_h11(connections, settings.webui_request_timeout, settings.webui_write_timeout),
        timeout_keep_alive=settings.webui_request_timeout,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.grace)),
    )


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port); PortInUseError if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise PortInUseError(env_name("webui_port"), host, port) from None
    sock.listen(BACKLOG)  # connections queue from now on, while the app starts
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: serve() owns the stop signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: WebuiSettings) -> None:
    """Run the web UI until a stop signal; PortInUseError if the port is taken."""
    sock = bind_listener(settings.host, settings.webui_port)
    port = sock.getsockname()[1]
    app = create_app(settings)
    server = _Server(server_config(app, settings))
    stop = stop_event_on_signals()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("webui listening on http://%s:%d", host, port)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(app.state.failed.wait())
    await asyncio.wait({serving, stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    app.state.stopping.set()
    server.should_exit = True
    await serving
    sock.close()
    if app.state.failure:
        raise DockercoinsError(f"{app.state.failure}; the web UI stopped")
