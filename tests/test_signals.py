"""SIGTERM and SIGHUP to each service and to `dockercoins up` as real processes: NOT_SERVING
first, in-flight calls finish, workers flush, Redis stops last, exit 0."""

import re
import signal
import threading
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from tests.stack import RunningStack, Service, alive, get_json, read_data_dir, wait_until
from tests.support import metric

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

STOP_SIGNALS = pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"]
)
"""Docker and Kubernetes send SIGTERM; a closed terminal or a dropped ssh session SIGHUP."""


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
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        wait_until(lambda: status in self.statuses, timeout, f"{name} watched")

    def close(self) -> None:
        self._stream.cancel()
        self.channel.close()


def slow_call(command: str, channel: grpc.Channel) -> grpc.Future:
    if command == "rng":
        stub = rng_pb2_grpc.RngStub(channel)
        return stub.GetRandom.future(rng_pb2.RandomRequest(size=32), timeout=20)
    hasher = hasher_pb2_grpc.HasherStub(channel)
    return hasher.Hash.future(hasher_pb2.HashRequest(data=b"x" * 32), timeout=20)


@STOP_SIGNALS
@pytest.mark.parametrize(
    ("command", "settings", "service"),
    [
        ("rng", {"rng_read_cost": 1.5}, "dockercoins.v1.Rng"),
        ("hasher", {"hasher_latency": 1.5}, "dockercoins.v1.Hasher"),
    ],
)
def test_a_stop_signal_says_not_serving_first_finishes_calls_and_exits_0(
    command, settings, service, sig
) -> None:
    port, metrics_port = free_port(), free_port()
    server = Service(
        command, **{f"{command}_port": port}, grace=5, metrics_port=metrics_port, **settings
    )
    try:
        server.wait_for("listening on")
        address = f"127.0.0.1:{port}"
        watch = HealthWatch(address, service)
        watch.wait_for(SERVING)
        channel = grpc.insecure_channel(address)
        in_flight = slow_call(command, channel)
        method = "GetRandom" if command == "rng" else "Hash"
        started = {"grpc_method": method}
        wait_until(
            lambda: metric(metrics_port, "grpc_server_started_total", **started) == 1,
            5,
            "the call served",
            server,
        )
        sent = time.monotonic()  # inside its 1.5 s cost
        server.proc.send_signal(sig)
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


@STOP_SIGNALS
def test_a_stop_signal_to_a_worker_flushes_everything_and_exits_0(redis_url, sig) -> None:
    rng_port, hasher_port, health_port, metrics_port = (free_port() for _ in range(4))
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
            metrics_port=metrics_port,
        )
        worker.wait_for("mining")
        watch = HealthWatch(f"127.0.0.1:{health_port}", "")
        watch.wait_for(SERVING)
        wait_until(
            lambda: metric(metrics_port, "dockercoins_worker_hashes_total") > 10,
            20,
            "10 hashes done",
            worker,
            errors=(OSError,),  # its /metrics not served yet
        )
        assert worker.stop(sig) == 0
        watch.wait_for(NOT_SERVING)
        stopped = next(line for line in worker.lines if "worker stopped:" in line)
        hashes = int(stopped.split("worker stopped: ")[1].split()[0])
        assert hashes > 10
        assert stopped.endswith(" 0 hashes unflushed")
        assert int(redis.Redis.from_url(redis_url).get(HASHES_KEY)) == hashes
        watch.close()
        for server in (hasher, rng):
            assert server.terminate() == 0
    finally:
        for service in (worker, hasher, rng):
            if service is not None:
                service.kill()


@STOP_SIGNALS
def test_a_stop_signal_to_the_web_ui_exits_0(redis_url, sig) -> None:
    port = free_port()
    webui = Service("webui", webui_port=port, redis_url=redis_url)
    try:
        webui.wait_for("listening on")
        healthz = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: get_json(healthz), 10, "/healthz answering", webui, errors=(OSError,))
        assert webui.stop(sig) == 0
        assert not any("Traceback" in line for line in webui.lines), webui.lines
    finally:
        webui.kill()


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_stop_signal_to_up_stops_the_workers_first_and_redis_last(tmp_path, sig) -> None:
    """SIGHUP (a closed terminal) stops `dockercoins up` as SIGTERM and Ctrl-C do: the workers
    stop and flush, then the web UI, hasher and rng, then Redis, which keeps every count."""
    stack = RunningStack(tmp_path / "data", ("--workers", "2"))
    try:
        url = stack.ready()
        children = stack.children()

        def both_mining() -> bool:  # on a busy machine one may start seconds after the other
            data = get_json(url + "/json")
            return data["workers"] == 2 and data["hashes"] > 10

        wait_until(both_mining, 30, "both workers mining", stack)
        assert stack.stop(sig) == 0
        lines = stack.lines
        flushed = [i for i, line in enumerate(lines) if "worker stopped:" in line]
        servers = [i for i, line in enumerate(lines) if re.search(r"(rng|hasher) stopped$", line)]
        redis_gone = [i for i, line in enumerate(lines) if "ready to exit" in line]
        assert len(flushed) == 2 and len(servers) == 2 and len(redis_gone) == 1, stack.output
        assert max(flushed) < min(servers) and max(servers) < redis_gone[0], stack.output
        assert lines[-1] == "dockercoins up: stopped"
        assert [pid for pid in children if alive(pid)] == []
        totals = [
            re.search(r"worker stopped: (\d+) hashes, .* (\d+) hashes unflushed", lines[i])
            for i in flushed
        ]
        assert all(found and found.group(2) == "0" for found in totals), stack.output
        hashes, _ = read_data_dir(tmp_path / "data" / "redis")
        assert hashes == sum(int(found.group(1)) for found in totals if found)
    finally:
        stack.kill()
