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
from workflows.ops.k8s_checks import (API_TOKEN_DIR, KUBERNETES_VERSION, build_kustomization, check_pod_spec,
                                      load_documents, manifest_files, overlays, pod_specs, ray_groups)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
K8S = PROJECT_ROOT / "k8s"
BASE = K8S / "base"
CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def shipped_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object as committed, then as each overlay builds it (what `kubectl apply -k` sends)."""
    for path in manifest_files(PROJECT_ROOT):
        for i, doc in enumerate(load_documents(path)):
            yield f"{path.relative_to(PROJECT_ROOT)}[{i}]", doc
    for overlay in overlays(PROJECT_ROOT):
        for i, doc in enumerate(build_kustomization(overlay)):
            yield f"{overlay.relative_to(PROJECT_ROOT)}[{i}]", doc


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
    (namespace,) = load_documents(BASE / "namespace.yaml")
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
    (c,) = mlflow_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "MLFLOW_BACKEND_STORE_URI" in secret_derived(c)
    assert not [a for a in c["args"] if "postgresql://" in a or "backend-store-uri" in a]


# --- F: MLflow authentication ---------------------------------------------------------------------------

def mlflow_objects() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in load_documents(BASE / "mlflow.yaml")}


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in c.get("env", [])}


def secret_ref(var: dict[str, Any]) -> tuple[str, str]:
    ref = var["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_mlflow_server_requires_a_login_with_the_admin_from_a_secret() -> None:
    """basic-auth on, its config file mounted from the ConfigMap, every credential from a Secret by env."""
    import configparser

    objects = mlflow_objects()
    (c,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = env_of(c)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert secret_ref(env[name]) == ("clipflow-mlflow-admin", name)
    assert {secret_ref(env[n]) for n in ("PGUSER", "PGPASSWORD")} == {("clipflow-db", "POSTGRES_USER"),
                                                                    ("clipflow-db", "POSTGRES_PASSWORD")}
    assert not [a for a in [*c["command"], *c["args"]] if "password" in a.lower()]
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    ini = configparser.ConfigParser()
    ini.read_string(objects["ConfigMap"]["data"][config_path.name])
    assert "@" not in ini["mlflow"]["database_uri"], "the auth store URI must hold no credentials (PGPASSWORD does)"
    assert ini["mlflow"]["default_permission"] == "READ" and "admin_password" not in ini["mlflow"]


def test_the_users_job_runs_the_shipped_script_as_admin_with_every_identity() -> None:
    job = mlflow_objects()["Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["image"] == mlflow_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    script = Path(c["command"][-1]).name
    assert (K8S / script).is_file() and f"COPY {script} " in (K8S / "mlflow.Dockerfile").read_text()
    env = env_of(c)
    assert secret_ref(env["MLFLOW_TRACKING_PASSWORD"]) == ("clipflow-mlflow-admin", "MLFLOW_AUTH_ADMIN_PASSWORD")
    for who in ("TRAIN", "EVAL"):
        assert secret_ref(env[f"CLIPFLOW_{who}_PASSWORD"]) == (f"clipflow-mlflow-{who.lower()}",
                                                               "MLFLOW_TRACKING_PASSWORD")


def ray_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, group in ray_groups(cluster_spec(doc)) for c in group["template"]["spec"]["containers"]]


def test_each_stage_logs_in_to_mlflow_as_its_own_identity() -> None:
    """From a Secret by secretKeyRef, never in argv: train as clipflow-train, eval as clipflow-eval, and
    preprocess, which never calls MLflow, with no MLflow credentials at all."""
    expected = {"train": "clipflow-mlflow-train", "eval": "clipflow-mlflow-eval", "eval-scheduled":
                "clipflow-mlflow-eval", "preprocess": None}
    checked = 0
    for where, doc in rendered_docs():
        secret = expected[where.split(":")[1]]
        for c in ray_containers(doc):
            env = env_of(c)
            names = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
            if secret is None:
                assert not names & set(env), where
            else:
                assert {secret_ref(env[n]) for n in names} == {(secret, n) for n in names}, where
            checked += 1
    (cluster,) = load_documents(PROJECT_ROOT / "ray_cluster.yaml")
    assert all(secret_ref(env_of(c)["MLFLOW_TRACKING_PASSWORD"])[0] == "clipflow-mlflow-train"
               for c in ray_containers(cluster))
    assert checked


# --- G: the autoscaler's Kubernetes API token -----------------------------------------------------------

def test_only_the_autoscaler_holds_a_kubernetes_api_token() -> None:
    """KubeRay binds its autoscaler Role to the head pod's ServiceAccount and the sidecar needs that account's
    token. The head's account is its own, mounts nothing by default, and every head pod projects the token
    into the autoscaler alone; every other pod runs without one."""
    accounts = {d["metadata"]["name"]: d for d in load_documents(BASE / "rbac.yaml") if d["kind"] == "ServiceAccount"}
    heads = set()
    for where, doc in all_docs():
        if doc["kind"] not in RAY_KINDS:
            for path, pod in pod_specs(doc):
                assert pod.get("automountServiceAccountToken", accounts[pod["serviceAccountName"]].get(
                    "automountServiceAccountToken")) is False, f"{where}.{path}"
            continue
        spec = cluster_spec(doc)
        head = spec["headGroupSpec"]["template"]["spec"]
        heads.add(head["serviceAccountName"])
        assert head["automountServiceAccountToken"] is False, where
        projected = {v["name"] for v in head["volumes"]
                     if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
        assert {m["name"] for m in spec["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == API_TOKEN_DIR} \
            == projected, where
        for path, pod in pod_templates(doc):
            if path != "headGroupSpec":
                assert pod["serviceAccountName"] not in heads and accounts[pod["serviceAccountName"]][
                    "automountServiceAccountToken"] is False, f"{where}.{path}"
            for c in containers(pod):
                assert not {m["name"] for m in c.get("volumeMounts", [])} & projected, f"{where}.{path}"
    assert heads == {"clipflow-ray-head"} and accounts["clipflow-ray-head"]["automountServiceAccountToken"] is False


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
    for path in sorted(K8S.rglob("ray*job-*.yaml")):
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
