"""Settings of the web UI."""

from pydantic import Field

from dockercoins.ports import WEBUI_PORT
from dockercoins.service_main import Flag
from dockercoins.settings import RedisClientSettings

MARK_SETTLE = 2.5
"""Seconds the worker count must hold still before the chart marks its change."""


class WebuiSettings(RedisClientSettings):
    """DOCKERCOINS_WEBUI_* settings and the Redis to read."""

    webui_port: int = Field(WEBUI_PORT, ge=0, le=65535, description="Port the web UI listens on.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis the web UI reads.")
    webui_max_streams: int = Field(
        100,
        ge=1,
        le=10000,
        description="Live /events streams (open pages) the web UI serves at once; past it, "
        "503 with Retry-After, and the page polls /json instead.",
    )
    webui_max_streams_per_client: int = Field(
        10,
        ge=1,
        le=10000,
        description="Live /events streams one client address (an IPv6 one by its /64) may "
        "hold; past it, 429 with Retry-After, and the page polls /json instead.",
    )
    webui_max_connections_per_client: int = Field(
        64,
        ge=1,
        le=100000,
        description="Open connections one client address (an IPv6 one by its /64) may hold "
        "(a browser opens at most 6); past it, a new one is reset at once.",
    )
    webui_stream_lifetime: float = Field(
        300.0,
        ge=1,
        le=86400,
        description="Seconds an /events stream lasts; then it ends and the page reconnects, "
        "resuming where it left off.",
    )
    webui_write_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Seconds a response may wait on a client that does not read (its buffers "
        "full) before the connection is reset.",
    )
    webui_request_timeout: int = Field(
        5,
        ge=1,
        le=300,
        description="Seconds a connection may stay without a complete request, after it opens "
        "or after its last response (keep-alive), before it is closed.",
    )
    webui_mark_settle: float = Field(
        MARK_SETTLE,
        ge=0,
        le=60,
        description="Seconds the worker count must hold still before the chart marks the "
        "change (where it began): one scaling step, one mark.",
    )


FLAGS = (
    Flag("--port", "webui_port", int, "port to listen on (0: any free)"),
    Flag("--redis", "redis_url", help="Redis URL"),
)
"""`python -m webui` and `dockercoins webui`: flags over these settings."""
