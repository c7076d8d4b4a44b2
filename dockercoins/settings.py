"""The settings base every service shares: DOCKERCOINS_ environment, frozen, one-line errors."""

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dockercoins.errors import ConfigError

ENV_PREFIX = "DOCKERCOINS_"

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


class GrpcServerSettings(BaseServiceSettings):
    """Fields of the services that are gRPC servers."""

    max_connection_age: float = Field(
        0,
        ge=0,
        le=86400,
        description="Seconds after which a gRPC server asks clients to reconnect, so that new "
        "replicas get traffic (0: never).",
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
        field = str(error["loc"][0]) if error["loc"] else "?"
        value = error.get("input")
        got = f" (got {value!r})" if not isinstance(value, dict) else ""
        raise ConfigError(f"{env_name(field)}: {error['msg']}{got}") from None
