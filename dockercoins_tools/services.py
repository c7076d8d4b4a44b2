"""The services DockerCoins runs, by name: each one's package, settings class and flags. The CLI,
`dockercoins settings` and the launcher read them here."""

import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from dockercoins.service_main import Flag
from dockercoins.settings import BaseServiceSettings
from hasher_svc import config as hasher_config
from rng_svc import config as rng_config
from webui import config as webui_config
from worker_svc import config as worker_config


@dataclass(frozen=True)
class Service:
    """A service: `python -m <package>` runs it alone; its settings and flags come from
    `<package>.config`, its serve() from `<package>.server` (imported only to run it)."""

    package: str
    settings: type[BaseServiceSettings]
    flags: Sequence[Flag]
    help: str

    @property
    def argv(self) -> list[str]:
        """The command that runs it as a process of its own, with this interpreter."""
        return [sys.executable, "-m", self.package]

    def load_serve(self) -> Callable[[Any], Coroutine[Any, Any, None]]:
        """Its serve(settings), imported now (not when the CLI starts: a server imports a lot)."""
        serve: Callable[[Any], Coroutine[Any, Any, None]]
        serve = importlib.import_module(f"{self.package}.server").serve
        return serve

    def default(self, field: str) -> Any:
        """The default of one of its settings (its port, say)."""
        return self.settings.model_fields[field].default


SERVICES: dict[str, Service] = {
    "rng": Service("rng_svc", rng_config.RngSettings, rng_config.FLAGS, "run the rng service"),
    "hasher": Service(
        "hasher_svc", hasher_config.HasherSettings, hasher_config.FLAGS, "run the hasher service"
    ),
    "worker": Service(
        "worker_svc", worker_config.WorkerSettings, worker_config.FLAGS, "run one worker"
    ),
    "webui": Service("webui", webui_config.WebuiSettings, webui_config.FLAGS, "run the web UI"),
}
"""Every service, in the order the CLI lists them."""
