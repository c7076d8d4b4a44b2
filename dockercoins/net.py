"""Ports: find a free one, and refuse a busy one with an error that names it."""

import socket

from dockercoins.errors import PortInUseError


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 literal (`::`, `::1`), else IPv4."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 literal in brackets (`[::]:50051`), as gRPC and URLs take it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind `port` on `host` now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # As servers bind (gRPC, uvicorn and Redis all set it): connections of a crashed
        # predecessor in TIME_WAIT do not make the port busy, a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def ensure_free(setting: str, host: str, port: int) -> int:
    """`port` if it can be bound on `host`, a free one if it is 0; else PortInUseError."""
    if port == 0:
        return free_port(host)
    if port_in_use(host, port):
        raise PortInUseError(setting, host, port)
    return port
