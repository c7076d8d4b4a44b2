"""What `dockercoins up` starts and where (StackSettings, its flags), its data directory, and the
bounds of a scale request."""

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from dockercoins.errors import ConfigError
from dockercoins.service_main import Flag
from dockercoins.settings import MetricsSettings, TlsSettings, env_name
from dockercoins_tools.services import SERVICES
from rng_svc.config import RngMode

CONTROL_SOCKET = "control.sock"
"""The control socket's name in the data directory (`dockercoins scale` connects to it)."""

UNIX_PATH_MAX = 107
"""Bytes of a Unix socket's path that Linux takes (sun_path is 108, with its final NUL)."""

SCALABLE = {"worker": "workers", "rng": "rng_replicas"}
"""What `dockercoins scale` can scale, and the setting whose bounds apply."""


class StackSettings(TlsSettings, MetricsSettings):
    """What `dockercoins up` starts and where; the services read their own settings too."""

    workers: int = Field(1, ge=0, le=200, description="Worker processes `dockercoins up` starts.")
    rng_replicas: int = Field(1, ge=1, le=32, description="rng processes `dockercoins up` starts.")
    rng_mode: RngMode = Field("blocking", description="rng mode: blocking or buffered.")
    rng_port: int = Field(
        SERVICES["rng"].default("rng_port"), ge=0, le=65535, description="Port of the (first) rng."
    )
    hasher_port: int = Field(
        SERVICES["hasher"].default("hasher_port"), ge=0, le=65535, description="Port of the hasher."
    )
    webui_port: int = Field(
        SERVICES["webui"].default("webui_port"), ge=0, le=65535, description="Port of the web UI."
    )
    redis_url: str | None = Field(
        None, description="Redis to use; unset: `dockercoins up` starts an embedded valkey-server."
    )
    redis_port: int = Field(
        0, ge=0, le=65535, description="Port of the embedded redis-server (0: any free one)."
    )
    data_dir: Path = Field(
        Path(".dockercoins"),
        description="Where `dockercoins up` keeps the embedded Redis's data and control socket.",
    )
    fresh: bool = Field(False, description="Empty the embedded Redis's data before starting.")
    redis_maxmemory_mb: int = Field(
        1024,
        ge=0,
        le=1 << 20,
        description="Memory cap of the embedded Redis in MiB (maxmemory, policy noeviction: a "
        "full Redis refuses writes, workers pause, nothing is lost); 0: no cap.",
    )
    control_timeout: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Seconds `dockercoins scale` waits for the running stack's answer.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Not 0: rng, hasher and each worker serve /metrics, each on a free port "
        "listed at start (the web UI serves /metrics on its own port); 0: off.",
    )

    @field_validator("data_dir")
    @classmethod
    def _socket_path_fits(cls, data_dir: Path) -> Path:
        length = len(os.fsencode(data_dir / CONTROL_SOCKET))
        if length > UNIX_PATH_MAX:
            raise PydanticCustomError(
                "socket_path_too_long",
                "the control socket's path would be {length} bytes, over the {limit} a Unix "
                "socket allows: choose a shorter directory",
                {"length": length, "limit": UNIX_PATH_MAX},
            )
        return data_dir


def claim_data_dir(data_dir: Path) -> None:
    """Create `data_dir` (mode 0700), or check that it belongs to this user: the control
    socket that scales the stack lives there."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = data_dir.stat().st_uid
    except OSError as exc:
        raise ConfigError(
            f"{env_name('data_dir')}: cannot use {data_dir}: {exc.strerror}"
        ) from None
    if owner != os.geteuid():
        raise ConfigError(
            f"{env_name('data_dir')}: {data_dir} belongs to uid {owner}, not to this user "
            f"(uid {os.geteuid()}); choose a directory of your own"
        )


def checked_count(service: object, count: object) -> tuple[str, int]:
    """A scale request's service and count, within the bounds of the setting that sets it."""
    if not isinstance(service, str) or service not in SCALABLE:
        raise ConfigError(f"can only scale worker or rng, not {service!r}")
    field = SCALABLE[service]
    if isinstance(count, bool) or not isinstance(count, int):
        raise ConfigError(f"{service}: expected a whole number, got {count!r}")
    info = StackSettings.model_fields[field]
    low = next(m.ge for m in info.metadata if hasattr(m, "ge"))
    high = next(m.le for m in info.metadata if hasattr(m, "le"))
    if not low <= count <= high:
        raise ConfigError(
            f"{service}={count} is out of bounds: {low} to {high} ({env_name(field)})"
        )
    return service, count


FLAGS = (
    Flag("--workers", "workers", int, "number of worker processes (default 1)"),
    Flag("--rng-mode", "rng_mode", help="blocking or buffered"),
    Flag("--profile", "profile", help="classic (the lesson's costs) or turbo (fast)"),
    Flag("--redis", "redis_url", help="use this Redis instead of starting one"),
    Flag("--data-dir", "data_dir", help="where the embedded Redis keeps its data"),
)
"""`dockercoins up`: flags over these settings."""
