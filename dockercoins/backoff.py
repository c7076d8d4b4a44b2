"""Retry pacing and outage reporting: back off exponentially, say so once per outage."""

import logging
import random
import time


class Backoff:
    """Exponential delays with jitter, from `initial` up to `maximum` seconds."""

    def __init__(self, initial: float = 0.05, maximum: float = 2.0, factor: float = 2.0) -> None:
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
    """Logs an upstream's failure once when it starts and once when it ends."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._since: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def is_down(self, name: str) -> bool:
        """Whether `name` is in an outage now."""
        return name in self._since

    def failed(self, name: str, reason: str) -> None:
        """Record a failed attempt; only the first of an outage is logged."""
        self._failures[name] = self._failures.get(name, 0) + 1
        if name not in self._since:
            self._since[name] = time.monotonic()
            self.log.warning("%s unreachable: %s; retrying with backoff", name, reason)

    def recovered(self, name: str) -> None:
        """Record a success; ends the outage, if any, with one line.

        Called after every successful call, so the usual case (no outage) returns at once.
        """
        if name not in self._since:
            return
        started = self._since.pop(name, None)
        failures = self._failures.pop(name, 0)
        if started is not None:
            self.log.info(
                "%s is back after %.1f s (%d failed attempts)",
                name,
                time.monotonic() - started,
                failures,
            )
