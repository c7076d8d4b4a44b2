"""The coin rule, at every difficulty, against its definition on real SHA-256 digests."""

import hashlib
import os

import pytest

from worker_svc.coins import find_coins


def batch_with_coins(blocks: int, difficulty: int, wanted: int) -> bytes:
    """Random 32-byte blocks, searched until `wanted` of them are coins at `difficulty`."""
    found, plain = [], []
    while len(found) < wanted or len(plain) < blocks - wanted:
        block = os.urandom(32)
        coin = hashlib.sha256(block).hexdigest().startswith("0" * difficulty)
        (found if coin else plain).append(block)
    return b"".join(found[:wanted] + plain[: blocks - wanted])


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_find_coins_is_the_hex_digest_rule(difficulty: int) -> None:
    data = batch_with_coins(600, difficulty, wanted=5)
    digests = b"".join(hashlib.sha256(data[i : i + 32]).digest() for i in range(0, len(data), 32))
    expected = {
        hashlib.sha256(data[i : i + 32]).hexdigest(): data[i : i + 32]
        for i in range(0, len(data), 32)
        if hashlib.sha256(data[i : i + 32]).hexdigest().startswith("0" * difficulty)
    }
    assert len(expected) >= 5
    assert find_coins(data, digests, difficulty) == expected
    # A harder rule keeps a subset; the first digit alone is not enough past difficulty 1.
    assert set(find_coins(data, digests, difficulty + 1)) <= set(expected)
