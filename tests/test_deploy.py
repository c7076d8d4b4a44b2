"""Offline checks of the Dockerfile, the compose files and the k8s/ manifests, with the real tools.

No Docker engine and no cluster: `kubectl kustomize` renders every overlay, `kubernetes-validate
--strict` holds the result to the API schemas, the Compose v2 binary checks the compose files,
hadolint the Dockerfile. Then the cross-checks no schema does: selectors, ports, variable names
against the settings classes, images, probes, grace periods. The mutation tests at the end break a
temp copy and show that each kind of check fails.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from dockercoins.redis_store import HASHES_KEY, WALLET_KEY, WORKER_KEY_PREFIX
from dockercoins.settings import env_name
from dockercoins_tools.cost_model import profile_costs
from dockercoins_tools.services import SERVICES
from dockercoins_tools.sizing import settings_from_env
from tests.stack import wait_until
from tests.support import ROOT, compose_binary, tool

K8S = ROOT / "k8s"
OVERLAYS = ["base", *sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))]
COMPOSE_VARIANTS = {
    "classic": ["compose.yaml"],
    "buffered": ["compose.yaml", "compose.buffered.yaml"],
    "turbo": ["compose.yaml", "compose.turbo.yaml"],
}
# A recent release and the oldest one still widely run (native gRPC probes are GA since 1.27).
K8S_VERSIONS = ["1.30.0", "1.37.0"]
APP_IMAGE = "dockercoins"
REDIS_PORT = 6379
# The simulated cost of one call (DESIGN.md), as the services' settings give it; probes must
# leave it ample room under load.
CLASSIC = profile_costs("classic")
SERVICE_COST = max(CLASSIC.rng_request, CLASSIC.hasher_latency)
MIN_PROBE_TIMEOUT = 10 * SERVICE_COST
MIN_LIVENESS_WINDOW = 100 * SERVICE_COST
TIMEOUT = 60

WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
# Controllers with a scale subresource: the disruption controller can compute maxUnavailable and
# percentages only for these; over a DaemonSet's pods only an integer minAvailable syncs.
SCALABLE_KINDS = {"Deployment", "StatefulSet"}
NAMESPACE = "dockercoins"
PART_OF = ("app.kubernetes.io/part-of", "dockercoins")
# Probes on ports no policy opens to every source: they rely on the API's rule that a pod's own
# node always reaches it, which kind 0.24-0.27 broke (kind issue 3875). rng and hasher serve
# health on their service ports, which stay closed to all but the workers; the README says so.
NODE_EXCEPTION_PROBES = {("rng", 50051), ("hasher", 50052)}


# --- tools -----------------------------------------------------------------------------------


def run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


# --- rendering -------------------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize path`, parsed; a failure to render fails the test with kubectl's words."""
    result = run([tool("kubectl"), "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    path = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    return tuple(render(path))


def compose_config(files: list[str], cwd: Path = ROOT) -> dict[str, Any]:
    argv = [compose_binary()]
    for name in files:
        argv += ["-f", name]
    result = run([*argv, "config", "--format", "json"], cwd=cwd)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@cache
def compose_variant(variant: str) -> dict[str, Any]:
    return compose_config(COMPOSE_VARIANTS[variant])


# --- the settings classes, by the command a container runs ----------------------------------


def settings_class(command: str) -> Any:
    """The settings class of `dockercoins <command>`, from the registry the CLI reads."""
    return SERVICES[command].settings


def settings_problems(where: str, command: str, env: dict[str, str]) -> list[str]:
    """Unknown DOCKERCOINS_* names, bad values, loopback defaults a container must override."""
    if command not in SERVICES:
        return [f"{where}: runs {command!r}, not one of {tuple(SERVICES)}"]
    from dockercoins.settings import ENV_PREFIX

    cls = settings_class(command)
    fields = cls.model_fields
    problems = []
    given = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in fields:
            problems.append(f"{where}: {name} is not a field of {cls.__name__}")
        else:
            given[field] = value
    for field, info in fields.items():
        name = ENV_PREFIX + field.upper()
        if info.is_required() and field not in given:
            problems.append(f"{where}: required {name} is not set")
        elif "127.0.0.1" in str(info.default) and field not in given:
            problems.append(f"{where}: {name} defaults to loopback, a container must set it")
    if not problems:
        try:
            settings_from_env(cls, env)
        except Exception as exc:
            problems.append(f"{where}: {cls.__name__} rejects its environment: {exc}")
    return problems


def grace_of(command: str, env: dict[str, str]) -> float:
    value = env.get("DOCKERCOINS_GRACE")
    return (
        float(value) if value is not None else settings_class(command).model_fields["grace"].default
    )


def port_in(env: dict[str, str], command: str) -> int | None:
    value = env.get(f"DOCKERCOINS_{command.upper()}_PORT")
    if value is None and command in SERVICES:
        info = settings_class(command).model_fields.get(f"{command}_port")
        return info.default if info else None
    return int(value) if value is not None else None


def grpc_target(value: str) -> tuple[str, int]:
    """host and port of `host:port` or `dns:///host:port`."""
    match = re.fullmatch(r"(?:dns:///)?([\w.-]+):(\d+)", value)
    assert match, f"not a gRPC target this stack uses: {value!r}"
    return match[1], int(match[2])


# --- the Kubernetes cross-checks -------------------------------------------------------------


@dataclass
class Workload:
    kind: str
    name: str
    doc: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        return self.doc["spec"]["template"]

    @property
    def labels(self) -> dict[str, str]:
        return self.pod["metadata"].get("labels", {})

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.pod["spec"]["containers"]


def workloads(docs: Any) -> list[Workload]:
    return [
        Workload(d["kind"], d["metadata"]["name"], d) for d in docs if d["kind"] in WORKLOAD_KINDS
    ]


def of_kind(docs: Any, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def command_of(container: dict[str, Any]) -> str | None:
    """The dockercoins subcommand a container runs, or None for other images."""
    if container["image"].split(":")[0] != APP_IMAGE:
        return None
    args = container.get("args") or []
    return args[0] if args else ""


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return declared["containerPort"]
    return None


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def probe_port(probe: dict[str, Any]) -> int | str | None:
    for handler in ("grpc", "httpGet", "tcpSocket"):
        if handler in probe:
            return probe[handler]["port"]
    return None


def k8s_problems(docs: Any) -> list[str]:
    """Every cross-check on one rendered overlay; an empty list when all hold."""
    problems: list[str] = []
    loads = workloads(docs)
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    names = [(w.kind, w.name) for w in loads]
    if len(set(names)) != len(names) or len({w.name for w in loads}) != len(loads):
        problems.append(f"workloads share a name: {names}")

    for w in loads:
        where = f"{w.kind}/{w.name}"
        selector = w.doc["spec"]["selector"].get("matchLabels", {})
        if not matches(selector, w.labels):
            problems.append(f"{where}: selector {selector} does not match its labels {w.labels}")
        pod = w.pod["spec"]
        if w.labels.get(PART_OF[0]) != PART_OF[1]:
            problems.append(f"{where}: its pods lack the label {PART_OF[0]}={PART_OF[1]}")
        for c in pod.get("initContainers", []):
            problems += container_security_problems(f"{where} init container {c['name']}", c, pod)
        for c in w.containers:
            cwhere = f"{where} container {c['name']}"
            problems += container_security_problems(cwhere, c, pod)
            if not {"readinessProbe", "livenessProbe"} <= set(c):
                problems.append(f"{cwhere}: needs a readiness and a liveness probe")
            for kind, probe in probes(c):
                port = probe_port(probe)
                if port is not None and container_port(c, port) is None:
                    problems.append(f"{cwhere}: {kind} port {port} is not a container port")
                if "grpc" in probe and not isinstance(port, int):
                    problems.append(f"{cwhere}: {kind} grpc port must be a number")
                if probe.get("timeoutSeconds", 1) < MIN_PROBE_TIMEOUT:
                    problems.append(f"{cwhere}: {kind} timeout under {MIN_PROBE_TIMEOUT} s")
                window = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
                if kind == "livenessProbe" and window < MIN_LIVENESS_WINDOW:
                    problems.append(f"{cwhere}: liveness kills after {window} s of slowness")
                if kind == "readinessProbe" and probe.get("failureThreshold", 3) < 2:
                    problems.append(f"{cwhere}: one slow readiness answer unreadies the pod")
            command = command_of(c)
            if command is None:
                continue
            env = env_of(c)
            problems += settings_problems(cwhere, command, env)
            if env.get("DOCKERCOINS_HOST") != "0.0.0.0":
                problems.append(f"{cwhere}: DOCKERCOINS_HOST must be 0.0.0.0 in a pod")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if command in SERVICES and grace <= grace_of(command, env):
                problems.append(f"{cwhere}: terminationGracePeriodSeconds {grace} <= its grace")
            own_port = port_in(env, command)
            if own_port is not None and container_port(c, own_port) is None:
                problems.append(f"{cwhere}: listens on {own_port}, not a container port")
            health = env.get("DOCKERCOINS_WORKER_HEALTH_PORT")
            if command == "worker" and (not health or container_port(c, int(health)) is None):
                problems.append(f"{cwhere}: its health port is not a container port")
            for name, value in env.items():
                if name.endswith("_ADDR"):
                    problems += target_problems(cwhere, name, value, docs, services)
                if name == "DOCKERCOINS_REDIS_URL":
                    problems += redis_url_problems(cwhere, c, value, docs, services)

    problems += redis_server_problems(docs, services)

    for name, svc in services.items():
        selector = svc["spec"].get("selector", {})
        selected = [w for w in loads if matches(selector, w.labels)]
        if not selected:
            problems.append(f"Service/{name}: selector {selector} matches no pod template")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in selected:
                if not any(container_port(c, target) for c in w.containers):
                    problems.append(f"Service/{name}: targetPort {target} not on {w.kind}/{w.name}")

    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Namespace":
            if doc["metadata"]["name"] != NAMESPACE:
                problems.append(f"{where}: the stack's namespace is {NAMESPACE}")
        elif doc["metadata"].get("namespace") != NAMESPACE:
            # Also catches cluster-scoped kinds, which `kubectl delete namespace` would leave.
            problems.append(f"{where}: not in namespace {NAMESPACE}")
        if doc["metadata"].get("labels", {}).get(PART_OF[0]) != PART_OF[1]:
            problems.append(
                f"{where}: lacks the label {PART_OF[0]}={PART_OF[1]}: "
                "`kubectl apply --prune -l` would neither apply nor prune it"
            )
    if [d["metadata"]["name"] for d in of_kind(docs, "Namespace")] != [NAMESPACE]:
        problems.append(f"the overlay must create Namespace/{NAMESPACE}, once")

    budgets = of_kind(docs, "PodDisruptionBudget")
    for w in loads:
        covering = [b for b in budgets if matches(b["spec"]["selector"]["matchLabels"], w.labels)]
        if len(covering) != 1:
            problems.append(f"{w.kind}/{w.name}: {len(covering)} PodDisruptionBudgets, not 1")
    for budget in budgets:
        bname = f"PodDisruptionBudget/{budget['metadata']['name']}"
        selected = [
            w for w in loads if matches(budget["spec"]["selector"]["matchLabels"], w.labels)
        ]
        if len(selected) != 1:
            problems.append(f"{bname}: selects {len(selected)} workloads, not 1")
        spec = budget["spec"]
        for w in selected:
            if w.kind not in SCALABLE_KINDS:
                # The disruption controller finds no scale to compute these from: the budget
                # fails to sync and allows no eviction at all.
                minimum = spec.get("minAvailable")
                if "maxUnavailable" in spec or type(minimum) is not int:
                    problems.append(
                        f"{bname}: over {w.kind}/{w.name}, which has no scale subresource: "
                        "only an integer minAvailable works"
                    )
            # minAvailable, or maxUnavailable 0, blocks every drain of a single replica.
            elif "minAvailable" in spec or spec.get("maxUnavailable", 0) == 0:
                problems.append(f"{bname}: can block a node drain; use maxUnavailable >= 1")

    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = [w for w in loads if (w.kind, w.name) == (ref["kind"], ref["name"])]
        if not target:
            problems.append(f"HPA/{hpa['metadata']['name']}: no {ref['kind']}/{ref['name']}")
        elif ref["kind"] not in SCALABLE_KINDS:
            problems.append(f"HPA/{hpa['metadata']['name']}: a {ref['kind']} cannot be scaled")
        for w in target:
            for metric in hpa["spec"].get("metrics", []):
                resource = metric.get("resource", {}).get("name")
                for c in w.containers:
                    if resource and resource not in c.get("resources", {}).get("requests", {}):
                        problems.append(
                            f"HPA/{hpa['metadata']['name']}: {w.name} requests no {resource}"
                        )

    for policy in of_kind(docs, "NetworkPolicy"):
        pname = f"NetworkPolicy/{policy['metadata']['name']}"
        guarded = [
            w
            for w in loads
            if matches(policy["spec"]["podSelector"].get("matchLabels", {}), w.labels)
        ]
        if not guarded:
            problems.append(f"{pname}: podSelector matches no pod")
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                labels = peer.get("podSelector", {}).get("matchLabels")
                if labels and not any(matches(labels, w.labels) for w in loads):
                    problems.append(f"{pname}: from {labels} matches no pod")
            for port in rule.get("ports", []):
                for w in guarded:
                    if not any(container_port(c, port["port"]) for c in w.containers):
                        problems.append(f"{pname}: port {port['port']} not on {w.name}")
    problems += probe_policy_problems(docs)
    return problems


def container_security_problems(where: str, c: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """Non-root, read-only root, no escalation, no capabilities, requests and limits."""
    problems = []
    sec = c.get("securityContext", {})
    if not (sec.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot")):
        problems.append(f"{where}: runAsNonRoot is not set")
    if sec.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: root filesystem is not read-only")
    if sec.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if "ALL" not in sec.get("capabilities", {}).get("drop", []):
        problems.append(f"{where}: capabilities are not all dropped")
    resources = c.get("resources", {})
    for part in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(part, {})):
            problems.append(f"{where}: resources.{part} lacks cpu or memory")
    return problems


def probe_policy_problems(docs: Any) -> list[str]:
    """Under NetworkPolicies, each network probe's port is open to every source, or is one of
    NODE_EXCEPTION_PROBES, which rely on the API's node exception (and the README says so)."""
    policies = of_kind(docs, "NetworkPolicy")
    problems = []
    for w in workloads(docs):
        guarding = [
            p
            for p in policies
            if matches(p["spec"]["podSelector"].get("matchLabels", {}), w.labels)
        ]
        if not guarding:
            continue
        open_ports = {
            port["port"]
            for p in guarding
            for rule in p["spec"].get("ingress", [])
            if not rule.get("from")
            for port in rule.get("ports", [{"port": "*"}])
        }
        for c in w.containers:
            for kind, probe in probes(c):
                port = probe_port(probe)
                if port is None:
                    continue  # exec: inside the container, no network
                number = container_port(c, port)
                if (
                    not ({number, "*"} & open_ports)
                    and (w.name, number) not in NODE_EXCEPTION_PROBES
                ):
                    problems.append(
                        f"{w.kind}/{w.name}: {kind} on port {number} passes only where the CNI "
                        "lets the node through NetworkPolicies (not kind 0.24-0.27, kind issue "
                        "3875): probe by exec, or open the port"
                    )
    return problems


def service_port_problems(where: str, host: str, port: int, docs: Any, services: dict) -> list[str]:
    svc = services.get(host)
    if svc is None:
        return [f"{where}: no Service {host!r}"]
    if port not in [p["port"] for p in svc["spec"]["ports"]]:
        return [f"{where}: Service {host} has no port {port}"]
    return []


REDIS_URL = re.compile(
    r"redis://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?(?P<host>[\w.-]+)(?::(?P<port>\d+))?"
)


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variables a container takes from Secrets: name -> (secret, key)."""
    return {
        e["name"]: (ref["name"], ref["key"])
        for e in container.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }


def redis_url_problems(
    where: str, c: dict[str, Any], value: str, docs: Any, services: dict
) -> list[str]:
    """A Redis URL names an ACL user and takes its password from the Secret that Redis hashes
    for that user, by a variable defined before it; it names a Service's port."""
    url = REDIS_URL.match(value)
    if not url:
        return [f"{where}: DOCKERCOINS_REDIS_URL={value!r} is not a redis:// URL"]
    problems = service_port_problems(
        where, url["host"], int(url["port"] or REDIS_PORT), docs, services
    )
    password = url["password"] or ""
    variable = re.fullmatch(r"\$\((\w+)\)", password)
    if not variable:
        return [*problems, f"{where}: DOCKERCOINS_REDIS_URL must take its password from a Secret"]
    names = [e["name"] for e in c.get("env", [])]
    earlier = names[: names.index("DOCKERCOINS_REDIS_URL")]
    if variable[1] not in earlier:
        problems.append(f"{where}: $({variable[1]}) is not defined before the URL: left unexpanded")
    users = redis_acl_users(docs)
    user = url["user"] or "default"
    if "on" not in users.get(user, {}).get("rules", []):
        problems.append(f"{where}: Redis has no enabled user {user!r}")
    elif secret_refs(c).get(variable[1]) != users[user]["secret"]:
        problems.append(
            f"{where}: the password of {user} comes from {secret_refs(c).get(variable[1])}, "
            f"Redis checks {users[user]['secret']}"
        )
    return problems


def redis_statefulset(docs: Any) -> Workload | None:
    return next((w for w in workloads(docs) if w.name == "redis"), None)


def redis_acl_users(docs: Any) -> dict[str, dict[str, Any]]:
    """The ACL template's users: their rules, and the Secret key the init container hashes into
    each password placeholder (`#@WEBUI_SHA256@` from $REDIS_WEBUI_PASSWORD)."""
    redis = redis_statefulset(docs)
    if redis is None:
        return {}
    volumes = {v["name"]: v for v in redis.pod["spec"].get("volumes", [])}
    users: dict[str, dict[str, Any]] = {}
    for init in redis.pod["spec"].get("initContainers", []):
        refs = secret_refs(init)
        for mount in init.get("volumeMounts", []):
            source = volumes[mount["name"]].get("configMap")
            if not source:
                continue
            (config,) = [
                d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == source["name"]
            ]
            for text in config["data"].values():
                for line in text.splitlines():
                    _, name, *rules = line.split()
                    placeholder = next((r[2:-8] for r in rules if r.startswith("#@")), None)
                    secret = refs.get(f"REDIS_{placeholder}_PASSWORD") if placeholder else None
                    users[name] = {"rules": rules, "secret": secret}
    return users


def redis_server_problems(docs: Any, services: dict) -> list[str]:
    """Redis: a StatefulSet of one on a claim, never two at once, that lets no one in without a
    password and no password sit in a manifest or on a command line."""
    redis = redis_statefulset(docs)
    if redis is None:
        return ["no redis workload"]
    where = f"{redis.kind}/redis"
    problems = []
    spec = redis.doc["spec"]
    if redis.kind != "StatefulSet" or spec.get("replicas") != 1:
        problems.append(f"{where}: must be a StatefulSet of 1 (a Deployment rolls over two)")
    elif spec.get("podManagementPolicy", "OrderedReady") != "OrderedReady":
        problems.append(f"{where}: podManagementPolicy must be OrderedReady")
    else:
        governing = services.get(spec.get("serviceName"), {})
        if governing.get("spec", {}).get("clusterIP") != "None":
            problems.append(f"{where}: serviceName must name a headless Service")
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        (container,) = redis.containers
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if mounts.get("/data") not in claims:
            problems.append(f"{where}: /data (the append-only file) is not on a claim")
    (container,) = redis.containers
    args = container.get("args", [])
    if any(a in args for a in ("--requirepass", "--user", "--masteruser")):
        problems.append(f"{where}: a password or user on the command line")
    if "--appendonly" not in args or args[args.index("--appendonly") + 1] != "yes":
        problems.append(f"{where}: no append-only file")
    users = redis_acl_users(docs)
    if "--aclfile" not in args or not users:
        return [*problems, f"{where}: no ACL file written from a template: anyone gets in"]
    default = users.get("default", {}).get("rules", [])
    if "off" not in default or "on" in default:
        problems.append(
            f"{where}: the default user is not off: a client without a password gets in"
        )
    for name, user in users.items():
        rules = user["rules"]
        if "nopass" in rules or any(r.startswith(">") for r in rules):
            problems.append(f"{where}: user {name} has no password or a plain one in a manifest")
        if "on" in rules and user["secret"] is None:
            problems.append(f"{where}: user {name} gets no password from a Secret")
    return problems


def target_problems(where: str, name: str, value: str, docs: Any, services: dict) -> list[str]:
    """A gRPC target must reach pods directly: dns:/// over a headless Service, on their port."""
    host, port = grpc_target(value)
    problems = service_port_problems(where, host, port, docs, services)
    if problems:
        return problems
    svc = services[host]
    if not value.startswith("dns:///"):
        problems.append(f"{where}: {name}={value!r} pins one pod; use dns:///{host}:{port}")
    if svc["spec"].get("clusterIP") != "None":
        problems.append(f"{where}: Service {host} is not headless, round_robin sees one address")
    for w in workloads(docs):
        selected = matches(svc["spec"].get("selector", {}), w.labels)
        if selected and not any(container_port(c, port) for c in w.containers):
            problems.append(f"{where}: {name} port {port} is not a port of {w.kind}/{w.name}")
    return problems


# --- the compose cross-checks ----------------------------------------------------------------


def seconds(duration: str | int | float | None) -> float:
    """A compose duration (`1m30s`, `3s`, `500ms`, nanoseconds as a number) in seconds."""
    if duration is None:
        return 0.0
    if isinstance(duration, int | float):
        return duration / 1e9
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([\d.]+)(ms|us|ns|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services = config["services"]
    for name, svc in services.items():
        where = f"compose service {name}"
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        image = svc.get("image", "")
        if image.split(":")[0] != APP_IMAGE or svc.get("entrypoint"):
            continue  # not ours, or a one-shot command of the image (the Redis password)
        command = (svc.get("command") or [""])[0]
        problems += settings_problems(where, command, env)
        if env.get("DOCKERCOINS_HOST") != "0.0.0.0":
            problems.append(f"{where}: DOCKERCOINS_HOST must be 0.0.0.0 in a container")
        if seconds(svc.get("stop_grace_period") or "10s") <= grace_of(command, env):
            problems.append(f"{where}: stop_grace_period is not longer than its grace")
        for value in (v for k, v in env.items() if k.endswith("_ADDR")):
            host, port = grpc_target(value)
            upstream = services.get(host)
            if upstream is None:
                problems.append(f"{where}: no service {host!r}")
            elif port != port_in(upstream.get("environment") or {}, host):
                problems.append(f"{where}: {value} is not the port {host} listens on")
            elif svc.get("depends_on", {}).get(host, {}).get("condition") != "service_healthy":
                problems.append(f"{where}: does not wait for {host} to be healthy")
        if "DOCKERCOINS_REDIS_URL" in env:
            redis = re.match(r"redis://([\w.-]+)", env["DOCKERCOINS_REDIS_URL"])
            if not redis or redis[1] not in services:
                problems.append(f"{where}: DOCKERCOINS_REDIS_URL names no service")
            elif svc.get("depends_on", {}).get(redis[1], {}).get("condition") != "service_healthy":
                problems.append(f"{where}: does not wait for Redis to be healthy")
        check = svc.get("healthcheck")
        if command in ("rng", "hasher", "webui") and not check:
            problems.append(f"{where}: has no healthcheck")
        if check:
            if seconds(check.get("timeout")) < MIN_PROBE_TIMEOUT:
                problems.append(f"{where}: healthcheck timeout under {MIN_PROBE_TIMEOUT} s")
            if (check.get("retries") or 3) < 2:
                problems.append(f"{where}: one slow health answer marks it unhealthy")
        for published in svc.get("ports", []):
            if int(published["target"]) != port_in(env, command):
                problems.append(f"{where}: publishes {published['target']}, not its port")
    for name, svc in services.items():
        for upstream, dep in (svc.get("depends_on") or {}).items():
            if dep.get("condition") == "service_healthy" and not services[upstream].get(
                "healthcheck"
            ):
                problems.append(
                    f"compose service {name}: waits on {upstream}, which has no healthcheck"
                )
    return problems


# --- tests: the tools themselves -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_the_cross_checks(overlay: str) -> None:
    assert k8s_problems(rendered(overlay)) == []


@pytest.mark.slow
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_overlay_validates_strictly(tmp_path: Path, k8s_version: str) -> None:
    files = []
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(rendered(overlay)))
        files.append(str(path))
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", k8s_version, *files])
    output = result.stdout + result.stderr
    # kubernetes-validate exits 0 on a kind it has no schema for and only says WARN.
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output


def everything_overlay(tmp_path: Path, components: list[str]) -> Path:
    """An overlay of the base and these components, labelled as the real overlays are."""
    overlay = tmp_path / "k8s" / "overlays" / "everything"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "labels": [
                    {"pairs": dict([PART_OF]), "includeSelectors": False, "includeTemplates": True}
                ],
                "resources": ["../../base"],
                "components": [f"../../components/{c}" for c in components],
            }
        )
    )
    return overlay


@pytest.mark.slow
def test_all_components_compose_together(tmp_path: Path) -> None:
    """daemonset, buffered, turbo, hpa, network-policies and metrics in one overlay, in either
    order. rng-hpa is the exception: a DaemonSet cannot be autoscaled, and the check says so."""
    shutil.copytree(K8S, tmp_path / "k8s")
    components = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
    components.remove("rng-hpa")
    problems = k8s_problems(render(everything_overlay(tmp_path, ["daemonset", "rng-hpa"])))
    assert problems == ["HPA/rng: no Deployment/rng"], problems
    for order in (components, components[::-1]):
        overlay = everything_overlay(tmp_path, order)
        docs = render(overlay)
        assert k8s_problems(docs) == []
        (rng,) = [w for w in workloads(docs) if w.name == "rng"]
        assert rng.kind == "DaemonSet"
        assert env_of(rng.containers[0])["DOCKERCOINS_RNG_MODE"] == "buffered"


@pytest.mark.slow
@pytest.mark.parametrize("variant", COMPOSE_VARIANTS)
def test_compose_config_is_valid(variant: str) -> None:
    argv = [compose_binary()]
    for name in COMPOSE_VARIANTS[variant]:
        argv += ["-f", name]
    result = run([*argv, "config", "-q"])
    assert result.returncode == 0, result.stderr
    assert compose_problems(compose_variant(variant)) == []


@pytest.mark.slow
def test_dockerfile_passes_hadolint() -> None:
    for dockerfile in sorted(ROOT.glob("Dockerfile*")):
        result = run([tool("hadolint"), "--failure-threshold", "error", str(dockerfile)])
        assert result.returncode == 0, result.stdout + result.stderr


def healthcheck_argv(service: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The compose healthcheck of `service` as a local command, aimed at `port` instead."""
    svc = compose_variant("classic")["services"][service]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERCOINS_")}
    env.update({k: str(v) for k, v in svc["environment"].items()})
    # The secret's file exists in the containers only; Redis is not reached by the check.
    env.pop("DOCKERCOINS_REDIS_PASSWORD_FILE", None)
    own = f"DOCKERCOINS_{service.upper()}_{'HEALTH_PORT' if service == 'worker' else 'PORT'}"
    compose_port = env[own]
    env.update({own: str(port), "DOCKERCOINS_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
    form, program, *args = svc["healthcheck"]["test"]
    assert form == "CMD", "exec form: no shell in the check"
    local = {"dockercoins": tool("dockercoins"), "python": sys.executable}[program]
    return [local, *(a.replace(f":{compose_port}", f":{port}") for a in args)], env


@pytest.mark.slow
@pytest.mark.parametrize("service", ["rng", "hasher", "worker", "webui"])
def test_compose_healthcheck_passes_on_the_real_service_and_fails_without_it(service: str) -> None:
    """The healthcheck, run as compose runs it, against the service started as compose starts it."""
    from dockercoins.net import free_port

    command = compose_variant("classic")["services"][service]["command"]

    def start() -> tuple[list[str], subprocess.Popen[str]]:
        check, env = healthcheck_argv(service, free_port())
        server = subprocess.Popen(
            [tool("dockercoins"), *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return check, server

    check, server = start()
    try:
        said: list[str] = []

        def passes() -> bool:
            nonlocal check, server
            if server.poll() is not None:
                error = server.communicate()[1]
                # Another test's process took the free port before the service bound it.
                assert "is already in use" in error, f"{service} exited: {error}"
                check, server = start()
                return False
            result = run(check)
            said[:] = [result.stdout]
            return result.returncode == 0

        wait_until(passes, 20, lambda: f"{check} passing (it said {said})", interval=0.2)
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert run(check).returncode != 0, f"{check} passes with {service} stopped"


def kubelet_probe(probe: dict[str, Any], container: dict[str, Any], ports: dict[int, int]) -> str:
    """Run one probe as the kubelet would, against local ports; '' when it passes."""
    import urllib.error
    import urllib.request

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    timeout = probe.get("timeoutSeconds", 1)
    port = ports[container_port(container, probe_port(probe) or 0) or 0]
    if "grpc" in probe:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
            except grpc.RpcError as exc:
                return f"grpc {exc.code().name}"
            return "" if reply.status == health_pb2.HealthCheckResponse.SERVING else "not SERVING"
    url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return "" if 200 <= reply.status < 400 else f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError) as exc:
        return str(exc)


def wait_for_probe(
    name: str,
    probe: dict[str, Any],
    container: dict[str, Any],
    ports: dict[int, int],
    proc: subprocess.Popen[bytes],
    deadline: float,
) -> None:
    """Until `probe` of `container` passes as the kubelet runs it; its process must live on."""
    failure = [""]

    def passes() -> bool:
        assert proc.poll() is None, f"{name}: exited with {proc.returncode}"
        failure[0] = kubelet_probe(probe, container, ports)
        return not failure[0]

    timeout = max(0.0, deadline - time.monotonic())
    wait_until(passes, timeout, lambda: f"{name} passing ({failure[0]})", interval=0.2)


@pytest.mark.slow
def test_kubernetes_probes_pass_on_the_real_processes_and_sigterm_fits_the_grace(
    redis_url: str,
) -> None:
    """Each app container of the base started with its own env (ports moved to free ones, Redis
    the test's): its probes pass as the kubelet would run them, and SIGTERM stops it in time."""
    from dockercoins.net import free_port

    started = []
    # Every container's ports moved to free ones; a worker's rng and hasher targets follow them
    # (a worker is ready only while it mines, so it must reach them).
    moved = {
        int(value): free_port()
        for w in workloads(rendered("base"))
        for name, value in env_of(w.containers[0]).items()
        if name.endswith("_PORT")
    }
    try:
        for w in workloads(rendered("base")):
            (c,) = w.containers
            command = command_of(c)
            if command is None:
                continue
            env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKERCOINS_")}
            env.update(env_of(c))
            ports = {}
            for name, value in env_of(c).items():
                if name.endswith("_PORT"):
                    ports[int(value)] = moved[int(value)]
                    env[name] = str(ports[int(value)])
                if name.endswith("_ADDR"):
                    env[name] = f"127.0.0.1:{moved[int(value.rsplit(':', 1)[1])]}"
            env.update({"DOCKERCOINS_HOST": "127.0.0.1", "DOCKERCOINS_REDIS_URL": redis_url})
            proc = subprocess.Popen(
                [tool("dockercoins"), *c["args"]],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append((w, c, ports, proc))
        assert {command_of(c) for _, c, _, _ in started} == set(SERVICES)
        deadline = time.monotonic() + 20
        for w, c, ports, proc in started:
            for kind, probe in probes(c):
                wait_for_probe(f"{w.name} {kind}", probe, c, ports, proc, deadline)
        for _, _, _, proc in started:
            proc.terminate()
        stopping = time.monotonic()
        for w, _, _, proc in started:
            limit = w.pod["spec"]["terminationGracePeriodSeconds"]
            proc.wait(timeout=max(0.1, limit - (time.monotonic() - stopping)))
            assert proc.returncode == 0, f"{w.name} exited {proc.returncode} on SIGTERM"
    finally:
        for _, _, _, proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_compose_probe_deadline_fits_in_the_healthcheck_timeout() -> None:
    services = compose_variant("classic")["services"]
    for name in ("rng", "hasher"):
        test = services[name]["healthcheck"]["test"]
        assert "--timeout" in test, f"{name}: the probe's 10 s default outlives compose's timeout"
        deadline = float(test[test.index("--timeout") + 1])
        assert SERVICE_COST * 10 <= deadline < seconds(services[name]["healthcheck"]["timeout"])


# --- tests: what the variants change -------------------------------------------------------


def rng_env(overlay: str) -> dict[str, str]:
    (rng,) = [w for w in workloads(rendered(overlay)) if w.name == "rng"]
    return env_of(rng.containers[0])


@pytest.mark.slow
def test_base_is_the_lesson_and_buffered_is_the_fix() -> None:
    assert rng_env("base")["DOCKERCOINS_RNG_MODE"] == "blocking"
    read_cost = env_name("rng_read_cost")
    assert float(rng_env("base")[read_cost]) == CLASSIC.rng_read_cost
    assert rng_env("buffered")["DOCKERCOINS_RNG_MODE"] == "buffered"
    assert float(rng_env("buffered")[read_cost]) == CLASSIC.rng_read_cost, "the fix keeps the cost"
    assert (
        compose_variant("classic")["services"]["rng"]["environment"]["DOCKERCOINS_RNG_MODE"]
        == "blocking"
    )
    assert (
        compose_variant("buffered")["services"]["rng"]["environment"]["DOCKERCOINS_RNG_MODE"]
        == "buffered"
    )


@pytest.mark.slow
def test_daemonset_overlay_keeps_the_rng_pod_template() -> None:
    base = {(w.kind, w.name): w for w in workloads(rendered("base"))}
    daemon = {(w.kind, w.name): w for w in workloads(rendered("daemonset"))}
    assert ("Deployment", "rng") not in daemon
    assert daemon[("DaemonSet", "rng")].pod == base[("Deployment", "rng")].pod
    assert "replicas" not in daemon[("DaemonSet", "rng")].doc["spec"]


@pytest.mark.slow
def test_turbo_turns_the_costs_off_in_compose_and_kubernetes() -> None:
    from hasher_svc.config import HasherSettings
    from rng_svc.config import RngSettings
    from worker_svc.config import WorkerSettings

    k8s = {w.name: env_of(w.containers[0]) for w in workloads(rendered("turbo"))}
    compose = {n: s.get("environment", {}) for n, s in compose_variant("turbo")["services"].items()}

    effective = settings_from_env  # the settings a container gets from exactly its environment
    for env in (k8s, compose):
        rng = effective(RngSettings, env["rng"])
        assert rng.rng_read_cost == 0 and rng.request_latency == 0
        assert effective(HasherSettings, env["hasher"]).hasher_latency == 0
        worker = effective(WorkerSettings, env["worker"])
        assert worker.worker_think_time == 0
        assert worker.worker_streaming and worker.worker_batch > 1 and worker.worker_loops > 1


@pytest.mark.slow
def test_the_kubectl_experiment_models_the_costs_the_manifests_deploy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`dockercoins experiment --backend kubectl` reads the costs from the pods' environment,
    as the containers read them, and never from the environment of the machine it runs on."""
    from dataclasses import replace

    from dockercoins_tools.cost_model import Costs, costs_of_containers

    def plain(costs: Costs) -> Costs:  # rng_latency unset means: the read cost
        return replace(costs, rng_latency=costs.rng_request)

    monkeypatch.setenv("DOCKERCOINS_RNG_READ_COST", "0.7")
    for overlay, expected in (("base", "classic"), ("buffered", "classic"), ("turbo", "turbo")):
        envs = {w.name: env_of(w.containers[0]) for w in workloads(rendered(overlay))}
        assert plain(costs_of_containers(envs)) == plain(profile_costs(expected)), overlay


@pytest.mark.slow
def test_autoscale_overlay_scales_the_worker_deployment() -> None:
    (hpa,) = of_kind(rendered("autoscale"), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "worker",
    }


@pytest.mark.slow
def test_network_policies_isolate_rng_hasher_and_redis() -> None:
    docs = rendered("network-policies")
    allowed: dict[str, set[str]] = {}
    for policy in of_kind(docs, "NetworkPolicy"):
        target = policy["spec"]["podSelector"]["matchLabels"].get("app")
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            sources = (
                {"*"} if not peers else {p["podSelector"]["matchLabels"]["app"] for p in peers}
            )
            allowed.setdefault(target, set()).update(sources)
    assert allowed == {
        "rng": {"worker"},
        "hasher": {"worker"},
        "redis": {"worker", "webui"},
        "webui": {"*"},
        "worker": {"*"},  # its health port only
    }
    (health,) = [
        p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].startswith("worker")
    ]
    assert [port["port"] for rule in health["spec"]["ingress"] for port in rule["ports"]] == [50053]
    (deny,) = [p for p in of_kind(docs, "NetworkPolicy") if "ingress" not in p["spec"]]
    every_pod = workloads(docs)
    assert all(matches(deny["spec"]["podSelector"]["matchLabels"], w.labels) for w in every_pod)


@pytest.mark.slow
def test_redis_has_a_maxmemory_that_refuses_writes_within_its_memory_limit() -> None:
    redis = redis_statefulset(rendered("base"))
    assert redis is not None
    (container,) = redis.containers
    args = container["args"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    maxmemory = args[args.index("--maxmemory") + 1]
    assert maxmemory.endswith("mb") and int(maxmemory[:-2]) <= 0.7 * int(limit[:-2])
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    command = compose_variant("classic")["services"]["redis"]["command"]
    assert "--maxmemory" in command
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.mark.slow
def test_webui_is_a_nodeport_and_grpc_services_are_headless() -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in of_kind(rendered("base"), "Service")}
    assert services["webui"]["type"] == "NodePort"
    assert services["rng"]["clusterIP"] == services["hasher"]["clusterIP"] == "None"


# --- tests: images and the Dockerfile ---------------------------------------------------------


@pytest.mark.slow
def test_images_agree_between_compose_kubernetes_and_pyproject() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    expected = f"{APP_IMAGE}:{version}"
    images = set()
    for overlay in OVERLAYS:
        for w in workloads(rendered(overlay)):
            images |= {c["image"] for c in w.containers}
    for variant in COMPOSE_VARIANTS:
        images |= {s["image"] for s in compose_variant(variant)["services"].values()}
    app = {i for i in images if i.split(":")[0] == APP_IMAGE}
    assert app == {expected}
    assert len(images - app) == 1, f"one Redis image everywhere, got {images - app}"


def stages(dockerfile: str) -> list[list[str]]:
    """Dockerfile instructions (continuations joined), grouped by FROM."""
    text = re.sub(r"\\\n", " ", dockerfile)
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_image_generates_stubs_in_a_build_stage_and_runs_unprivileged() -> None:
    *builders, final = stages((ROOT / "Dockerfile").read_text())
    build = [line for stage in builders for line in stage]
    final_text = "\n".join(final)
    # One protoc line, in scripts/protos, which `make protos` and the build both run.
    assert "grpc_tools.protoc" in (ROOT / "scripts" / "protos").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "scripts/protos $(PY)" in make and "grpc_tools.protoc" not in make
    assert any(re.search(r"^RUN sh scripts/protos ", line) for line in build)
    assert "grpc_tools.protoc" not in "\n".join(build)
    assert "grpcio-tools" not in final_text and "pip install" not in final_text
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("ENTRYPOINT") and "dockercoins" in line for line in final)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "dockercoins/v1/" in ignored, "a stale local copy of the stubs must not reach the image"


def test_image_installs_dependencies_before_the_code_and_needs_no_registry_but_the_base() -> None:
    """A code change rebuilds from the code's COPY on: the dependencies' layer sees pyproject.toml
    and the lock files alone, and installs what they pin, hashes checked. No `# syntax=` line:
    BuildKit would fetch that frontend image from a registry."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, re.M | re.I)
    *builders, _ = stages(dockerfile)
    build = [line for stage in builders for line in stage]
    install = next(i for i, line in enumerate(build) if "-r requirements.lock" in line)
    copied = [line.split()[1:-1] for line in build[:install] if line.startswith("COPY ")]
    assert copied == [["pyproject.toml", "requirements.lock", "requirements-build.lock"]], copied
    assert build[install].count("--require-hashes") == 2, "both the download and the install"
    packages = {"dockercoins/", "rng_svc/", "hasher_svc/", "worker_svc/", "webui/"}
    later = [line.split()[1] for line in build[install:] if line.startswith("COPY ")]
    assert packages <= set(later)
    assert "--only-binary=:all:" in build[install], "wheels only: a slim image has no compiler"


def test_image_labels_carry_the_version_of_pyproject() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (*_, final) = stages((ROOT / "Dockerfile").read_text())
    text = "\n".join(final)
    assert f"ARG VERSION={version}" in text
    for key in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in text, key


# --- tests: a broken copy makes the checks fail ------------------------------------------------


def broken_copy(tmp_path: Path, file: str, old: str, new: str) -> Path:
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))
    return tmp_path / "k8s" / "base"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file", "old", "new", "complaint"),
    [
        (
            "base/rng.yaml",
            "  selector:\n    app: rng",
            "  selector:\n    app: rgn",
            "Service/rng: selector {'app': 'rgn'} matches no pod template",
        ),
        (
            "base/hasher.yaml",
            "containerPort: 50052",
            "containerPort: 50053",
            "listens on 50052, not a container port",
        ),
        (
            "base/worker.yaml",
            "DOCKERCOINS_RNG_ADDR",
            "DOCKERCOINS_RNG_ADDRESS",
            "DOCKERCOINS_RNG_ADDRESS is not a field of WorkerSettings",
        ),
        ("base/worker.yaml", "dns:///rng:50051", "rng:50051", "pins one pod"),
        ("base/webui.yaml", "targetPort: http", "targetPort: web", "targetPort web not on"),
        ("base/rng.yaml", "  clusterIP: None\n", "", "Service rng is not headless"),
        (
            "base/webui.yaml",
            "path: /healthz\n              port: http",
            "path: /healthz\n              port: 8080",
            "livenessProbe port 8080 is not a container port",
        ),
        (
            "base/rng.yaml",
            "terminationGracePeriodSeconds: 15",
            "terminationGracePeriodSeconds: 5",
            "terminationGracePeriodSeconds 5 <= its grace",
        ),
        (
            "base/rng.yaml",
            "value: blocking",
            "value: bufferd",
            "RngSettings rejects its environment",
        ),
        (
            "base/disruption-budgets.yaml",
            "      app: hasher\n",
            "      app: hashr\n",
            "PodDisruptionBudget/hasher: selects 0 workloads",
        ),
        (
            "base/disruption-budgets.yaml",
            "  maxUnavailable: 1\n  unhealthyPodEvictionPolicy: AlwaysAllow\n"
            "  selector:\n    matchLabels:\n      app: redis",
            "  minAvailable: 1\n  selector:\n    matchLabels:\n      app: redis",
            "PodDisruptionBudget/redis: can block a node drain",
        ),
        (
            "overlays/network-policies/kustomization.yaml",
            "namespace: dockercoins\n",
            "",
            "NetworkPolicy/rng-from-worker: not in namespace dockercoins",
        ),
    ],
)
def test_a_broken_manifest_fails_the_checks(
    tmp_path: Path, file: str, old: str, new: str, complaint: str
) -> None:
    broken_copy(tmp_path, file, old, new)
    overlay = file.split("/")[1] if file.startswith("overlays/") else None
    path = tmp_path / "k8s" / ("base" if overlay is None else f"overlays/{overlay}")
    problems = k8s_problems(render(path))
    assert any(complaint in p for p in problems), problems


@pytest.mark.slow
def test_a_broken_compose_file_fails_the_checks(tmp_path: Path) -> None:
    for name in ("compose.yaml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    path = tmp_path / "compose.yaml"
    path.write_text(
        path.read_text().replace(
            "DOCKERCOINS_HASHER_ADDR: dns:///hasher:50052",
            "DOCKERCOINS_HASHER_ADR: dns:///hasher:50052",
        )
    )
    problems = compose_problems(compose_config(["compose.yaml"], cwd=tmp_path))
    assert (
        "compose service worker: DOCKERCOINS_HASHER_ADR is not a field of WorkerSettings"
        in problems
    )
    path.write_text(path.read_text().replace("depends_on:", "depnds_on:", 1))
    result = run([compose_binary(), "-f", "compose.yaml", "config", "-q"], cwd=tmp_path)
    assert result.returncode != 0 and "depnds_on" in result.stderr


@pytest.mark.slow
def test_metrics_overlay_scrapes_ports_the_processes_serve_metrics_on() -> None:
    scraped = {}
    for workload in workloads(rendered("metrics")):
        annotations = workload.pod["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        port = int(annotations["prometheus.io/port"])
        (container,) = workload.containers
        assert container_port(container, port) == port, f"{workload.name}: {port} not declared"
        env = env_of(container)
        command = command_of(container)
        # The process listens there: its metrics port, or (webui) its own HTTP port.
        assert port in (
            int(env.get("DOCKERCOINS_METRICS_PORT", 0)),
            int(env.get(f"DOCKERCOINS_{(command or '').upper()}_PORT", 0)),
        ), workload.name
        scraped[workload.name] = port
    assert scraped == {"rng": 9100, "hasher": 9100, "worker": 9100, "webui": 8000}


# --- the kind path: config and script, checked without a cluster ------------------------------

# kind's v1alpha4 Cluster (sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go), which kind reads
# strictly: an unknown field fails `kind create cluster`.
_PATCH = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: {"type": "string"} for k in ("group", "version", "kind", "patch")},
}
_NODE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "role": {"enum": ["control-plane", "worker"]},
        "image": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "extraMounts": {"type": "array", "items": {"type": "object"}},
        "extraPortMappings": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["containerPort"],
                "properties": {
                    "containerPort": {"type": "integer"},
                    "hostPort": {"type": "integer"},
                    "listenAddress": {"type": "string"},
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                },
            },
        },
        "gpus": {"type": "string"},
        "kubeadmConfigPatches": {"type": "array", "items": {"type": "string"}},
        "kubeadmConfigPatchesJSON6902": {"type": "array", "items": _PATCH},
    },
}
KIND_CLUSTER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "apiVersion"],
    "properties": {
        "kind": {"const": "Cluster"},
        "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
        "name": {"type": "string"},
        "nodes": {"type": "array", "items": _NODE},
        "networking": {"type": "object"},
        "featureGates": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "runtimeConfig": {"type": "object", "additionalProperties": {"type": "string"}},
        "kubeadmConfigPatches": {"type": "array", "items": {"type": "string"}},
        "kubeadmConfigPatchesJSON6902": {"type": "array", "items": _PATCH},
        "containerdConfigPatches": {"type": "array", "items": {"type": "string"}},
        "containerdConfigPatchesJSON6902": {"type": "array", "items": {"type": "string"}},
    },
}
# The flags kind documents for the commands the script runs (kind <command> --help).
KIND_FLAGS = {
    ("version",): set(),
    ("get", "clusters"): set(),
    ("create", "cluster"): {"--name", "--config", "--image", "--kubeconfig", "--retain", "--wait"},
    ("load", "image-archive"): {"--name", "--nodes"},
}
# The flags Helm documents for the commands the script runs (helm <command> --help, Helm 3).
HELM_FLAGS = {
    ("repo", "add"): {"--force-update", "--username", "--password"},
    ("upgrade",): {
        "--install", "--version", "--namespace", "--kube-context", "--values", "--wait",
        "--timeout", "--create-namespace", "--set",
    },
}  # fmt: skip
# The charts the HPA v2 lab installs, as scripts/kind-up and docs/deploy.md name them; the keys
# of their values.yaml that k8s/monitoring's values set (read in the charts at these versions).
CHART_KEYS = {
    "prometheus": (
        "29.27.0",
        {
            ("server", "global", "scrape_interval"),
            ("server", "global", "evaluation_interval"),
            ("server", "persistentVolume", "enabled"),
            ("alertmanager", "enabled"),
            ("kube-state-metrics", "enabled"),
            ("prometheus-node-exporter", "enabled"),
            ("prometheus-pushgateway", "enabled"),
        },
    ),
    "prometheus-adapter": (
        "5.3.0",
        {("prometheus", "url"), ("prometheus", "port"), ("rules", "existing"),
         ("metricsRelistInterval",)},
    ),
}  # fmt: skip

RECORDER = """#!{python}
import json, os, sys
with open({log!r}, "a") as record:
    record.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if sys.argv[1:] == ["version"] and os.environ.get("KIND_VERSION"):
    print(os.environ["KIND_VERSION"])
"""
KUBECTL_STAND_IN = """#!{python}
import sys
from tests.kubectl_stand_in import main
sys.exit(main())
"""


@dataclass
class StandIns:
    """docker, kind and helm that record their command lines, and kubectl modelling a cluster
    (tests/kubectl_stand_in.py), first on PATH."""

    env: dict[str, str]
    log: Path
    kubectl_log: Path

    @classmethod
    def make(cls, tmp_path: Path) -> "StandIns":
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        log = tmp_path / "commands.jsonl"
        for name in ("docker", "kind", "helm"):
            (bin_dir / name).write_text(RECORDER.format(python=sys.executable, log=str(log)))
        (bin_dir / "kubectl").write_text(KUBECTL_STAND_IN.format(python=sys.executable))
        for stand_in in bin_dir.iterdir():
            stand_in.chmod(0o755)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "KUBECTL_STAND_IN_STATE": str(tmp_path / "cluster.json"),
            "KUBECTL_STAND_IN_LOG": str(tmp_path / "kubectl.jsonl"),
            "KUBECTL_STAND_IN_REAL": tool("kubectl"),
        }
        env.pop("KIND_CLUSTER_NAME", None)
        return cls(env, log, tmp_path / "kubectl.jsonl")

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def commands(self, name: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [line[1:] for line in lines if line[0] == name]

    def kubectl(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.kubectl_log.read_text().splitlines()]

    def objects(self) -> dict[str, dict[str, Any]]:
        from tests.kubectl_stand_in import Cluster

        return Cluster(Path(self.env["KUBECTL_STAND_IN_STATE"])).objects


def prune_args(text: str) -> list[str]:
    """The `prune=(...)` bash array of a script or a README block, as its words."""
    import shlex

    found = re.search(r"^\s*prune=\((.*?)\)", text, re.S | re.M)
    assert found, "no prune=(...) array"
    return shlex.split(found[1], comments=True)


def rng_workloads(objects: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(k for k, o in objects.items() if o["kind"] in WORKLOAD_KINDS and "/rng" in k[-4:])


def applied_state(overlay: str) -> set[str]:
    """What an apply --prune of `overlay` leaves of the kinds it may prune, plus what it keeps."""
    from tests.kubectl_stand_in import gvk, key

    allow = {a.split("=", 1)[1] for a in prune_args(KIND_UP.read_text()) if "=" in a}
    return {key(d) for d in rendered(overlay) if gvk(d) in allow}


KIND_UP = ROOT / "scripts" / "kind-up"


def test_kind_config_is_a_valid_cluster_with_worker_nodes() -> None:
    import jsonschema

    config = yaml.safe_load((K8S / "kind.yaml").read_text())
    jsonschema.validate(config, KIND_CLUSTER_SCHEMA)
    roles = [node.get("role", "control-plane") for node in config["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") >= 2, roles
    broken = {**config, "node": config["nodes"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KIND_CLUSTER_SCHEMA)


@cache
def kubectl_flags(*command: str) -> frozenset[str]:
    """The flags `kubectl COMMAND --help` and `kubectl options` document."""
    helps = (
        run([tool("kubectl"), *command, "--help"]).stdout + run([tool("kubectl"), "options"]).stdout
    )
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", helps))


def flags_of(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kind_script_runs_the_documented_commands_in_order(tmp_path: Path, overlay: str) -> None:
    """scripts/kind-up against the stand-ins (real make): the commands, each flag one the tool
    documents, the image the manifests run loaded as an archive, the Secret made, and the
    overlay's objects in the modelled cluster."""
    stand_ins = StandIns.make(tmp_path)
    result = stand_ins.run([str(KIND_UP), overlay])
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = [c for c in stand_ins.commands("kind") if c != ["version"]]
    assert [tuple(c[:2]) for c in kinds] == [
        ("get", "clusters"),
        ("create", "cluster"),
        ("load", "image-archive"),
    ]
    for argv in stand_ins.commands("kind"):
        verb = tuple(argv[:2]) if len(argv) > 1 and not argv[1].startswith("-") else (argv[0],)
        assert flags_of(argv) <= KIND_FLAGS[verb], argv
    create = kinds[1]
    assert create[create.index("--config") + 1] == "k8s/kind.yaml"
    cluster = create[create.index("--name") + 1]
    docker = stand_ins.commands("docker")
    (build,) = [c for c in docker if c[0] == "build" and "--help" not in c]
    assert build[-1] == "."
    image = build[build.index("--tag") + 1]
    (save,) = [c for c in docker if c[:2] == ["image", "save"] and "--help" not in c]
    archive = save[save.index("--output") + 1]
    assert save[-1] == image
    # The image loaded into the nodes is the one the manifests run, never pulled.
    load = kinds[2]
    assert load[2] == archive and load[load.index("--name") + 1] == cluster
    assert not Path(archive).exists(), "the archive is left behind"
    for w in workloads(rendered(overlay)):
        for c in w.containers:
            if command_of(c) is not None:
                assert c["image"] == image and c["imagePullPolicy"] == "IfNotPresent"
    calls = [entry["argv"] for entry in stand_ins.kubectl()]
    for argv in calls:
        if argv[0] == "kustomize":
            continue
        assert argv[:2] == ["--context", f"kind-{cluster}"], argv
        rest = argv[2:]
        if rest[0] in ("-n", "--namespace"):
            assert rest[1] in (NAMESPACE, "kube-system"), argv
            rest = rest[2:]
        assert flags_of(rest) <= kubectl_flags(*kubectl_verb(rest)), f"undocumented flag: {argv}"
    path = "k8s/base" if overlay == "base" else f"k8s/overlays/{overlay}"
    applied = [a[2:] for a in calls if "apply" in a and "-k" in a and a[-1] != "k8s/monitoring"]
    assert applied == [["apply", "-k", path, *prune_args(KIND_UP.read_text())]]
    objects = stand_ins.objects()
    assert {k for k in objects if k in applied_state(overlay) or "/dockercoins/" in k} >= (
        applied_state(overlay)
    )
    secret = objects[f"Secret/{NAMESPACE}/redis-passwords"]["stringData"]
    assert set(secret) == {"webui", "worker"} and secret["webui"] != secret["worker"]
    assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in secret.values()), "48 hex digits"
    assert f"PersistentVolumeClaim/{NAMESPACE}/data-redis-0" in objects
    rolled = {a[-2] for a in calls if "rollout" in a and "kube-system" not in a}
    assert rolled == {f"{w.kind.lower()}.apps/{w.name}" for w in workloads(rendered(overlay))}
    assert (overlay == "autoscale") == any("metrics-server" in " ".join(a) for a in calls)
    helm = stand_ins.commands("helm")
    assert (overlay == "autoscale-rng") == bool(helm)
    for argv in helm:
        verb = tuple(argv[:2]) if argv[0] == "repo" else (argv[0],)
        assert flags_of(argv) <= HELM_FLAGS[verb], argv
    for argv in (a for a in helm if a[0] == "upgrade"):
        chart = argv[3].split("/")[1]
        assert argv[argv.index("--version") + 1] == CHART_KEYS[chart][0]
        assert (ROOT / argv[argv.index("--values") + 1]).is_file()


@pytest.mark.slow
def test_kind_script_switches_overlays_leaving_one_rng_and_the_data(tmp_path: Path) -> None:
    """kind-up daemonset, then buffered, then autoscale-rng, then base, on one modelled cluster:
    after each, exactly the overlay's objects, one rng workload, the same Secret and claim."""
    stand_ins = StandIns.make(tmp_path)
    secret = None
    for overlay, rng in (
        ("daemonset", "DaemonSet"),
        ("buffered", "Deployment"),
        ("autoscale-rng", "Deployment"),
        ("base", "Deployment"),
    ):
        result = stand_ins.run([str(KIND_UP), overlay])
        assert result.returncode == 0, result.stdout + result.stderr
        objects = stand_ins.objects()
        assert rng_workloads(objects) == [f"{rng}/{NAMESPACE}/rng"], overlay
        ours = {k for k, o in objects.items() if o["metadata"].get("namespace") == NAMESPACE}
        kept = {
            f"Secret/{NAMESPACE}/redis-passwords",
            f"PersistentVolumeClaim/{NAMESPACE}/data-redis-0",
        }
        assert ours == applied_state(overlay) | kept, overlay
        secret = secret or objects[f"Secret/{NAMESPACE}/redis-passwords"]
        assert objects[f"Secret/{NAMESPACE}/redis-passwords"] == secret, "passwords remade"


@pytest.mark.slow
def test_kind_script_warns_of_kind_releases_that_block_probes_under_policies(
    tmp_path: Path,
) -> None:
    stand_ins = StandIns.make(tmp_path)
    old = "kind v0.26.0 go1.23.4 linux/amd64"
    warned = stand_ins.run([str(KIND_UP), "network-policies"], KIND_VERSION=old)
    assert warned.returncode == 0 and "kind issue 3875" in warned.stderr, warned.stderr
    quiet = stand_ins.run([str(KIND_UP), "buffered"], KIND_VERSION=old)
    recent = stand_ins.run(
        [str(KIND_UP), "metrics"], KIND_VERSION="kind v0.31.0 go1.25 linux/amd64"
    )
    assert "3875" not in quiet.stderr + recent.stderr


@pytest.mark.slow
@pytest.mark.parametrize("first", OVERLAYS)
def test_every_overlay_after_every_other_leaves_exactly_its_own_objects(
    tmp_path: Path, first: str
) -> None:
    """Each pair a user could apply in sequence, through the prune of kind-up and the README: the
    second overlay's objects, one rng workload, Redis's claim kept."""
    from tests.kubectl_stand_in import Cluster

    args = prune_args(KIND_UP.read_text())
    allow = {a.split("=", 1)[1] for a in args if a.startswith("--prune-allowlist=")}
    selector = args[args.index("-l") + 1]
    for second in OVERLAYS:
        cluster = Cluster(tmp_path / f"{first}-{second}.json")
        cluster.apply([dict(d) for d in rendered(first)], selector, allow)
        cluster.apply([dict(d) for d in rendered(second)], selector, allow)
        assert len(rng_workloads(cluster.objects)) == 1, (first, second)
        from tests.kubectl_stand_in import gvk

        left = {k for k, o in cluster.objects.items() if gvk(o) in allow}
        assert left == applied_state(second), (first, second)
        assert f"PersistentVolumeClaim/{NAMESPACE}/data-redis-0" in cluster.objects


@pytest.mark.slow
def test_pruning_without_the_allowlist_would_delete_the_redis_data(tmp_path: Path) -> None:
    """Why the allowlist: kubectl's default one holds PersistentVolumeClaims, and Redis's claim
    carries the label (its template's), so a plain `--prune -l` deletes the counter."""
    from tests.kubectl_stand_in import DEFAULT_PRUNE, Cluster

    cluster = Cluster(tmp_path / "cluster.json")
    selector = "=".join(PART_OF)
    cluster.apply([dict(d) for d in rendered("base")], selector, DEFAULT_PRUNE)
    cluster.apply([dict(d) for d in rendered("buffered")], selector, DEFAULT_PRUNE)
    assert f"PersistentVolumeClaim/{NAMESPACE}/data-redis-0" not in cluster.objects


def kubectl_verb(words: list[str]) -> tuple[str, ...]:
    """The words of a kubectl command that its --help is for (`rollout status`, `create secret
    generic`), global flags and their values skipped."""
    words = list(words)
    while words and words[0] in ("-n", "--namespace", "--context"):
        words = words[2:]
    verb = [words[0]]
    if words[0] in ("rollout", "set", "create", "config") and len(words) > 1:
        verb.append(words[1])
        if words[1] == "secret" and len(words) > 2:
            verb.append(words[2])
    return tuple(verb)


@pytest.mark.slow
def test_kind_script_names_the_overlays_when_given_an_unknown_one() -> None:
    result = run([str(ROOT / "scripts" / "kind-up"), "no-such-overlay"])
    assert result.returncode == 2
    assert "no overlay 'no-such-overlay'" in result.stderr and "buffered" in result.stderr


# --- Redis locked: the rendered ACL, run on a real redis-server --------------------------------


def kubelet_env(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: Secret keys resolved, `$(VAR)`
    replaced by the value of a variable defined earlier in the list (later ones stay as is)."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if ref := e.get("valueFrom", {}).get("secretKeyRef"):
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
    return env


def redis_cli(port: int, user: str | None = None, password: str | None = None) -> Any:
    import redis

    return redis.Redis(port=port, username=user, password=password, socket_timeout=5)


@pytest.mark.slow
def test_kubernetes_redis_acl_locks_out_strangers_and_grants_each_service_what_it_uses(
    tmp_path: Path,
) -> None:
    """The redis pod of the base, run here: its init container's own script writes the ACL file
    from the rendered template and generated passwords; redis-server starts with the pod's args
    (a local redis-server, not the image's: it says which); the web UI and a worker run with the
    URL the kubelet would build. No client gets in without a password (NOAUTH), the web UI's user
    cannot write, each service uses exactly the commands its user is granted (none refused but
    redis-py's CLIENT SETINFO), and no log shows a password."""
    import secrets as random

    import redis

    from dockercoins.net import free_port
    from dockercoins_tools.embedded_redis import redis_server_argv
    from tests.stack import LoggedProcess, get_json
    from tests.support import dockercoins_cmd, service_env

    docs = rendered("base")
    redis_pod = redis_statefulset(docs)
    assert redis_pod is not None
    (init,) = redis_pod.pod["spec"]["initContainers"]
    (server,) = redis_pod.containers
    volumes = {v["name"]: v for v in redis_pod.pod["spec"]["volumes"]}
    passwords = {("redis-passwords", key): random.token_hex(24) for key in ("webui", "worker")}

    # The init container, with its mounts moved to directories of the test's own.
    script = init["command"][-1]
    moved = {}
    for mount in init["volumeMounts"]:
        local = tmp_path / mount["name"]
        local.mkdir()
        moved[mount["mountPath"]] = str(local)
        script = script.replace(mount["mountPath"], str(local))
        if config := volumes[mount["name"]].get("configMap"):
            (data,) = [
                d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == config["name"]
            ]
            for name, text in data["data"].items():
                (local / name).write_text(text)
    result = subprocess.run(
        [*init["command"][:-1], script],
        env={"PATH": os.environ["PATH"], **kubelet_env(init, passwords)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    args = server["args"]
    acl_file = Path(moved[str(Path(args[args.index("--aclfile") + 1]).parent)]) / "users.acl"
    acl_text = acl_file.read_text()
    assert not any(p in acl_text for p in passwords.values()), "a password in the ACL file"
    # The test's own reader of ACL LOG and INFO commandstats, beside the pod's users.
    admin = random.token_hex(16)
    acl_file.write_text(acl_text + f"user admin on >{admin} ~* &* +@all\n")

    port = free_port()
    args = [
        a.replace(str(Path(a).parent), str(acl_file.parent)) if a.endswith(".acl") else a
        for a in args
    ]
    redis_proc = subprocess.Popen(
        [*redis_server_argv("127.0.0.1", port, tmp_path / "data"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started: list[LoggedProcess] = []
    try:
        stranger = redis_cli(port)

        def noauth() -> bool:
            try:
                stranger.ping()
            except redis.AuthenticationError:  # NOAUTH (redis-py drops the code)
                return True
            except redis.ConnectionError:
                return False
            return False

        wait_until(noauth, 10, "redis-server answering NOAUTH")
        with pytest.raises(redis.AuthenticationError, match=r"(?i)authenticat"):
            stranger.get(HASHES_KEY)
        with pytest.raises(redis.AuthenticationError):
            redis_cli(port, "default", "").ping()
        root = redis_cli(port, "admin", admin)
        webui_client = redis_cli(port, "webui", passwords[("redis-passwords", "webui")])
        worker_client = redis_cli(port, "worker", passwords[("redis-passwords", "worker")])
        assert webui_client.getrange(HASHES_KEY, 0, 19) == b""
        for client, forbidden in (
            (
                webui_client,
                [("SET", HASHES_KEY, "1"), ("HSET", WALLET_KEY, "a", "b"), ("DEL", WALLET_KEY)],
            ),
            (worker_client, [("GET", "elsewhere"), ("KEYS", "*"), ("SCAN", "0")]),
        ):
            for command in [*forbidden, ("FLUSHALL",), ("CONFIG", "GET", "*"), ("ACL", "LIST")]:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*command)

        # The web UI alone first (with one heartbeat to read), then a worker beside it.
        root.set(WORKER_KEY_PREFIX + "seed", json.dumps({"loops": 1}), px=60_000)
        root.acl_log_reset()  # the refusals above were the test's
        root.config_resetstat()
        grants = {
            name: {r[1:] for r in user["rules"] if r.startswith("+")}
            for name, user in redis_acl_users(docs).items()
        }

        def start(command: str, **settings: object) -> LoggedProcess:
            env = service_env(**settings)
            (w,) = [w for w in workloads(docs) if command_of(w.containers[0]) == command]
            url = kubelet_env(w.containers[0], passwords).get("DOCKERCOINS_REDIS_URL")
            if url is not None:
                env["DOCKERCOINS_REDIS_URL"] = url.replace("@redis:6379", f"@127.0.0.1:{port}")
            proc = LoggedProcess(dockercoins_cmd(command), env)
            started.append(proc)
            return proc

        webui_port = free_port()
        start("webui", webui_port=webui_port)
        page = f"http://127.0.0.1:{webui_port}"

        def json_or_none() -> dict[str, Any] | None:
            try:
                return get_json(page + "/json")
            except OSError:
                return None

        wait_until(lambda: (json_or_none() or {}).get("workers") == 1, 20, "the web UI reading")
        assert get_json(page + "/readyz") == {"status": "ready"}

        def used_by_webui() -> set[str]:
            used = {name.removeprefix("cmdstat_") for name in root.info("commandstats")}
            test_and_handshake = {"config|resetstat", "config", "set", "auth", "hello", "client"}
            return used - test_and_handshake - {"client|setinfo"}

        wait_until(
            lambda: used_by_webui() >= grants["webui"],
            10,
            lambda: f"the web UI using its grants {grants['webui']} (used {used_by_webui()})",
        )
        used = used_by_webui()
        assert used == grants["webui"], f"the web UI used {used}, is granted {grants['webui']}"

        root.delete(WORKER_KEY_PREFIX + "seed")
        root.config_resetstat()
        rng_port, hasher_port = free_port(), free_port()
        start("rng", rng_port=rng_port, rng_read_cost=0.005)
        start("hasher", hasher_port=hasher_port, hasher_latency=0.005)
        worker = start(
            "worker",
            rng_addr=f"127.0.0.1:{rng_port}",
            hasher_addr=f"127.0.0.1:{hasher_port}",
            worker_health_port=free_port(),
            worker_think_time=0.005,
            worker_flush_interval=0.3,
        )
        wait_until(
            lambda: (
                (json_or_none() or {}).get("hashes", 0) > 50
                and (json_or_none() or {}).get("coins", 0) > 0
            ),
            30,
            "the worker's hashes and coins on the page",
            worker,
        )
        assert worker.stop() == 0
        # The test's own commands (before the reset) and the handshake left out.
        used = {name.removeprefix("cmdstat_") for name in root.info("commandstats")}
        used -= {"config|resetstat", "config", "auth", "hello", "client|setinfo", "client"}
        assert grants["worker"] <= used, f"granted but never used: {grants['worker'] - used}"
        assert used <= grants["webui"] | grants["worker"], used
        refused = {
            (entry["username"], entry["object"])
            for entry in root.acl_log()
            if entry["username"] != "default"
        }
        assert {obj for _, obj in refused} <= {"client", "client|setinfo"}, refused
    finally:
        for proc in reversed(started):
            proc.stop()
        redis_proc.terminate()
        out, _ = redis_proc.communicate(timeout=10)
    logs = out + "".join(p.output for p in started)
    for password in passwords.values():
        assert password not in logs, "a password in a log"


# --- the README's Kubernetes commands, replayed ----------------------------------------------

REPLAY_MARK = "<!-- replayed by tests/test_deploy.py"


def readme_sequence() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(re.escape(REPLAY_MARK) + r"[^\n]*\n```sh\n(.*?)```", readme, re.S)
    assert found, "README lost its replayed Kubernetes block"
    return found[1]


@pytest.mark.slow
def test_readme_kubernetes_sequence_leaves_one_rng_at_every_step(tmp_path: Path) -> None:
    """The README's block, run by bash as typed, against the modelled kubectl: after each apply
    exactly the overlay's objects and one rng workload; the probes exec'd in a worker parse with
    the real CLI; at the end the namespace is gone with all it held."""
    stand_ins = StandIns.make(tmp_path)
    script = readme_sequence()
    assert prune_args(script) == prune_args(KIND_UP.read_text()), "README and kind-up prune alike"
    last = script.rstrip().splitlines()[-1]
    assert last.startswith("kubectl delete namespace dockercoins")
    result = stand_ins.run(["bash", "-euo", "pipefail", "-c", script.replace(last, "")])
    assert result.returncode == 0, result.stdout + result.stderr
    steps = stand_ins.kubectl()
    applied = [(s, s["argv"][s["argv"].index("-k") + 1]) for s in steps if "apply" in s["argv"]]
    expected = {"k8s/base": "Deployment", "k8s/overlays/daemonset": "DaemonSet"}
    expected["k8s/overlays/buffered"] = "Deployment"
    assert [path for _, path in applied] == list(expected)
    for step, path in applied:
        overlay = path.rsplit("/", 1)[-1] if "overlays" in path else "base"
        objects = {k for k in step["objects"] if f"/{NAMESPACE}/" in k}
        kept = {
            f"Secret/{NAMESPACE}/redis-passwords",
            f"PersistentVolumeClaim/{NAMESPACE}/data-redis-0",
        }
        assert objects == applied_state(overlay) | kept, path
        assert [
            k
            for k in objects
            if k.endswith(f"/{NAMESPACE}/rng") and k.split("/")[0] in WORKLOAD_KINDS
        ] == [f"{expected[path]}/{NAMESPACE}/rng"]
    # The worker count survives the later applies, as apply's three-way merge keeps it.
    assert stand_ins.objects()[f"Deployment/{NAMESPACE}/worker"]["spec"]["replicas"] == 10
    probes = [s["argv"] for s in steps if "exec" in s["argv"]]
    assert len(probes) == 2 + 3, probes  # rng and hasher, then each of the three rng pods
    probe_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", run_cli_help("probe")))
    for argv in probes:
        command = argv[argv.index("--") + 1 :]
        assert command[:2] == ["dockercoins", "probe"] and flags_of(command) <= probe_flags
    assert {a[a.index("--addr") + 1].rsplit(":", 1)[1] for a in probes if "--addr" in a} == {
        "50051"
    }
    end = stand_ins.run(["bash", "-c", last])
    assert end.returncode == 0, end.stderr
    assert not [k for k in stand_ins.objects() if f"/{NAMESPACE}/" in k or k.endswith(NAMESPACE)]


def run_cli_help(command: str) -> str:
    from tests.support import run_cli

    return run_cli(command, "--help").stdout


def kubectl_lines(text: str) -> Iterator[list[str]]:
    """Each kubectl command in the fenced blocks of a Markdown text, as words: lines split as
    the shell would, at `&&`, `;`, `|`, `&` and the parentheses of `$(...)`."""
    import shlex

    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.wordchars += "$*{}[]@=/:.,-"
            command: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set("();<>|&"):
                    if command[:1] == ["kubectl"]:
                        yield command[1:]
                    command = []
                elif token not in ("do", "$") or command:
                    command.append(token)


@pytest.mark.slow
def test_every_kubectl_command_in_the_docs_takes_only_flags_kubectl_documents() -> None:
    texts = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "deploy.md").read_text()]
    seen = 0
    for text in texts:
        for words in kubectl_lines(text):
            command = words[: words.index("--")] if "--" in words else words
            words_only = [w for w in command if not w.startswith("${")]
            verb = kubectl_verb(words_only)
            assert flags_of(words_only) <= kubectl_flags(*verb), f"kubectl {' '.join(words)}"
            seen += 1
    assert seen >= 15, seen


# --- the HPA v2 lab: prometheus-adapter's rule and the autoscalers ----------------------------

MONITORING = K8S / "monitoring"
# prometheus-adapter's configuration (pkg/config/config.go, v0.12), which it reads with
# yaml.UnmarshalStrict: an unknown field stops the adapter.
_GROUP_RESOURCE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["resource"],
    "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
}
_RESOURCE_MAPPING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "template": {"type": "string"},
        "overrides": {"type": "object", "additionalProperties": _GROUP_RESOURCE},
        "namespaced": {"type": "boolean"},
    },
}
_DISCOVERY_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["seriesQuery", "resources", "name", "metricsQuery"],
    "properties": {
        "seriesQuery": {"type": "string", "minLength": 1},
        "seriesFilters": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"is": {"type": "string"}, "isNot": {"type": "string"}},
            },
        },
        "resources": _RESOURCE_MAPPING,
        "name": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
        },
        "metricsQuery": {"type": "string", "minLength": 1},
    },
}
ADAPTER_CONFIG_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rules"],
    "properties": {
        "rules": {"type": "array", "items": _DISCOVERY_RULE},
        "externalRules": {"type": "array", "items": _DISCOVERY_RULE},
        "resourceRules": {"type": "object"},
    },
}


def adapter_config() -> tuple[str, dict[str, Any]]:
    """The ConfigMap of k8s/monitoring that the adapter mounts: its name and config.yaml."""
    (config,) = of_kind(render(MONITORING), "ConfigMap")
    return config["metadata"]["name"], yaml.safe_load(config["data"]["config.yaml"])


def selectors(promql: str) -> list[tuple[str, dict[str, str]]]:
    """`name{label="value",...}` selectors of a PromQL text: the name and its equality matchers."""
    found = []
    for name, body in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", promql):
        found.append((name, dict(re.findall(r'(\w+)="([^"]*)"', body))))
    return found


@pytest.mark.slow
def test_adapter_rules_are_a_valid_prometheus_adapter_config_the_chart_mounts(
    tmp_path: Path,
) -> None:
    import jsonschema

    name, config = adapter_config()
    jsonschema.validate(config, ADAPTER_CONFIG_SCHEMA)
    for broken in (
        {**config, "rule": config["rules"]},
        {"rules": [{**config["rules"][0], "x": 1}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, ADAPTER_CONFIG_SCHEMA)
    # kubernetes-validate holds the ConfigMap and the namespace to the API's schemas.
    path = tmp_path / "monitoring.yaml"
    path.write_text(yaml.safe_dump_all(render(MONITORING)))
    result = run(
        [tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[-1], str(path)]
    )
    assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, result.stdout
    # The charts' values: keys their values.yaml has, the adapter pointed at this ConfigMap and
    # at the Prometheus of the other release.
    values = {
        "prometheus": yaml.safe_load((MONITORING / "prometheus-values.yaml").read_text()),
        "prometheus-adapter": yaml.safe_load((MONITORING / "adapter-values.yaml").read_text()),
    }

    def paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        return {
            p
            for k, v in tree.items()
            for p in (paths(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k)})
        }

    for chart, (_, keys) in CHART_KEYS.items():
        assert paths(values[chart]) <= keys, chart
    adapter = values["prometheus-adapter"]
    assert adapter["rules"]["existing"] == name
    assert adapter["prometheus"]["url"] == "http://prometheus-server.monitoring.svc"


@pytest.mark.slow
async def test_the_adapter_rule_reads_series_that_rng_serves(servers) -> None:
    """The rule's series, as a real rng serves them on /metrics (Prometheus adds namespace and pod
    from its kubernetes-pods job): its seriesQuery and every selector of its metricsQuery match."""
    import grpc
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dockercoins.net import free_port
    from dockercoins.v1 import rng_pb2, rng_pb2_grpc

    address = await servers.rng(rng_read_cost=0.0, metrics_port=free_port())
    async with grpc.aio.insecure_channel(address) as channel:
        await rng_pb2_grpc.RngStub(channel).GetRandom(rng_pb2.RandomRequest(size=32), timeout=10)
    served = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(generate_latest(REGISTRY).decode())
        for sample in family.samples
    ]
    _, config = adapter_config()
    (rule,) = config["rules"]
    query = rule["metricsQuery"].replace(
        "<<.LabelMatchers>>", 'namespace="dockercoins",pod="rng-0"'
    )
    query = query.replace("<<.GroupBy>>", "pod").replace("<<.Series>>", "unused")
    wanted = [*selectors(rule["seriesQuery"]), *selectors(query)]
    assert len(wanted) == 3
    for name, labels in wanted:
        labels = {k: v for k, v in labels.items() if k not in ("namespace", "pod")}
        assert any(
            n == name and all(have.get(k) == v for k, v in labels.items()) for n, have in served
        ), f"{name}{labels} is not among rng's series"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert re.fullmatch(rule["name"]["matches"], selectors(rule["seriesQuery"])[0][0])


def hpa_settles(latency: dict[int, float], target: float, start: int, most: int) -> list[int]:
    """The replica counts an HPA goes through on a Pods AverageValue metric: desired =
    ceil(n x value / target), unchanged within its 10 % tolerance, until a count repeats."""
    import math

    seen = [start]
    while True:
        n = seen[-1]
        ratio = latency[n] / target
        desired = n if abs(ratio - 1) <= 0.1 else min(most, max(1, math.ceil(n * ratio)))
        if desired in seen:
            return [*seen, desired]
        seen.append(desired)


@pytest.mark.slow
def test_rng_autoscaler_reads_the_adapters_metric_and_settles_at_three_pods() -> None:
    """With 10 classic workers, rng's mean time per call at n blocking replicas is 1/n - 0.2 s
    while rng is the bottleneck (n <= 3: 10 workers cycle through think + hasher + rng), and its
    0.1 s floor plus a little queueing beyond: measured 818, 305, 138, 113, 108, 104 ms for 1 to 6
    (docs/deploy.md). From one replica the target leads to 3 and stays there, both on the model
    and on the measured figures."""
    docs = rendered("autoscale-rng")
    (hpa,) = [h for h in of_kind(docs, "HorizontalPodAutoscaler") if h["metadata"]["name"] == "rng"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    _, config = adapter_config()
    assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in config["rules"]}
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    seconds = float(target["averageValue"].removesuffix("m")) / 1000
    assert seconds > CLASSIC.rng_request, "above rng's floor: an idle rng must not scale"
    rng = [w for w in workloads(docs) if w.name == "rng"]
    assert [w.kind for w in rng] == [hpa["spec"]["scaleTargetRef"]["kind"]] == ["Deployment"]
    (container,) = rng[0].containers
    assert (
        env_of(container)["DOCKERCOINS_METRICS_PORT"]
        == rng[0].pod["metadata"]["annotations"]["prometheus.io/port"]
    )
    most = hpa["spec"]["maxReplicas"]
    cycle = CLASSIC.worker_think_time + CLASSIC.hasher_latency
    model = {
        n: max(CLASSIC.rng_request, 10 / (n / CLASSIC.rng_read_cost) - cycle)
        for n in range(1, most + 1)
    }
    measured = dict(enumerate([0.818, 0.305, 0.138, 0.113, 0.108, 0.104], 1))
    for latency in (model, measured):
        path = hpa_settles(latency, seconds, 1, most)
        assert path[-2:] == [3, 3], path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overlay", "file", "old", "new", "complaint"),
    [
        (  # the budget kind-up and the README applied before: maxUnavailable over a DaemonSet
            "daemonset",
            "components/daemonset/kustomization.yaml",
            "      - op: remove\n        path: /spec/maxUnavailable\n"
            "      - op: add\n        path: /spec/minAvailable\n        value: 1\n",
            "      - op: replace\n        path: /spec/maxUnavailable\n        value: 1\n",
            "PodDisruptionBudget/rng: over DaemonSet/rng, which has no scale subresource",
        ),
        (
            "daemonset",
            "components/daemonset/kustomization.yaml",
            "path: /spec/minAvailable\n        value: 1\n",
            'path: /spec/minAvailable\n        value: "50%"\n',
            "PodDisruptionBudget/rng: over DaemonSet/rng, which has no scale subresource",
        ),
        (  # an overlay without the label: its policies are neither applied nor pruned
            "network-policies",
            "overlays/network-policies/kustomization.yaml",
            "      app.kubernetes.io/part-of: dockercoins\n",
            "      app.kubernetes.io/name: dockercoins\n",
            "NetworkPolicy/rng-from-worker: lacks the label app.kubernetes.io/part-of",
        ),
        (
            "network-policies",
            "components/network-policies/network-policies.yaml",
            "          port: 50053\n",
            "          port: 50054\n",
            "Deployment/worker: readinessProbe on port 50053 passes only where the CNI",
        ),
        (
            "network-policies",
            "base/redis.yaml",
            "          livenessProbe:\n            exec:\n              command:",
            "          livenessProbe:\n            tcpSocket:\n              port: 6379\n"
            "            x-command:",
            "StatefulSet/redis: livenessProbe on port 6379 passes only where the CNI",
        ),
        (
            "base",
            "base/redis-acl.yaml",
            "user default off",
            "user default on nopass",
            "the default user is not off",
        ),
        (
            "base",
            "base/webui.yaml",
            "redis://webui:$(REDIS_PASSWORD)@",
            "redis://webui:hunter2@",
            "DOCKERCOINS_REDIS_URL must take its password from a Secret",
        ),
        (
            "base",
            "base/worker.yaml",
            "redis://worker:$(REDIS_PASSWORD)@",
            "redis://webui:$(REDIS_PASSWORD)@",
            "the password of webui comes from ('redis-passwords', 'worker')",
        ),
        (
            "base",
            "base/redis.yaml",
            "kind: StatefulSet\n",
            "kind: Deployment\n",
            "Deployment/redis: must be a StatefulSet of 1",
        ),
        (
            "base",
            "base/redis.yaml",
            "            - --aclfile\n            - /run/redis/users.acl\n",
            "",
            "no ACL file written from a template: anyone gets in",
        ),
        (
            "base",
            "base/redis.yaml",
            "  clusterIP: None\n  selector:\n    app: redis",
            "  selector:\n    app: redis",
            "serviceName must name a headless Service",
        ),
    ],
)
def test_a_broken_overlay_fails_the_new_checks(
    tmp_path: Path, overlay: str, file: str, old: str, new: str, complaint: str
) -> None:
    broken_copy(tmp_path, file, old, new)
    path = tmp_path / "k8s" / ("base" if overlay == "base" else f"overlays/{overlay}")
    problems = k8s_problems(render(path))
    assert any(complaint in p for p in problems), problems


@pytest.mark.slow
def test_kind_config_maps_the_web_ui_node_port_to_the_hosts_loopback() -> None:
    config = yaml.safe_load((K8S / "kind.yaml").read_text())
    (webui,) = [s for s in of_kind(rendered("base"), "Service") if s["metadata"]["name"] == "webui"]
    (port,) = webui["spec"]["ports"]
    mappings = [m for node in config["nodes"] for m in node.get("extraPortMappings", [])]
    assert mappings == [
        {
            "containerPort": port["nodePort"],
            "hostPort": port["nodePort"],
            "listenAddress": "127.0.0.1",
            "protocol": "TCP",
        }
    ]
    assert f"http://127.0.0.1:{port['nodePort']}" in KIND_UP.read_text()
