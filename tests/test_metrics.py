"""Prometheus metrics of every service, scraped as Prometheus would: from rng's and hasher's own
collectors in-process, and from a real `dockercoins up`."""

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dockercoins.metrics import MetricsEndpoint
from dockercoins.v1 import rng_pb2, rng_pb2_grpc
from hasher_svc.metrics import watch_path
from rng_svc.config import RngSettings
from rng_svc.metrics import watch_source
from rng_svc.server import build_server, build_source
from tests.stack import RunningStack, wait_until


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample at `url`: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture
def stack(tmp_path):
    running = RunningStack(
        tmp_path / "data", ("--workers", "2", "--rng-mode", "buffered"), metrics_port=1
    )
    yield running
    running.kill()


async def test_rng_exports_its_source_and_hasher_its_path() -> None:
    """rng's collector (buffered mode: reads, the buffer's level within its capacity, refills,
    underruns) and hasher's path, on an endpoint of their own; gone once unexported."""
    settings = RngSettings(rng_port=0, rng_mode="buffered", rng_read_cost=0)
    source = build_source(settings)
    server = build_server(settings, source)
    await server.start()
    registry = CollectorRegistry()
    endpoint = MetricsEndpoint("127.0.0.1", 0, registry)
    unexport = [watch_source(source, registry), watch_path("hashlib", registry)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for _ in range(3):
                await rng_pb2_grpc.RngStub(channel).GetRandom(rng_pb2.RandomRequest(size=32))
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        rng = await asyncio.to_thread(scrape, url)
        assert value(rng, "dockercoins_rng_entropy_reads_total") >= 1
        assert value(rng, "dockercoins_rng_refills_total") >= 1
        capacity = settings.rng_buffer_size
        assert value(rng, "dockercoins_rng_buffer_capacity_bytes") == capacity
        assert 0 <= value(rng, "dockercoins_rng_buffer_bytes") <= capacity
        assert ("dockercoins_rng_underruns_total", frozenset()) in rng
        assert value(rng, "dockercoins_hasher_path_info", path="hashlib") == 1
        for stop in unexport:
            stop()
        assert not await asyncio.to_thread(scrape, url)
    finally:
        endpoint.close()
        await server.stop(0)
        await source.close()


@pytest.mark.slow
def test_every_service_exports_its_metrics(stack) -> None:
    webui = stack.ready()
    endpoints = {
        name: url
        for name, url in (
            stack.wait_for_line(rf"^metrics {name} (http://\S+)").group(0).split()[1:]
            for name in ("rng", "hasher", "worker.1", "worker.2")
        )
    }
    rng_address = stack.wait_for_line(r"^rng (\S+)").group(1)
    with grpc.insecure_channel(rng_address) as channel:  # one refused request, to be counted
        with pytest.raises(grpc.RpcError) as refused:
            rng_pb2_grpc.RngStub(channel).GetRandom(rng_pb2.RandomRequest(size=0), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = rng_pb2_grpc.RngStub(channel).StreamRandom(
            rng_pb2.StreamRandomRequest(size=32, messages=3)
        )
        assert len(list(stream)) == 3

    def mining(name: str) -> bool:
        try:
            return value(scrape(endpoints[name]), "dockercoins_worker_hashes_total") > 5
        except OSError:  # its /metrics not served yet: a worker starts slowly on a busy machine
            return False

    wait_until(lambda: mining("worker.1") and mining("worker.2"), 30, "both workers mining", stack)

    rng = scrape(endpoints["rng"])
    method = {"grpc_service": "dockercoins.v1.Rng", "grpc_method": "GetRandom"}
    assert value(rng, "grpc_server_handled_total", grpc_code="OK", **method) > 10
    assert value(rng, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **method) == 1
    assert value(rng, "grpc_server_started_total", **method) >= value(
        rng, "grpc_server_handled_total", **method
    )
    assert value(rng, "grpc_server_handling_seconds_count", **method) > 10
    assert value(rng, "dockercoins_rng_refills_total") >= 1
    assert value(rng, "dockercoins_rng_entropy_reads_total") >= 1
    # The buffer's gauges are there (a missing one would read 0 in `value`), the capacity is the
    # default setting's, and the level within it.
    capacity = RngSettings.model_fields["rng_buffer_size"].default
    assert value(rng, "dockercoins_rng_buffer_capacity_bytes") == capacity
    assert ("dockercoins_rng_buffer_bytes", frozenset()) in rng
    assert 0 <= value(rng, "dockercoins_rng_buffer_bytes") <= capacity
    assert ("dockercoins_rng_underruns_total", frozenset()) in rng
    streamed = {"grpc_service": "dockercoins.v1.Rng", "grpc_method": "StreamRandom"}
    assert value(rng, "grpc_server_msg_sent_total", **streamed) == 3  # written, not yielded
    assert value(rng, "grpc_server_handled_total", grpc_code="OK", **streamed) == 1

    hasher = scrape(endpoints["hasher"])
    hashed = value(hasher, "grpc_server_handled_total", grpc_method="Hash", grpc_code="OK")
    assert hashed > 10
    # The histogram's le="+Inf" bucket holds every call.
    assert value(hasher, "grpc_server_handling_seconds_bucket", grpc_method="Hash", le="+Inf") == (
        value(hasher, "grpc_server_handling_seconds_count", grpc_method="Hash")
    )

    total = 0.0
    for name in ("worker.1", "worker.2"):
        worker = scrape(endpoints[name])
        hashes = value(worker, "dockercoins_worker_hashes_total")
        assert hashes > 5
        assert ("dockercoins_worker_coins_total", frozenset()) in worker
        assert value(worker, "dockercoins_worker_coins_total") <= hashes
        assert value(worker, "dockercoins_worker_rpc_seconds_count", upstream="rng") > 5
        assert value(worker, "dockercoins_worker_rpc_seconds_count", upstream="hasher") > 5
        total += hashes
    # The workers' calls are the servers' calls (scraped a little later, so at least as many).
    assert value(scrape(endpoints["hasher"]), "grpc_server_handled_total", grpc_method="Hash") >= (
        total
    )

    webui_metrics = scrape(webui + "/metrics")
    assert value(webui_metrics, "process_resident_memory_bytes") > 0
    assert stack.stop() == 0
