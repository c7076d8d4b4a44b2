"""`python -m dockercoins_tools.healthcheck HOST:PORT --service NAME`: one gRPC health Check, for
container health checks.

Compose runs a container's health check every 5 s for as long as it lives, in every container, so
this speaks the few HTTP/2 frames of one unary call itself, with the standard library alone:
importing gRPC costs 0.15 s of CPU a check, which with ten workers, two rngs, hasher and the web UI
came to a third of a core on a 2-core machine, taken from the containers' own share. It sends
its header fields as plain literals and reads the grpc-status and grpc-message that this
project's servers (gRPC's C core) send as plain literals too; a Huffman-coded status reads as
unreadable and fails the check. Plaintext only; with TLS on, use `dockercoins probe --health`.
"""

import argparse
import socket
import struct
import sys
import time
from collections.abc import Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
STREAM = 1
"""The one stream of the one call."""
STATIC_TABLE_SIZE = 61
"""HPACK's static table (RFC 7541, appendix A): the names asked for here are not in it."""
MAX_FRAME = 1 << 14
"""The largest frame a peer may send before we raise it (we never do): more is a broken peer."""
SERVING_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
"""grpc.health.v1's ServingStatus by number (tests/test_healthcheck.py holds it to health_pb2)."""
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
"""gRPC's status codes by number (tests/test_healthcheck.py holds them to grpc.StatusCode)."""


class CheckFailed(Exception):
    """The call did not end in a reply: the reason, as a status name and what was seen."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """An HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload (RFC 9113 4.1)."""
    return struct.pack(">IBBI", len(payload), kind, flags, stream)[1:] + payload


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """RFC 7541 5.1: `value` in a `prefix`-bit prefix, `first` holding the bits above it."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    return bytes((first | limit,)) + varint(value - limit)  # the rest: 7 bits a byte, low first


def literal(name: str, value: str) -> bytes:
    """A header field as a literal without indexing, with a new name, no Huffman coding."""
    raw_name, raw_value = name.encode(), value.encode()
    return (
        b"\x00" + hpack_int(len(raw_name), 7) + raw_name + hpack_int(len(raw_value), 7) + raw_value
    )


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint, which is also HPACK's integer past its prefix."""
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def request(authority: str, service: str, timeout: float) -> bytes:
    """The preface, our (default) settings, and the call: headers, then its one message."""
    fields = b"\x83\x86" + b"".join(  # :method POST, :scheme http (static table 3 and 6)
        literal(name, value)
        for name, value in (
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{max(1, int(timeout * 1000))}m"),
        )
    )
    raw = service.encode()
    message = b"\x0a" + varint(len(raw)) + raw if raw else b""  # HealthCheckRequest.service
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return (
        PREFACE
        + frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, STREAM, fields)
        + frame(DATA, END_STREAM, STREAM, body)
    )


class HeaderBlock:
    """Just enough HPACK decoding to read grpc-status and grpc-message (RFC 7541 6)."""

    def __init__(self) -> None:
        self.dynamic: list[tuple[str | None, str | None]] = []

    def decode(self, block: bytes) -> dict[str, str | None]:
        fields: dict[str, str | None] = {}
        at = 0
        while at < len(block):
            byte = block[at]
            if byte & 0x80:  # indexed field
                index, at = self._int(block, at, 7)
                name, value = self._entry(index)
            elif byte & 0xE0 == 0x20:  # dynamic table size update
                _, at = self._int(block, at, 5)
                continue
            else:  # a literal: incremental indexing (01), without (0000) or never (0001)
                indexing = byte & 0xC0 == 0x40
                index, at = self._int(block, at, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, at = self._string(block, at)
                value, at = self._string(block, at)
                if indexing:
                    self.dynamic.insert(0, (name, value))
            if name is not None:
                fields[name] = value
        return fields

    def _entry(self, index: int) -> tuple[str | None, str | None]:
        if index <= STATIC_TABLE_SIZE:
            return None, None
        try:
            return self.dynamic[index - STATIC_TABLE_SIZE - 1]
        except IndexError:
            raise CheckFailed(f"INTERNAL: header index {index} is in no table") from None

    @staticmethod
    def _int(block: bytes, at: int, prefix: int) -> tuple[int, int]:
        limit = (1 << prefix) - 1
        value, at = block[at] & limit, at + 1
        if value < limit:
            return value, at
        shift = 0
        while True:
            if at >= len(block) or shift > 28:
                raise CheckFailed("INTERNAL: a broken header block")
            byte, at = block[at], at + 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at

    @classmethod
    def _string(cls, block: bytes, at: int) -> tuple[str | None, int]:
        huffman = block[at] & 0x80 if at < len(block) else 0
        length, at = cls._int(block, at, 7)
        if at + length > len(block):
            raise CheckFailed("INTERNAL: a broken header block")
        raw = block[at : at + length]
        return (None if huffman else raw.decode("latin-1")), at + length


def call(address: str, service: str, timeout: float) -> tuple[dict[str, str | None], bytes]:
    """One Check over a fresh connection: the trailers (with the headers) and the reply's bytes."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"UNAVAILABLE: cannot connect: {exc}") from None
    with sock:
        try:
            return _exchange(sock, address, service, timeout, deadline)
        except TimeoutError:
            raise CheckFailed(f"DEADLINE_EXCEEDED: no answer in {timeout:g} s") from None
        except OSError as exc:
            raise CheckFailed(f"UNAVAILABLE: {exc}") from None


def _exchange(
    sock: socket.socket, address: str, service: str, timeout: float, deadline: float
) -> tuple[dict[str, str | None], bytes]:
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(request(address, service, timeout))
    headers = HeaderBlock()
    fields: dict[str, str | None] = {}
    body = pending = block = b""
    ended = 0
    while True:
        while len(pending) < 9 or len(pending) < 9 + int.from_bytes(pending[:3], "big"):
            if len(pending) >= 9 and int.from_bytes(pending[:3], "big") > MAX_FRAME:
                raise CheckFailed("INTERNAL: a frame larger than HTTP/2 allows")
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise CheckFailed("UNAVAILABLE: the server closed the connection mid-call")
            pending += chunk
        size = int.from_bytes(pending[:3], "big")
        kind, flags = pending[3], pending[4]
        stream = int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
        payload, pending = pending[9 : 9 + size], pending[9 + size :]
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            sock.sendall(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            raise CheckFailed("UNAVAILABLE: the server sent GOAWAY")
        elif stream != STREAM:
            continue
        elif kind == RST_STREAM:
            raise CheckFailed("UNAVAILABLE: the server reset the call")
        elif kind == DATA:
            body += _unpad(payload, flags)
            if flags & END_STREAM:  # no trailers: the status check below says so
                return fields, body
        elif kind in (HEADERS, CONTINUATION):  # CONTINUATION: until END_HEADERS
            if kind == HEADERS:
                payload = _unpad(payload, flags)
                if flags & PRIORITY:
                    payload = payload[5:]
                ended = flags & END_STREAM
            block += payload
            if flags & END_HEADERS:
                fields.update(headers.decode(block))
                block = b""
                if ended:
                    return fields, body


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & PADDED:
        return payload
    pad = payload[0] if payload else 0
    return payload[1 : len(payload) - pad]


def check(address: str, service: str, timeout: float) -> str:
    """Ask the health service at `address` about `service`; '' if SERVING, else why not."""
    try:
        fields, body = call(address, service, timeout)
    except CheckFailed as exc:
        return str(exc)
    status = fields.get("grpc-status", "")
    if status != "0":
        if status is None:
            name = "grpc-status unreadable (Huffman-coded)"
        elif status.isdigit() and int(status) < len(GRPC_CODES):
            name = GRPC_CODES[int(status)]
        else:
            name = f"grpc-status {status!r}"
        details = fields.get("grpc-message")
        return f"{name}: {details}" if details else name
    # One length-prefixed HealthCheckResponse: field 1, the status, a varint (0 when absent).
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        return f"INTERNAL: not one uncompressed reply message ({len(body)} bytes)"
    message, serving = body[5:], 0
    if message[:1] == b"\x08" and len(message) >= 2:
        serving = message[1]
    if serving != SERVING_STATUS.index("SERVING"):
        return SERVING_STATUS[serving] if serving < len(SERVING_STATUS) else f"status {serving}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 if SERVING, 1 if not (or unreachable), 2 on bad arguments; one line either way."""
    parser = argparse.ArgumentParser(
        prog="python -m dockercoins_tools.healthcheck",
        description="One grpc.health.v1 Check; exit 0 if the service answers SERVING.",
    )
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument(
        "--service",
        default="",
        help="health service to ask about: dockercoins.v1.Rng, dockercoins.v1.Hasher, a "
        "worker's readiness or liveness; '' (default): the server's overall status",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (2)")
    options = parser.parse_args(argv)
    if options.timeout <= 0:
        parser.error("--timeout must be above 0")
    what = f"{options.address} {options.service or '(overall)'}"
    failure = check(options.address, options.service, options.timeout)
    if failure:
        print(f"{what}: {failure}", file=sys.stderr)
        return 1
    print(f"{what}: SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
