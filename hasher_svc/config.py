"""Settings of the hasher service."""

from pydantic import Field

from dockercoins.ports import HASHER_PORT
from dockercoins.service_main import Flag
from dockercoins.settings import GrpcServerSettings
from dockercoins.v1 import hasher_pb2
from dockercoins.wire import BATCH_BYTES, BLOCK_SIZE, MAX_BATCH, MAX_REPLY_BYTES, MESSAGE_CEILING

SERVICE_NAME = hasher_pb2.DESCRIPTOR.services_by_name["Hasher"].full_name
"""hasher's gRPC service, as reflection, health checks and probes name it."""


class HasherSettings(GrpcServerSettings):
    """DOCKERCOINS_HASHER_* settings; defaults are the original's costs."""

    TURBO_DEFAULTS = {"hasher_latency": 0.0}

    hasher_port: int = Field(
        HASHER_PORT, ge=0, le=65535, description="Port hasher listens on (0: any free)."
    )
    hasher_latency: float = Field(
        0.1, ge=0, le=60, description="Seconds every request costs; requests do not queue."
    )
    hasher_max_request: int = Field(
        BATCH_BYTES,
        ge=1,
        le=MESSAGE_CEILING,
        description=f"Largest request payload in bytes; larger ones get RESOURCE_EXHAUSTED, "
        f"unread. The worker sends at most {MAX_BATCH} blocks of {BLOCK_SIZE} bytes.",
    )
    hasher_max_blocks: int = Field(
        MAX_BATCH,
        ge=1,
        le=MESSAGE_CEILING // BLOCK_SIZE,
        description="Most blocks (digests) one request may ask for; more get "
        "RESOURCE_EXHAUSTED before any hashing.",
    )
    hasher_max_reply: int = Field(
        MAX_REPLY_BYTES,
        ge=1024,
        le=MESSAGE_CEILING,
        description="Largest reply in bytes (32 per digest, 98 with its hex string); a "
        "request whose reply would be larger gets RESOURCE_EXHAUSTED before any hashing.",
    )
    hasher_inline_blocks: int = Field(
        4096,
        ge=0,
        le=MESSAGE_CEILING // BLOCK_SIZE,
        description="Largest batch in blocks hashed on the event loop; larger ones are "
        "hashed in a thread, one at a time, so that health checks answer meanwhile.",
    )
    hasher_native: bool = Field(
        True,
        description="Hash each batch in one native call (C over libcrypto, the GIL released) "
        "where the extension is built; false, or where it is not: hashlib per block, the same "
        "digests. The start line and /metrics say which path runs.",
    )
    hasher_inline_bytes: int = Field(
        1 << 20,
        ge=0,
        le=MESSAGE_CEILING,
        description="Largest payload in bytes hashed on the event loop; larger ones are "
        "hashed in the same thread as large batches.",
    )


FLAGS = (
    Flag("--port", "hasher_port", int, "port to listen on (0: any free)"),
    Flag("--latency", "hasher_latency", float, "seconds per request"),
)
"""`python -m hasher_svc` and `dockercoins hasher`: flags over these settings."""
