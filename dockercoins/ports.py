"""The well-known ports of the DockerCoins services: each service's default, and where a worker
looks for rng and hasher when no address is set (services never import each other)."""

RNG_PORT = 50051
HASHER_PORT = 50052
WEBUI_PORT = 8000
