"""The cost model: the simulated costs a stack runs with, and the rate they predict."""

from dataclasses import asdict, dataclass

from dockercoins.settings import env_name


@dataclass(frozen=True)
class Costs:
    """The simulated costs the stack runs with (local) or was deployed with (kubectl)."""

    rng_read_cost: float = 0.1
    hasher_latency: float = 0.1
    worker_think_time: float = 0.1
    worker_flush_interval: float = 1.0
    rng_latency: float | None = None
    profile: str = "classic"

    @property
    def rng_request(self) -> float:
        """Least time of an rng request: rng_latency, or the read cost when unset."""
        return self.rng_read_cost if self.rng_latency is None else self.rng_latency

    def env(self) -> dict[str, str]:
        """The DOCKERCOINS_* variables that give the services these costs."""
        return {
            env_name(name): str(value) for name, value in asdict(self).items() if value is not None
        }


PROFILES: dict[str, Costs] = {
    "classic": Costs(),
    "turbo": Costs(0.0, 0.0, 0.0, 1.0, 0.0, profile="turbo"),
}
"""Named cost sets for `--profile`; flags override single costs of the chosen profile."""


def expected_rate(mode: str, workers: float, rng_replicas: int, costs: Costs) -> float:
    """The model: hashes/s of `workers` one-loop workers against `rng_replicas` rng processes.

    A loop pays think + rng's time per request + hasher's latency; rng answers no
    sooner than its request time (by default its read cost), concurrently.
    Blocking: each request also does its own read under one lock, so each rng serves
    at most 1 / read cost requests per second: the rate is the smaller of the two.
    Buffered: requests are served from the buffer, so nothing queues and the rate
    grows with the workers (its source is far from being the limit).
    """
    rng_request = max(costs.rng_request, costs.rng_read_cost if mode == "blocking" else 0.0)
    loop = costs.worker_think_time + rng_request + costs.hasher_latency
    if mode == "blocking":
        ceiling = rng_replicas / costs.rng_read_cost if costs.rng_read_cost else float("inf")
        return min(workers / loop, ceiling) if loop else ceiling
    return workers / loop if loop else float("inf")
