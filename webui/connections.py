"""The web UI's door: what one client address may hold, and the deadlines uvicorn lacks.

Streams and connections are counted per client address, an IPv6 client by its /64 (what one
customer is given), so that one client cannot take what every visitor needs. uvicorn's h11
protocol gets three guards: a per-address bound on connections, a deadline for a request to
arrive (uvicorn has none before a connection's first request, nor for one dribbled a byte at a
time), and a write timeout that drops a client who stopped reading once its buffers are full.
What a connection holds in memory is bounded too: WRITE_BUFFER in the process, SEND_BUFFER in
the kernel (which Linux would otherwise let grow to 4 MiB on loopback: hours of a page's
events before a reader who stopped would be noticed).
"""

import asyncio
import ipaddress
import logging
import socket
import sys
from typing import Any, Literal

from uvicorn.protocols.http.h11_impl import H11Protocol

from webui.metrics import WEBUI_DROPPED, WEBUI_REFUSED

log = logging.getLogger(__name__)

WRITE_BUFFER = 64 * 1024
"""Bytes a connection's transport buffers beyond the kernel's before the response waits (and
the write timeout starts): asyncio's default high-water mark, set explicitly."""

SEND_BUFFER = 64 * 1024
"""The kernel's send buffer per connection (SO_SNDBUF, which Linux doubles): the page's largest
file (51 KB) in one go, a page's events for minutes."""


def client_key(host: str | None) -> str:
    """The address a client's streams and connections count under: its IPv4 address, or the
    /64 of its IPv6 address (an IPv4-mapped one as IPv4)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class PerClient:
    """What is held per client address, under a bound per address and one in all."""

    def __init__(self, per_client: int, total: int = sys.maxsize) -> None:
        self.per_client = per_client
        self.total = total
        self.held = 0
        self._by_client: dict[str, int] = {}

    def holds(self, key: str) -> int:
        """How many the address `key` holds."""
        return self._by_client.get(key, 0)

    def full_for(self, key: str) -> Literal["client", "total"] | None:
        """Which bound a new one for `key` would break: its own, the total, or None."""
        if self.holds(key) >= self.per_client:
            return "client"
        if self.held >= self.total:
            return "total"
        return None

    def take(self, key: str) -> None:
        self._by_client[key] = self.holds(key) + 1
        self.held += 1

    def give_back(self, key: str) -> None:
        left = self.holds(key) - 1
        if left > 0:
            self._by_client[key] = left
        else:
            self._by_client.pop(key, None)
        self.held -= 1


def guarded_h11(
    connections: PerClient, request_timeout: float, write_timeout: float
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the door's guards: `connections` bounds them per address
    (past it, a new connection is reset at once), a connection without a complete request
    `request_timeout` seconds after it opened or after its last response is closed, and one
    whose writes have waited `write_timeout` seconds on a full buffer is reset."""

    class GuardedH11(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._key = ""
            self._counted = False
            self._idle: asyncio.TimerHandle | None = None
            self._stalled: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._key = client_key(self.client[0] if self.client else None)
            if connections.full_for(self._key) is not None:
                WEBUI_REFUSED.labels("connections-per-client").inc()
                transport.abort()
                return
            connections.take(self._key)
            self._counted = True
            transport.set_write_buffer_limits(high=WRITE_BUFFER)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._wait_for_request()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._idle, self._stalled):
                if timer is not None:
                    timer.cancel()
            if self._counted:
                connections.give_back(self._key)
                self._counted = False
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._wait_for_request()

        def _wait_for_request(self) -> None:
            if self._idle is not None:
                self._idle.cancel()
            self._idle = self.loop.call_later(request_timeout, self._close_if_idle)

        def _close_if_idle(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way
                WEBUI_DROPPED.labels("no-request").inc()
                self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._stalled = self.loop.call_later(write_timeout, self._drop_stalled)

        def resume_writing(self) -> None:
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None
            super().resume_writing()

        def _drop_stalled(self) -> None:
            WEBUI_DROPPED.labels("stopped-reading").inc()
            log.debug("%s stopped reading for %g s: connection reset", self._key, write_timeout)
            self.transport.abort()

    return GuardedH11
