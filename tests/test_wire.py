"""The wire's facts come from one place (dockercoins/wire.py): the batch cap and turbo's batch,
the hasher's caps, rng's largest request, the worker's largest batch and gRPC's limits."""

import asyncio
import subprocess
import sys
import textwrap

import pytest

from dockercoins import wire
from dockercoins.channels import ChannelPool
from dockercoins.grpcserver import BASE_OPTIONS
from hasher_svc.config import HasherSettings
from rng_svc.config import RngSettings
from worker_svc.config import WorkerSettings


def field_bound(settings: type, name: str, bound: str) -> int:
    """A settings field's `le` (or `ge`) bound."""
    for item in settings.model_fields[name].metadata:  # type: ignore[attr-defined]
        if hasattr(item, bound):
            return int(getattr(item, bound))
    raise AssertionError(f"{name} has no {bound} bound")


async def channel_options() -> dict:
    """The options of a worker's channel (opened, never connected: nothing calls)."""
    pool = ChannelPool("127.0.0.1:1")
    await pool.close()
    return pool.options


def test_the_limits_in_force_are_the_wire_modules() -> None:
    hasher, rng = HasherSettings(), RngSettings()
    assert hasher.hasher_max_blocks == wire.MAX_BATCH
    assert hasher.hasher_max_request == rng.rng_max_request == wire.MAX_BATCH * wire.BLOCK_SIZE
    assert hasher.hasher_max_reply == wire.reply_bytes(wire.MAX_BATCH, raw=False)
    assert field_bound(WorkerSettings, "worker_batch", "le") == wire.MAX_BATCH
    assert WorkerSettings(profile="turbo").worker_batch == wire.TURBO_BATCH <= wire.MAX_BATCH
    assert dict(BASE_OPTIONS)["grpc.max_send_message_length"] == wire.MAX_MESSAGE_BYTES
    options = asyncio.run(channel_options())
    assert options["grpc.max_receive_message_length"] == wire.MAX_MESSAGE_BYTES
    assert options["grpc.max_send_message_length"] == wire.MAX_MESSAGE_BYTES
    # The worker's largest batch fits every bound on its way, raw digests back included.
    largest = wire.MAX_BATCH * wire.BLOCK_SIZE + wire.MESSAGE_FRAMING
    assert largest <= hasher.hasher_max_request + wire.MESSAGE_FRAMING <= wire.MAX_MESSAGE_BYTES
    assert wire.reply_bytes(wire.MAX_BATCH, raw=True) <= hasher.hasher_max_reply
    for settings, field in (
        (HasherSettings, "hasher_max_request"),
        (RngSettings, "rng_max_request"),
    ):
        assert field_bound(settings, field, "le") == wire.MESSAGE_CEILING


@pytest.mark.slow
def test_changing_the_batch_cap_in_wire_changes_every_limit() -> None:
    """Another batch cap and turbo batch written in wire.py alone (here: its source rewritten
    before any service is imported) move the hasher's caps, rng's largest request, the worker's
    bound and turbo default, and gRPC's limits with them."""
    script = textwrap.dedent(
        """
        import inspect
        import dockercoins.wire as wire
        source = inspect.getsource(wire)
        source = source.replace("MAX_BATCH = 16384", "MAX_BATCH = 2048")
        source = source.replace("TURBO_BATCH = ", "TURBO_BATCH = 1024 or ")
        source = source.replace("MESSAGE_CEILING = 16 << 20", "MESSAGE_CEILING = 4 << 20")
        exec(compile(source, wire.__file__, "exec"), wire.__dict__)
        import asyncio
        from dockercoins.grpcserver import BASE_OPTIONS
        from tests.test_wire import channel_options
        from hasher_svc.config import HasherSettings
        from rng_svc.config import RngSettings
        from worker_svc.config import WorkerSettings
        hasher = HasherSettings()
        print(hasher.hasher_max_blocks, hasher.hasher_max_request, hasher.hasher_max_reply)
        print(RngSettings().rng_max_request, WorkerSettings(profile="turbo").worker_batch)
        print(WorkerSettings.model_fields["worker_batch"].metadata)
        print(dict(BASE_OPTIONS)["grpc.max_send_message_length"])
        print(asyncio.run(channel_options())["grpc.max_send_message_length"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0].split() == ["2048", str(2048 * 32), str(wire.reply_bytes(2048, raw=False))]
    assert out[1].split() == [str(2048 * 32), "1024"]
    assert "le=2048" in out[2]
    assert out[3] == out[4] == str((4 << 20) + wire.MESSAGE_FRAMING)
