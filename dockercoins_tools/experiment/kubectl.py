"""The experiment on a cluster: `kubectl` scales, the web UI's `/json` gives the counter."""

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any

from dockercoins.errors import ConfigError
from dockercoins.redis_store import Totals
from dockercoins.settings import env_name
from dockercoins_tools.cost_model import Costs, costs_of_containers
from dockercoins_tools.experiment.backends import ExperimentError


class KubectlBackend:
    """A cluster: `kubectl scale deployment/worker`, the counter from the web UI's `/json`.

    The costs of the model are the cluster's own (its containers' DOCKERCOINS_* variables), and
    every change of rng restarts the workers, so that none keeps a connection to an old rng.
    """

    name = "kubectl"

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        context: str | None = None,
        kubectl: str = "kubectl",
        timeout: float = 120.0,
        rng_workload: str = "deployment/rng",
    ) -> None:
        kind, _, name = rng_workload.partition("/")
        if kind not in ("deployment", "daemonset") or not name:
            raise ConfigError(
                f"--rng-workload: expected deployment/NAME or daemonset/NAME, got {rng_workload!r}"
            )
        self.rng_workload = rng_workload
        self.url = url.rstrip("/")
        self.namespace = namespace
        self.context = context
        self.kubectl = kubectl
        self.timeout = timeout
        self.commands: list[list[str]] = []

    async def run(self, *args: str) -> str:
        """Run kubectl with these arguments in the namespace (and context); its output."""
        argv = [self.kubectl, *args, "-n", self.namespace]
        if self.context:
            argv += ["--context", self.context]
        self.commands.append(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise ExperimentError(f"{self.kubectl}: not found on PATH") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:  # an OSError too on 3.11: said here, not taken for a network error
            raise ExperimentError(
                f"`{' '.join(argv)}` gave no answer within {self.timeout:g} s"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: no kubectl left behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode:
            detail = (err or out).decode(errors="replace").strip().splitlines()
            raise ExperimentError(
                f"`{' '.join(argv)}` failed ({proc.returncode}): {detail[-1] if detail else ''}"
            )
        return out.decode(errors="replace")

    async def start(self) -> None:
        await self._json()  # fail early, with the URL in the message, if the web UI is not there

    async def deployed_costs(self) -> Costs:
        envs = {}
        for service, workload in (
            ("rng", self.rng_workload),
            ("hasher", "deployment/hasher"),
            ("worker", "deployment/worker"),
        ):
            try:
                spec = json.loads(await self.run("get", workload, "-o", "json"))
                containers = spec["spec"]["template"]["spec"]["containers"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ExperimentError(f"{workload}: no pod template in its JSON ({exc})") from None
            (container,) = [c for c in containers if c["name"] == service] or containers[:1]
            envs[service] = {
                e["name"]: e["value"] for e in container.get("env", []) if "value" in e
            }
        try:
            return costs_of_containers(envs)
        except ConfigError as exc:
            raise ExperimentError(f"the cluster's settings: {exc}") from None

    async def configure(self, mode: str, rng_replicas: int) -> None:
        # `set env` to the value it already has changes nothing and restarts nothing.
        rng = self.rng_workload
        await self.run("set", "env", rng, f"{env_name('rng_mode')}={mode}")
        if rng.startswith("deployment/"):
            await self.run("scale", rng, f"--replicas={rng_replicas}")
        # A DaemonSet runs one rng per node (the course's fix): nothing to scale; give the
        # node count as --rng-replicas so that the model expects the right ceiling.
        await self.run("rollout", "status", rng, f"--timeout={self.timeout:.0f}s")
        # Workers would keep their connections to the old rng pods until the servers'
        # connection age ends them: new workers resolve the new ones at once.
        await self.run("rollout", "restart", "deployment/worker")
        await self.run("rollout", "status", "deployment/worker", f"--timeout={self.timeout:.0f}s")

    async def scale_workers(self, count: int) -> None:
        await self.run("scale", "deployment/worker", f"--replicas={count}")

    async def _json(self) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            with urllib.request.urlopen(self.url + "/json", timeout=5) as reply:
                data: dict[str, Any] = json.loads(reply.read())
                return data

        try:
            return await asyncio.to_thread(fetch)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ExperimentError(f"cannot read {self.url}/json: {exc}") from None

    async def running_workers(self) -> int:
        return int((await self._json()).get("workers") or 0)

    async def read(self) -> Totals:
        data = await self._json()
        return Totals(int(data["hashes"]), int(data.get("coins") or 0), float(data["now"]))

    def cpu_seconds(self) -> tuple[float, float] | None:
        return None

    async def close(self) -> None:
        return None
