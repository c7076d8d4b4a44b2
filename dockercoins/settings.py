"""The settings base every service shares: DOCKERCOINS_ environment, frozen, one-line errors."""

from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, FilePath, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dockercoins.errors import ConfigError

ENV_PREFIX = "DOCKERCOINS_"

REDIS_TIMEOUT = 2.0
"""Seconds a Redis call or connect may take before it fails: the default of every Redis client
(`redis_store.connect`), the services' DOCKERCOINS_REDIS_TIMEOUT and the tools' alike."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
Profile = Literal["classic", "turbo"]


class BaseServiceSettings(BaseSettings):
    """Fields every process understands; each service adds its own in its `config.py`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False
    )

    TURBO_DEFAULTS: ClassVar[dict[str, Any]] = {}
    """Defaults that the turbo profile changes; a value set explicitly always wins."""

    profile: Profile = Field(
        "classic",
        description="classic: the original's simulated costs; turbo: costs off, streams, "
        "batches and pools (each turbo default can still be overridden).",
    )
    log_level: LogLevel = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    host: str = Field(
        "127.0.0.1",
        description="Address servers bind to; containers set 0.0.0.0 explicitly.",
    )
    grace: float = Field(
        5.0, ge=0, le=120, description="Seconds a stopping server lets in-flight calls finish."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and str(data.get("profile", "")).lower() == "turbo":
            for field, value in cls.TURBO_DEFAULTS.items():
                data.setdefault(field, value)
        return data


class TlsSettings(BaseServiceSettings):
    """TLS of the gRPC hops: plaintext unless a certificate (servers) or a CA (clients) is set."""

    tls_cert: FilePath | None = Field(
        None,
        description="PEM certificate this process presents: gRPC servers serve TLS with it, "
        "gRPC clients present it to servers that ask (mutual TLS). Unset: plaintext.",
    )
    tls_key: FilePath | None = Field(
        None, description="PEM private key of DOCKERCOINS_TLS_CERT (set both or neither)."
    )
    tls_ca: FilePath | None = Field(
        None,
        description="PEM CA bundle: gRPC clients use TLS and verify servers against it; gRPC "
        "servers require client certificates signed by it (mutual TLS).",
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> "TlsSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            cert, key = env_name("tls_cert"), env_name("tls_key")
            missing = key if self.tls_key is None else cert
            raise ValueError(f"{missing}: {cert} and {key} go together, set both or neither")
        return self


class MetricsSettings(BaseServiceSettings):
    """The Prometheus endpoint of a service."""

    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics endpoint, on DOCKERCOINS_HOST (0: off).",
    )


class RedisClientSettings(BaseServiceSettings):
    """How a service reaches Redis: a URL, its password from a file (a mounted secret), and how
    long it waits for it."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis this service uses.")
    redis_timeout: float = Field(
        REDIS_TIMEOUT,
        gt=0,
        le=60,
        description="Seconds a service waits for Redis: to connect, for each reply, and for a "
        "whole reading (the web UI's sample, /json, /readyz); then Redis counts as unreachable.",
    )
    redis_password_file: FilePath | None = Field(
        None,
        description="File holding Redis's password (a mounted secret: compose's, say), for a "
        "DOCKERCOINS_REDIS_URL without one. Unset: the URL's password, if any.",
    )

    @model_validator(mode="after")
    def _one_password(self) -> "RedisClientSettings":
        if self.redis_password_file is None:
            return self
        variable = env_name("redis_password_file")
        if urlsplit(self.redis_url).password is not None:
            raise ValueError(
                f"{variable}: {env_name('redis_url')} has a password already; give it in one place"
            )
        if not self.redis_password():
            raise ValueError(f"{variable}: {self.redis_password_file} is empty")
        return self

    def redis_password(self) -> str | None:
        """The password in DOCKERCOINS_REDIS_PASSWORD_FILE (None: the URL's own, if any)."""
        if self.redis_password_file is None:
            return None
        try:
            return self.redis_password_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{env_name('redis_password_file')}: cannot read it: {exc}") from None


class CallBoundSettings(BaseServiceSettings):
    """What every gRPC server allows the calls outside the application (health, reflection), and
    any call that waits on its client: rng's, hasher's and the worker's health port."""

    max_probe_streams: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Health Watch and reflection streams a gRPC server holds at once, apart "
        "from the application's calls; more get RESOURCE_EXHAUSTED at once. Health Checks are "
        "not counted: they answer at once.",
    )
    max_peer_probe_calls: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Health and reflection calls, Checks included, one client address may have "
        "in flight at once on a gRPC server; more get RESOURCE_EXHAUSTED. A Check is refused "
        "only for its own address's calls, never for other clients'.",
    )
    call_idle_timeout: float = Field(
        300,
        ge=0.1,
        le=86400,
        description="Seconds a gRPC server lets a call wait on its client (for its next "
        "request, or for room to send a reply the client does not read) before it ends the "
        "call UNAVAILABLE. Keep it above the longest a mining worker leaves its streams "
        "silent, think time + DOCKERCOINS_RPC_TIMEOUT (10.1 s by default); a worker reopens an "
        "ended stream. A health Watch between two changes waits on nobody.",
    )


class GrpcServerSettings(TlsSettings, MetricsSettings, CallBoundSettings):
    """Fields of the services that are gRPC servers."""

    max_connection_age: float = Field(
        0,
        ge=0,
        le=86400,
        description="Seconds after which a gRPC server asks clients to reconnect, so that new "
        "replicas get traffic (0: never).",
    )
    max_connection_idle: float = Field(
        300,
        ge=0,
        le=86400,
        description="Seconds a gRPC server keeps a connection with no call in flight before "
        "closing it (0: never); clients reconnect on their next call.",
    )
    max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        le=100_000,
        description="Calls of rng's or hasher's methods a server runs at once, a stream "
        "counted until it ends; more get RESOURCE_EXHAUSTED at once. Health and reflection "
        "calls have bounds of their own (DOCKERCOINS_MAX_PROBE_STREAMS). Each call may hold up "
        "to its largest request in memory.",
    )
    max_peer_rpcs: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Calls of rng's or hasher's methods one client address may have in flight "
        "at once (a turbo worker holds 4 streams); more get RESOURCE_EXHAUSTED at once, so "
        "that no client takes all of DOCKERCOINS_MAX_CONCURRENT_RPCS. `dockercoins up` with "
        "more than 64 turbo workers on one host raises it.",
    )
    max_work_in_progress: int = Field(
        2,
        ge=1,
        le=1024,
        description="Requests whose work a server does at once: the hasher's hashing, the "
        "takes from rng's buffer (rng's blocking source reads one at a time whatever this "
        "says). The others wait in a queue per client address, and the addresses take turns by "
        "what their requests cost, so that one address's many streams cannot take the work "
        "from the others.",
    )
    max_concurrent_streams: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Calls one client connection may have open at once (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); a client queues the ones past it.",
    )
    min_ping_interval: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="Least seconds between keepalive pings a gRPC server accepts from a "
        "client; pings more often are strikes.",
    )
    keepalive_time: float = Field(
        30.0,
        ge=1,
        le=86400,
        description="Seconds a client may stay silent before a gRPC server pings it, to find "
        "out whether it is still there.",
    )
    keepalive_timeout: float = Field(
        10.0,
        ge=1,
        le=3600,
        description="Seconds a gRPC server waits for the answer to its ping; then it closes the "
        "connection and ends the client's calls, whose slots are free again.",
    )
    max_ping_strikes: int = Field(
        2,
        ge=0,
        le=1000,
        description="Too-frequent pings a gRPC server bears before it closes the connection "
        "(GOAWAY too_many_pings; 0: no limit).",
    )


SettingsT = TypeVar("SettingsT", bound=BaseServiceSettings)


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build `cls` from the environment plus explicit overrides (flags).

    Raises ConfigError with one line naming the variable and what it expects.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a check across fields: its message names the variables
            raise ConfigError(str(error["msg"]).removeprefix("Value error, ")) from None
        field = str(error["loc"][0]) if error["loc"] else "?"
        value = error.get("input")
        got = f" (got {value!r})" if not isinstance(value, dict) else ""
        raise ConfigError(f"{env_name(field)}: {error['msg']}{got}") from None
