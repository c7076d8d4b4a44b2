"""Settings of the worker."""

from pydantic import Field

from dockercoins.settings import MetricsSettings, TlsSettings


class WorkerSettings(TlsSettings, MetricsSettings):
    """DOCKERCOINS_WORKER_* settings plus the addresses of rng, hasher and Redis."""

    TURBO_DEFAULTS = {
        "worker_think_time": 0.0,
        "worker_loops": 4,
        "worker_batch": 1000,
        "worker_pool_size": 2,
        "worker_streaming": True,
    }

    rng_addr: str = Field(
        "127.0.0.1:50051",
        description="rng's gRPC target: host:port, ipv4:a:p,b:q (several, round-robin) or dns:///name:port.",
    )
    hasher_addr: str = Field(
        "127.0.0.1:50052", description="hasher's gRPC target, in the same forms as rng's."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis the worker writes to.")
    worker_think_time: float = Field(
        0.1, ge=0, le=60, description="Seconds each unit of work sleeps (the original's 0.1 s)."
    )
    worker_flush_interval: float = Field(
        1.0, gt=0, le=60, description="Seconds between flushes of the hash count to Redis."
    )
    worker_loops: int = Field(1, ge=1, le=1024, description="Concurrent mining loops per worker.")
    worker_batch: int = Field(
        1, ge=1, le=16384, description="32-byte blocks per message (hashes per unit of work)."
    )
    worker_pool_size: int = Field(
        1, ge=1, le=64, description="gRPC channels (connections) per upstream; loops share them."
    )
    worker_streaming: bool = Field(
        False,
        description="Streams (rng server-streaming, hasher bidirectional) instead of one "
        "unary call per unit.",
    )
    worker_health_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's own gRPC health server (0: none)."
    )
    difficulty: int = Field(
        1, ge=1, le=64, description="Leading zero hex digits that make a digest a coin."
    )
    rpc_timeout: float = Field(
        10.0, gt=0, le=600, description="Deadline in seconds of every call to rng and hasher."
    )
