"""Retry pacing and outage reporting: back off exponentially, say so once per outage."""

import logging
import random
import time

MAX_BACKOFF = 2.0
"""Longest pause, in seconds, between two attempts at an unreachable peer."""


class Backoff:
    """Exponential delays with jitter, from `initial` up to `maximum` seconds."""

    def __init__(
        self, initial: float = 0.05, maximum: float = MAX_BACKOFF, factor: float = 2.0
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next_delay(self) -> float:
        """The delay before the next attempt; each call lengthens the following one."""
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self._next = self.initial


class OutageLog:
    """Logs an upstream's failure once when it starts and once when it ends.

    Several loops share one log: an attempt that began before the upstream came back and
    fails after it (a stream that was already stalled) belongs to the outage that ended, not
    to a new one, so each outage gets exactly one line of each kind.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._since: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._back_at: dict[str, float] = {}

    def is_down(self, name: str) -> bool:
        """Whether `name` is in an outage now."""
        return name in self._since

    def down(self) -> list[str]:
        """The names in an outage now."""
        return list(self._since)

    def failed(self, name: str, reason: str, started: float | None = None) -> None:
        """Record a failed attempt, begun at `started` (time.monotonic()); logs an outage's first.

        A failure of an attempt begun before `name` last came back is not a new outage.
        """
        if name not in self._since:
            if started is not None and started < self._back_at.get(name, float("-inf")):
                return
            self._since[name] = time.monotonic()
            self.log.warning("%s unreachable: %s; retrying with backoff", name, reason)
        self._failures[name] = self._failures.get(name, 0) + 1

    def recovered(self, name: str) -> None:
        """Record a success; ends the outage, if any, with one line.

        Called after every successful call, so the usual case (no outage) returns at once.
        """
        if name not in self._since:
            return
        now = time.monotonic()
        started = self._since.pop(name)
        failures = self._failures.pop(name, 0)
        self._back_at[name] = now
        self.log.info("%s is back after %.1f s (%d failed attempts)", name, now - started, failures)
