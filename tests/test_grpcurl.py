"""The real grpcurl, through reflection, against real servers: what a user pokes with."""

import json

import pytest

from tests.support import grpcurl

pytestmark = pytest.mark.slow


async def test_list_describe_and_call_every_method(servers) -> None:
    rng = await servers.rng(rng_read_cost=0)
    hasher = await servers.hasher(hasher_latency=0)

    code, out = await grpcurl(rng, "list")
    assert code == 0, out
    assert set(out.split()) == {
        "dockercoins.v1.Rng",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, out = await grpcurl(hasher, "list")
    assert "dockercoins.v1.Hasher" in out.split()

    code, out = await grpcurl(rng, "describe", "dockercoins.v1.Rng")
    assert code == 0 and "rpc StreamRandom" in out, out
    code, out = await grpcurl(hasher, "describe", "dockercoins.v1.HashRequest")
    assert code == 0 and "block_size" in out, out
    code, out = await grpcurl(rng, "describe")  # every service, reflection v1 included
    assert code == 0 and "grpc.reflection.v1.ServerReflectionRequest" in out, out

    for address in (rng, hasher):
        code, out = await grpcurl(address, "grpc.health.v1.Health/Check")
        assert code == 0 and json.loads(out)["status"] == "SERVING", out

    code, out = await grpcurl("-d", '{"size": 32}', rng, "dockercoins.v1.Rng/GetRandom")
    assert code == 0, out
    assert json.loads(out)["size"] == "32"

    code, out = await grpcurl(
        "-d", '{"size": 8, "count": 2, "messages": 3}', rng, "dockercoins.v1.Rng/StreamRandom"
    )
    assert code == 0 and out.count('"data"') == 3, out

    code, out = await grpcurl("-d", '{"data": ""}', hasher, "dockercoins.v1.Hasher/Hash")
    assert code == 0, out
    assert json.loads(out)["hexdigests"] == [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    ]
    two_hellos = '{"data": "aGVsbG8="} {"data": "aGVsbG8="}'
    code, out = await grpcurl("-d", two_hellos, hasher, "dockercoins.v1.Hasher/HashStream")
    hello_sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert code == 0 and out.count(hello_sha256) == 2, out


async def test_grpcurl_shows_the_status_code_of_bad_input(servers) -> None:
    rng = await servers.rng(rng_read_cost=0)
    code, out = await grpcurl("-d", '{"size": 0}', rng, "dockercoins.v1.Rng/GetRandom")
    assert code != 0
    assert "InvalidArgument" in out and "size must be at least 1 byte" in out
