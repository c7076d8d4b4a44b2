"""The cost model: the simulated costs a stack runs with, as the services' settings give them,
and the rate they predict."""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, get_args

from dockercoins.settings import Profile, SettingsT, env_name, load_settings
from hasher_svc.config import HasherSettings
from rng_svc.config import RngSettings
from worker_svc.config import WorkerSettings

PROFILES: tuple[str, ...] = get_args(Profile)
"""The named sets of costs of `--profile`: the services' defaults, and their TURBO_DEFAULTS."""


@dataclass(frozen=True)
class Costs:
    """The simulated costs the stack runs with (local) or was deployed with (kubectl)."""

    rng_read_cost: float
    hasher_latency: float
    worker_think_time: float
    worker_flush_interval: float
    rng_latency: float | None
    profile: str

    @property
    def rng_request(self) -> float:
        """Least time of an rng request: rng_latency, or the read cost when unset."""
        return self.rng_read_cost if self.rng_latency is None else self.rng_latency

    def env(self) -> dict[str, str]:
        """The DOCKERCOINS_* variables that give the services these costs."""
        return {
            env_name(name): str(value) for name, value in asdict(self).items() if value is not None
        }


def settings_of_container(
    cls: type[SettingsT], env: Mapping[str, str], fields: Sequence[str]
) -> SettingsT:
    """`cls` as a container with this environment gets it (this process's environment aside)."""

    class FromContainer(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls, settings_cls: Any, init_settings: Any, **_: Any
        ) -> tuple[Any, ...]:
            return (init_settings,)

    given = {field: env[env_name(field)] for field in fields if env_name(field) in env}
    settings: SettingsT = load_settings(FromContainer, **given)
    return settings


def costs_of_containers(envs: Mapping[str, Mapping[str, str]]) -> Costs:
    """The simulated costs of rng, hasher and worker containers with these environments."""
    rng = settings_of_container(
        RngSettings, envs["rng"], ("profile", "rng_read_cost", "rng_latency")
    )
    hasher = settings_of_container(HasherSettings, envs["hasher"], ("profile", "hasher_latency"))
    worker = settings_of_container(
        WorkerSettings,
        envs["worker"],
        ("profile", "worker_think_time", "worker_flush_interval"),
    )
    return Costs(
        rng_read_cost=rng.rng_read_cost,
        hasher_latency=hasher.hasher_latency,
        worker_think_time=worker.worker_think_time,
        worker_flush_interval=worker.worker_flush_interval,
        rng_latency=rng.rng_latency,
        profile=worker.profile,
    )


def profile_costs(profile: str) -> Costs:
    """The costs the services run with under `profile` and nothing else set."""
    only_profile = {env_name("profile"): profile}
    return costs_of_containers(dict.fromkeys(("rng", "hasher", "worker"), only_profile))


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
