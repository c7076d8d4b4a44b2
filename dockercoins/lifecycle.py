"""Signals and shutdown: SIGTERM, SIGINT and SIGHUP set one event that every service waits on."""

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that stop a process in order: SIGTERM (Docker, Kubernetes), SIGINT (Ctrl-C) and
SIGHUP (a closed terminal, a dropped ssh session), whose default would end it on the spot. No
process of ours reloads anything: its settings are frozen at start."""


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first stop signal (STOP_SIGNALS; call from inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return stop


def watch_task(task: "asyncio.Task[Any]", on_crash: Callable[[str], None]) -> None:
    """Make a long-running task's failure loud: its traceback logged, then `on_crash(why)`,
    which takes the process down so that its supervisor restarts it."""

    def done(finished: "asyncio.Task[Any]") -> None:
        if finished.cancelled() or finished.exception() is None:
            return
        error = finished.exception()
        log.error("%s failed", finished.get_name(), exc_info=error)
        on_crash(f"{finished.get_name()} failed: {error!r}")

    task.add_done_callback(done)


async def cancel_all(tasks: "list[asyncio.Task[Any]]") -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again if one lingers."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            names = ", ".join(task.get_name() for task in pending)
            log.warning("%s did not end when cancelled; cancelling again", names)


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task is being cancelled.

    For a broad `except` around a library call: a library's timeout that expires as its task
    is cancelled can raise TimeoutError (an OSError on 3.11) or its own timeout error instead
    of CancelledError (3.11's `asyncio.wait_for`, which redis-py uses, can even return a
    result); swallowed, the cancelled task would run on.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
