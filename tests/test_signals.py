"""SIGTERM to each service as a real process: NOT_SERVING first, in-flight calls finish, exit 0."""

import signal
import threading
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from tests.stack import Service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """A Health/Watch stream in a thread: every status the server sends, in order."""

    def __init__(self, address: str, service: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.statuses: list[int] = []
        stub = health_pb2_grpc.HealthStub(self.channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for reply in self._stream:
                self.statuses.append(reply.status)
        except grpc.RpcError:
            pass  # the server went away: the end of the watch

    def wait_for(self, status: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while status not in self.statuses:
            assert time.monotonic() < deadline, f"statuses so far: {self.statuses}"
            time.sleep(0.02)

    def close(self) -> None:
        self._stream.cancel()
        self.channel.close()


def slow_call(command: str, channel: grpc.Channel) -> grpc.Future:
    if command == "rng":
        stub = rng_pb2_grpc.RngStub(channel)
        return stub.GetRandom.future(rng_pb2.RandomRequest(size=32), timeout=20)
    hasher = hasher_pb2_grpc.HasherStub(channel)
    return hasher.Hash.future(hasher_pb2.HashRequest(data=b"x" * 32), timeout=20)


@pytest.mark.parametrize(
    ("command", "settings", "service"),
    [
        ("rng", {"rng_read_cost": 1.5}, "dockercoins.v1.Rng"),
        ("hasher", {"hasher_latency": 1.5}, "dockercoins.v1.Hasher"),
    ],
)
def test_sigterm_says_not_serving_first_finishes_calls_and_exits_0(
    command, settings, service
) -> None:
    port = free_port()
    server = Service(command, **{f"{command}_port": port}, grace=5, **settings)
    try:
        server.wait_for("listening on")
        address = f"127.0.0.1:{port}"
        watch = HealthWatch(address, service)
        watch.wait_for(SERVING)
        channel = grpc.insecure_channel(address)
        in_flight = slow_call(command, channel)
        time.sleep(0.5)  # the call is being served: inside its 1.5 s cost
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        watch.wait_for(NOT_SERVING)
        # A Watch never ends by itself: left open, it would hold the stop for the whole grace.
        watch.close()
        reply = in_flight.result(timeout=10)  # finished within the grace period
        assert (len(reply.data) if command == "rng" else len(reply.hexdigests)) in (32, 1)
        assert server.proc.wait(15) == 0
        took = time.monotonic() - sent
        assert took < 5, f"{command} took {took:.1f} s to stop with a 1.5 s call in flight"
        assert watch.statuses[0] == SERVING
        assert watch.statuses[-1] == NOT_SERVING
        assert any(f"{command} stopped" in line for line in server.lines), server.lines
        assert not any("Traceback" in line for line in server.lines), server.lines
        channel.close()
    finally:
        server.kill()


def test_sigterm_to_a_worker_flushes_everything_and_exits_0(redis_url) -> None:
    rng_port, hasher_port, health_port = free_port(), free_port(), free_port()
    rng = Service("rng", rng_port=rng_port, rng_read_cost=0.005)
    hasher = Service("hasher", hasher_port=hasher_port, hasher_latency=0.005)
    worker = None
    try:
        rng.wait_for("listening on")
        hasher.wait_for("listening on")
        worker = Service(
            "worker",
            rng_addr=f"127.0.0.1:{rng_port}",
            hasher_addr=f"127.0.0.1:{hasher_port}",
            redis_url=redis_url,
            worker_think_time=0.005,
            worker_flush_interval=5,  # most of the work is still unflushed at SIGTERM
            worker_health_port=health_port,
        )
        worker.wait_for("mining")
        watch = HealthWatch(f"127.0.0.1:{health_port}", "")
        watch.wait_for(SERVING)
        time.sleep(2)
        assert worker.terminate() == 0
        watch.wait_for(NOT_SERVING)
        stopped = next(line for line in worker.lines if "worker stopped:" in line)
        hashes = int(stopped.split("worker stopped: ")[1].split()[0])
        assert hashes > 10
        assert stopped.endswith(" 0 hashes unflushed")
        assert int(redis.Redis.from_url(redis_url).get("hashes")) == hashes
        watch.close()
        for server in (hasher, rng):
            assert server.terminate() == 0
    finally:
        for service in (worker, hasher, rng):
            if service is not None:
                service.kill()


def test_sigterm_to_the_web_ui_exits_0(redis_url) -> None:
    port = free_port()
    webui = Service("webui", webui_port=port, redis_url=redis_url)
    try:
        webui.wait_for("listening on")
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert webui.terminate() == 0
    finally:
        webui.kill()
