"""A fair share of each server's scarce work per client address (issue 18's follow-up): the
turns themselves, then a flood that reads fast from 127.0.0.2 against a visitor from 127.0.0.1,
on rng's blocking lock (scaled-down read cost), on turbo rng and on the turbo hasher."""

import asyncio
import json
import os
import socket
import statistics
import time
from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.fairshare import FairShare
from dockercoins.grpcserver import take_wakeups_at_once
from dockercoins.net import free_port
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc, rng_pb2, rng_pb2_grpc
from dockercoins.wire import BLOCK_SIZE, TURBO_BATCH
from dockercoins_tools.procstat import memory_mb
from tests.stack import LoggedProcess, Service
from tests.support import SourceForwarder, flood_cmd, hold_calls, service_env

BATCH = TURBO_BATCH * BLOCK_SIZE
"""Bytes of a turbo worker's batch."""


async def granted_order(share: FairShare, turns: Sequence[tuple[str, float]]) -> list[str]:
    """Queue `turns` (address, cost) behind a turn that holds every slot, in that order, then
    let them through one at a time: the order they were granted in, by the name `address:n`
    (n counting that address's turns)."""
    order: list[str] = []
    holders = [asyncio.ensure_future(share.acquire("holder", 1)) for _ in range(share.slots)]
    await asyncio.gather(*holders)
    counts: dict[str, int] = {}

    async def one(address: str, cost: float) -> None:
        counts[address] = counts.get(address, 0) + 1
        name = f"{address}:{counts[address]}"
        await share.acquire(address, cost)
        order.append(name)
        await asyncio.sleep(0)  # its work: one pass of the loop
        share.release()

    waiting = [asyncio.ensure_future(one(address, cost)) for address, cost in turns]
    await asyncio.sleep(0)  # every turn queued
    assert share.waiting == len(turns)
    for _ in range(share.slots):
        share.release()
    await asyncio.gather(*waiting)
    assert (share.busy, share.waiting) == (0, 0)
    return order


async def test_equal_turns_go_round_robin_across_addresses_fifo_within_one() -> None:
    turns = [("a", 1), ("a", 1), ("a", 1), ("b", 1), ("b", 1), ("c", 1)]
    order = await granted_order(FairShare(1), turns)
    assert order == ["a:1", "b:1", "c:1", "a:2", "b:2", "a:3"]


async def test_addresses_share_the_cost_not_the_turns() -> None:
    """An address whose turns cost 4 times as much gets a turn for every 4 of the other's."""
    turns = [("big", 4)] * 3 + [("small", 1)] * 12
    order = await granted_order(FairShare(1), turns)
    assert order[:5] == ["big:1", "small:1", "small:2", "small:3", "small:4"]
    assert order[5:10] == ["big:2", "small:5", "small:6", "small:7", "small:8"]


async def test_many_calls_from_one_address_wait_in_its_own_queue() -> None:
    """256 turns from one address, then one from another: the other is granted second."""
    turns = [("flood", 1)] * 256 + [("visitor", 1)]
    order = await granted_order(FairShare(1), turns)
    assert order.index("visitor:1") == 1


async def test_at_most_slots_turns_are_in_progress() -> None:
    share = FairShare(3)
    in_progress, most = 0, 0

    async def work(address: str) -> None:
        nonlocal in_progress, most
        await share.acquire(address, 1)
        in_progress += 1
        most = max(most, in_progress)
        await asyncio.sleep(0.001)
        in_progress -= 1
        share.release()

    await asyncio.gather(*(work(f"10.0.0.{i % 5}") for i in range(60)))
    assert most == 3
    assert (share.busy, share.waiting, share.addresses) == (0, 0, 0)


async def test_a_turn_is_granted_from_the_loop_so_turns_of_one_pass_go_in_fair_order() -> None:
    """Work that never awaits holds its slot only while it runs: the turns asked for in one pass
    of the loop are still granted in fair order, not in the order they were asked."""
    share = FairShare(1)
    order: list[str] = []

    async def instant(address: str) -> None:
        await share.acquire(address, 1)
        order.append(address)
        share.release()

    await asyncio.gather(*[instant("flood") for _ in range(5)], instant("visitor"))
    assert order.index("visitor") == 1


async def test_an_idle_address_banks_no_credit() -> None:
    """An address that had nothing waiting while another worked gets its share from then on,
    not the turns it missed."""
    share = FairShare(1)
    order: list[str] = []
    six_granted = asyncio.Event()
    await share.acquire("holder", 1)

    async def one(address: str) -> None:
        await share.acquire(address, 1)
        order.append(address)
        if len(order) == 6:
            six_granted.set()
        await asyncio.sleep(0)
        share.release()

    busy = [asyncio.ensure_future(one("busy")) for _ in range(10)]
    await asyncio.sleep(0)
    share.release()
    await six_granted.wait()
    late = [asyncio.ensure_future(one("late")) for _ in range(4)]
    await asyncio.gather(*busy, *late)
    assert order[:6] == ["busy"] * 6
    assert order[6:14] == ["late", "busy"] * 4 or order[6:14] == ["busy", "late"] * 4


async def test_a_cancelled_turn_gives_up_its_place_or_its_slot() -> None:
    share = FairShare(1)
    await share.acquire("holder", 1)
    waiting = asyncio.ensure_future(share.acquire("gone", 1))
    behind = asyncio.ensure_future(share.acquire("next", 1))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (share.waiting, share.addresses) == (1, 1)
    share.release()
    await asyncio.wait_for(behind, 1)  # granted past the cancelled turn

    granted_then_cancelled = asyncio.ensure_future(share.acquire("late", 1))
    last = asyncio.ensure_future(share.acquire("last", 1))
    await asyncio.sleep(0)
    share.release()  # `late` is granted; cancelled before it runs, it hands the slot on
    granted_then_cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    await asyncio.wait_for(last, 1)
    assert share.busy == 1
    share.release()
    assert (share.busy, share.waiting) == (0, 0)


def test_a_share_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        FairShare(0)


# --- a flood that reads fast, from 127.0.0.2, against a visitor from 127.0.0.1 ---------------

FLOOD_STREAMS = 256
"""Calls the flood holds and keeps busy: the per-address share (DOCKERCOINS_MAX_PEER_RPCS)."""

WINDOW = 2
"""Batches a hashing visitor keeps in flight on each stream: the bench's best configuration."""

CHECK_BOUND = 0.1
"""Seconds a new client's health Check takes during the flood (the median of 10)."""


async def visitor_rate(address: str, call: str, seconds: float, calls: int = 4) -> float:
    """Replies per second a visitor from 127.0.0.1 gets over `seconds` with `calls` calls at
    once: `get` (GetRandom of one block, one after the other, as a classic worker asks),
    `stream` (a StreamRandom of turbo's batch, read as it comes) or `hash` (a HashStream of
    turbo's batch, raw digests, `WINDOW` in flight, as a turbo worker sends)."""
    replies = 0
    async with grpc.aio.insecure_channel(address) as channel:
        rng, hasher = rng_pb2_grpc.RngStub(channel), hasher_pb2_grpc.HasherStub(channel)
        await rng.GetRandom(rng_pb2.RandomRequest(size=32), timeout=10) if call != "hash" else None
        began = time.monotonic()
        deadline = began + seconds

        async def one() -> None:
            nonlocal replies
            if call == "get":
                while time.monotonic() < deadline:
                    reply = await rng.GetRandom(rng_pb2.RandomRequest(size=32), timeout=30)
                    assert len(reply.data) == 32
                    replies += 1
                return
            if call == "stream":
                request = rng_pb2.StreamRandomRequest(size=BLOCK_SIZE, count=TURBO_BATCH)
                stream = rng.StreamRandom(request)
                while time.monotonic() < deadline:
                    assert len((await stream.read()).data) == BATCH
                    replies += 1
            else:
                batch = hasher_pb2.HashRequest(data=os.urandom(BATCH), block_size=32, raw=True)
                stream = hasher.HashStream()
                in_flight = asyncio.Semaphore(WINDOW)

                async def send() -> None:
                    while True:
                        await in_flight.acquire()
                        await stream.write(batch)

                sending = asyncio.ensure_future(send())
                while time.monotonic() < deadline:
                    assert len((await stream.read()).digests) == BATCH
                    in_flight.release()
                    replies += 1
                sending.cancel()
            stream.cancel()

        await asyncio.gather(*(one() for _ in range(calls)))
        return replies / (time.monotonic() - began)


async def check_times(address: str, checks: int = 10) -> list[float]:
    """Seconds of `checks` health Checks, each from a new client (its own connection), all
    SERVING."""
    times = []
    for _ in range(checks):
        began = time.perf_counter()
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        times.append(time.perf_counter() - began)
    return times


def ms(times: list[float]) -> str:
    """Check times as the tests print them: median and slowest, in ms."""
    return f"median {statistics.median(times) * 1000:.1f} ms, slowest {max(times) * 1000:.1f} ms"


def answer_fast(times: list[float]) -> None:
    """New clients' Checks answer in `CHECK_BOUND` (the median: a probe's usual answer) and
    all within 1 s (issue 18's bound: the machine's other jobs can hold a process back for
    more than 100 ms now and then)."""
    assert statistics.median(times) < CHECK_BOUND, times
    assert max(times) < 1.0, times


async def test_grpc_aio_takes_every_pending_wakeup_at_once(servers) -> None:
    """The running grpcio still has the completion-queue reader `take_wakeups_at_once` wraps
    (on a grpcio whose insides changed it would find none and change nothing: this fails, and
    the turbo flood's Checks below tell whether it still matters)."""
    await servers.hasher(hasher_latency=0)
    loop = asyncio.get_running_loop()
    assert take_wakeups_at_once(loop)  # found, wrapped by the server's start already
    wrapped = [
        key
        for key in loop._selector.get_map().values()  # type: ignore[attr-defined]
        if getattr(key.data[0], "_callback", None) is not None
        and getattr(key.data[0]._callback, "takes_all_wakeups", False)
    ]
    assert len(wrapped) == 1


async def test_a_handler_that_raises_leaves_its_wakeups_for_the_rest_of_the_queue() -> None:
    """The wrapper over a stand-in for grpc.aio's reader (a real socket pair, a queue, the same
    read-one-byte-then-handle-all shape) whose handling raises on one event, as grpc.aio's does
    on an event of a closed loop: the loop is woken again and every other event is handled. The
    first version read the bytes before the handler and lost these wake-ups: a test's server
    stop then waited forever."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    queue: list[str] = []
    handled: list[str] = []
    done = asyncio.Event()

    def handle_events() -> None:  # grpc.aio's PollerCompletionQueue._handle_events, in short
        reader.recv(1)
        while queue:
            event = queue.pop(0)
            if event == "closed loop":
                raise RuntimeError("Event loop is closed")
            handled.append(event)
        if len(handled) == 4:
            done.set()

    handle_events.__name__ = "_handle_events"
    loop.add_reader(reader, handle_events)
    try:
        assert take_wakeups_at_once(loop)
        for event in ("a", "closed loop", "b", "c", "d"):  # the poller: queue, then a byte
            queue.append(event)
            writer.send(b"\0")
        await asyncio.wait_for(done.wait(), 5)
        assert handled == ["a", "b", "c", "d"]
    finally:
        loop.remove_reader(reader)
        reader.close()
        writer.close()


READ_COST = 0.01
"""rng's read cost, scaled down: the blocking lock serves at most 100 reads a second."""


@pytest.mark.alone
@pytest.mark.light
async def test_the_blocking_lock_goes_round_robin_while_one_address_reads_fast(servers) -> None:
    """Classic blocking rng, read cost 10 ms. A visitor from 127.0.0.1 asks with 4 calls at
    once, alone, then while 127.0.0.2 keeps 256 StreamRandoms reading everything (through a
    real TCP forwarder). The lock still serves one read at a time, 1 / read cost a second;
    round-robin gives the visitor every other read: at least 0.4 of its rate alone (half, less
    the gaps between its own calls; on main's FIFO lock it got 4 reads in 260, 0.013 of it).
    New clients' Checks answer within 100 ms meanwhile (the median of 10; all within 1 s)."""
    address = await servers.rng(rng_mode="blocking", rng_read_cost=READ_COST)
    source = servers.source_at(address)
    alone = await visitor_rate(address, "get", 2)
    forwarder = SourceForwarder(address, "127.0.0.2")
    try:
        flood, refused = await hold_calls(await forwarder.start(), "readfast", FLOOD_STREAMS)
        assert (len(flood), refused) == (FLOOD_STREAMS, {})
        reads, began = source.source.reads, time.monotonic()
        during = await visitor_rate(address, "get", 3)
        capacity = (source.source.reads - reads) / (time.monotonic() - began)
        checks = await check_times(address)
    finally:
        await forwarder.close()
    print(f"\nvisitor alone {alone:.1f}, during the flood {during:.1f} reads/s ", end="")
    print(f"({during / alone:.2f}); the lock {capacity:.1f} reads/s; Checks {ms(checks)}")
    assert during >= 0.4 * alone, f"{during:.1f} reads/s during the flood, {alone:.1f} alone"
    # One read at a time, as before; never idle while reads wait (less the timer's lateness).
    assert 0.6 / READ_COST <= capacity <= 1.02 / READ_COST
    answer_fast(checks)


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.parametrize(
    ("service", "settings", "flood", "call", "bound"),
    [
        ("rng", {"profile": "turbo"}, "readfast", "stream", 0.3),
        ("hasher", {"profile": "turbo"}, "hashfast", "hash", 0.35),
    ],
    ids=["rng-turbo", "hasher-turbo"],
)
def test_a_flood_that_reads_fast_leaves_a_turbo_visitor_its_share(
    service, settings, flood, call, bound, record_property
) -> None:
    """A turbo rng or hasher process. A visitor from 127.0.0.1 streams turbo's batches with 4
    calls (a turbo worker's loops), alone, then while a flood process keeps 256 calls busy from
    127.0.0.2 through a real TCP forwarder: StreamRandoms of 32 KB messages read as fast as
    they come, or HashStreams sending the largest batch (16,384 blocks) as soon as the last is
    answered. The server's work goes to the two addresses by its cost, half each, as the
    blocking lock shows; here that work is CPU, and on 2 cores the flood process (256 streams
    through a Python forwarder) takes a core of its own, so the server gets less CPU during the
    flood than alone whoever it serves. The bounds keep the shape (half, not a 256th) with room
    for that: 0.35 on the hasher, 0.3 on rng, whose work per message is about what a client
    spends reading it (measured 0.44-0.79 and 0.56-0.85; on main the visitor got 0.01-0.08 and
    0.03-0.12). New clients' Checks answer within 100 ms meanwhile (the median of 10; all within
    1 s), and the server's memory is recorded."""
    port = free_port()
    server = Service(service, **{f"{service}_port": port}, **settings)
    address = f"127.0.0.1:{port}"
    flooding = None
    try:
        server.wait_for("listening on")
        alone = asyncio.run(visitor_rate(address, call, 3))
        rss_before = memory_mb(server.proc.pid, "VmRSS")
        flooding = LoggedProcess(
            flood_cmd("127.0.0.2", f"{flood}:{FLOOD_STREAMS}:{address}"), service_env()
        )
        held = json.loads(flooding.wait_for_line(r"^flood (.*)", 120).group(1))
        during = asyncio.run(visitor_rate(address, call, 4))
        checks = asyncio.run(check_times(address))
        rss_during = memory_mb(server.proc.pid, "VmRSS")
    finally:
        if flooding is not None:
            flooding.kill()
        server.terminate()
        server.kill()
    print(
        f"\n{service}: visitor alone {alone:.1f}, during the flood {during:.1f} replies/s ", end=""
    )
    print(f"({during / alone:.2f}); Checks {ms(checks)}; ", end="")
    print(f"RSS {rss_before:.1f} -> {rss_during:.1f} MB; load average {os.getloadavg()[0]:.1f}")
    record_property("rates", (round(alone, 1), round(during, 1)))
    record_property("check_ms", [round(seconds * 1000, 1) for seconds in checks])
    record_property("rss_mb", (rss_before, rss_during))
    assert list(held.values()) == [{"held": FLOOD_STREAMS, "refused": {}}], held
    assert during >= bound * alone, f"{during:.1f} replies/s during the flood, {alone:.1f} alone"
    answer_fast(checks)
