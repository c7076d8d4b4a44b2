"""Settings of the hasher service."""

from pydantic import Field

from dockercoins.settings import GrpcServerSettings


class HasherSettings(GrpcServerSettings):
    """DOCKERCOINS_HASHER_* settings; defaults are the original's costs."""

    TURBO_DEFAULTS = {"hasher_latency": 0.0}

    hasher_port: int = Field(
        50052, ge=0, le=65535, description="Port hasher listens on (0: any free)."
    )
    hasher_latency: float = Field(
        0.1, ge=0, le=60, description="Seconds every request costs; requests do not queue."
    )
    hasher_max_request: int = Field(
        4 << 20,
        ge=1,
        le=64 << 20,
        description="Largest request payload in bytes; larger ones get RESOURCE_EXHAUSTED.",
    )
