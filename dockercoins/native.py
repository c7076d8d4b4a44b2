"""The hot loops in C when the extension is built: batch SHA-256 and a keystream; else hashlib
and os.urandom, byte for byte alike (SHA-256) or as strong (random bytes)."""

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

_native: Any
try:
    from dockercoins import _native  # type: ignore[attr-defined,no-redef]
except ImportError:  # built where a C compiler and OpenSSL's headers were; optional
    _native = None

NATIVE_BUILT = _native is not None
"""Whether the extension (dockercoins/_native.c, over the system's libcrypto) is importable."""

HashPath = Literal["native", "hashlib"]
HashBlocks = Callable[[bytes, int], bytes]

Generator = Literal["urandom", "aes-256-ctr", "chacha20"]
"""Where random bytes come from: the OS, or a stream cipher's keystream under a fresh key from
the OS for every call (libcrypto through the extension)."""
KEY_BYTES = 32
"""Both ciphers take a 256-bit key; each call draws a new one from os.urandom."""
IV_BYTES = 16
"""Both ciphers take a 16-byte IV (AES-CTR's counter block, ChaCha20's counter and nonce): zeros,
as every key is used once."""

HASHLIB_CHUNK_BLOCKS = 1024
"""Blocks the hashlib path hashes between two offers of the GIL, and whose digests it holds as
separate objects at once (about half a millisecond, under 100 KB)."""


def sha256_blocks_hashlib(data: bytes, block_size: int) -> bytes:
    """The fallback: hashlib per block, the GIL offered to other threads every chunk."""
    if block_size == 0:
        return hashlib.sha256(data).digest()
    _check_blocks(len(data), block_size)
    step = block_size * HASHLIB_CHUNK_BLOCKS
    if len(data) <= step:
        return _hash_chunk(memoryview(data), block_size)
    return b"".join(_hash_chunks(data, block_size))


def _check_blocks(size: int, block_size: int) -> None:
    if block_size < 0 or size == 0 or size % block_size:
        raise ValueError(
            f"data of {size} bytes is not a whole, non-empty number of {block_size}-byte blocks"
        )


def _hash_chunk(view: memoryview, block_size: int) -> bytes:
    sha256 = hashlib.sha256
    return b"".join(
        [sha256(view[i : i + block_size]).digest() for i in range(0, len(view), block_size)]
    )


def _hash_chunks(data: bytes, block_size: int) -> Iterator[bytes]:
    view = memoryview(data)
    step = block_size * HASHLIB_CHUNK_BLOCKS
    for start in range(0, len(data), step):
        yield _hash_chunk(view[start : start + step], block_size)
        time.sleep(0)


def hash_function(path: HashPath) -> HashBlocks:
    """The batch SHA-256 of `path`: native (one C loop over libcrypto, the GIL released) or
    hashlib. Both raise ValueError for data that is not whole, non-empty blocks (block_size > 0)."""
    if path == "native":
        if _native is None:
            raise RuntimeError("the native extension dockercoins._native is not built")
        return _native.sha256_blocks  # type: ignore[no-any-return]
    return sha256_blocks_hashlib


def choose_hash_path(native: bool = True) -> HashPath:
    """native when asked for and the extension is built, else hashlib."""
    return "native" if native and NATIVE_BUILT else "hashlib"


def sha256_blocks(data: bytes, block_size: int) -> bytes:
    """The SHA-256 of `data` (block_size 0) or of each block_size-byte block, concatenated."""
    return hash_function(choose_hash_path())(data, block_size)


def describe_hash_path(path: HashPath) -> str:
    """The path for a start line: which library does the hashing."""
    if path == "native" and _native is not None:
        return f"native batch SHA-256 over {_native.OPENSSL_VERSION}"
    built = "" if NATIVE_BUILT else " (the native extension is not built)"
    return f"hashlib per block{built}"


def random_function(generator: Generator) -> tuple[Generator, Callable[[int], bytes]]:
    """The generator that runs for `generator` (urandom when the extension is not built) and its
    function of a size in bytes."""
    if generator == "urandom" or _native is None:
        return "urandom", os.urandom
    keystream = _native.keystream
    iv = bytes(IV_BYTES)

    def random_bytes(size: int) -> bytes:
        return keystream(generator, os.urandom(KEY_BYTES), iv, size)  # type: ignore[no-any-return]

    return generator, random_bytes
