"""`python -m dockercoins_tools.healthcheck HOST:PORT --service NAME`: one gRPC health Check, for
container health checks.

Compose runs a container's health check every few seconds for as long as it lives, so this
imports gRPC and the health stubs and nothing else: `dockercoins probe --health` asks the same
question through the whole CLI (settings, TLS, every stub), which costs several times the CPU
to start. Plaintext only; with TLS on, use `dockercoins probe --health`.
"""

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str, timeout: float) -> str:
    """Ask the health service at `address` about `service`; '' if SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    if reply.status != SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 if SERVING, 1 if not (or unreachable), 2 on bad arguments; one line either way."""
    parser = argparse.ArgumentParser(
        prog="python -m dockercoins_tools.healthcheck",
        description="One grpc.health.v1 Check; exit 0 if the service answers SERVING.",
    )
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument(
        "--service",
        default="",
        help="health service to ask about: dockercoins.v1.Rng, dockercoins.v1.Hasher, a "
        "worker's readiness or liveness; '' (default): the server's overall status",
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (2)")
    options = parser.parse_args(argv)
    what = f"{options.address} {options.service or '(overall)'}"
    failure = check(options.address, options.service, options.timeout)
    if failure:
        print(f"{what}: {failure}", file=sys.stderr)
        return 1
    print(f"{what}: SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())
