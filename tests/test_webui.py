"""The web UI against a real redis-server: /json, probes, SSE, the sampler, the process."""

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from redis.asyncio import Redis

from dockercoins.errors import PortInUseError
from dockercoins.net import free_port
from dockercoins.schema import RNG_MODE_KEY, announce_worker
from dockercoins.settings import load_settings
from tests.conftest import service_env
from webui.config import WebuiSettings
from webui.server import bind_listener, connect_redis, create_app
from webui.service import SpeedMonitor

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


async def test_json_has_the_original_shape(client: httpx.AsyncClient, redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.incrby("hashes", 42)
    sync.hset("wallet", mapping={"0abc": b"x", "0def": b"y", "0123": b"z"})

    response = await client.get("/json")

    assert response.status_code == 200
    body = response.json()
    assert body["hashes"] == 42
    assert body["coins"] == 3
    assert isinstance(body["now"], float)
    assert abs(body["now"] - time.time()) < 5
    assert {"coins", "hashes", "now"} <= body.keys()


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


async def test_monitor_fits_the_rate_and_marks_worker_changes(redis_url: str) -> None:
    client: Redis = connect_redis(redis_url)
    monitor = SpeedMonitor(client, window=5)
    try:
        await client.set(RNG_MODE_KEY, "buffered")
        await announce_worker(client, "one", {"loops": 1}, ttl=30)
        for step in range(12):
            await client.incrby("hashes", 50)
            await monitor.sample_once()
            if step == 6:
                await announce_worker(client, "two", {"loops": 1}, ttl=30)
            monitor.add_point()
            await asyncio.sleep(0.1)

        state = monitor.snapshot()
        assert state["status"] == "live"
        assert state["rng_mode"] == "buffered"
        assert state["workers"] == 2
        assert state["marks"] == [[pytest.approx(state["marks"][0][0]), 2]]
        assert 200 < state["speed"] < 1000  # 50 per ~0.1 s, on a busy machine
        assert len(state["points"]) == 12
        newer = monitor.snapshot(after=state["seq"])
        assert newer["points"] == [] and newer["marks"] == [] and not newer["reset"]
    finally:
        await client.aclose()


async def test_monitor_says_why_when_redis_is_down() -> None:
    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0")
    monitor = SpeedMonitor(client)
    try:
        await monitor.sample_once()
        point = monitor.add_point()
    finally:
        await client.aclose()
    assert point.rate is None
    state = monitor.snapshot()
    assert state["status"] == "redis-unreachable"
    assert state["reason"].startswith("Redis unreachable")


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


def test_process_streams_events_and_stops_on_sigterm(
    webui_process: tuple[subprocess.Popen[str], str], redis_url: str
) -> None:
    proc, url = webui_process
    redis.Redis.from_url(redis_url).incrby("hashes", 7)
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
