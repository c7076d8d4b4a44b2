"""Settings of the rng service."""

from typing import Literal

from pydantic import Field, model_validator

from dockercoins.native import Generator
from dockercoins.ports import RNG_PORT
from dockercoins.service_main import Flag
from dockercoins.settings import GrpcServerSettings, env_name
from dockercoins.v1 import rng_pb2
from dockercoins.wire import BATCH_BYTES, MESSAGE_CEILING

SERVICE_NAME = rng_pb2.DESCRIPTOR.services_by_name["Rng"].full_name
"""rng's gRPC service, as reflection, health checks and probes name it."""

RngMode = Literal["blocking", "buffered"]


class RngSettings(GrpcServerSettings):
    """DOCKERCOINS_RNG_* settings; defaults are the original's costs."""

    TURBO_DEFAULTS = {"rng_read_cost": 0.0, "rng_generator": "aes-256-ctr"}

    rng_port: int = Field(
        RNG_PORT, ge=0, le=65535, description="Port rng listens on (0: any free)."
    )
    rng_mode: RngMode = Field(
        "blocking",
        description="blocking: every request pays a read under one lock (the original); "
        "buffered: a producer refills a buffer in large blocks (the fix).",
    )
    rng_read_cost: float = Field(
        0.1, ge=0, le=60, description="Seconds every read of the entropy source costs."
    )
    rng_generator: Generator = Field(
        "urandom",
        description="Where the bytes come from: urandom (the OS, about 0.3-0.5 GB/s per core); "
        "aes-256-ctr or chacha20: that cipher's keystream under a fresh 256-bit key from the "
        "OS for every read (libcrypto through the native extension, several GB/s per core; "
        "urandom where the extension is not built). The start line says which runs.",
    )
    rng_latency: float | None = Field(
        None,
        ge=0,
        le=60,
        description="Least seconds between a request and its answer, spent concurrently "
        "(the original's time per request); unset: the same as DOCKERCOINS_RNG_READ_COST.",
    )
    rng_block_size: int = Field(
        65536, ge=1, le=64 << 20, description="Bytes the buffered producer reads per source read."
    )
    rng_buffer_size: int = Field(
        1 << 20, ge=1, le=1 << 30, description="Bytes the buffered mode holds at most."
    )
    rng_log_requests: bool = Field(
        False,
        description="Log every call (INFO: its size and the caller's address), as the "
        "original's rng did; for watching which rng pod serves whom (`kubectl logs -f`).",
    )
    rng_max_request: int = Field(
        BATCH_BYTES,
        ge=1,
        le=MESSAGE_CEILING,
        description="Largest request in bytes (size x count); larger ones get INVALID_ARGUMENT.",
    )

    @property
    def request_latency(self) -> float:
        """rng_latency, or the read cost when it is unset."""
        return self.rng_read_cost if self.rng_latency is None else self.rng_latency

    @model_validator(mode="after")
    def _request_fits_buffer(self) -> "RngSettings":
        if self.rng_mode == "buffered" and self.rng_max_request > self.rng_buffer_size:
            raise ValueError(
                f"{env_name('rng_max_request')} must not exceed "
                f"{env_name('rng_buffer_size')} in buffered mode"
            )
        return self


FLAGS = (
    Flag("--port", "rng_port", int, "port to listen on (0: any free)"),
    Flag("--mode", "rng_mode", help="blocking or buffered"),
    Flag("--read-cost", "rng_read_cost", float, "seconds per entropy read"),
)
"""`python -m rng_svc` and `dockercoins rng`: flags over these settings."""
