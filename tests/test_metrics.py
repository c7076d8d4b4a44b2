"""Prometheus metrics of every service, scraped from a real `dockercoins up` as Prometheus would."""

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dockercoins.v1 import rng_pb2, rng_pb2_grpc
from rng_svc.config import RngSettings
from tests.stack import RunningStack, wait_until

pytestmark = pytest.mark.slow


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
