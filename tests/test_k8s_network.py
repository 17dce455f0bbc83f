"""k8s/networkpolicies.yaml, evaluated offline against the pods clipflow's manifests create.

No CNI runs here, so the NetworkPolicy semantics are implemented below (label selectors, namespace and
IP-block peers, ports, policies adding up per direction) and every connection is checked as a cluster
would: allowed only if the source's egress and the destination's ingress both allow it. Pods get the
labels of their templates, plus, for Ray pods, the labels the KubeRay operator adds. An ipBlock is taken to
match pod IPs too (CNI-specific), so what must stay closed stays closed on any CNI.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from workflows.common.config import load_config
from workflows.ops import k8s_render
from workflows.ops.k8s_checks import build_kustomization, load_documents, manifest_files, overlays, ray_groups

PROJECT_ROOT = Path(__file__).resolve().parent.parent
K8S = PROJECT_ROOT / "k8s"
NAMESPACE = "clipflow"
OPERATOR_NAMESPACE = "kuberay-system"  # README step 1
RAY_ROLES = {"ray-head", "ray-worker"}


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace set) or an address outside the cluster (namespace None)."""

    role: str
    ip: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def kuberay_pod_labels(template_labels: dict[str, str], node_type: str, cluster: str, group: str) -> dict[str, str]:
    """The labels the operator gives a Ray pod: its own, overridden by the template's except ray.io/node-type,
    ray.io/group and ray.io/cluster (ray-operator/controllers/ray/common/pod.go, labelPod)."""
    fixed = {"ray.io/node-type": node_type, "ray.io/group": group, "ray.io/cluster": cluster}
    defaults = {"ray.io/is-ray-node": "yes", "ray.io/identifier": f"{cluster}-{node_type}",
                "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    return {**defaults, **template_labels, **fixed}


def ray_pods(spec: dict[str, Any], cluster: str, ips: Iterator[str]) -> Iterator[Endpoint]:
    for path, group in ray_groups(spec):
        head = path == "headGroupSpec"
        labels = kuberay_pod_labels(group["template"].get("metadata", {}).get("labels", {}),
                                    "head" if head else "worker", cluster, "headgroup" if head else group["groupName"])
        yield Endpoint("ray-head" if head else "ray-worker", next(ips), NAMESPACE, labels)


def manifest_pods() -> list[Endpoint]:
    """One endpoint per pod template: shipped manifests and what `k8s render` writes for every config."""
    ips = (f"10.244.{i // 250}.{i % 250 + 1}" for i in range(10_000))
    docs = [doc for path in manifest_files(PROJECT_ROOT) for doc in load_documents(path)]
    docs += [doc for overlay in overlays(PROJECT_ROOT) for doc in build_kustomization(overlay)]
    for config in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        cfg = load_config(config)
        docs += [k8s_render.render(cfg, str(config), stage) for stage in k8s_render.STAGES]
        docs.append(k8s_render.render(cfg, str(config), "eval", schedule="0 * * * *"))
    pods: list[Endpoint] = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            pods.append(Endpoint(doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
                                 next(ips), NAMESPACE, doc["spec"]["template"]["metadata"]["labels"]))
        elif kind == "RayCluster":
            pods += ray_pods(doc["spec"], name, ips)
        elif kind in ("RayJob", "RayCronJob"):
            job = doc["spec"]["jobTemplate"] if kind == "RayCronJob" else doc["spec"]
            pods += ray_pods(job["rayClusterSpec"], f"{name}-x7k2p", ips)  # the operator appends a suffix
            labels = {**job["submitterPodTemplate"]["metadata"]["labels"], "batch.kubernetes.io/job-name": name}
            pods.append(Endpoint("submitter", next(ips), NAMESPACE, labels))
    return pods


PODS = manifest_pods()


def first(role: str) -> Endpoint:
    return next(p for p in PODS if p.role == role)


HEAD, WORKER, SUBMITTER, MLFLOW, POSTGRES, USERS_JOB = map(first, ["ray-head", "ray-worker", "submitter", "mlflow",
                                                                   "postgres", "mlflow-users"])
# Pods clipflow does not create, and addresses outside the cluster.
STRANGER = Endpoint("stranger", "10.244.200.1", NAMESPACE, {"run": "debug"})  # `kubectl run` in the namespace
IMPOSTOR = Endpoint("impostor", "10.244.200.2", NAMESPACE,  # claims to be part of clipflow, is not a Ray pod
                    {"app.kubernetes.io/part-of": "clipflow", "app.kubernetes.io/component": "notebook"})
LOOKALIKE = Endpoint("lookalike", "10.244.200.3", "default", HEAD.labels)  # a head's labels, another namespace
OPERATOR = Endpoint("operator", "10.244.201.1", OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "kuberay-operator"})
DNS = Endpoint("dns", "10.244.202.1", "kube-system", {"k8s-app": "kube-dns"})
S3 = Endpoint("s3", "52.216.1.1")
PRIVATE_SERVICE = Endpoint("private-service", "10.96.5.5")  # an in-cluster service address, not a pod here
API_SERVER = Endpoint("api-server", "10.0.0.1")
OUTSIDERS = [STRANGER, IMPOSTOR, LOOKALIKE, OPERATOR, DNS]


# --- NetworkPolicy semantics ----------------------------------------------------------------------------

@functools.cache
def policies() -> list[dict[str, Any]]:
    docs = load_documents(K8S / "base" / "networkpolicies.yaml")
    assert {d["kind"] for d in docs} == {"NetworkPolicy"}
    assert {d["metadata"]["namespace"] for d in docs} == {NAMESPACE}
    return docs


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: every matchLabels pair and every matchExpressions requirement holds."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for req in selector.get("matchExpressions", []):
        key, op, values = req["key"], req["operator"], req.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], target: Endpoint) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(target.ip)
        block = peer["ipBlock"]
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(c) for c in block.get("except", [])))
    if target.namespace is None:
        return False
    namespace_selector = peer.get("namespaceSelector")
    in_namespace = (selects(namespace_selector, {"kubernetes.io/metadata.name": target.namespace})
                    if namespace_selector is not None else target.namespace == NAMESPACE)
    return in_namespace and selects(peer.get("podSelector", {}), target.labels)


def port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        assert isinstance(p.get("port", 0), int), f"named port {p['port']}: this evaluator resolves numbers only"
        if p.get("protocol", "TCP") == protocol and (
                "port" not in p or p["port"] <= port <= p.get("endPort", p["port"])):
            return True
    return False


def side_allows(subject: Endpoint, peer: Endpoint, port: int, protocol: str, direction: str) -> bool:
    """Whether the policies selecting ``subject`` let it send to (Egress) / receive from (Ingress) ``peer``."""
    if subject.namespace != NAMESPACE:
        return True  # outside namespace clipflow: not these policies' business
    applicable = [p for p in policies() if direction in p["spec"]["policyTypes"]
                  and selects(p["spec"]["podSelector"], subject.labels)]
    if not applicable:
        return True
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    return any((not rule.get(peers_key) or any(peer_matches(x, peer) for x in rule[peers_key]))
               and port_matches(rule.get("ports"), port, protocol)
               for p in applicable for rule in p["spec"].get(rules_key, []))


def allowed(src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return (side_allows(src, dst, port, protocol, "Egress")
            and side_allows(dst, src, port, protocol, "Ingress"))


# --- the policies ---------------------------------------------------------------------------------------

def test_every_pod_template_is_modelled() -> None:
    roles = {p.role for p in PODS}
    assert roles == {"ray-head", "ray-worker", "submitter", "mlflow", "postgres", "mlflow-users"}
    assert len({p.labels["app.kubernetes.io/component"] for p in PODS if p.role == "ray-worker"}) == 2


def test_a_default_deny_isolates_every_pod() -> None:
    deny = [p for p in policies() if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not allowed(STRANGER, MLFLOW, 5000) and not allowed(MLFLOW, STRANGER, 8080)


EVERY_ROLE = {"ray-head", "ray-worker", "submitter", "mlflow", "postgres", "mlflow-users"}
EXPECTED_SELECTION = {
    "clipflow-default-deny": EVERY_ROLE,
    "clipflow-dns": EVERY_ROLE,
    "clipflow-ray": RAY_ROLES,
    "clipflow-ray-head": {"ray-head"},
    "clipflow-ray-job-submitter": {"submitter"},
    "clipflow-mlflow": {"mlflow"},
    "clipflow-postgres": {"postgres"},
    "clipflow-mlflow-users": {"mlflow-users"},
}


def test_each_policy_selects_the_pods_it_means() -> None:
    """Computed from the pod templates' labels: a renamed label or a template without it shows up here."""
    selected = {p["metadata"]["name"]: {pod.role for pod in PODS if selects(p["spec"]["podSelector"], pod.labels)}
                for p in policies()}
    assert selected == EXPECTED_SELECTION
    for p in policies():
        if p["metadata"]["name"] != "clipflow-default-deny" and p["spec"]["podSelector"]:
            # every pod of a role, not just some: e.g. both Ray worker groups, every rendered job's submitter
            roles = EXPECTED_SELECTION[p["metadata"]["name"]]
            assert all(selects(p["spec"]["podSelector"], pod.labels) for pod in PODS if pod.role in roles)
    assert not any(selects(p["spec"]["podSelector"], IMPOSTOR.labels) for p in policies() if p["spec"]["podSelector"])


OPEN = [
    ("worker -> head GCS", WORKER, HEAD, 6379, "TCP"),
    ("worker -> head Ray client", WORKER, HEAD, 10001, "TCP"),
    ("head -> worker (raylet, object manager, workers)", HEAD, WORKER, 23456, "TCP"),
    ("worker -> worker (NCCL, object transfers)", WORKER, WORKER, 41000, "TCP"),
    ("Ray -> MLflow", WORKER, MLFLOW, 5000, "TCP"),
    ("Ray head (driver) -> MLflow", HEAD, MLFLOW, 5000, "TCP"),
    ("MLflow -> PostgreSQL", MLFLOW, POSTGRES, 5432, "TCP"),
    ("mlflow-users Job -> MLflow", USERS_JOB, MLFLOW, 5000, "TCP"),
    ("submitter -> head Jobs API", SUBMITTER, HEAD, 8265, "TCP"),
    ("operator -> head Jobs API", OPERATOR, HEAD, 8265, "TCP"),
    ("Ray -> S3", WORKER, S3, 443, "TCP"),
    ("MLflow -> S3 (artifacts)", MLFLOW, S3, 443, "TCP"),
    ("head autoscaler -> API server", HEAD, API_SERVER, 443, "TCP"),
    *[(f"{pod.role} -> DNS/{proto}", pod, DNS, 53, proto) for pod in (HEAD, WORKER, SUBMITTER, MLFLOW, POSTGRES,
                                                                    USERS_JOB)
      for proto in ("UDP", "TCP")],
]

CLOSED = [
    ("stranger -> head Jobs API", STRANGER, HEAD, 8265, "TCP"),
    ("impostor -> head Jobs API", IMPOSTOR, HEAD, 8265, "TCP"),
    ("other namespace, a head's labels -> head Jobs API", LOOKALIKE, HEAD, 8265, "TCP"),
    ("other namespace -> head GCS", LOOKALIKE, HEAD, 6379, "TCP"),
    ("operator -> head GCS", OPERATOR, HEAD, 6379, "TCP"),
    ("operator -> worker", OPERATOR, WORKER, 8265, "TCP"),
    ("stranger -> worker", STRANGER, WORKER, 23456, "TCP"),
    ("submitter -> head GCS", SUBMITTER, HEAD, 6379, "TCP"),
    ("submitter -> worker", SUBMITTER, WORKER, 8265, "TCP"),
    ("submitter -> MLflow", SUBMITTER, MLFLOW, 5000, "TCP"),
    ("submitter -> S3", SUBMITTER, S3, 443, "TCP"),
    ("stranger -> MLflow", STRANGER, MLFLOW, 5000, "TCP"),
    ("other namespace -> MLflow", LOOKALIKE, MLFLOW, 5000, "TCP"),
    ("Ray -> PostgreSQL", WORKER, POSTGRES, 5432, "TCP"),
    ("Ray -> MLflow on another port", WORKER, MLFLOW, 8080, "TCP"),
    ("MLflow -> Ray head", MLFLOW, HEAD, 8265, "TCP"),
    ("PostgreSQL -> S3", POSTGRES, S3, 443, "TCP"),
    ("PostgreSQL -> MLflow", POSTGRES, MLFLOW, 5000, "TCP"),
    ("Ray -> private service on 443", WORKER, PRIVATE_SERVICE, 443, "TCP"),
    ("Ray -> S3 over plain HTTP", WORKER, S3, 80, "TCP"),
    ("worker -> API server", WORKER, API_SERVER, 443, "TCP"),
    ("Ray -> a pod in another namespace", WORKER, LOOKALIKE, 8265, "TCP"),
    ("Ray -> DNS on another port", WORKER, DNS, 8080, "TCP"),
    ("mlflow-users Job -> PostgreSQL", USERS_JOB, POSTGRES, 5432, "TCP"),
    ("mlflow-users Job -> Ray head", USERS_JOB, HEAD, 8265, "TCP"),
    ("mlflow-users Job -> S3", USERS_JOB, S3, 443, "TCP"),
    ("stranger -> mlflow-users Job", STRANGER, USERS_JOB, 8080, "TCP"),
]


@pytest.mark.parametrize("name,src,dst,port,protocol", OPEN, ids=[c[0] for c in OPEN])
def test_open_path(name: str, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> None:
    assert allowed(src, dst, port, protocol), name


@pytest.mark.parametrize("name,src,dst,port,protocol", CLOSED, ids=[c[0] for c in CLOSED])
def test_closed_path(name: str, src: Endpoint, dst: Endpoint, port: int, protocol: str) -> None:
    assert not allowed(src, dst, port, protocol), name


def test_every_ray_pod_reaches_every_ray_pod() -> None:
    ray = [p for p in PODS if p.role in RAY_ROLES]
    assert all(allowed(a, b, 6379) for a in ray for b in ray)


def admitted(dst: Endpoint, port: int) -> set[str]:
    """Roles whose connections ``dst``'s ingress accepts, by its own policies alone: the sender's egress
    rules (which also close most of these paths) are left out, so each ingress policy is tested in itself."""
    return {e.role for e in [*PODS, *OUTSIDERS] if side_allows(dst, e, port, "TCP", "Ingress")}


def test_postgres_admits_only_mlflow() -> None:
    assert admitted(POSTGRES, 5432) == {"mlflow"}
    assert {e.role for e in [*PODS, *OUTSIDERS] if allowed(e, POSTGRES, 5432)} == {"mlflow"}


def test_mlflow_admits_ray_pods_and_the_users_job_and_nothing_else() -> None:
    assert admitted(MLFLOW, 5000) == RAY_ROLES | {"mlflow-users"}
    assert {e.role for e in [*PODS, *OUTSIDERS] if allowed(e, MLFLOW, 5000)} == RAY_ROLES | {"mlflow-users"}


def test_the_head_dashboard_is_reachable_only_from_clipflow_and_the_operator() -> None:
    assert admitted(HEAD, 8265) == RAY_ROLES | {"submitter", "operator"}
    assert admitted(HEAD, 6379) == RAY_ROLES
    assert admitted(WORKER, 8265) == RAY_ROLES
