"""TLS on every gRPC hop, with certificates this test generates: plain TLS and mutual TLS."""

import socket
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dockercoins.channels import ChannelPool
from dockercoins.errors import ConfigError
from dockercoins.grpcserver import GrpcServer
from dockercoins.tls import channel_credentials, server_credentials
from dockercoins.v1 import hasher_pb2, hasher_pb2_grpc
from dockercoins_tools.launcher.stack import grpc_serving
from hasher_svc.config import SERVICE_NAME, HasherSettings
from hasher_svc.service import HasherServicer
from tests.stack import RunningStack, get_json, wait_until
from tests.support import run_cli, service_env


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and
    a second CA that signed nothing of ours."""
    where = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    other_ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("worker.dockercoins.test")
    files = SimpleNamespace(dir=where)
    for name, blob in {
        "ca": ca.cert_pem,
        "other_ca": other_ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }.items():
        path = where / f"{name}.pem"
        blob.write_to_path(str(path))
        setattr(files, name, path)
    return files


def tls(cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> object:
    return SimpleNamespace(tls_cert=cert, tls_key=key, tls_ca=ca)


async def start_hasher(credentials: grpc.ServerCredentials | None) -> tuple[GrpcServer, str]:
    server = GrpcServer("hasher", [SERVICE_NAME])
    hasher_pb2_grpc.add_HasherServicer_to_server(
        HasherServicer(HasherSettings(hasher_latency=0)), server.server
    )
    server.bind("127.0.0.1", 0, "DOCKERCOINS_HASHER_PORT", credentials=credentials)
    await server.start()
    return server, f"127.0.0.1:{server.port}"


async def hash_once(target: str, credentials: grpc.ChannelCredentials | None) -> str:
    pool = ChannelPool(target, size=2, credentials=credentials)
    try:
        reply = await hasher_pb2_grpc.HasherStub(pool.next()).Hash(
            hasher_pb2.HashRequest(data=b"hello"), timeout=5
        )
        return str(reply.hexdigests[0])
    finally:
        await pool.close()


HELLO = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


async def test_tls_server_answers_a_client_that_trusts_its_ca(pki) -> None:
    server, target = await start_hasher(server_credentials(tls(pki.server_cert, pki.server_key)))
    try:
        assert await hash_once(target, channel_credentials(tls(ca=pki.ca))) == HELLO
        assert await grpc_serving(target, credentials=channel_credentials(tls(ca=pki.ca)))
        # A plaintext client and a client trusting another CA get nowhere.
        for credentials in (None, channel_credentials(tls(ca=pki.other_ca))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await hash_once(target, credentials)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_mutual_tls_refuses_a_client_without_a_certificate(pki) -> None:
    server_side = tls(pki.server_cert, pki.server_key, pki.ca)
    server, target = await start_hasher(server_credentials(server_side))
    try:
        with_cert = channel_credentials(tls(pki.client_cert, pki.client_key, pki.ca))
        assert await hash_once(target, with_cert) == HELLO
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await hash_once(target, channel_credentials(tls(ca=pki.ca)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # Health is behind the same TLS: a probe needs the same credentials.
        channel = grpc.aio.secure_channel(target, with_cert)
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        await channel.close()
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


def test_a_file_that_is_not_pem_is_a_config_error_naming_the_variable(pki, tmp_path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^DOCKERCOINS_TLS_CERT: .*junk.pem is not a PEM"):
        server_credentials(tls(junk, pki.server_key))
    with pytest.raises(ConfigError, match=r"^DOCKERCOINS_TLS_CA: cannot read"):
        channel_credentials(tls(ca=tmp_path / "missing.pem"))


def test_no_tls_settings_means_plaintext() -> None:
    assert server_credentials(object()) is None
    assert channel_credentials(object()) is None
    assert channel_credentials(tls(ca=None)) is None


@pytest.mark.slow
def test_up_with_mutual_tls_everywhere_mines_and_probes(pki, tmp_path) -> None:
    cert = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_ca": pki.ca}
    stack = RunningStack(tmp_path / "data", ("--workers", "1"), **cert)
    try:
        webui = stack.ready()  # the launcher's readiness checks went over mutual TLS
        rng = stack.wait_for_line(r"^rng (\S+)").group(1)
        first = get_json(webui + "/json")["hashes"]
        wait_until(lambda: get_json(webui + "/json")["hashes"] > first, 30, "mining", stack)
        probe = run_cli(
            "probe", "rng", "--addr", rng, "--count", "2", "--interval", "0",
            env=service_env(**cert),
        )  # fmt: skip
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert "2 calls, 2 ok, 0 failed" in probe.stdout
        plaintext = run_cli("probe", "rng", "--addr", rng, "--count", "1", "--timeout", "2")
        assert plaintext.returncode == 1
        assert "UNAVAILABLE" in plaintext.stdout
        assert stack.stop() == 0
    finally:
        stack.kill()


@pytest.mark.slow
def test_a_certificate_without_its_key_stops_the_start_with_one_line(pki) -> None:
    result = run_cli("rng", "--port", "0", env=service_env(tls_cert=pki.server_cert))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dockercoins rng: DOCKERCOINS_TLS_KEY: DOCKERCOINS_TLS_CERT and DOCKERCOINS_TLS_KEY "
        "go together, set both or neither"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "settings", "line"),
    [
        ("hasher", {"tls_ca": "/nonexistent/ca.pem"}, "DOCKERCOINS_TLS_CA: Path does not point"),
        ("rng", {"tls_cert": "JUNK", "tls_key": "JUNK"}, "DOCKERCOINS_TLS_KEY: "),
        ("worker", {"metrics_port": 70000}, "DOCKERCOINS_METRICS_PORT: Input should be less"),
        ("hasher", {"metrics_port": "BUSY"}, "DOCKERCOINS_METRICS_PORT)"),
    ],
)
def test_bad_tls_or_metrics_settings_are_one_line(command, settings, line, tmp_path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {
            key: {"JUNK": junk, "BUSY": busy.getsockname()[1]}.get(value, value)
            for key, value in settings.items()
        }
        flags = ("--port", "0") if command != "worker" else ()
        result = run_cli(command, *flags, env=service_env(**values))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dockercoins {command}: ")
    assert line in lines[0]
