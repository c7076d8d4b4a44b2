"""Settings of the worker."""

from pydantic import Field, model_validator

from dockercoins.backoff import MAX_BACKOFF
from dockercoins.ports import HASHER_PORT, RNG_PORT
from dockercoins.service_main import Flag
from dockercoins.settings import (
    CallBoundSettings,
    MetricsSettings,
    RedisClientSettings,
    TlsSettings,
)
from dockercoins.wire import BLOCK_SIZE, MAX_BATCH, TURBO_BATCH

READINESS = "readiness"
"""Health service that says whether the worker mines now (the overall status "" says the same)."""

READINESS_SERVICES = ("", READINESS)
"""The health services that report readiness: the overall status and `readiness`."""

LIVENESS = "liveness"
"""Health service that says whether the worker's loops still step (restart it if not)."""

HEALTH_TICK = 0.25
"""Seconds between two evaluations of readiness and liveness (and two looks of the watchdog of a
stream session with nothing in flight)."""


class WorkerSettings(TlsSettings, MetricsSettings, RedisClientSettings, CallBoundSettings):
    """DOCKERCOINS_WORKER_* settings plus the addresses of rng, hasher and Redis."""

    TURBO_DEFAULTS = {
        "worker_think_time": 0.0,
        "worker_loops": 4,
        "worker_batch": TURBO_BATCH,
        "worker_pool_size": 2,
        "worker_streaming": True,
        "worker_stream_window": 4,
        "difficulty": 4,
    }

    rng_addr: str = Field(
        f"127.0.0.1:{RNG_PORT}",
        description="rng's gRPC target: host:port, ipv4:a:p,b:q (several, round-robin) or dns:///name:port.",
    )
    hasher_addr: str = Field(
        f"127.0.0.1:{HASHER_PORT}", description="hasher's gRPC target, in the same forms as rng's."
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
        1,
        ge=1,
        le=MAX_BATCH,
        description=f"{BLOCK_SIZE}-byte blocks per message (hashes per unit of work).",
    )
    worker_pool_size: int = Field(
        1, ge=1, le=64, description="gRPC channels (connections) per upstream; loops share them."
    )
    worker_streaming: bool = Field(
        False,
        description="Streams (rng server-streaming, hasher bidirectional) instead of one "
        "unary call per unit.",
    )
    worker_stream_window: int = Field(
        4,
        ge=1,
        le=64,
        description="Messages each streaming loop keeps in flight at the hasher (each holds "
        "its batch's random bytes until its digests come back).",
    )
    worker_health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the worker's own gRPC health server (0: none): services "
        "`readiness` (also the overall status) and `liveness`.",
    )
    difficulty: int = Field(
        1, ge=1, le=64, description="Leading zero hex digits that make a digest a coin."
    )
    rpc_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Deadline in seconds of every call to rng and hasher, and of every message "
        "on a stream: a stream silent for longer is abandoned and reopened.",
    )
    worker_keepalive_time: float = Field(
        10.0,
        ge=10,
        le=3600,
        description="Seconds between HTTP/2 keepalive pings on the worker's connections to rng "
        "and hasher; a ping unanswered within DOCKERCOINS_RPC_TIMEOUT closes the connection "
        "(servers accept pings every 5 s at most).",
    )
    worker_max_pending_coins: int = Field(
        200_000,
        ge=1,
        le=10_000_000,
        description="Coins held in memory while Redis does not take them (about 250 bytes "
        "each); at this bound the worker stops mining until Redis takes them again.",
    )
    worker_max_unflushed: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds of mining a worker may hold that Redis has not counted (from the "
        "oldest hash not yet in `hashes`): at this bound it stops mining until Redis takes "
        "them, so a kill -9 during a Redis outage loses at most this much work. Longer than "
        "DOCKERCOINS_WORKER_FLUSH_INTERVAL + DOCKERCOINS_REDIS_TIMEOUT.",
    )
    worker_flush_chunk: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Coins written to Redis per command (a unit's coins are never split), so "
        "that a backlog drains in steps that each fit DOCKERCOINS_REDIS_TIMEOUT.",
    )
    worker_stage_timing: bool = Field(
        True,
        description="Time each stage of every unit of work (think, rng, hasher, Redis) for the "
        "heartbeat, the web UI's bars and /json's `latency`; false only to measure its cost.",
    )
    worker_stage_window: float = Field(
        10.0,
        ge=1,
        le=3600,
        description="Seconds of recent units whose stage times (p50, p99) the heartbeat reports.",
    )
    worker_ready_timeout: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="Seconds without a finished unit of work after which readiness goes "
        "NOT_SERVING (an unreachable upstream or a full backlog does it at once); unset: "
        "think time + 2 x DOCKERCOINS_RPC_TIMEOUT.",
    )
    worker_liveness_timeout: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="Seconds a mining loop or the flusher may go without a step (a reply, a "
        "failed attempt, a retry, a wait for Redis) before liveness goes NOT_SERVING and the "
        "worker exits to be restarted; outages do not count. Unset: 3 x (think time + "
        "DOCKERCOINS_RPC_TIMEOUT + flush interval), at least 30.",
    )

    @property
    def ready_timeout(self) -> float:
        """Seconds without a finished unit before readiness fails."""
        if self.worker_ready_timeout is not None:
            return self.worker_ready_timeout
        return self.worker_think_time + 2 * self.rpc_timeout

    @property
    def liveness_timeout(self) -> float:
        """Seconds without any step of a loop or the flusher before liveness fails."""
        if self.worker_liveness_timeout is not None:
            return self.worker_liveness_timeout
        step = self.worker_think_time + self.rpc_timeout + self.worker_flush_interval
        return max(30.0, 3 * step)

    @model_validator(mode="after")
    def _timeouts_fit_a_unit(self) -> "WorkerSettings":
        # A unit thinks, then waits for each upstream at most the deadline, between retries at
        # most MAX_BACKOFF: shorter timeouts would report a healthy worker as failing.
        if self.worker_ready_timeout is not None and (
            self.worker_ready_timeout <= self.worker_think_time
        ):
            raise ValueError(
                "DOCKERCOINS_WORKER_READY_TIMEOUT must be longer than "
                f"DOCKERCOINS_WORKER_THINK_TIME ({self.worker_think_time} s)"
            )
        flush = self.worker_flush_interval + self.redis_timeout
        if self.worker_max_unflushed <= flush:
            raise ValueError(
                "DOCKERCOINS_WORKER_MAX_UNFLUSHED must be longer than "
                "DOCKERCOINS_WORKER_FLUSH_INTERVAL + DOCKERCOINS_REDIS_TIMEOUT "
                f"({flush:g} s): the work between two flushes would pause mining"
            )
        step = self.worker_think_time + self.rpc_timeout + MAX_BACKOFF
        if self.worker_liveness_timeout is not None and self.worker_liveness_timeout <= step:
            raise ValueError(
                "DOCKERCOINS_WORKER_LIVENESS_TIMEOUT must be longer than "
                f"DOCKERCOINS_WORKER_THINK_TIME + DOCKERCOINS_RPC_TIMEOUT + {MAX_BACKOFF:g} s "
                f"({step:g} s)"
            )
        return self


FLAGS = (
    Flag("--rng", "rng_addr", help="rng target"),
    Flag("--hasher", "hasher_addr", help="hasher target"),
    Flag("--redis", "redis_url", help="Redis URL"),
    Flag("--think-time", "worker_think_time", float, "seconds per unit of work"),
    Flag("--loops", "worker_loops", int, "concurrent mining loops"),
)
"""`python -m worker_svc` and `dockercoins worker`: flags over these settings."""
