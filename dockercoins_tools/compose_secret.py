"""The compose stack's Redis password, made on its first `up` and kept in its volume after:
`python -m dockercoins_tools.compose_secret DIR` (compose.yaml's `redis-secret` service).

DIR/password holds the password, for the worker and the web UI (DOCKERCOINS_REDIS_PASSWORD_FILE);
DIR/redis.conf the lines that lock Redis with it (only its SHA-256), which redis-server reads as
its configuration file. Neither is ever in git, on a command line or in the environment."""

import os
import sys
from pathlib import Path

from dockercoins_tools.embedded_redis import locked_config, new_password

PASSWORD = "password"
CONFIG = "redis.conf"


def _write_once(path: Path, content: bytes) -> bool:
    """Create `path` with `content`, readable by every user of the volume (Redis and our
    services run as different users); False if it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    return True


def ensure_secret(directory: Path) -> bool:
    """Make the password and Redis's configuration in `directory` unless there; True if made."""
    password_file = directory / PASSWORD
    made = _write_once(password_file, new_password().encode())
    password = password_file.read_text().strip()
    if not password:
        raise SystemExit(f"{password_file} is empty: remove the volume that holds it")
    (directory / CONFIG).unlink(missing_ok=True)
    _write_once(directory / CONFIG, locked_config(password))
    return made


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m dockercoins_tools.compose_secret DIRECTORY")
    made = ensure_secret(Path(args[0]))
    print(f"redis password {'made' if made else 'kept'} in {args[0]}")


if __name__ == "__main__":
    main()
