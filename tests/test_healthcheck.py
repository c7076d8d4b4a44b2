"""`dockercoins_tools.healthcheck`, compose's health check: one Check in HTTP/2 frames of its own,
against real rng and hasher servers in this process, and against peers that never answer well."""

import asyncio
import socket
import threading
import time

import pytest

from dockercoins.net import free_port
from dockercoins_tools.healthcheck import (
    GOAWAY,
    GRPC_CODES,
    HEADERS,
    RST_STREAM,
    SERVING_STATUS,
    SETTINGS,
    HeaderBlock,
    check,
    frame,
    hpack_int,
    literal,
)
from tests.support import GrpcServers


async def test_serving_overall_and_by_name_and_unknown_names_not_found(
    servers: GrpcServers,
) -> None:
    rng, hasher = await servers.rng(), await servers.hasher()
    asked = [
        (rng, "dockercoins.v1.Rng"), (rng, ""), (hasher, "dockercoins.v1.Hasher"), (hasher, ""),
        (rng, "dockercoins.v1.Hasher"), (hasher, "nosuch"),
    ]  # fmt: skip
    said = [await asyncio.to_thread(check, address, name, 2.0) for address, name in asked]
    assert said == ["", "", "", "", "NOT_FOUND", "NOT_FOUND"]


async def test_a_stopping_server_is_not_serving(servers: GrpcServers) -> None:
    rng = await servers.rng()
    await servers.at(rng).health.enter_graceful_shutdown()  # what a stopping server does first
    assert await asyncio.to_thread(check, rng, "dockercoins.v1.Rng", 2.0) == "NOT_SERVING"


def _answer_once(reply: bytes) -> tuple[str, threading.Thread]:
    """A peer that reads what it is sent, answers `reply` (if any) and hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        with listener:
            peer, _ = listener.accept()
            with peer:
                peer.recv(4096)
                peer.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{listener.getsockname()[1]}", thread


def test_a_silent_peer_fails_the_check_at_its_deadline() -> None:
    with socket.socket() as silent:  # listens; the kernel accepts; nobody reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        said = check(f"127.0.0.1:{silent.getsockname()[1]}", "", 0.5)
        took = time.monotonic() - started
    assert said == "DEADLINE_EXCEEDED: no answer in 0.5 s"
    assert 0.4 < took < 2, took


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "INTERNAL: a frame larger"),
        (b"", "UNAVAILABLE: the server closed the connection mid-call"),
        # GOAWAY on the connection (last stream 0, PROTOCOL_ERROR); RST_STREAM of the call.
        (frame(GOAWAY, 0, 0, bytes(7) + b"\x01"), "UNAVAILABLE: the server sent GOAWAY"),
        (frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x02"), "UNAVAILABLE: the server reset"),
    ],
)
def test_a_peer_that_is_no_grpc_server_fails_the_check_with_its_reason(
    reply: bytes, reason: str
) -> None:
    address, thread = _answer_once(reply)
    assert check(address, "", 2.0).startswith(reason)
    thread.join(timeout=5)


def test_nothing_listening_is_unavailable() -> None:
    assert check(f"127.0.0.1:{free_port()}", "", 1.0).startswith("UNAVAILABLE: cannot connect")


def test_trailers_only_with_a_huffman_coded_status_fail_unreadable() -> None:
    """HEADERS that end the call with grpc-status Huffman-coded ('0' is 00000 and 3 bits of EOS)."""
    block = b"\x00" + hpack_int(len(b"grpc-status"), 7) + b"grpc-status" + b"\x81\x07"
    end_stream_and_headers = 0x5
    reply = frame(SETTINGS, 0, 0) + frame(HEADERS, end_stream_and_headers, 1, block)
    address, thread = _answer_once(reply)
    assert check(address, "", 2.0) == "grpc-status unreadable (Huffman-coded)"
    thread.join(timeout=5)


def test_header_blocks_decode_literals_and_the_entries_they_index() -> None:
    status = b"\x40" + literal("grpc-status", "5")[1:]  # a literal with incremental indexing
    message = literal("grpc-message", "x" * 300)  # a length past the 7-bit prefix
    decoder = HeaderBlock()
    assert decoder.decode(b"\x88" + status + message) == {  # 0x88: static :status 200
        "grpc-status": "5",
        "grpc-message": "x" * 300,
    }
    assert decoder.decode(bytes([0x80 | 62])) == {"grpc-status": "5"}  # the dynamic entry
    assert hpack_int(300, 7) == b"\x7f\xad\x01"  # RFC 7541 C.1.2's method, 7-bit prefix


def test_the_names_of_codes_and_statuses_are_grpcs() -> None:
    """The check carries its own tables so as not to import gRPC: they must stay gRPC's."""
    import grpc
    from grpc_health.v1 import health_pb2

    assert {code.value[0]: code.name for code in grpc.StatusCode} == dict(enumerate(GRPC_CODES))
    statuses = health_pb2.HealthCheckResponse.ServingStatus
    assert {value: name for name, value in statuses.items()} == dict(enumerate(SERVING_STATUS))
