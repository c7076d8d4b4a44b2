"""A fair share of a server's scarce work per client address: turns at the work wait in a queue
per address, FIFO, and the addresses take turns by what their work costs (each service counts
its own), a bounded number in progress at once (rng's entropy lock and buffer, the hasher's
hashing)."""

import asyncio
import heapq
from collections import deque


class Turn:
    """One waiting turn: its start and finish tags, its place in arrival order, and the future
    its caller awaits until granted."""

    __slots__ = ("finish", "granted", "order", "start")

    def __init__(self, start: float, finish: float, order: int, granted: asyncio.Future[None]):
        self.start = start
        self.finish = finish
        self.order = order
        self.granted = granted


class FairShare:
    """Turns at one scarce piece of work, granted fairly across client addresses.

    Every turn waits in its address's queue, FIFO, until one of `slots` is free. A slot goes
    to the address whose first waiting turn has the earliest start tag (start-time fair
    queueing): each address's turns are tagged one after the other by their cost, none earlier
    than the turn granted last, so that every address with turns waiting is granted an equal
    share of the cost, whatever the number of its calls, and turns of equal cost go round-robin
    across addresses. An address with nothing waiting starts again at the turn granted last: it
    banks no credit while idle, and owes at most one turn when it comes back.

    A turn is granted from the event loop, never inside `acquire`, even with a slot free: work
    that runs without awaiting (the keystream, a small batch hashed on the loop) holds its slot
    only while it runs, so every caller would find a slot free and the loop's own order (one
    turn per call, so the address with the most calls gets the most) would decide. This way the
    turns that arrive in one pass of the loop wait together and go in fair order; a turn costs a
    future and a pass of the loop, a few µs per message.

    Each call waits for at most one turn at a time, so the calls' budgets (`calls.py`: per
    address and in total) bound the queues.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a fair share needs at least one slot, got {slots}")
        self.slots = slots
        self.busy = 0
        """Turns granted and not yet released."""
        self._virtual = 0.0  # the start tag of the turn granted last
        self._queues: dict[str, deque[Turn]] = {}  # addresses with turns waiting, oldest first
        self._heads: list[tuple[float, int, str]] = []  # (start, order, address) of each head
        self._order = 0
        self._granting = False  # a grant of free slots is scheduled

    @property
    def waiting(self) -> int:
        """Turns waiting for a slot."""
        return sum(len(queue) for queue in self._queues.values())

    @property
    def addresses(self) -> int:
        """Addresses with turns waiting."""
        return len(self._queues)

    async def acquire(self, address: str, cost: float) -> None:
        """Wait for a turn of `address` that costs `cost`; call `release` once its work is
        done. A turn cancelled while it waits gives its place up (or, granted meanwhile, its
        slot to the next)."""
        queue = self._queues.get(address)
        if queue is None:
            queue = self._queues[address] = deque()
            start = self._virtual
        else:
            start = max(self._virtual, queue[-1].finish)
        self._order += 1
        loop = asyncio.get_running_loop()
        turn = Turn(start, start + cost, self._order, loop.create_future())
        queue.append(turn)
        if len(queue) == 1:
            heapq.heappush(self._heads, (start, turn.order, address))
        if self.busy < self.slots and not self._granting:
            self._granting = True
            loop.call_soon(self._grant_free)
        try:
            await turn.granted
        except asyncio.CancelledError:
            if turn.granted.done() and not turn.granted.cancelled():
                self.release()  # granted as it was cancelled: the slot goes on
            else:
                self._withdraw(address, turn)
            raise

    def release(self) -> None:
        """End a turn: its slot goes to the next turn due, if any waits."""
        self.busy -= 1
        self._grant()

    def _grant_free(self) -> None:
        self._granting = False
        while self.busy < self.slots and self._grant():
            pass

    def _grant(self) -> bool:
        """Give a free slot to the turn due next; False if none waits."""
        heads = self._heads
        while heads:
            start, order, address = heapq.heappop(heads)
            queue = self._queues.get(address)
            if queue is None or queue[0].order != order:
                continue  # a head withdrawn since
            turn = queue.popleft()
            if queue:
                heapq.heappush(heads, (queue[0].start, queue[0].order, address))
            else:
                del self._queues[address]
            if turn.granted.done():
                continue  # cancelled; its caller has not run yet to withdraw it
            if start > self._virtual:
                self._virtual = start
            self.busy += 1
            turn.granted.set_result(None)
            return True
        self._virtual = 0.0  # nothing waits: no tag left to compare with
        return False

    def _withdraw(self, address: str, turn: Turn) -> None:
        queue = self._queues.get(address)
        if queue is None or turn not in queue:
            return  # skipped by `_grant` already
        head = queue[0] is turn
        queue.remove(turn)
        if not queue:
            del self._queues[address]
        elif head:  # the old head's entry in the heap is stale now
            heapq.heappush(self._heads, (queue[0].start, queue[0].order, address))
