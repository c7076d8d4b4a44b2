"""A stand-in for `kubectl` that keeps a small model of a cluster's objects in a JSON file, so that
a command sequence (the README's, `scripts/kind-up`'s) can be replayed without a cluster and the
objects it leaves checked. Run as `python -m tests.kubectl_stand_in ARGS...` by a wrapper named
`kubectl` first on PATH; `kubectl kustomize`, `--help` and `options` go to the real kubectl.

What it models, as kubectl and the API server do it:
- `apply -k DIR`: the rendered objects, only those matching `-l` when given (kubectl applies
  nothing else); `spec.replicas` left as it is live when the manifest did not change it (the
  three-way merge: a `kubectl scale` survives a later apply); with `--prune`, every object of an
  allowlisted kind (kubectl's default list without `--prune-allowlist`) matching `-l`, in a
  namespace the apply visited, that the apply did not contain, is deleted;
- a StatefulSet's controller: one PersistentVolumeClaim per replica and claim template, carrying
  the template's labels, kept when the StatefulSet goes;
- `create namespace`, `create secret generic --from-env-file`, `delete KIND NAME`, `delete
  namespace` (and everything in it), `scale`, `get` (NotFound for a missing object; `-o name`;
  `-o jsonpath` over pods, one per replica or per node for a DaemonSet, for `{.items[*].a.b}`);
- `exec`, `logs`, `rollout`, `port-forward`, `set env`, `patch`: recorded; they fail when the
  workload they name does not exist, except in a namespace the model never saw made (kube-system:
  `apply -f URL`, metrics-server's manifest, is recorded only).
Every call is appended to the log as JSON: its argv and the objects present after it.
"""

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

NODES = 3  # k8s/kind.yaml's worker nodes: a DaemonSet runs one pod on each
# kubectl's own prune allowlist, used when --prune comes without --prune-allowlist.
DEFAULT_PRUNE = {
    "core/v1/ConfigMap", "core/v1/Endpoints", "core/v1/Namespace", "core/v1/PersistentVolumeClaim",
    "core/v1/PersistentVolume", "core/v1/Pod", "core/v1/ReplicationController", "core/v1/Secret",
    "core/v1/Service", "batch/v1/Job", "batch/v1/CronJob", "networking.k8s.io/v1/Ingress",
    "apps/v1/DaemonSet", "apps/v1/Deployment", "apps/v1/ReplicaSet", "apps/v1/StatefulSet",
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}
SHORT = {
    "deploy": "Deployment", "deployment": "Deployment", "deployments": "Deployment",
    "ds": "DaemonSet", "daemonset": "DaemonSet", "daemonsets": "DaemonSet",
    "sts": "StatefulSet", "statefulset": "StatefulSet", "statefulsets": "StatefulSet",
    "svc": "Service", "service": "Service", "services": "Service",
    "secret": "Secret", "secrets": "Secret", "ns": "Namespace", "namespace": "Namespace",
    "namespaces": "Namespace", "pvc": "PersistentVolumeClaim",
    "persistentvolumeclaim": "PersistentVolumeClaim", "configmap": "ConfigMap",
    "cm": "ConfigMap", "hpa": "HorizontalPodAutoscaler", "pdb": "PodDisruptionBudget",
    "networkpolicy": "NetworkPolicy", "netpol": "NetworkPolicy", "pod": "Pod", "pods": "Pod",
}  # fmt: skip
GROUP_OF = {"Deployment": "apps", "DaemonSet": "apps", "StatefulSet": "apps"}


class Refused(Exception):
    """What kubectl would print to stderr before exiting 1."""


def gvk(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    return f"{api if '/' in api else 'core/' + api}/{obj['kind']}"


def key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta.get('namespace', '')}/{meta['name']}"


def selected(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj["metadata"].get("labels", {})
    return all(labels.get(k) == v for k, v in (p.split("=", 1) for p in selector.split(",")))


class Cluster:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.objects: dict[str, dict[str, Any]] = (
            json.loads(path.read_text()) if path.exists() else {}
        )

    def save(self) -> None:
        self.path.write_text(json.dumps(self.objects))

    def find(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        ns = "" if kind in CLUSTER_SCOPED else namespace
        return self.objects.get(f"{kind}/{ns}/{name}")

    def require(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found = self.find(kind, namespace, name)
        if found is None:
            raise Refused(f'Error from server (NotFound): {kind.lower()}s "{name}" not found')
        return found

    def put(self, obj: dict[str, Any]) -> None:
        if obj["kind"] not in CLUSTER_SCOPED:
            namespace = obj["metadata"].get("namespace", "default")
            if namespace != "default" and self.find("Namespace", "", namespace) is None:
                raise Refused(f'Error from server (NotFound): namespaces "{namespace}" not found')
        self.objects[key(obj)] = obj

    def apply(
        self, docs: list[dict[str, Any]], selector: str | None, prune: set[str] | None
    ) -> None:
        docs = [d for d in docs if selected(d, selector)]
        # Namespaces first, as kubectl orders them.
        for doc in sorted(docs, key=lambda d: d["kind"] != "Namespace"):
            live = self.objects.get(key(doc))
            doc = json.loads(json.dumps(doc))
            manifest = doc.get("spec", {}).get("replicas")
            if live is not None and "replicas" in live.get("spec", {}):
                last = live.get("last-applied", {}).get("spec", {}).get("replicas")
                if manifest == last:
                    doc["spec"]["replicas"] = live["spec"]["replicas"]
            doc["last-applied"] = {"spec": {"replicas": manifest}}
            self.put(doc)
            if doc["kind"] == "StatefulSet":
                self.claims_of(doc)
        if prune is None:
            return
        applied = {key(d) for d in docs}
        visited = {d["metadata"].get("namespace") for d in docs} - {None}
        for k, obj in list(self.objects.items()):
            namespace = obj["metadata"].get("namespace")
            in_scope = namespace in visited or obj["kind"] in CLUSTER_SCOPED
            if k not in applied and in_scope and gvk(obj) in prune and selected(obj, selector):
                del self.objects[k]

    def claims_of(self, sts: dict[str, Any]) -> None:
        """The StatefulSet controller: a claim per replica and template, never deleted by it."""
        for template in sts["spec"].get("volumeClaimTemplates", []):
            for i in range(sts["spec"].get("replicas", 1)):
                name = f"{template['metadata']['name']}-{sts['metadata']['name']}-{i}"
                claim = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {
                        "name": name,
                        "namespace": sts["metadata"]["namespace"],
                        "labels": template["metadata"].get("labels", {}),
                    },
                    "spec": template["spec"],
                }
                self.objects.setdefault(key(claim), claim)

    def pods(self, namespace: str, selector: str | None) -> list[dict[str, Any]]:
        found = []
        for obj in self.objects.values():
            if obj["kind"] not in GROUP_OF or obj["metadata"].get("namespace") != namespace:
                continue
            template = obj["spec"]["template"]
            if not selected(template, selector):
                continue
            count = NODES if obj["kind"] == "DaemonSet" else obj["spec"].get("replicas", 1)
            for i in range(count):
                found.append(
                    {
                        "metadata": {
                            "name": f"{obj['metadata']['name']}-{i}",
                            **template["metadata"],
                        },
                        "status": {"podIP": f"10.244.{len(found) + 1}.{i + 2}"},
                    }
                )
        return found


def jsonpath(template: str, data: Any) -> str:
    """kubectl's `{.items[*].a.b}`, the one shape the README uses: values joined by spaces."""
    match = re.fullmatch(r"\{((?:\.\w+(?:\[\*\])?)+)\}", template)
    if not match:
        raise Refused(f"stand-in: jsonpath {template!r} is not modelled")
    values = [data]
    for name, star in re.findall(r"\.(\w+)(\[\*\])?", match[1]):
        values = [v[name] for v in values if isinstance(v, dict) and name in v]
        if star:
            values = [item for v in values for item in v]
    return " ".join(str(v) for v in values)


def workload_ref(ref: str) -> tuple[str, str]:
    kind, _, name = ref.partition("/")
    return SHORT.get(kind, kind), name


def run(argv: list[str], cluster: Cluster, real: str) -> str:
    args, namespace = [], "default"
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--context", "-n", "--namespace"):
            if a != "--context":
                namespace = argv[i + 1]
            i += 2
            continue
        if a.startswith("--namespace="):
            namespace = a.split("=", 1)[1]
        elif not a.startswith("--context="):
            args.append(a)
        i += 1
    if not args or args[0] in ("kustomize", "options") or "--help" in args:
        result = subprocess.run([real, *argv], capture_output=True, text=True)
        if result.returncode:
            raise Refused(result.stderr)
        return result.stdout
    verb, rest = args[0], args[1:]
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for a in rest}
    selector = None
    if "-l" in rest:
        selector = rest[rest.index("-l") + 1]
    if verb == "apply":
        if "-k" not in rest:  # -f URL (metrics-server): not modelled
            return ""
        path = rest[rest.index("-k") + 1]
        rendered = subprocess.run([real, "kustomize", path], capture_output=True, text=True)
        if rendered.returncode:
            raise Refused(rendered.stderr)
        docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        allow = {a.split("=", 1)[1] for a in rest if a.startswith("--prune-allowlist=")}
        prune = (allow or DEFAULT_PRUNE) if "--prune" in flags else None
        if prune is not None and not selector and "--all" not in flags:
            raise Refused(
                "error: all resources selected for prune without explicitly passing --all"
            )
        cluster.apply(docs, selector, prune)
        return ""
    if verb == "create":
        what, name = rest[0], rest[1] if rest[0] == "namespace" else rest[2]
        if what == "namespace":
            if cluster.find("Namespace", "", name):
                raise Refused(
                    f'Error from server (AlreadyExists): namespaces "{name}" already exists'
                )
            cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            return ""
        if what == "secret" and rest[1] == "generic":
            data: dict[str, str] = {}
            for source in (a for a in rest if a.startswith("--from-env-file=")):
                for line in Path(source.split("=", 1)[1]).read_text().splitlines():
                    if line.strip():
                        k, _, v = line.partition("=")
                        data[k] = v
            if cluster.find("Secret", namespace, name):
                raise Refused(f'Error from server (AlreadyExists): secrets "{name}" already exists')
            cluster.put(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                    "stringData": data,
                }
            )
            return ""
        raise Refused(f"stand-in: create {what} is not modelled")
    if verb == "delete":
        kind, name = (
            (SHORT.get(rest[0], rest[0]), rest[1]) if "/" not in rest[0] else workload_ref(rest[0])
        )
        if cluster.find(kind, namespace, name) is None:
            if "--ignore-not-found" in flags:
                return ""
            cluster.require(kind, namespace, name)
        if kind == "Namespace":
            for k, obj in list(cluster.objects.items()):
                if obj["metadata"].get("namespace") == name or k == f"Namespace//{name}":
                    del cluster.objects[k]
        else:
            del cluster.objects[key(cluster.require(kind, namespace, name))]
        return ""
    if verb == "get":
        kinds = [SHORT.get(k, k) for k in rest[0].split(",")]
        valued = {i + 1 for i, a in enumerate(rest) if a in ("-l", "-o", "--selector")}
        names = [a for i, a in enumerate(rest[1:], 1) if not a.startswith("-") and i not in valued]
        output = flags.get("-o") or (rest[rest.index("-o") + 1] if "-o" in rest else None)
        if kinds == ["Pod"]:
            items = cluster.pods(namespace, selector)
            if output and output.startswith("jsonpath="):
                return jsonpath(output.split("=", 1)[1], {"items": items}) + "\n"
            return "\n".join(p["metadata"]["name"] for p in items) + "\n"
        if names:
            for name in names[:1]:
                cluster.require(kinds[0], namespace, name)
            return ""
        lines = [
            f"{o['kind'].lower()}.{GROUP_OF[o['kind']]}/{o['metadata']['name']}"
            if o["kind"] in GROUP_OF
            else f"{o['kind'].lower()}/{o['metadata']['name']}"
            for o in cluster.objects.values()
            if o["kind"] in kinds
            and o["metadata"].get("namespace") == namespace
            and selected(o, selector)
        ]
        return "".join(line + "\n" for line in lines)
    if verb == "scale":
        ref = rest[0] if "/" in rest[0] else f"{rest[0]}/{rest[1]}"
        kind, name = workload_ref(ref)
        obj = cluster.require(kind, namespace, name)
        obj["spec"]["replicas"] = int(
            next(a for a in rest if a.startswith("--replicas=")).split("=")[1]
        )
        return ""
    if verb in ("exec", "logs", "port-forward", "rollout", "set", "wait", "label", "patch"):
        if cluster.find("Namespace", "", namespace) is None and namespace != "default":
            return ""  # a namespace the model never saw made (kube-system): not modelled
        refs = [a for a in rest if "/" in a and not a.startswith("-")]
        for ref in refs[:1]:
            kind, name = workload_ref(ref)
            if kind in ("service", "Service"):
                cluster.require("Service", namespace, name)
            elif kind in GROUP_OF:
                cluster.require(kind, namespace, name)
        return ""
    raise Refused(f"stand-in: kubectl {verb} is not modelled")


def main() -> int:
    argv = sys.argv[1:]
    state = Path(os.environ["KUBECTL_STAND_IN_STATE"])
    status, out = 0, ""
    # One invocation at a time, as an API server orders requests: a command run in the
    # background (the README's `kubectl port-forward ... &`) must not read the state while the
    # next one writes it, nor save a copy older than that one's.
    with open(state.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster = Cluster(state)
        try:
            out = run(argv, cluster, os.environ["KUBECTL_STAND_IN_REAL"])
        except Refused as exc:
            print(exc, file=sys.stderr)
            status = 1
        cluster.save()
        with open(os.environ["KUBECTL_STAND_IN_LOG"], "a") as log:
            record = {"argv": argv, "status": status, "objects": sorted(cluster.objects)}
            log.write(json.dumps(record) + "\n")
    sys.stdout.write(out)
    return status


if __name__ == "__main__":
    sys.exit(main())
