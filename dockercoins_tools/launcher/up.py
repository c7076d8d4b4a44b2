"""`dockercoins up`: the stack and its control socket, from start until a stop signal."""

import asyncio
import contextlib

from dockercoins.errors import DockercoinsError
from dockercoins.lifecycle import stop_event_on_signals
from dockercoins_tools.launcher.control import ControlServer
from dockercoins_tools.launcher.settings import CONTROL_SOCKET, StackSettings, claim_data_dir
from dockercoins_tools.launcher.stack import Stack


async def serve(settings: StackSettings) -> None:
    """Start the stack, print where everything listens, run until SIGTERM, SIGINT or SIGHUP.

    If one of the launcher's own tasks fails (a supervisor, a log pump), its traceback is
    logged, everything is stopped and DockercoinsError says which: the launcher never goes on
    half-alive.
    """
    claim_data_dir(settings.data_dir)
    stop = stop_event_on_signals()
    stack = Stack(settings)
    control = ControlServer(stack, settings.data_dir / CONTROL_SOCKET)
    try:
        starting = asyncio.create_task(stack.start())
        stopped = asyncio.create_task(stop.wait())
        crashed = asyncio.create_task(stack.crashed.wait())
        await asyncio.wait({starting, stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()
            await control.start()
            for line in stack.describe():
                stack.console.say(line)
            stack.console.say("dockercoins up: ready; Ctrl-C stops everything")
            await asyncio.wait({stopped, crashed}, return_when=asyncio.FIRST_COMPLETED)
        stack.console.say("dockercoins up: stopping")
    finally:
        await control.stop()
        await stack.stop()
        stopped.cancel()
        crashed.cancel()
    if stack.failure:
        raise DockercoinsError(f"{stack.failure}; stopped everything")
    stack.console.say("dockercoins up: stopped")
