"""Run a worker: channels, Redis, the optional health server, signals."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from grpc_health.v1 import health_pb2

from dockercoins.channels import ChannelPool, keepalive_options
from dockercoins.grpcserver import GrpcServer
from dockercoins.lifecycle import stop_event_on_signals
from dockercoins.metrics import start_metrics_endpoint
from dockercoins.redis_store import connect
from dockercoins.tls import channel_credentials
from worker_svc.config import LIVENESS, READINESS_SERVICES, WorkerSettings
from worker_svc.health import HealthReport
from worker_svc.metrics import watch_ledger
from worker_svc.miner import Miner

log = logging.getLogger(__name__)

_STATUS = {
    True: health_pb2.HealthCheckResponse.SERVING,
    False: health_pb2.HealthCheckResponse.NOT_SERVING,
}


@contextlib.asynccontextmanager
async def open_miner(
    settings: WorkerSettings, report_health: HealthReport | None = None
) -> AsyncIterator[Miner]:
    """A miner with what it mines through: a pool of channels to rng and one to hasher (with
    keepalive, and TLS when set), a Redis client; all closed when the block ends."""
    credentials = channel_credentials(settings)
    options = keepalive_options(settings.worker_keepalive_time, settings.rpc_timeout)
    rng = ChannelPool(settings.rng_addr, settings.worker_pool_size, options, credentials)
    hasher = ChannelPool(settings.hasher_addr, settings.worker_pool_size, options, credentials)
    redis = connect(settings.redis_url, settings.redis_timeout, settings.redis_password())
    try:
        yield Miner(settings, rng, hasher, redis, report_health=report_health)
    finally:
        await rng.close()
        await hasher.close()
        await redis.aclose()


async def serve(settings: WorkerSettings) -> None:
    """Mine until a stop signal; then finish the unit in hand, flush, exit."""
    stop = stop_event_on_signals()
    health: GrpcServer | None = None
    report: HealthReport | None = None
    if settings.worker_health_port:
        health = GrpcServer("worker", [], calls=settings)
        health.listen(settings, "worker_health_port")
        servicer = health.health

        async def report(ready: bool, live: bool) -> None:
            for name in READINESS_SERVICES:
                await servicer.set(name, _STATUS[ready])
            await servicer.set(LIVENESS, _STATUS[live])

        await report(False, True)  # not ready until a unit of work is done
        await health.start(serving=False)
    start_metrics_endpoint(settings.host, settings.metrics_port)
    try:
        async with open_miner(settings, report) as miner:
            if settings.metrics_port:
                watch_ledger(miner.ledger)
            await _mine_until(stop, miner, health)
    finally:
        if health is not None:
            await health.stop(0)


async def _mine_until(stop: asyncio.Event, miner: Miner, health: GrpcServer | None) -> None:
    """Run `miner` until `stop` is set, then stop it: NOT_SERVING first, then the unit in hand
    and the last flush."""
    settings = miner.settings
    log.info(
        "worker %s mining: rng %s, hasher %s, %d loop(s), batch %d, %d channel(s), %s",
        miner.worker_id,
        miner.rng.target,
        miner.hasher.target,
        settings.worker_loops,
        settings.worker_batch,
        settings.worker_pool_size,
        "streaming" if settings.worker_streaming else "unary calls",
    )
    running = asyncio.create_task(miner.run())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if not running.done():
            log.info("worker stopping: finishing the unit in hand")
            if health is not None:
                for name in READINESS_SERVICES:
                    await health.health.set(name, _STATUS[False])
            miner.stop()
        await running  # a loop's or the flusher's failure ends the process here, traceback and all
    finally:
        stopped.cancel()
