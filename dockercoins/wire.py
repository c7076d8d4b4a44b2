"""The wire's facts in one place: block and digest sizes, the batch cap, framing, and every
message limit derived from them (the hasher's caps, rng's largest request, gRPC's limits)."""

BLOCK_SIZE = 32
"""Bytes of randomness per hash, as in the original."""

DIGEST_SIZE = 32
"""Bytes of a SHA-256 digest."""

TURBO_BATCH = 8192
"""Blocks per message in turbo (the worker's default there): the best point of the bench's grid
(docs/performance.md); grpcio's 100-200 CPU-µs per message per process are then about 0.02 µs
per hash."""

MAX_BATCH = 16384
"""The batch cap: most blocks one message may carry (the worker's largest batch, the hasher's
default cap on blocks per request). The bench's grid goes up to it."""

BATCH_BYTES = MAX_BATCH * BLOCK_SIZE
"""The largest batch's random bytes (512 KiB): the default of rng's largest request and of the
hasher's largest request payload."""

MESSAGE_FRAMING = 64
"""Bytes of any of our messages besides its one large field: field tags, lengths and the small
fields (a HashRequest's block_size and raw, a RandomReply's size and mode)."""

HEX_ENTRY_BYTES = 2 + 2 * DIGEST_SIZE
"""One hex digest in a HashReply: a field tag, a length byte and 64 characters."""


def reply_bytes(blocks: int, raw: bool) -> int:
    """An upper bound of the size of the hasher's reply to a request of `blocks` blocks."""
    digests = 6 + DIGEST_SIZE * blocks  # a tag, a length of at most 5 bytes, the digests
    return digests if raw else digests + HEX_ENTRY_BYTES * blocks


MAX_REPLY_BYTES = reply_bytes(MAX_BATCH, raw=False)
"""The default bound of a hasher reply: the batch cap's digests with their hex strings (1.6 MB)."""

MESSAGE_CEILING = 16 << 20
"""The most any size setting may allow (rng's largest request, the hasher's request and reply):
parsing or serializing a message on the event loop takes time too (16 MiB: about 20-60 ms on the
shared build machine)."""

MAX_MESSAGE_BYTES = MESSAGE_CEILING + MESSAGE_FRAMING
"""gRPC's limit on the messages a client sends and receives, and servers send: the largest
message any size setting may allow, so that a client takes the largest reply any server may
send. Servers receive only what their own settings allow."""
