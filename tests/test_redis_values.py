"""Whatever Redis holds, nothing reading it raises: property-based (hypothesis) over arbitrary
JSON (NaN, Infinity, huge numbers, deep nesting, broken text) in the heartbeat merge, the web
UI's sampler and /json, and the counters; then real web UI and worker processes that keep
running while bad keys live in a real Redis, and say which key is bad."""

import asyncio
import copy
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockercoins.counter_sampler import CounterSampler
from dockercoins.net import free_port
from dockercoins.redis_store import (
    FLUSHED_KEY_PREFIX,
    HASHES_KEY,
    WALLET_KEY,
    WORKER_KEY_PREFIX,
    BadData,
    BadHeartbeat,
    BadWrite,
    WorkerHeartbeat,
    connect,
    parse_heartbeat,
    read_totals,
    record,
)
from dockercoins.settings import load_settings
from dockercoins.stages import STAGES, UNIT, StageMerge, StageTimes
from tests.stack import Service, wait_until_async
from webui.config import WebuiSettings
from webui.monitor import Fleet, latency_fields
from webui.server import create_app

PROPERTY = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

KEYS = ["mining", "rng_mode", "latency", "units", "hashes_per_unit", *STAGES, UNIT, "buckets"]
LEAVES = (
    st.none()
    | st.booleans()
    | st.floats()  # NaN and ±Infinity included: json.dumps writes them as such
    | st.integers(-(10**400), 10**400)
    | st.sampled_from([2**53, 2**63, 10**30, -1, 0, 1e308, 5e-324])
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=25,
)


def real_heartbeat() -> dict[str, Any]:
    """What a worker writes: its mode and a window of stage times."""
    times = StageTimes(10)
    for n in range(40):
        times.add(0.01 * (n % 3), 0.1 + n / 100, 0.05, 0.0002)
    return {
        "pid": 7,
        "loops": 4,
        "mining": True,
        "rng_mode": "buffered",
        "latency": times.summary(4),
    }


def leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into `node`, its containers' included."""
    if path:
        yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaf_paths(value, (*path, index))


REAL = real_heartbeat()
PATHS = list(leaf_paths(REAL))


@st.composite
def spoiled_heartbeats(draw: st.DrawFn) -> str:
    """A real heartbeat with one value, anywhere in it, replaced by any JSON value."""
    heartbeat = copy.deepcopy(REAL)
    path = draw(st.sampled_from(PATHS))
    node = heartbeat
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = draw(JSON_VALUES)
    return json.dumps(heartbeat)


HEARTBEAT_TEXTS = st.one_of(
    JSON_VALUES.map(json.dumps),
    spoiled_heartbeats(),
    st.integers(1, 5000).map(lambda n: '{"latency":' * n + "{}" + "}" * n),  # deep nesting
    st.integers(1, 5000).map(lambda n: "[" * n),
    st.builds(lambda text, cut: text[:cut], spoiled_heartbeats(), st.integers(0, 200)),
    st.binary(max_size=60).map(lambda raw: raw.decode("latin-1")),
)


def strict_json(text: str) -> Any:
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@PROPERTY
@given(texts=st.lists(HEARTBEAT_TEXTS, min_size=1, max_size=3))
def test_any_heartbeat_is_read_or_refused_and_the_merge_never_raises(texts: list[str]) -> None:
    fleet = Fleet()
    merging = StageMerge()
    for n, text in enumerate([*texts, json.dumps(REAL)]):
        heartbeat = parse_heartbeat(f"{WORKER_KEY_PREFIX}{n}", b"string", text.encode())
        assert isinstance(heartbeat, WorkerHeartbeat | BadHeartbeat)
        fleet.add(heartbeat)
        if isinstance(heartbeat, WorkerHeartbeat) and heartbeat.info.latency is not None:
            merging.add(heartbeat.info.latency)
    assert fleet.mining >= 1  # the real one
    strict_json(json.dumps(latency_fields(merging.result()), allow_nan=False))
    strict_json(json.dumps(latency_fields(fleet.stages.result()), allow_nan=False))
    strict_json(json.dumps(fleet.rng_modes, allow_nan=False))


@pytest.fixture
def page(redis_url: str) -> Iterator[tuple[asyncio.AbstractEventLoop, Any, httpx.AsyncClient]]:
    """The web UI app, its lifespan entered, in an event loop of the test's own (hypothesis
    runs its examples synchronously); yields the loop, the app and a client of it."""
    loop = asyncio.new_event_loop()
    app = create_app(load_settings(WebuiSettings, redis_url=redis_url))
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://webui")
    try:
        yield loop, app, client
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()


@PROPERTY
@given(text=HEARTBEAT_TEXTS)
def test_any_heartbeat_in_redis_leaves_the_sampler_and_json_standing(page, text: str) -> None:
    loop, app, client = page
    monitor = app.state.monitor

    async def example() -> None:
        redis_client = app.state.redis
        await redis_client.set(HASHES_KEY, 12345)
        await redis_client.set(WORKER_KEY_PREFIX + "real", json.dumps(REAL), ex=60)
        await redis_client.set(WORKER_KEY_PREFIX + "x", text, ex=60)
        await monitor.sample_once()
        monitor.add_point()
        snapshot = strict_json(json.dumps(monitor.snapshot(), allow_nan=False))
        assert snapshot["status"] in ("live", "bad-data"), snapshot
        assert snapshot["hashes"] == 12345 and snapshot["workers"] >= 1
        if snapshot["status"] == "bad-data":
            assert f"`{WORKER_KEY_PREFIX}x` skipped" in snapshot["reason"]
        reply = await client.get("/json")
        assert reply.status_code == 200
        body = strict_json(reply.text)
        assert body["hashes"] == 12345 and body["status"] == snapshot["status"]

    loop.run_until_complete(example())


COUNTER_VALUES = st.one_of(
    st.binary(max_size=30),
    st.integers(-(2**70), 2**70).map(lambda n: str(n).encode()),
    st.floats().map(lambda f: repr(f).encode()),
    st.sampled_from([b"", b"0", b"9223372036854775807", b"9223372036854775808", b" 1", b"1e3"]),
)


@PROPERTY
@given(hashes=COUNTER_VALUES, flushed=COUNTER_VALUES)
def test_any_counter_is_read_as_a_count_or_bad_data(redis_url, hashes, flushed) -> None:
    """The web UI's and the tools' reads of `hashes`, and a worker's flush past its own last
    flush number: a count, or BadData naming the key (no reading, for the tools' sampler);
    never another error, and never a count skipped."""

    async def example() -> None:
        client = connect(redis_url)
        try:
            await client.set(HASHES_KEY, hashes)
            try:
                totals = await read_totals(client)
                assert totals.hashes == int(hashes or 0) and 0 <= totals.hashes < 2**63
            except BadData as exc:
                assert "`hashes`" in str(exc)
                totals = None
            sampler = CounterSampler.of_redis(client, 1.0)  # the bench's and the experiment's
            reading = await sampler.sample_answered()
            assert (reading and reading.totals.hashes) == (totals and totals.hashes)
            await client.set(HASHES_KEY, 0)
            await client.set(FLUSHED_KEY_PREFIX + "w", flushed)
            last = int(flushed) if re.fullmatch(rb"\d{1,15}", flushed) else None
            try:
                await record(client, 10, {}, "w", 7)
                assert last is not None and last <= 7, "bad data taken"
                assert int(await client.get(HASHES_KEY)) == (10 if last < 7 else 0)  # 7: in
            except BadWrite as exc:
                assert last is None or last > 7
                assert f"`{FLUSHED_KEY_PREFIX}w`" in str(exc) and not exc.counted
                assert int(await client.get(HASHES_KEY)) == 0
        finally:
            await client.aclose()

    asyncio.run(example())


@pytest.mark.slow
async def test_the_web_ui_and_a_worker_run_on_while_bad_keys_live_in_redis(
    servers, start_worker, redis_url: str, tmp_path: Path
) -> None:
    """Bad values planted in a real Redis under a real web UI and a real worker: both keep
    running, /json names the bad key, the worker keeps the work Redis refuses (and pauses at
    its bound), and once the keys are mended every hash and coin is counted exactly once."""
    rng, hasher = await servers.upstreams()
    log = tmp_path / "worker.log"
    worker = await start_worker(
        log, rng_addr=rng, hasher_addr=hasher, redis_url=redis_url, worker_max_unflushed=3
    )
    port = free_port()
    webui = Service("webui", webui_port=port, redis_url=redis_url)
    sync = redis.Redis.from_url(redis_url)

    said: list[dict[str, Any]] = [{}]

    async def json_says(
        reason: str, status: str = "bad-data", workers: int | None = None
    ) -> dict[str, Any]:
        """/json once its status is `status`, its reason holds `reason` (and it counts `workers`
        mining, if given: on a busy machine a heartbeat may say not mining for a while)."""

        def says() -> bool:
            said[0] = httpx.get(f"http://127.0.0.1:{port}/json", timeout=5).json()
            counted = workers is None or said[0].get("workers") == workers
            return said[0]["status"] == status and reason in (said[0]["reason"] or "") and counted

        await wait_until_async(says, 20, lambda: f"/json saying {status}: {reason} ({said[0]})")
        return said[0]

    async def logged(pattern: str, times: int = 1) -> None:
        """Until the worker has logged a line matching `pattern` `times` times."""
        await wait_until_async(
            lambda: len(re.findall(pattern, log.read_text())) >= times, 20, pattern
        )

    try:
        webui.wait_for("listening on")
        await wait_until_async(lambda: sync.hlen(WALLET_KEY) > 0, 30, "coins")
        [heartbeat] = sync.keys(WORKER_KEY_PREFIX + "*")
        flushed = FLUSHED_KEY_PREFIX + heartbeat.decode().removeprefix(WORKER_KEY_PREFIX)

        sync.set(WORKER_KEY_PREFIX + "x", '{"latency":{"units":Infinity}}')  # the value
        # The bad key skipped, the worker's heartbeat still counted.
        await json_says(
            f"worker heartbeat `{WORKER_KEY_PREFIX}x` skipped: latency.units", workers=1
        )
        sync.delete(WORKER_KEY_PREFIX + "x")
        sync.hset(WORKER_KEY_PREFIX + "h", "mining", "true")
        await json_says(f"`{WORKER_KEY_PREFIX}h` skipped: a hash, not a string")
        sync.delete(WORKER_KEY_PREFIX + "h")

        saved = sync.get(flushed)
        sync.set(flushed, "garbage")
        await logged(rf"redis unreachable: BadWrite: `{flushed}` holds \"garbage\"")
        await logged(r"mining paused: \d+ hashes not yet in Redis")
        sync.set(flushed, saved)
        await logged(r"redis is back after")
        await logged(r"mining resumed")

        with sync.pipeline() as pipe:  # a transaction: no flush between the two
            pipe.rename(WALLET_KEY, "saved-wallet").set(WALLET_KEY, "a string").execute()
        await json_says("`wallet` holds another type than a hash (WRONGTYPE)")
        await logged(r"BadWrite: `wallet` holds another type than a hash")
        with sync.pipeline() as pipe:
            pipe.delete(WALLET_KEY).rename("saved-wallet", WALLET_KEY).execute()
        await logged(r"redis is back after", 2)  # one outage, one line, each
        with sync.pipeline() as pipe:
            pipe.rename(HASHES_KEY, "saved-hashes").rpush(HASHES_KEY, "a list").execute()
        await json_says("`hashes` holds another type than a counter (WRONGTYPE)")
        await logged(r"BadWrite: `hashes` cannot count: WRONGTYPE")
        with sync.pipeline() as pipe:
            pipe.delete(HASHES_KEY).rename("saved-hashes", HASHES_KEY).execute()
        await json_says("", "live")

        assert worker.returncode is None and webui.proc.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 15) == 0
        stopped = re.search(
            r"worker stopped: (\d+) hashes, (\d+) coins, 0 hashes unflushed", log.read_text()
        )
        assert stopped, log.read_text()[-3000:]
        assert int(sync.get(HASHES_KEY)) == int(stopped[1])
        assert sync.hlen(WALLET_KEY) == int(stopped[2])
    finally:
        webui.terminate()
        webui.kill()
