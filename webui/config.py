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
        "503 with Retry-After.",
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
