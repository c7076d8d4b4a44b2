"""The control socket of `dockercoins up`: the server that scales the running stack on request
from `dockercoins scale`, and that command's client."""

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from dockercoins.errors import ConfigError, DockercoinsError
from dockercoins.redaction import redact_url
from dockercoins.settings import env_name
from dockercoins_tools.launcher.settings import CONTROL_SOCKET, checked_count
from dockercoins_tools.launcher.stack import Stack

log = logging.getLogger(__name__)

CONTROL_LINE_LIMIT = 4096
"""Bytes of one control request: a scale request is a few dozen."""

CONTROL_READ_TIMEOUT = 5.0
"""Seconds the control socket waits for a request once a client connected."""


class ControlServer:
    """A Unix socket in the data directory through which `dockercoins scale` reaches the stack.

    Mode 0600 in a directory of this user's: only this user can scale the stack. A request
    is one JSON line; anything else is answered with an error, never a crash.
    """

    def __init__(self, stack: Stack, path: Path) -> None:
        self.stack = stack
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(self.path), limit=CONTROL_LINE_LIMIT
        )
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(CONTROL_READ_TIMEOUT):
                    line = await reader.readline()
            except TimeoutError:
                reply = _refused(f"no request within {CONTROL_READ_TIMEOUT:.0f} s")
            except ValueError:
                reply = _refused(f"request longer than {CONTROL_LINE_LIMIT} bytes")
            else:
                reply = await self.answer(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client left: nobody to answer
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line: `{"scale": {"worker": N, "rng": K}}` or `{}`."""
        try:
            request = json.loads(line)
        except ValueError:
            return _refused("not a JSON request")
        if not isinstance(request, dict) or set(request) - {"scale"}:
            return _refused('expected {"scale": {"worker": N, "rng": K}}')
        scale = request.get("scale", {})
        if not isinstance(scale, dict):
            return _refused('expected {"scale": {"worker": N, "rng": K}}')
        try:
            counts = [checked_count(service, count) for service, count in scale.items()]
            for service, count in counts:
                await self.stack.scale(service, count)
        except DockercoinsError as exc:
            return _refused(str(exc))
        except Exception as exc:  # a defect: say it, keep the launcher and its stack running
            log.exception("control request %r failed", request)
            return _refused(f"failed: {exc!r}")
        return {"ok": True, "status": self.status()}

    def status(self) -> dict[str, Any]:
        """Counts and addresses of the running stack."""
        return {
            "worker": len(self.stack.workers),
            "rng": len(self.stack.rngs),
            "redis_url": redact_url(self.stack.redis_url),
            "webui": f"http://{self.stack.client_host}:{self.stack.ports.get('webui')}",
        }

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _refused(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


async def send_control(data_dir: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the stack running with `data_dir`; its reply, within `timeout` s."""
    path = data_dir / CONTROL_SOCKET
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(
            f"no running `dockercoins up` found (no control socket at {path}; "
            f"set {env_name('data_dir')} to the one it uses)"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (a stack of another user?)") from None
    except TimeoutError:
        raise DockercoinsError(
            f"no answer from the `dockercoins up` at {path} within {timeout:g} s "
            f"({env_name('control_timeout')})"
        ) from None
    except ConnectionError as exc:
        raise DockercoinsError(f"the `dockercoins up` at {path} hung up: {exc}") from None
    if not line:
        raise DockercoinsError(f"the `dockercoins up` at {path} closed without an answer")
    reply: dict[str, Any] = json.loads(line)
    return reply
