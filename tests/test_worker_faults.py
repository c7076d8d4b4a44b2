"""A worker's faults: stalls, silent connections, a long Redis outage and a full Redis.

Real rng, hasher, redis-server and worker processes; faults are real signals (SIGSTOP, SIGCONT,
SIGTERM) or a real TCP proxy that stops forwarding. Costs and deadlines are scaled down (a 1 s
RPC deadline, pauses of 2.5 s). Every test ends with the exact count: the `hashes` counter
equals the total the worker reports at exit, and the wallet holds every coin it found.
"""

import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.net import free_port
from dockercoins.redis_store import WALLET_KEY, WORKER_KEY_PREFIX
from tests.stack import LoggedProcess, RedisProcess, wait_until
from tests.support import metric, service_env

pytestmark = pytest.mark.slow

PAUSE = 2.5
"""Seconds a peer is paused: well past the worker's 1 s deadline."""

GRACE = 2.0

WORKER = {
    "rpc_timeout": 1.0,
    "redis_timeout": 0.5,
    "worker_flush_interval": 0.2,
    "grace": GRACE,
    "worker_think_time": 0.01,
}
"""The worker's settings in every test; the profile and addresses come on top."""


class Upstream:
    """rng or hasher as its own process, on a free port, that a test can pause."""

    def __init__(self, service: str, **fields: object) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"{service}_svc"],
            env=service_env(**{f"{service}_port": self.port, **fields}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addr = f"127.0.0.1:{self.port}"

    def serving(self) -> bool:
        return health_status(self.port) == "SERVING"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    """rng and hasher processes with their costs off, shared by the module's tests."""
    started = {
        "rng": Upstream("rng", rng_read_cost=0, rng_latency=0),
        "hasher": Upstream("hasher", hasher_latency=0),
    }
    try:
        for upstream in started.values():
            wait_until(upstream.serving, 30, "rng and hasher serving")
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    yield server
    server.stop()


def health_status(port: int, service: str = "", timeout: float = 5) -> str:
    """The status a gRPC health Check of `service` answers, or the error code's name."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class HealthRecorder:
    """Samples a worker's readiness and liveness in a thread, as probes would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            statuses = [health_status(self.port, name, 3) for name in ("", "readiness", "liveness")]
            self.samples.append((time.monotonic(), *statuses))

    def between(self, start: float, end: float) -> list[tuple[float, str, str, str]]:
        return [sample for sample in self.samples if start <= sample[0] <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Worker(LoggedProcess):
    """A worker process with a health port, its output collected."""

    def __init__(self, profile: str, rng: str, hasher: str, redis_url: str, **fields: object):
        self.health_port = free_port()
        self.metrics_port = free_port()
        settings = {
            **WORKER,
            "profile": profile,
            "rng_addr": rng,
            "hasher_addr": hasher,
            "redis_url": redis_url,
            "worker_health_port": self.health_port,
            "metrics_port": self.metrics_port,
            **fields,
        }
        super().__init__([sys.executable, "-m", "worker_svc"], service_env(**settings))

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    def hashes_done(self) -> int:
        """The worker's own total of hashes, as its /metrics says."""
        return int(metric(self.metrics_port, "dockercoins_worker_hashes_total"))

    def settled(self) -> int:
        """`hashes_done` once two readings in a row agree: the units in flight have ended."""
        return settled(self.hashes_done)

    def stop_and_totals(self, timeout: float = GRACE + 3) -> tuple[int, int, int, float]:
        """SIGTERM; (hashes, coins, unflushed) it reports, and the seconds it took to exit."""
        started = time.monotonic()
        code = self.stop(signal.SIGTERM, timeout=timeout)
        took = time.monotonic() - started
        assert code == 0, self.output
        found = re.search(
            r"worker stopped: (\d+) hashes, (\d+) coins, (\d+) hashes unflushed", self.output
        )
        assert found, self.output
        hashes, coins, unflushed = (int(n) for n in found.groups())
        return hashes, coins, unflushed, took


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill()


def rate(server: RedisProcess, seconds: float = 1.5) -> float:
    """Hashes per second the `hashes` counter grows by over `seconds`."""
    before = server.hashes()
    time.sleep(seconds)  # the window the rate is measured over
    return (server.hashes() - before) / seconds


def assert_exact_count(server: RedisProcess, worker: Worker) -> tuple[int, float]:
    """Stop the worker; the counter and the wallet hold exactly what it reports."""
    hashes, coins, unflushed, took = worker.stop_and_totals()
    assert unflushed == 0, worker.output
    assert server.hashes() == hashes, worker.output
    assert server.client.hlen(WALLET_KEY) == coins
    return hashes, took


def paused(proc: subprocess.Popen, seconds: float) -> float:
    """SIGSTOP `proc` for `seconds`, then SIGCONT; returns when it was continued."""
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the stall itself
    finally:
        proc.send_signal(signal.SIGCONT)
    return time.monotonic()


# --- stalls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["classic", "turbo"])
@pytest.mark.parametrize("peer", ["rng", "hasher", "redis"])
def test_a_paused_peer_costs_the_worker_its_deadline_and_nothing_else(
    upstreams, own_redis, workers, profile: str, peer: str, record_property
) -> None:
    worker = Worker(profile, upstreams["rng"].addr, upstreams["hasher"].addr, own_redis.url)
    workers.append(worker)
    wait_until(lambda: own_redis.hashes() > 0, 30, "mining", worker)
    wait_until(lambda: health_status(worker.health_port) == "SERVING", 10, "ready", worker)
    before = rate(own_redis)
    health = HealthRecorder(worker.health_port)
    proc = upstreams[peer].proc if peer != "redis" else own_redis.proc
    paused_at = time.monotonic()
    continued = paused(proc, PAUSE)
    worker.wait_for_line(rf"{peer} is back after", 10)

    rates: list[float] = []

    def half_the_rate_again() -> bool:
        rates.append(rate(own_redis, 1.0))
        return rates[-1] >= 0.5 * before

    wait_until(half_the_rate_again, 10, f"half of {before:.0f} h/s again ({rates})", worker)
    after = rates[-1]
    recovered = time.monotonic() - continued
    health.stop()

    # One line when the outage began, one when it ended, whatever the loops and retries.
    assert worker.count(rf"{peer} unreachable") == 1, worker.output
    assert worker.count(rf"{peer} is back after") == 1, worker.output
    assert worker.count(r"unreachable") == 1, worker.output
    during = health.between(paused_at + 1.5, continued)
    assert ("NOT_SERVING", "NOT_SERVING") in [(o, r) for _, o, r, _ in during], health.samples
    assert {live for *_, live in health.samples} == {"SERVING"}, "an outage is not a crash"
    assert health.samples[-1][1:3] == ("SERVING", "SERVING")

    assert_exact_count(own_redis, worker)
    record_property("recovered_s", round(recovered, 2))
    print(
        f"{profile} {peer}: {before:.0f} h/s before, {after:.0f} after, back in {recovered:.1f} s"
    )


def test_readiness_and_the_heartbeat_say_mining_only_while_it_mines(
    upstreams, own_redis, workers
) -> None:
    worker = Worker("classic", upstreams["rng"].addr, upstreams["hasher"].addr, own_redis.url)
    workers.append(worker)

    def heartbeat() -> dict:
        keys = own_redis.client.keys(WORKER_KEY_PREFIX + "*")
        return json.loads(own_redis.client.get(keys[0]) or "{}") if keys else {}

    wait_until(lambda: heartbeat().get("mining") is True, 30, "heartbeat mining", worker)
    rng = upstreams["rng"].proc
    rng.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: health_status(worker.health_port, "readiness") == "NOT_SERVING", 5,
                   "readiness NOT_SERVING", worker)  # fmt: skip
        assert health_status(worker.health_port) == "NOT_SERVING"
        assert health_status(worker.health_port, "liveness") == "SERVING"
        wait_until(lambda: heartbeat().get("mining") is False, 3, "heartbeat not mining", worker)
    finally:
        rng.send_signal(signal.SIGCONT)
    wait_until(lambda: health_status(worker.health_port) == "SERVING", 10, "ready again", worker)
    wait_until(lambda: heartbeat().get("mining") is True, 3, "heartbeat mining again", worker)
    assert_exact_count(own_redis, worker)


# --- a connection that goes silent ------------------------------------------------------------


class SilentProxy:
    """A TCP proxy that forwards until told to go silent: then it reads and writes nothing,
    on every connection it holds, as a partitioned network or a frozen peer would.
    `kill_open_connections()` silences the connections open now for good (a NAT or a peer
    that lost them) while new ones are forwarded."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silent = threading.Event()
        self.dead_before = float("-inf")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def kill_open_connections(self) -> None:
        self.dead_before = time.monotonic()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        born = time.monotonic()
        try:
            while not self._closing.is_set():
                if self.silent.is_set() or born < self.dead_before:
                    time.sleep(0.02)
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self._closing.set()
        self.listener.close()


@pytest.mark.parametrize("profile", ["classic", "turbo"])
def test_a_connection_that_goes_silent_is_abandoned_at_the_deadline(
    upstreams, own_redis, workers, profile: str
) -> None:
    proxy = SilentProxy(upstreams["hasher"].port)
    try:
        worker = Worker(profile, upstreams["rng"].addr, f"127.0.0.1:{proxy.port}", own_redis.url)
        workers.append(worker)
        wait_until(lambda: own_redis.hashes() > 0, 30, "mining", worker)
        proxy.silent.set()
        try:
            # Noticed at the deadline (1 s), not when the peer speaks again.
            worker.wait_for_line(r"hasher unreachable: \w+", 1.0 + 3)
            stalled = own_redis.hashes()
            time.sleep(0.5)  # a while without a hasher: the counter stands
            assert own_redis.hashes() - stalled < 1000, "mining without a hasher?"
        finally:
            proxy.silent.clear()
        worker.wait_for_line(r"hasher is back after", 10)
        wait_until(lambda: own_redis.hashes() > stalled, 10, "mining again", worker)
        assert worker.count(r"hasher unreachable") == 1, worker.output
        assert_exact_count(own_redis, worker)
    finally:
        proxy.close()


def test_a_dead_connection_that_looks_alive_is_replaced_by_keepalive(
    upstreams, own_redis, workers
) -> None:
    proxy = SilentProxy(upstreams["hasher"].port)
    try:
        worker = Worker("classic", upstreams["rng"].addr, f"127.0.0.1:{proxy.port}", own_redis.url)
        workers.append(worker)
        wait_until(lambda: own_redis.hashes() > 0, 30, "mining", worker)
        proxy.kill_open_connections()
        killed = time.monotonic()
        # Each call times out on the old connection until a keepalive ping (every 10 s) goes
        # unanswered for the deadline (1 s) and the channel connects anew.
        worker.wait_for_line(r"hasher is back after", 10 + 1 + 5)
        assert time.monotonic() - killed >= 1.0
        assert worker.count(r"hasher unreachable") == 1, worker.output
        assert_exact_count(own_redis, worker)
    finally:
        proxy.close()


# --- Redis away for long, Redis full ----------------------------------------------------------


def turbo_worker_mining(
    upstreams: dict[str, Upstream], server: RedisProcess, workers: list[Worker], **fields: object
) -> Worker:
    """A turbo worker with these settings, once its first count is in `server`."""
    worker = Worker("turbo", upstreams["rng"].addr, upstreams["hasher"].addr, server.url, **fields)
    workers.append(worker)
    wait_until(lambda: server.hashes() > 0, 30, "mining", worker)
    return worker


# These two need coins fast: the original's rule (one in 16; turbo's default is one in 65,536),
# in units of 1000 blocks, 4 in flight per loop, so that the bound is passed by a few at most.
MANY_COINS = {"difficulty": 1, "worker_batch": 1000, "worker_stream_window": 4}


def test_the_backlog_is_bounded_and_drains_in_chunks(upstreams, own_redis, workers) -> None:
    bound = 3000
    worker = turbo_worker_mining(
        upstreams,
        own_redis,
        workers,
        worker_max_pending_coins=bound,
        worker_flush_chunk=500,
        **MANY_COINS,
    )
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        worker.wait_for_line(r"mining paused: \d+ coins not yet in Redis", 10)
        # Paused: the worker's own total stops growing, once the units in flight have ended.
        frozen = worker.settled()
        time.sleep(1.0)  # a second more of the pause: not one hash more
        assert worker.hashes_done() == frozen, "mining while the backlog is full"
        assert health_status(worker.health_port) == "NOT_SERVING"
        assert health_status(worker.health_port, "liveness") == "SERVING"
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    worker.wait_for_line(r"mining resumed", 10)
    wait_until(lambda: worker.hashes_done() > frozen, 10, "mining again", worker)
    assert worker.count(r"mining paused") == 1, worker.output
    assert worker.count(r"redis unreachable") == 1, worker.output
    found = re.search(r"mining paused: (\d+) coins", worker.output)
    assert found and bound <= int(found.group(1)) < bound + 1000
    assert_exact_count(own_redis, worker)


OUTAGE = 6.0
"""Seconds Redis is paused in the kill -9 test: the issue's 120 s, scaled down (with the bound
scaled down to UNFLUSHED), three times the bound: a worker without it would lose the whole outage,
twice what the test allows; the full scale is measured by hand in docs/reliability.md."""

UNFLUSHED = 2.0
"""DOCKERCOINS_WORKER_MAX_UNFLUSHED in the kill -9 test."""


def settled(count: Callable[[], int]) -> int:
    """`count()` once two readings in a row, 0.3 s apart, agree."""
    readings: list[int] = []

    def still() -> bool:
        readings.append(count())
        return len(readings) > 1 and readings[-1] == readings[-2]

    wait_until(still, 10, "the count to settle", interval=0.3)
    return readings[-1]


@pytest.mark.alone  # the loss is bounded by the worker's own rate, measured before the outage
@pytest.mark.parametrize("difficulty", [1, 4])
def test_kill_9_during_a_redis_outage_loses_at_most_the_unflushed_bound(
    upstreams, own_redis, workers, difficulty: int
) -> None:
    """Redis paused for OUTAGE s: the worker stops mining once its oldest uncounted hash is
    UNFLUSHED s old (said once, not ready, still live), so a kill -9 then loses at most about
    UNFLUSHED s of its own rate, not the whole outage."""
    # The coin bound out of the way: at turbo's rate and the original's rule (difficulty 1) it
    # would pause the worker first, within a second.
    worker = turbo_worker_mining(
        upstreams,
        own_redis,
        workers,
        worker_max_unflushed=UNFLUSHED,
        worker_max_pending_coins=2_000_000,
        difficulty=difficulty,
    )
    before = worker.hashes_done()
    time.sleep(1.5)  # the window the worker's own rate is measured over, this run
    rate = (worker.hashes_done() - before) / 1.5
    own_redis.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        worker.wait_for_line(
            r"mining paused: \d+ hashes not yet in Redis, the oldest found [\d.]+ s ago "
            rf"\(DOCKERCOINS_WORKER_MAX_UNFLUSHED={UNFLUSHED:g} s\)",
            UNFLUSHED + 5,
        )
        frozen = worker.settled()
        assert health_status(worker.health_port) == "NOT_SERVING"
        assert health_status(worker.health_port, "liveness") == "SERVING"
        time.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))  # the rest of the outage
        done = worker.hashes_done()
        assert done == frozen, "mining while its unflushed work is at the bound"
        worker.proc.kill()
        worker.proc.wait(10)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    # Commands the killed worker sent before it died may still be in Redis's socket.
    lost = done - settled(own_redis.hashes)
    assert worker.count(r"mining paused") == 1, worker.output
    # At most the bound, the flush interval and the units in flight at the worker's own rate.
    assert 0 <= lost <= rate * (UNFLUSHED + 1.0), (
        f"lost {lost} hashes of {done}; {rate:.0f} hashes/s"
    )


def test_a_full_redis_pauses_mining_and_loses_nothing(upstreams, tmp_path, workers) -> None:
    server = RedisProcess(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    try:
        worker = Worker(
            "turbo",
            upstreams["rng"].addr,
            upstreams["hasher"].addr,
            server.url,
            worker_max_pending_coins=20_000,
            **MANY_COINS,
        )
        workers.append(worker)
        worker.wait_for_line(r"redis unreachable: \w*Error: .*maxmemory", 30)
        worker.wait_for_line(r"mining paused", 10)
        assert worker.proc.poll() is None
        server.client.config_set("maxmemory", "0")  # the operator makes room
        worker.wait_for_line(r"redis is back after", 10)
        worker.wait_for_line(r"mining resumed", 10)
        assert worker.count(r"redis unreachable") == 1, worker.output
        assert_exact_count(server, worker)
    finally:
        server.stop()


# --- stopping during an outage ----------------------------------------------------------------


@pytest.mark.parametrize("peer", ["hasher", "redis"])
def test_sigterm_during_an_outage_stops_within_the_grace(
    upstreams, own_redis, workers, peer: str
) -> None:
    worker = Worker("turbo", upstreams["rng"].addr, upstreams["hasher"].addr, own_redis.url)
    workers.append(worker)
    wait_until(lambda: own_redis.hashes() > 0, 30, "mining", worker)
    proc = upstreams[peer].proc if peer != "redis" else own_redis.proc
    proc.send_signal(signal.SIGSTOP)
    try:
        worker.wait_for_line(rf"{peer} unreachable", 5)
        hashes, coins, unflushed, took = worker.stop_and_totals(timeout=GRACE + 3)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert took < GRACE + 1.0, f"stopped in {took:.1f} s"
    if peer == "redis":
        assert unflushed > 0 and "could not flush" in worker.output
        # A flush sent before the exit may still be applied when Redis wakes: never more.
        assert hashes - unflushed <= own_redis.hashes() <= hashes
    else:
        assert unflushed == 0
        assert own_redis.hashes() == hashes
        assert own_redis.client.hlen(WALLET_KEY) == coins
