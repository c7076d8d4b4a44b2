"""The coin rule: a digest is a coin when its hex form starts with `difficulty` zeros."""

from dockercoins.wire import BLOCK_SIZE, DIGEST_SIZE


def is_coin(hexdigest: str, difficulty: int = 1) -> bool:
    """The coin rule: the hex digest starts with `difficulty` zeros."""
    return hexdigest.startswith("0" * difficulty)


# The first byte of a digest holds its first two hex digits: one leading zero digit means a
# first byte below 16, two or more mean a first byte of 0. Marking the candidates with
# bytes.translate and finding them with bytes.find keeps the scan in C; Python only sees them.
_FIRST_BYTE_BELOW_16 = bytes(1 if value < 16 else 0 for value in range(256))
_FIRST_BYTE_ZERO = bytes(1 if value == 0 else 0 for value in range(256))


def find_coins(data: bytes, digests: bytes, difficulty: int = 1) -> dict[str, bytes]:
    """Coins among a batch: hex digest -> the 32 random bytes that hashed to it."""
    table = _FIRST_BYTE_BELOW_16 if difficulty == 1 else _FIRST_BYTE_ZERO
    candidates = digests[::DIGEST_SIZE].translate(table)
    coins: dict[str, bytes] = {}
    index = candidates.find(1)
    while index != -1:
        digest = digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE].hex()
        if is_coin(digest, difficulty):
            coins[digest] = data[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        index = candidates.find(1, index + 1)
    return coins
