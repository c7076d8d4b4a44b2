"""The most memory each process of DockerCoins can hold, from its settings: what a deployment's
memory limit must cover (concurrent calls x largest request and reply, plus what a process holds
anyway). tests/test_compose.py checks compose's and Kubernetes' limits against it."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import FilePath

from dockercoins.grpcserver import BASE_OPTIONS, SMALL_REQUEST_BYTES
from dockercoins.settings import ENV_PREFIX, BaseServiceSettings, GrpcServerSettings
from dockercoins.wire import BLOCK_SIZE, DIGEST_SIZE, MESSAGE_FRAMING, reply_bytes
from hasher_svc.config import HasherSettings
from rng_svc.config import RngSettings
from webui.config import WebuiSettings
from worker_svc.config import WorkerSettings

MiB = 1 << 20

PROCESS_BASELINE = 80 * MiB
"""What a service's Python process holds before any call: the interpreter, gRPC or uvicorn, our
code. Measured (VmHWM, a turbo `dockercoins up` after 25 s): rng 57, hasher 60, web UI 69,
worker 69 MB."""

REQUEST_COPIES = 2
"""Copies of a request a server holds while it serves it: the message as received, its bytes."""

REPLY_COPIES = 4
"""Copies of a reply: its bytes, the message, the serialized message, gRPC's send buffer."""

STREAM_BUFFERS = 1 * MiB
"""What HTTP/2 parks per call on top of its messages when the windows do not grow (BDP probing
off): frames read ahead, a reply the client has not taken yet."""

STREAM_BUFFERS_BDP = 48 * MiB
"""The same with BDP probing on, which lets the windows grow to megabytes: a client that sends
the largest requests and never reads made a hasher hold up to 51 MB per stream."""

OTHER_CALL_BYTES = 64 * 1024
"""A health check, health watch or reflection call (small requests, small replies)."""

COIN_BYTES = 250
"""A coin a worker holds while Redis does not take it (DOCKERCOINS_WORKER_MAX_PENDING_COINS)."""

EVENT_STREAM_BYTES = 64 * 1024
"""One open /events stream of the web UI: its task, its response and the socket's buffers."""

HEARTBEATS_READ = 1000
"""Heartbeats the web UI holds at once as it samples (its workers; HEARTBEAT_PAGE keys a step)."""

HEARTBEAT_BYTES = 16 * 1024
"""One worker heartbeat as the web UI holds it: JSON with a stage histogram per stage."""

REDIS_MAXMEMORY_SHARE = 0.7
"""Redis's maxmemory may be at most this share of its limit: the rest for fragmentation, client
buffers and an append-only file rewrite's copy-on-write."""

ISOLATED_PREFIX = "DOCKERCOINS_SIZING_ISOLATED_"
"""An environment prefix that no variable carries."""

ONE_SHOT_BASELINE = 48 * MiB
"""A short Python command of the image (the compose stack's password maker): the interpreter and
a few modules."""


@dataclass(frozen=True)
class RedisServer:
    """The settings of a Redis server that matter for its memory: its maxmemory, in bytes."""

    maxmemory: int


@dataclass(frozen=True)
class WorstCase:
    """The most memory a process can hold, part by part, in bytes."""

    service: str
    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """One line: the total and its parts, in MiB."""
        parts = ", ".join(f"{name} {size / MiB:.1f}" for name, size in self.parts.items())
        return f"{self.service}: {self.total / MiB:.0f} MiB ({parts})"


def stream_buffers() -> int:
    """What HTTP/2 may park per call on the servers as they are built (BDP probing on or off)."""
    return STREAM_BUFFERS if ("grpc.http2.bdp_probe", 0) in BASE_OPTIONS else STREAM_BUFFERS_BDP


def _server_calls(settings: GrpcServerSettings, per_call: int) -> dict[str, int]:
    """A gRPC server's calls: the application's, each `per_call` bytes, and the small others
    (health Watch and reflection streams; a Check is answered at once)."""
    other = settings.max_probe_streams
    return {
        "baseline": PROCESS_BASELINE,
        "calls": settings.max_concurrent_rpcs * per_call,
        "health and reflection": other * OTHER_CALL_BYTES,
    }


def worst_case_memory(
    settings: RngSettings | HasherSettings | WorkerSettings | WebuiSettings | RedisServer | None,
) -> WorstCase:
    """The most memory the process with these settings can hold (None: the one-shot password
    maker of the compose stack)."""
    if settings is None:
        return WorstCase("one-shot", {"baseline": ONE_SHOT_BASELINE})
    if isinstance(settings, RedisServer):
        share = int(settings.maxmemory / REDIS_MAXMEMORY_SHARE)
        return WorstCase(
            "redis", {"maxmemory": settings.maxmemory, "overhead": share - settings.maxmemory}
        )
    if isinstance(settings, RngSettings):
        reply = settings.rng_max_request
        per_call = REQUEST_COPIES * SMALL_REQUEST_BYTES + REPLY_COPIES * reply + stream_buffers()
        parts = _server_calls(settings, per_call)
        if settings.rng_mode == "buffered":
            parts["buffer"] = settings.rng_buffer_size + settings.rng_block_size
        return WorstCase("rng", parts)
    if isinstance(settings, HasherSettings):
        request = settings.hasher_max_request + MESSAGE_FRAMING
        reply = min(settings.hasher_max_reply, reply_bytes(settings.hasher_max_blocks, raw=False))
        per_call = REQUEST_COPIES * request + REPLY_COPIES * reply + stream_buffers()
        return WorstCase("hasher", _server_calls(settings, per_call))
    if isinstance(settings, WorkerSettings):
        window = settings.worker_stream_window if settings.worker_streaming else 1
        in_flight = settings.worker_loops * window
        batch = settings.worker_batch
        # Per unit in flight: rng's reply, the request to hasher, hasher's raw digests.
        unit = (REPLY_COPIES + REQUEST_COPIES) * batch * BLOCK_SIZE
        unit += REPLY_COPIES * batch * DIGEST_SIZE
        return WorstCase(
            "worker",
            {
                "baseline": PROCESS_BASELINE,
                "units in flight": in_flight * unit,
                "calls' buffers": settings.worker_loops * 2 * STREAM_BUFFERS,
                "coins held": settings.worker_max_pending_coins * COIN_BYTES,
            },
        )
    return WorstCase(
        "webui",
        {
            "baseline": PROCESS_BASELINE,
            "/events streams": settings.webui_max_streams * EVENT_STREAM_BYTES,
            "heartbeats": HEARTBEATS_READ * HEARTBEAT_BYTES,
        },
    )


def settings_from_env(cls: type[BaseServiceSettings], env: Mapping[str, str]) -> Any:
    """`cls` as a deployment's environment `env` sets it (DOCKERCOINS_* variables only, this
    process's own environment ignored). Variables the class does not know, and paths of files
    (certificates, secrets: they name files inside a container), are left out: no memory
    depends on them, nor any other check of a deployment's settings."""
    fields: dict[str, Any] = {"_env_prefix": ISOLATED_PREFIX}
    for name, value in env.items():
        field = name.removeprefix(ENV_PREFIX).lower()
        info = cls.model_fields.get(field)
        if not name.startswith(ENV_PREFIX) or info is None:
            continue
        if FilePath in (info.annotation, *getattr(info.annotation, "__args__", ())):
            continue
        fields[field] = value
    # _env_prefix, one no variable has: the fields come from `env` alone, not from this process's.
    return cls(**fields)
