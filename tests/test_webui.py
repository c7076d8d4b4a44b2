"""The web UI against a real redis-server: /json, probes, SSE, its doors, the process. Its
monitor (the sampler behind them) is tested in tests/test_monitor.py."""

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from prometheus_client import REGISTRY

from dockercoins.errors import PortInUseError
from dockercoins.net import free_port
from dockercoins.redis_store import HASHES_KEY, WALLET_KEY, WORKER_KEY_PREFIX
from dockercoins.settings import load_settings
from dockercoins.stages import StageTimes
from dockercoins_tools.procstat import memory_mb
from tests.stack import wait_until, wait_until_async
from tests.support import service_env
from webui.config import WebuiSettings
from webui.connections import client_key
from webui.server import _Server, bind_listener, create_app, server_config

LETTERS = str.maketrans("0123456789", "abcdefghij")
"""Digits as letters: rng modes are lowercase words."""

LISTENING = re.compile(r"webui listening on http://([\d.]+):(\d+)")


async def app_client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app in this process, lifespan included (ASGITransport skips it)."""
    app = create_app(load_settings(WebuiSettings, redis_url=redis_url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://webui"
        ) as client,
    ):
        yield client


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async for each in app_client(redis_url):
        yield each


@pytest.fixture
async def client_without_redis() -> AsyncIterator[httpx.AsyncClient]:
    async for each in app_client(f"redis://127.0.0.1:{free_port()}/0"):
        yield each


async def json_when(
    client: httpx.AsyncClient, check: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """/json once `check` holds for it, polled every 0.1 s; fails with the last body."""
    deadline = time.monotonic() + timeout
    while not check(body := (await client.get("/json")).json()):
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
    return body


async def test_json_has_the_original_shape(client: httpx.AsyncClient, redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.incrby(HASHES_KEY, 42)
    sync.hset(WALLET_KEY, mapping={"0abc": b"x", "0def": b"y", "0123": b"z"})

    response = await client.get("/json")

    assert response.status_code == 200
    body = response.json()
    assert {"coins", "hashes", "now"} <= body.keys()
    assert body["hashes"] == 42
    assert body["coins"] == 3
    assert isinstance(body["now"], float)
    assert abs(body["now"] - time.time()) < 5


async def test_json_on_an_empty_redis_is_zero(client: httpx.AsyncClient) -> None:
    body = (await client.get("/json")).json()
    assert (body["hashes"], body["coins"]) == (0, 0)


async def test_probes_with_redis_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


async def test_redis_down_is_a_quick_503_with_a_reason(
    client_without_redis: httpx.AsyncClient,
) -> None:
    started = time.monotonic()
    ready = await client_without_redis.get("/readyz")
    totals = await client_without_redis.get("/json")
    health = await client_without_redis.get("/healthz")

    assert time.monotonic() - started < 5
    assert ready.status_code == 503
    assert ready.json()["reason"].startswith("Redis unreachable")
    assert totals.status_code == 503
    assert totals.json()["reason"].startswith("Redis unreachable")
    assert health.status_code == 200


async def test_page_and_vendored_chart_are_served_locally(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert 'id="speed"' in page.text
    assert "http" not in re.sub(r'href="/static[^"]*"', "", page.text.split("<body>")[1])
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert (await client.get(asset)).status_code == 200, asset
    assert (await client.get("/static/vendor/uplot/LICENSE")).status_code == 200


async def test_the_rng_mode_comes_from_the_heartbeats_and_says_mixed(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    sync = redis.Redis.from_url(redis_url)

    def beat(name: str, mode: str) -> None:
        sync.set(f"{WORKER_KEY_PREFIX}{name}", json.dumps({"rng_mode": mode}), ex=30)

    body = await json_when(client, lambda body: body["status"] == "live")
    assert body["rng_mode"] is None and body["rng_modes"] == {}
    beat("a", "blocking")
    await json_when(client, lambda body: body["rng_mode"] == "blocking")
    # During a change of mode: one worker already served by a buffered rng, one by both.
    beat("b", "buffered")
    beat("c", "blocking,buffered")
    body = await json_when(client, lambda body: body["rng_mode"] == "mixed")
    assert body["rng_modes"] == {"blocking": 2, "buffered": 2}
    sync.delete(WORKER_KEY_PREFIX + "a", WORKER_KEY_PREFIX + "c")
    await json_when(client, lambda body: body["rng_mode"] == "buffered")


async def test_json_and_metrics_give_the_workers_stage_times(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    sync = redis.Redis.from_url(redis_url)
    body = (await client.get("/json")).json()
    assert body["latency"] == {"think": None, "rng": None, "hasher": None, "redis": None}

    for name, rng_seconds in (("slow", 0.8), ("fast", 0.1)):
        times = StageTimes(10)
        for _ in range(50):
            times.add(0.1, rng_seconds, 0.1, 0.00002)
        info = {"latency": times.summary(hashes_per_unit=1)}
        sync.set(f"{WORKER_KEY_PREFIX}{name}", json.dumps(info), ex=30)
    sync.set(WORKER_KEY_PREFIX + "older", json.dumps({"mining": True}), ex=30)  # no stage times

    body = await json_when(client, lambda body: body["latency"]["rng"] is not None)
    assert {"coins", "hashes", "now"} <= body.keys()
    latency = body["latency"]
    assert set(latency) == {"think", "rng", "hasher", "redis"}
    assert all(set(stage) == {"p50", "p99"} for stage in latency.values())
    assert latency["rng"]["p99"] == pytest.approx(0.8, rel=0.03)
    assert latency["hasher"]["p50"] == pytest.approx(0.1, rel=0.03)
    assert latency["redis"]["p50"] == pytest.approx(0.00002, rel=0.03)
    assert body["latency_share"]["rng"] == pytest.approx(45 / 65, rel=0.01)
    assert body["latency_unit"]["units"] == 100 and body["hashes_per_unit"] == 1

    metrics = (await client.get("/metrics")).text
    rng_p99 = re.search(
        r'^dockercoins_stage_latency_seconds\{quantile="0.99",stage="rng"\} (\S+)$', metrics, re.M
    )
    assert rng_p99 and float(rng_p99[1]) == latency["rng"]["p99"]
    assert 'dockercoins_stage_share{stage="rng"}' in metrics


def test_busy_port_is_refused_with_its_number() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} "):
            bind_listener("127.0.0.1", port)


@pytest.fixture
def webui_process(redis_url: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m webui --port 0` as a real process; yields it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "webui", "--port", "0"],
        env=service_env(redis_url=redis_url),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if found := LISTENING.search(line):
                url = f"http://{found[1]}:{found[2]}"
        assert url, "webui never logged where it listens"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.slow
def test_process_streams_events_and_stops_on_sigterm(
    webui_process: tuple[subprocess.Popen[str], str], redis_url: str
) -> None:
    proc, url = webui_process
    redis.Redis.from_url(redis_url).incrby(HASHES_KEY, 7)
    states = []
    with (
        httpx.Client(base_url=url, timeout=10) as http,
        http.stream("GET", "/events") as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                states.append(json.loads(line[6:]))
            if len(states) == 3:
                break
    assert states[0]["reset"] is True
    assert not states[-1]["reset"]
    assert states[-1]["hashes"] == 7
    assert states[-1]["status"] == "live"

    with httpx.Client(base_url=url, timeout=10) as http, http.stream("GET", "/events"):
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # with a stream open: it must still stop promptly
        assert proc.wait(15) == 0
    assert time.monotonic() - started < 10


FLOOD = 1000
"""Idle /events connections one address holds in the flood test (the issue's check)."""


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the web UI's /metrics (0 if absent)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def first_event(port: int, source: str = "127.0.0.1") -> tuple[str, float]:
    """GET /events from `source` on a real socket: the status line, and the seconds to the
    first state (or to the end of a refusal)."""
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: webui\r\n\r\n")
        received = b""
        while b"event: state" not in received and (chunk := sock.recv(65536)):
            received += chunk
        return received.split(b"\r\n", 1)[0].decode(), time.monotonic() - started


@pytest.mark.slow
def test_a_flood_of_idle_streams_from_one_address_leaves_the_page_to_everyone(
    webui_process: tuple[subprocess.Popen[str], str],
) -> None:
    """The issue's check: while 127.0.0.2 holds 1,000 connections that asked for /events and
    never read, a visitor from 127.0.0.1 gets /events 200 and a first state within 5 s, again
    and again; the flooder holds its 10 streams, its other connections are refused, and the
    web UI's memory stays small."""
    proc, url = webui_process
    port = int(url.rsplit(":", 1)[1])
    rss_before = memory_mb(proc.pid, "VmRSS")
    flood: list[socket.socket] = []
    failed: dict[socket.socket, bytes] = {}  # reset at once past the connections' cap
    try:
        for _ in range(FLOOD):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind(("127.0.0.2", 0))
            flood.append(sock)
            try:
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"GET /events HTTP/1.1\r\nHost: webui\r\n\r\n")
            except OSError as exc:  # the reset came before the request: its error is taken here
                failed[sock] = type(exc).__name__.encode()
        refused = 'dockercoins_webui_refused_total{reason="%s"}'
        wait_until(
            lambda: (
                metric(url, refused % "connections-per-client")
                + metric(url, refused % "streams-per-client")
                + metric(url, "dockercoins_webui_streams")
                >= FLOOD
            ),
            30,
            "the web UI to answer the whole flood",
        )
        for _ in range(5):
            status, took = first_event(port)
            assert status == "HTTP/1.1 200 OK" and took < 5, (status, took)
            time.sleep(0.5)
        answers = []
        for sock in flood:
            if sock in failed:
                answers.append(failed[sock])
                continue
            try:
                answers.append(sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except OSError as exc:
                answers.append(type(exc).__name__.encode())
        # Its own 10 streams (DOCKERCOINS_WEBUI_MAX_STREAMS_PER_CLIENT); every other connection
        # answered 429 and closed, or reset at once (past its 64 connections).
        assert answers.count(b"HTTP/1.1 200") == 10
        # Every other connection refused, each as the server counted it: a 429 for each stream
        # past the client's 10, and one reset (or, when the server refused it at accept before
        # its request arrived, closed with no answer: b"", seen a few in a thousand on a loaded
        # machine) for each connection past its 64.
        kinds = {kind: answers.count(kind) for kind in set(answers)}
        closed = (b"ConnectionResetError", b"BrokenPipeError", b"")
        assert set(answers) <= {b"HTTP/1.1 200", b"HTTP/1.1 429", *closed}, kinds
        assert answers.count(b"HTTP/1.1 429") == metric(url, refused % "streams-per-client"), kinds
        at_accept = metric(url, refused % "connections-per-client")
        assert sum(answers.count(kind) for kind in closed) == at_accept, (kinds, at_accept)
        assert metric(url, "dockercoins_webui_streams") == 10
        peak = memory_mb(proc.pid)
        assert peak - rss_before < 32, f"RSS {rss_before:.1f} -> peak {peak:.1f} MB"
    finally:
        for sock in flood:
            sock.close()


@pytest.mark.slow
def test_process_on_a_busy_port_fails_with_one_line(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "webui", "--port", str(port)],
            env=service_env(redis_url=redis_url),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dockercoins webui: port {port} on 127.0.0.1 is already in use (DOCKERCOINS_WEBUI_PORT)"
    ]


async def test_every_response_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    for path in ("/", "/json", "/healthz", "/readyz", "/static/app.js", "/no-such-page"):
        response = await client.get(path)
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "no-referrer", path


async def test_bad_data_in_redis_is_said_by_the_page_and_json(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def says(status: str, reason: str) -> dict[str, Any]:
        return await json_when(
            client, lambda body: body["status"] == status and reason in (body["reason"] or "")
        )

    sync.set(HASHES_KEY, "notanumber")
    await says("bad-data", "`hashes` holds 'notanumber', not a number of hashes")
    assert (await client.get("/json")).status_code == 503
    sync.set(HASHES_KEY, "9" * 30)  # more digits than any count Redis keeps
    await says("bad-data", "`hashes` holds '999")
    sync.set(HASHES_KEY, 5)
    sync.set(WALLET_KEY, "not a hash")
    await says("bad-data", "`wallet` holds another type than a hash (WRONGTYPE)")
    sync.delete(WALLET_KEY)
    sync.delete(HASHES_KEY)
    sync.rpush(HASHES_KEY, 1)
    await says("bad-data", "`hashes` holds another type than a counter (WRONGTYPE)")
    sync.delete(HASHES_KEY)
    sync.set(HASHES_KEY, 5)
    await says("live", "")


async def test_a_bad_heartbeat_is_skipped_and_named_and_the_sample_stands(
    client: httpx.AsyncClient, redis_url: str
) -> None:
    """The issue's value (`Infinity` in the stage times) took the web UI down; now it and
    other bad heartbeats are skipped, named on /json, and the good workers still count."""
    sync = redis.Redis.from_url(redis_url)
    sync.set(HASHES_KEY, 5)
    sync.set(WORKER_KEY_PREFIX + "good", json.dumps({"mining": True, "rng_mode": "buffered"}))

    async def says(reason: str) -> dict[str, Any]:
        return await json_when(
            client,
            lambda body: body["status"] == "bad-data" and reason in (body["reason"] or ""),
        )

    for key, bad, why in [
        ("x", '{"latency":{"units":Infinity}}', "latency.units"),
        ("x", '{"mining": "yes"}', "mining: Input should be a valid boolean"),
        ("x", "{not json", "Invalid JSON"),
        ("x", "[" * 100_000, "longer than 65536 bytes"),
        ("x", "[" * 5000, "Invalid JSON: recursion limit exceeded"),
    ]:
        sync.set(f"{WORKER_KEY_PREFIX}{key}", bad)
        body = await says(f"worker heartbeat `{WORKER_KEY_PREFIX}{key}` skipped: {why}")
        assert (body["hashes"], body["workers"], body["rng_mode"]) == (5, 1, "buffered"), body
    sync.delete(WORKER_KEY_PREFIX + "x")
    sync.hset(WORKER_KEY_PREFIX + "h", "mining", "true")
    body = await says(f"worker heartbeat `{WORKER_KEY_PREFIX}h` skipped: a hash, not a string")
    assert body["workers"] == 1
    sync.incrby(HASHES_KEY, 100)  # the rate goes on through bad heartbeats
    await json_when(client, lambda body: (body["hashes_per_second"] or 0) > 0)
    sync.delete(WORKER_KEY_PREFIX + "h")
    await json_when(client, lambda body: body["status"] == "live")


@contextlib.asynccontextmanager
async def served_app(redis_url: str, **fields: Any) -> AsyncIterator[tuple[FastAPI, int]]:
    """The app behind uvicorn as `serve` configures it, in this event loop, on a real socket;
    yields it and its port."""
    settings = load_settings(WebuiSettings, redis_url=redis_url, **fields)
    app = create_app(settings)
    sock = bind_listener("127.0.0.1", 0)
    server = _Server(server_config(app, settings))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    port = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")  # served: started
    await close(writer)
    try:
        yield app, port
    finally:
        app.state.stopping.set()
        server.should_exit = True
        await serving
        sock.close()


@pytest.fixture
async def served(redis_url: str) -> AsyncIterator[tuple[FastAPI, int]]:
    async with served_app(
        redis_url, webui_max_streams=20, webui_max_streams_per_client=20
    ) as served:
        yield served


async def open_stream(
    port: int, source: str = "127.0.0.1", last_event_id: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """GET /events over a real connection from `source`, read up to its first state (or the
    end of a refusal); the reader, the writer, what was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    writer.write(f"GET /events HTTP/1.1\r\nHost: webui\r\n{resume}\r\n".encode())
    received = b""
    while b"event: state" not in received and (chunk := await reader.read(65536)):
        received += chunk
    return reader, writer, received.decode(errors="replace")


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_streams_are_capped_and_a_closed_one_leaves_no_task(served) -> None:
    app, port = served
    baseline = len(asyncio.all_tasks())

    opened = await asyncio.gather(*(open_stream(port) for _ in range(20)))
    assert all(head.startswith("HTTP/1.1 200") for _, _, head in opened)
    assert "content-security-policy: default-src 'self'" in opened[0][2].lower()
    _, writer, head = await open_stream(port, "127.0.0.2")  # one too many
    await close(writer)
    assert head.startswith("HTTP/1.1 503"), head
    assert "retry-after: 10" in head.lower() and "DOCKERCOINS_WEBUI_MAX_STREAMS)" in head
    assert "connection: close" in head.lower()
    await asyncio.gather(*(close(w) for _, w, _ in opened))

    for _ in range(50):  # 1,000 streams opened and closed, 20 at a time
        wave = await asyncio.gather(*(open_stream(port) for _ in range(20)))
        assert all(head.startswith("HTTP/1.1 200") for _, _, head in wave), wave[0][2]
        await asyncio.gather(*(close(w) for _, w, _ in wave))

    await wait_until_async(
        lambda: len(asyncio.all_tasks()) <= baseline and not app.state.streams.held,
        15,
        "every stream's task and count gone",
    )


async def test_one_address_holds_at_most_its_share_of_streams(redis_url: str) -> None:
    """Past its own bound an address gets 429 naming it, and the connection is closed; other
    addresses are served up to the total, then everyone gets 503."""
    async with served_app(redis_url, webui_max_streams=5, webui_max_streams_per_client=3) as (
        app,
        port,
    ):
        mine = [await open_stream(port, "127.0.0.2") for _ in range(3)]
        assert all(head.startswith("HTTP/1.1 200") for _, _, head in mine)
        reader, writer, head = await open_stream(port, "127.0.0.2")
        assert head.startswith("HTTP/1.1 429"), head
        assert "3 live streams from 127.0.0.2 already" in head
        assert "DOCKERCOINS_WEBUI_MAX_STREAMS_PER_CLIENT" in head
        assert "retry-after: 10" in head.lower()
        assert await reader.read() == b"", "a refused connection is closed"
        await close(writer)
        others = [await open_stream(port, source) for source in ("127.0.0.3", "127.0.0.4")]
        assert all(head.startswith("HTTP/1.1 200") for _, _, head in others)
        reader, writer, head = await open_stream(port, "127.0.0.5")
        assert head.startswith("HTTP/1.1 503"), head
        await close(writer)
        assert app.state.streams.held == 5
        for _, writer, _ in [*mine, *others]:
            await close(writer)


async def test_a_stream_ends_at_its_lifetime_and_resumes_where_it_left_off(
    redis_url: str,
) -> None:
    async with served_app(redis_url, webui_stream_lifetime=1.5) as (app, port):
        await wait_for_points(app, 2)
        reader, writer, head = await open_stream(port)
        started = time.monotonic()
        assert "retry: 1000" in head
        rest = (await asyncio.wait_for(reader.read(), 10)).decode()  # to the stream's end
        took = time.monotonic() - started
        await close(writer)
        assert 1.0 < took < 5, took
        assert "event: renew" in rest.split("event: state")[-1]
        last_id = re.findall(r"^id: (\S+)$", head + rest, re.M)[-1]
        await wait_for_points(app, int(last_id.split("-")[1]) + 2)

        reader, writer, head = await open_stream(port, last_event_id=last_id)
        await close(writer)
        state = json.loads(re.findall(r"^data: (.*)$", head, re.M)[-1])
        assert state["reset"] is False, "resumed, not the whole history again"
        assert 1 <= len(state["points"]) <= 3
        reader, writer, head = await open_stream(port, last_event_id="0badcafe-3")
        await close(writer)
        assert json.loads(re.findall(r"^data: (.*)$", head, re.M)[-1])["reset"] is True


def dropped(reason: str) -> float:
    """Connections the web UIs of this process dropped for `reason` (their metric)."""
    return REGISTRY.get_sample_value("dockercoins_webui_dropped_total", {"reason": reason}) or 0


async def wait_for_points(app: FastAPI, seq: int) -> None:
    """Until the app's monitor has added points up to sequence number `seq`."""
    await wait_until_async(lambda: app.state.monitor.last_seq >= seq, 15, f"point {seq}")


async def test_a_client_that_stops_reading_is_dropped_at_the_write_timeout(
    redis_url: str,
) -> None:
    """A reader that never reads fills its buffers; the stream then waits on it for the write
    timeout, and the connection is reset: the stream and its memory are let go."""
    sync = redis.Redis.from_url(redis_url)
    for n in range(900):  # a big fleet's state, 4 rng modes each: about 80 KB per event
        modes = ",".join(f"{n:04d}{part}".translate(LETTERS) + "x" * 11 for part in "0123")
        sync.set(f"{WORKER_KEY_PREFIX}w{n}", json.dumps({"rng_mode": modes}), ex=120)
    was = dropped("stopped-reading")
    async with served_app(redis_url, webui_write_timeout=1.0) as (app, port):
        await wait_for_points(app, 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        sock.send(b"GET /events HTTP/1.1\r\nHost: webui\r\n\r\n")
        await wait_until_async(lambda: app.state.streams.held, 10, "the stream")
        # Never read: the buffers fill, then the write timeout.
        held = await wait_until_async(lambda: not app.state.streams.held, 60, "the drop")
        sock.setblocking(True)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):  # what reached the socket, then its end
                pass
        sock.close()
        assert held > 1.0, held
        assert dropped("stopped-reading") == was + 1


async def test_a_connection_without_a_whole_request_is_closed_and_one_address_is_capped(
    redis_url: str,
) -> None:
    """uvicorn waits forever for a first request, or for one dribbled a byte at a time; the web
    UI closes such a connection after its request timeout. And past its connections' bound,
    an address's new connection is reset while other addresses are served."""
    async with served_app(
        redis_url, webui_request_timeout=1, webui_max_connections_per_client=3
    ) as (_, port):
        idle = [
            await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            for _ in range(3)
        ]
        idle[1][1].write(b"GET /events HTTP/1.1\r\nHo")  # a head that never ends
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # reset or closed at once
        await close(writer)
        assert time.monotonic() - started < 0.9
        async with httpx.AsyncClient() as other:  # from 127.0.0.1: served
            assert (await other.get(f"http://127.0.0.1:{port}/healthz")).is_success
        for reader, writer in idle:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await close(writer)
        assert 0.9 < time.monotonic() - started < 4
        _, writer, head = await open_stream(port, "127.0.0.2")  # its connections are free again
        await close(writer)
        assert head.startswith("HTTP/1.1 200"), head


def test_a_client_counts_by_its_address_an_ipv6_one_by_its_64() -> None:
    """One IPv6 host has a /64 to pick addresses from: its streams count together."""
    assert client_key("127.0.0.2") == "127.0.0.2"
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert client_key(None) == "unknown"
