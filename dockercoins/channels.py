"""A pool of gRPC channels per upstream, each with its own connection, balanced round-robin."""

import itertools
from collections.abc import Sequence

import grpc

from dockercoins.backoff import MAX_BACKOFF
from dockercoins.tls import open_channel
from dockercoins.wire import MAX_MESSAGE_BYTES

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
DNS_MIN_INTERVAL_MS = 1000


def normalize_target(target: str) -> str:
    """A gRPC target; a bare comma-separated list of IPv4 host:port becomes `ipv4:` form."""
    target = target.strip()
    if "," in target and not target.startswith(_SCHEMES):
        return "ipv4:" + ",".join(part.strip() for part in target.split(","))
    return target


def keepalive_options(interval: float, timeout: float) -> list[tuple[str, int]]:
    """Channel options that notice a silent peer and reconnect promptly once it is back.

    Pings go every `interval` seconds, with or without calls; a ping unanswered within
    `timeout` closes the connection (a paused or partitioned peer), and reconnection attempts
    are never more than MAX_BACKOFF apart.
    """
    return [
        ("grpc.keepalive_time_ms", int(interval * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
        # gRPC 1.85 waits for a ping's ack this long (default 1 min), whatever the keepalive
        # timeout says: without it a dead connection stayed "READY" for over a minute.
        ("grpc.http2.ping_timeout_ms", int(timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # A stalled stream sends no data; pings must go on regardless (default: 2 at most).
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC waits up to 120 s between reconnection attempts by default: after a long
        # outage the channel would sit idle long after its peer came back.
        ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF * 1000)),
    ]


class ChannelPool:
    """`size` channels to one target, each with its own subchannel pool (its own connections).

    grpcio shares one connection between channels with identical options; a local
    subchannel pool per channel makes the pool real. Every channel balances
    round-robin over all the addresses its target resolves to (a headless Service's
    pods with `dns:///`, or an `ipv4:` list). With `credentials`, every channel is TLS.
    """

    def __init__(
        self,
        target: str,
        size: int = 1,
        options: Sequence[tuple[str, str | int]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, got {size}")
        self.target = normalize_target(target)
        channel_options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Without this, window growth lets a fast server stream park megabytes per stream.
            ("grpc.http2.bdp_probe", 0),
            # A server's GOAWAY (DOCKERCOINS_MAX_CONNECTION_AGE) makes the channel re-resolve
            # dns:/// targets, but by default at most every 30 s: new replicas waited that long.
            ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_INTERVAL_MS),
            *options,
        ]
        self.options = dict(channel_options)
        """Every channel's options, by name."""
        self.channels = [
            open_channel(self.target, credentials, channel_options) for _ in range(size)
        ]
        self._turn = itertools.cycle(self.channels)

    def next(self) -> grpc.aio.Channel:
        """The next channel, round-robin."""
        return next(self._turn)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self.channels:
            await channel.close()
