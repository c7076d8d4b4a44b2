"""Run a worker: channels, Redis, the optional health server, signals."""

import asyncio
import logging

from grpc_health.v1 import health_pb2
from redis.asyncio import Redis

from dockercoins.channels import ChannelPool
from dockercoins.grpcserver import GrpcServer
from dockercoins.lifecycle import stop_event_on_signals
from dockercoins.metrics import start_metrics_endpoint, watch_ledger
from dockercoins.tls import channel_credentials, server_credentials
from worker_svc.config import WorkerSettings
from worker_svc.service import Miner

log = logging.getLogger(__name__)


def connect_redis(url: str) -> Redis:
    """A Redis client with short timeouts, so that an outage is noticed and retried."""
    return Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


async def serve(settings: WorkerSettings) -> None:
    """Mine until SIGTERM or SIGINT; then finish the unit in hand, flush, exit."""
    stop = stop_event_on_signals()
    health: GrpcServer | None = None
    if settings.worker_health_port:
        health = GrpcServer("worker", [])
        health.bind(
            settings.host,
            settings.worker_health_port,
            "DOCKERCOINS_WORKER_HEALTH_PORT",
            server_credentials(settings),
        )
        await health.start()
    start_metrics_endpoint(settings.host, settings.metrics_port)
    credentials = channel_credentials(settings)
    rng = ChannelPool(settings.rng_addr, settings.worker_pool_size, credentials=credentials)
    hasher = ChannelPool(settings.hasher_addr, settings.worker_pool_size, credentials=credentials)
    redis = connect_redis(settings.redis_url)
    miner = Miner(settings, rng, hasher, redis)
    if settings.metrics_port:
        watch_ledger(miner.ledger)
    log.info(
        "worker %s mining: rng %s, hasher %s, %d loop(s), batch %d, %d channel(s), %s",
        miner.worker_id,
        rng.target,
        hasher.target,
        settings.worker_loops,
        settings.worker_batch,
        settings.worker_pool_size,
        "streaming" if settings.worker_streaming else "unary calls",
    )
    running = asyncio.create_task(miner.run())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
    log.info("worker stopping: finishing the unit in hand")
    if health is not None:
        await health.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    miner.stopping.set()
    stopped.cancel()
    await running
    await rng.close()
    await hasher.close()
    await redis.aclose()
    if health is not None:
        await health.stop(0)
