"""Security properties of every Kubernetes object clipflow ships or renders, checked offline.

What is covered: Ray token auth on every Ray cluster (ray_cluster.yaml, the committed jobs, and the jobs
`clipflow k8s render` writes for every config and stage), the "restricted" Pod Security Standard on the
namespace and on every pod template, Secrets kept out of command lines, and the job deadline taken from
the run config. That the validators reject each violation is in test_k8s.py (BROKEN_*); the network
policies are in test_k8s_network.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest

from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.ops import k8s_render
from workflows.ops.k8s_checks import (KUBERNETES_VERSION, check_pod_spec, load_documents, manifest_files, pod_specs,
                                      ray_groups)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
K8S = PROJECT_ROOT / "k8s"
CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def shipped_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in manifest_files(PROJECT_ROOT):
        for i, doc in enumerate(load_documents(path)):
            yield f"{path.relative_to(PROJECT_ROOT)}[{i}]", doc


def rendered_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    """What `clipflow k8s render` writes for every config in configs/ and every stage, plus the schedule."""
    for config in CONFIGS:
        cfg = load_config(config)
        for stage in k8s_render.STAGES:
            yield f"{config.name}:{stage}", k8s_render.render(cfg, str(config), stage)
        yield f"{config.name}:eval-scheduled", k8s_render.render(cfg, str(config), "eval", schedule="0 * * * *")


def all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [*shipped_docs(), *rendered_docs()]


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else job_spec(doc)["rayClusterSpec"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodSpec) of every pod the object makes: core workloads, Ray groups, RayJob submitters."""
    if doc["kind"] in RAY_KINDS:
        for path, group in ray_groups(cluster_spec(doc)):
            yield path, group["template"]["spec"]
        if doc["kind"] != "RayCluster":
            yield "submitterPodTemplate", job_spec(doc)["submitterPodTemplate"]["spec"]
    else:
        yield from pod_specs(doc)


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


# --- A: token auth on every Ray kind --------------------------------------------------------------------

def ray_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(where, doc) for where, doc in all_docs() if doc["kind"] in RAY_KINDS]


def test_every_ray_kind_is_covered() -> None:
    kinds = {doc["kind"] for _, doc in ray_docs()}
    assert kinds == set(RAY_KINDS)
    assert len([d for _, d in ray_docs() if d["kind"] == "RayJob"]) >= 3 * len(CONFIGS)


@pytest.mark.parametrize("doc", [pytest.param(doc, id=where) for where, doc in ray_docs()])
def test_every_ray_cluster_requires_the_token(doc: dict[str, Any]) -> None:
    """The operator then generates the token and hands it to every Ray container and the submitter; nothing
    may switch it off with its own RAY_AUTH_MODE (a container's value would win)."""
    assert cluster_spec(doc)["authOptions"] == {"mode": "token"}
    for path, pod in pod_templates(doc):
        for c in containers(pod):
            assert not {v["name"] for v in c.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, path


def test_the_long_running_cluster_token_is_where_the_readme_says() -> None:
    """The operator names the Secret after the RayCluster; README's `clipflow submit` step reads it there."""
    (cluster,) = load_documents(PROJECT_ROOT / "ray_cluster.yaml")
    readme = (PROJECT_ROOT / "README.md").read_text()
    command = (f"kubectl -n {cluster['metadata']['namespace']} get secret {cluster['metadata']['name']} "
               "-o jsonpath='{.data.auth_token}'")
    assert command in readme


# --- C: the restricted Pod Security Standard ------------------------------------------------------------

def test_namespace_enforces_restricted() -> None:
    (namespace,) = load_documents(K8S / "namespace.yaml")
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    minor = KUBERNETES_VERSION.rsplit(".", 1)[0]
    assert labels["pod-security.kubernetes.io/enforce-version"] == f"v{minor}"


def test_every_pod_template_meets_restricted() -> None:
    """check_pod_spec holds the restricted rules; here: it reaches every pod clipflow creates."""
    checked = []
    for where, doc in all_docs():
        for path, pod in pod_templates(doc):
            assert check_pod_spec(pod, f"{where}.{path}", read_only_root=False) == []
            checked.append(f"{where}.{path}")
    assert any("mlflow.yaml" in w for w in checked) and any("postgres.yaml" in w for w in checked)
    assert any("headGroupSpec" in w for w in checked) and any("submitterPodTemplate" in w for w in checked)
    assert len([w for w in checked if "workerGroupSpecs" in w]) >= 2


# --- E: no Secret on a command line ---------------------------------------------------------------------

def secret_derived(c: dict[str, Any]) -> set[str]:
    """Env names whose value comes from a Secret, directly or through $(VAR) expansion of one."""
    names: set[str] = set()
    for var in c.get("env", []):
        refs = {m.group(1) for m in _REFERENCE.finditer(str(var.get("value", ""))) if m.group(1)}
        if "secretKeyRef" in var.get("valueFrom", {}) or refs & names:
            names.add(var["name"])
    return names


def test_no_secret_is_expanded_into_a_command_line() -> None:
    found_secret_env = False
    for where, doc in all_docs():
        for path, pod in pod_templates(doc):
            for c in containers(pod):
                assert not c.get("envFrom"), f"{where}.{path}: envFrom hides which variables hold Secrets"
                secrets = secret_derived(c)
                found_secret_env |= bool(secrets)
                for arg in [*c.get("command", []), *c.get("args", [])]:
                    refs = {m.group(1) for m in _REFERENCE.finditer(arg) if m.group(1)}
                    assert not refs & secrets, f"{where}.{path}({c['name']}): {arg}"
    assert found_secret_env, "no container reads a Secret: is the scan looking at the right objects?"


def test_mlflow_gets_its_database_password_from_the_environment() -> None:
    _, deployment = load_documents(K8S / "mlflow.yaml")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "MLFLOW_BACKEND_STORE_URI" in secret_derived(c)
    assert not [a for a in c["args"] if "postgresql://" in a or "backend-store-uri" in a]


# --- D: a deadline from the run config ------------------------------------------------------------------

def advertised_hours(config: Path) -> float:
    """The wall time README's config table gives for ``config`` ("about 26 h")."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    row = re.search(rf"^\| `configs/{re.escape(config.name)}` \|.*\babout (\d+(?:\.\d+)?) h\b", readme, re.M)
    assert row, f"README's config table gives no wall time for {config.name}"
    return float(row.group(1))


@pytest.mark.parametrize("name", ["vit_b32_laion400m.yaml", "vit_l14.yaml"])
def test_cluster_configs_bound_their_jobs_at_one_and_a_half_times_their_wall_time(name: str) -> None:
    config = PROJECT_ROOT / "configs" / name
    cfg = load_config(config)
    assert cfg.k8s.active_deadline_seconds == 1.5 * advertised_hours(config) * 3600
    for stage in k8s_render.STAGES:
        assert k8s_render.render(cfg, str(config), stage)["spec"]["activeDeadlineSeconds"] == \
            cfg.k8s.active_deadline_seconds
    cron = k8s_render.render(cfg, str(config), "eval", schedule="0 * * * *")
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] == cfg.k8s.active_deadline_seconds


def test_committed_jobs_carry_the_deadline() -> None:
    for path in sorted(K8S.glob("ray*job-*.yaml")):
        (doc,) = load_documents(path)
        argv = shlex.split(re.search(r"`(clipflow k8s render .*)`", path.read_text()).group(1))
        cfg = load_config(PROJECT_ROOT / argv[argv.index("--config") + 1])
        assert job_spec(doc)["activeDeadlineSeconds"] == cfg.k8s.active_deadline_seconds > 0, path.name


def test_no_deadline_by_default_and_a_negative_one_is_refused() -> None:
    config = PROJECT_ROOT / "configs" / "demo.yaml"
    assert "activeDeadlineSeconds" not in k8s_render.render(load_config(config), str(config), "train")["spec"]
    cfg = load_config(config, ["k8s.active_deadline_seconds=-1"])
    with pytest.raises(UserError, match="k8s.active_deadline_seconds must be >= 0"):
        k8s_render.render(cfg, str(config), "train")
