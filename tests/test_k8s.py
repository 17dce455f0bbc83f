"""The Kubernetes manifests, checked offline: schemas, semantics, cross-file consistency, rendering.

No API server runs here, so each manifest is validated the way `kubectl apply --validate=strict` and
the KubeRay operator would: core kinds against the pinned Kubernetes schema, KubeRay kinds against the
vendored v1 CRD schemas, plus the project's own rules. Each validator is also shown to reject broken
input, so a passing check means something.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import ray
import yaml

from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.ops import k8s_render
from workflows.ops.cli import COMMANDS, build_parser, main
from workflows.ops.k8s_checks import (KUBERNETES_VERSION, build_kustomization, gpus_of, kustomizations, kustomize_files,
                                      load_documents, manifest_files, overlays, split_image, validate_manifest)

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout these tests belong to
K8S = PROJECT_ROOT / "k8s"
BASE = K8S / "base"
DEFAULT_OVERLAY = K8S / "overlays" / "paper-vit-b32"  # what `kubectl apply -k k8s/` applies
CLUSTER = PROJECT_ROOT / "ray_cluster.yaml"
SECRET_TEMPLATES = sorted((K8S / "secrets").glob("*.template.yaml"))
# Under k8s/ but deliberately not applied by `kubectl apply -k k8s/`: credentials are created by hand.
# The operator's Helm values (README step 1): not a Kubernetes object.
OPERATOR_VALUES = K8S / "kuberay-operator-values.yaml"
NOT_IN_KUSTOMIZATION = {p.relative_to(K8S).as_posix() for p in [*SECRET_TEMPLATES, OPERATOR_VALUES]}
# A digest pin, or a release tag (a version: never `latest` or a branch name, which move).
PINNED_TAG = re.compile(r"v?\d+(\.\d+)+")
PINNED_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# KubeRay 1.6 kinds whose controller the operator starts only behind a feature gate that is off by default.
GATED_KINDS = {"RayCronJob": "RayCronJob"}


def all_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object shipped: as committed, then as each overlay builds it (patched, images pinned)."""
    for path in manifest_files(PROJECT_ROOT):
        for doc in load_documents(path):
            yield path, doc
    for overlay in overlays(PROJECT_ROOT):
        for doc in build_kustomization(overlay):
            yield overlay, doc


def mlflow_docs() -> dict[str, dict[str, Any]]:
    """base/mlflow.yaml's objects by kind (ConfigMap, Service, Deployment, Job)."""
    return {doc["kind"]: doc for doc in load_documents(BASE / "mlflow.yaml")}


def ray_jobs() -> list[tuple[Path, dict[str, Any]]]:
    """(file, RayJob spec) for every RayJob and RayCronJob template shipped."""
    out = []
    for path, doc in all_docs():
        if doc["kind"] == "RayJob":
            out.append((path, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            out.append((path, doc["spec"]["jobTemplate"]))
    return out


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container/initContainer anywhere in a manifest."""
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            if isinstance(node.get(key), list):
                yield from node[key]
        for value in node.values():
            yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)


def secret_refs(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        if isinstance(ref, dict):
            yield ref["name"], ref["key"]
        for value in node.values():
            yield from secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from secret_refs(value)


# --- every manifest is valid -------------------------------------------------------------------------

@pytest.mark.parametrize("path", manifest_files(PROJECT_ROOT), ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_manifest_parses_and_validates(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        assert validate_manifest(doc) == []


def test_every_kind_is_checked_by_a_schema() -> None:
    kinds = {doc["kind"] for _, doc in all_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "Namespace", "Deployment", "Service", "StatefulSet",
            "ServiceAccount", "Role", "RoleBinding", "Secret", "NetworkPolicy", "ConfigMap", "Job"} <= kinds


@pytest.mark.parametrize("directory", kustomizations(PROJECT_ROOT),
                         ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_every_kustomization_builds_and_every_object_validates(directory: Path) -> None:
    """What `kubectl apply -k DIR` would send: the built objects, after patches, namespace, labels and images."""
    docs = build_kustomization(directory)
    assert docs
    for doc in docs:
        assert validate_manifest(doc) == [], doc["metadata"]["name"]
        assert doc["metadata"].get("namespace", "clipflow") == "clipflow"


# --- the validators reject what the API server / operator would ---------------------------------------

def _cluster() -> dict[str, Any]:
    return copy.deepcopy(load_documents(CLUSTER)[0])


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in doc["spec"]["workerGroupSpecs"] if gpus_of(g))


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _head_pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["headGroupSpec"]["template"]["spec"]


BROKEN_CLUSTERS: dict[str, tuple[Callable[[dict], None], str]] = {
    "wrong type": (lambda d: _gpu_group(d).update(maxReplicas="4"), "is not of type 'integer'"),
    "unknown enum": (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
    "missing required": (lambda d: _gpu_group(d).pop("groupName"), "'groupName' is a required property"),
    "unknown field": (lambda d: d["spec"].update(enableInTreeAutoscalling=True), "Additional properties"),
    "nested unknown field": (lambda d: _head_container(d).update(imagePullPolicyy="Always"), "Additional properties"),
    "bad quantity": (lambda d: _head_container(d)["resources"]["limits"].update(cpu="eight"), "does not match"),
    "gpu on head": (lambda d: _head_container(d)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
                    "the head must have no GPUs"),
    "head runs tasks": (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus"),
    "no autoscaling": (lambda d: d["spec"].update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
    "min above max": (lambda d: _gpu_group(d).update(minReplicas=5, replicas=5), "minReplicas (5)"),
    "no limits": (lambda d: _head_container(d)["resources"].pop("limits"), "resources.limits.cpu is not set"),
    "no shm": (lambda d: _gpu_group(d)["template"]["spec"].pop("volumes"), "/dev/shm"),
    # preemption: an evicted GPU pod drains its node (Ray Train checkpoints) and lives until the drain deadline
    "no preemption notice": (lambda d: _gpu_group(d)["template"]["spec"]["containers"][0].pop("lifecycle"),
                             "needs a preStop hook `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION"),
    "grace shorter than the drain": (lambda d: _gpu_group(d)["template"]["spec"].update(
        terminationGracePeriodSeconds=60), "within terminationGracePeriodSeconds (60): set it to at least 110"),
    "hook does not wait for the drain": (lambda d: _gpu_group(d)["template"]["spec"]["containers"][0]["lifecycle"][
        "preStop"]["exec"].update(command=["sh", "-c", "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION "
                                           "--reason-message x --deadline-remaining-seconds 90 && sleep 5"]),
        "must wait out its drain deadline (90 s; it sleeps 5 s)"),
    # the head pod, where job drivers run: deleted or evicted, it first stops its jobs gracefully (ops.stop_jobs)
    "head without its stop hook": (lambda d: _head_container(d).pop("lifecycle"),
                                   "the head container needs a preStop hook `python -m workflows.ops.stop_jobs"),
    "head grace shorter than its stop hook": (lambda d: _head_pod(d).update(terminationGracePeriodSeconds=60),
                                              "within terminationGracePeriodSeconds (60): set it to at least 120"),
    "head stop hook shorter than a driver's stop": (
        lambda d: _head_container(d)["lifecycle"]["preStop"]["exec"]["command"].__setitem__(-1, "30"),
        "the head's stop hook waits 30 s, less than a stopped driver may take to save its stop checkpoint (90 s)"),
    "job supervisor kills before the head's stop hook ends": (
        lambda d: _head_container(d).update(env=[v for v in _head_container(d)["env"]
                                                 if v["name"] != "RAY_JOB_STOP_WAIT_TIME_S"]),
        "set env RAY_JOB_STOP_WAIT_TIME_S to at least the stop hook's 100 s in the head container (it has none"),
    "root": (lambda d: [d["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
                        _head_container(d)["securityContext"].pop("runAsNonRoot")], "runAsNonRoot"),
    # security: token auth, the restricted Pod Security Standard, the NetworkPolicies' labels
    "no auth": (lambda d: d["spec"].pop("authOptions"), "authOptions: set {mode: token}"),
    "auth disabled": (lambda d: d["spec"].update(authOptions={"mode": "disabled"}), "authOptions: set {mode: token}"),
    "auth switched off in a container": (
        lambda d: _head_container(d)["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
        "do not set RAY_AUTH_MODE"),
    "container overrides runAsNonRoot": (lambda d: _head_container(d)["securityContext"].update(runAsNonRoot=False),
                                         "runAsNonRoot is not true"),
    "uid 0": (lambda d: _gpu_group(d)["template"]["spec"]["securityContext"].update(runAsUser=0), "runAsUser: 0"),
    "privileged": (lambda d: _head_container(d)["securityContext"].update(privileged=True), "privileged"),
    "capability added": (lambda d: _head_container(d)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                         "capabilities.add"),
    "host network": (lambda d: _head_pod(d).update(hostNetwork=True), "host namespaces"),
    "host port": (lambda d: _head_container(d)["ports"][0].update(hostPort=6379), "hostPort"),
    "hostPath volume": (lambda d: _head_pod(d)["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
                        "hostPath volumes are not allowed"),
    "autoscaler escalates": (
        lambda d: d["spec"]["autoscalerOptions"]["securityContext"].pop("allowPrivilegeEscalation"),
        "autoscalerOptions: securityContext.allowPrivilegeEscalation"),
    # the autoscaler's Kubernetes API token: there for the sidecar alone (KubeRay binds its Role to the head's SA)
    "autoscaler without API token": (lambda d: d["spec"]["autoscalerOptions"].pop("volumeMounts"),
                                     "the autoscaler cannot call the Kubernetes API"),
    "token automounted into the Ray container": (lambda d: _head_pod(d).update(automountServiceAccountToken=True),
                                                 "automountServiceAccountToken: set false"),
    "Ray container mounts the token": (lambda d: _head_container(d)["volumeMounts"].append(
        {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}),
        "only the autoscaler may"),
    "workers share the head's account": (
        lambda d: _gpu_group(d)["template"]["spec"].update(serviceAccountName="clipflow-ray-head"),
        "uses the head's ServiceAccount"),
    "head on the default account": (lambda d: _head_pod(d).pop("serviceAccountName"), "a ServiceAccount of the head"),
    "unlabelled for the network policies": (
        lambda d: _gpu_group(d)["template"]["metadata"]["labels"].pop("app.kubernetes.io/part-of"),
        "k8s/base/networkpolicies.yaml selects pods by them"),
}


@pytest.mark.parametrize("name", list(BROKEN_CLUSTERS))
def test_broken_ray_cluster_is_rejected(name: str) -> None:
    mutate, expected = BROKEN_CLUSTERS[name]
    doc = _cluster()
    assert validate_manifest(doc) == []
    mutate(doc)
    errors = validate_manifest(doc)
    assert any(expected in e for e in errors), errors


def _rayjob() -> dict[str, Any]:
    return copy.deepcopy(load_documents(DEFAULT_OVERLAY / "rayjob-train.yaml")[0])


BROKEN_JOBS: dict[str, tuple[Callable[[dict], None], str]] = {
    "submission mode": (lambda d: d["spec"].update(submissionMode="BatchMode"), "submissionMode"),
    "wrong type": (lambda d: d["spec"].update(backoffLimit="2"), "is not of type 'integer'"),
    "cluster twice": (lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "clipflow"}), "exactly one"),
    "ttl without shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    "broken cluster inside": (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
                              "'template' is a required property"),
    "unknown field": (lambda d: d["spec"].update(entrypointt="clipflow train"), "Additional properties"),
    "cluster without auth": (lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions"),
    "kubernetes token auth": (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(enableK8sTokenAuth=True),
                              "enableK8sTokenAuth"),
    "zero deadline": (lambda d: d["spec"].update(activeDeadlineSeconds=0), "activeDeadlineSeconds"),
    "deadline past int32": (lambda d: d["spec"].update(activeDeadlineSeconds=2**31), "activeDeadlineSeconds"),
    "default submitter": (lambda d: d["spec"].pop("submitterPodTemplate"), "default submitter pod"),
    "unlabelled submitter": (lambda d: d["spec"]["submitterPodTemplate"].pop("metadata"),
                             "submitterPodTemplate.metadata.labels"),
    "submitter escalates": (
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
}


@pytest.mark.parametrize("name", list(BROKEN_JOBS))
def test_broken_ray_job_is_rejected(name: str) -> None:
    mutate, expected = BROKEN_JOBS[name]
    doc = _rayjob()
    mutate(doc)
    assert any(expected in e for e in validate_manifest(doc)), validate_manifest(doc)


def test_broken_core_manifests_are_rejected() -> None:
    service, deployment = mlflow_docs()["Service"], mlflow_docs()["Deployment"]
    assert validate_manifest(deployment) == []
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "one"
    assert any("replicas" in e for e in validate_manifest(bad))
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # typo: strict schema rejects it
    assert validate_manifest(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    assert any("readOnlyRootFilesystem" in e for e in validate_manifest(bad))
    bad = copy.deepcopy(service)
    bad["spec"]["ports"][0]["port"] = "http"
    assert validate_manifest(bad)


def _mlflow_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


BROKEN_MLFLOW: dict[str, tuple[Callable[[dict], None], str]] = {
    "password in argv": (lambda c: c["args"].append("--backend-store-uri=postgresql://u:$(DB_PASSWORD)@db/mlflow"),
                         "$(DB_PASSWORD) expands a Secret into the command line"),
    "secret-derived variable in argv": (lambda c: c["command"].append("$(MLFLOW_BACKEND_STORE_URI)"),
                                        "$(MLFLOW_BACKEND_STORE_URI) expands a Secret"),
    "reference before definition": (lambda c: c["env"].insert(0, c["env"].pop(
        next(i for i, v in enumerate(c["env"]) if v["name"] == "MLFLOW_BACKEND_STORE_URI"))),
        "refers to $(DB_USER), which no env entry before it defines"),
    "root": (lambda c: c["securityContext"].update(runAsUser=0), "runAsUser: 0"),
}


@pytest.mark.parametrize("name", list(BROKEN_MLFLOW))
def test_broken_mlflow_deployment_is_rejected(name: str) -> None:
    mutate, expected = BROKEN_MLFLOW[name]
    deployment = mlflow_docs()["Deployment"]
    assert validate_manifest(deployment) == []
    mutate(_mlflow_container(deployment))
    errors = validate_manifest(deployment)
    assert any(expected in e for e in errors), errors


def test_escaped_references_are_not_expansions() -> None:
    deployment = mlflow_docs()["Deployment"]
    _mlflow_container(deployment)["args"].append("--note=$$(DB_PASSWORD)")  # Kubernetes passes `$(DB_PASSWORD)` on
    assert validate_manifest(deployment) == []


def test_kubernetes_schema_version_is_shipped() -> None:
    import kubernetes_validate

    assert kubernetes_validate.validate(load_documents(BASE / "namespace.yaml")[0], KUBERNETES_VERSION,
                                        strict=True) == KUBERNETES_VERSION.rsplit(".", 1)[0]


# --- kustomize --------------------------------------------------------------------------------------

def test_every_file_under_k8s_is_built_or_deliberately_left_out() -> None:
    """Each YAML file is a kustomization, a resource or patch one of them reads, or on the known list."""
    used: set[Path] = set()
    for directory in kustomizations(PROJECT_ROOT):
        resources, patches = kustomize_files(directory)
        listed = [p.relative_to(directory.resolve()).as_posix() if p.is_relative_to(directory.resolve()) else p
                  for p in resources]
        assert len(listed) == len(set(listed)), directory
        used |= {*resources, *patches}
    on_disk = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert on_disk - {p.relative_to(K8S.resolve()).as_posix() for p in used} == NOT_IN_KUSTOMIZATION
    assert {p.relative_to(K8S.resolve()).as_posix() for p in used} & NOT_IN_KUSTOMIZATION == set()
    namespace = load_documents(BASE / "namespace.yaml")[0]["metadata"]["name"]
    for directory in kustomizations(PROJECT_ROOT):
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert spec.get("namespace", namespace) == namespace


def test_kubectl_apply_k8s_applies_the_default_overlay() -> None:
    """README's `kubectl apply -k k8s/` keeps working: k8s/ builds exactly the paper ViT-B/32 overlay."""
    assert build_kustomization(K8S) == build_kustomization(DEFAULT_OVERLAY)
    kinds = {doc["kind"] for doc in build_kustomization(K8S)}
    assert {"RayJob", "RayCronJob", "Deployment", "StatefulSet", "NetworkPolicy", "Job"} <= kinds
    assert "kubectl apply -k k8s/" in (PROJECT_ROOT / "README.md").read_text()


def built_images(directory: Path) -> set[str]:
    return {c["image"] for doc in build_kustomization(directory) for c in containers(doc)}


@pytest.mark.parametrize("overlay", overlays(PROJECT_ROOT), ids=lambda p: p.name)
def test_every_overlay_pins_every_image(overlay: Path) -> None:
    """Each image the overlay deploys is named in its `images:` with a digest or a release tag; the build
    carries it. A digest that cannot exist yet (zeros) is no pin: tags until `kustomize edit set image`."""
    pins = yaml.safe_load((overlay / "kustomization.yaml").read_text())["images"]
    by_name = {pin["name"]: pin for pin in pins}
    assert len(by_name) == len(pins)
    for name, pin in by_name.items():
        assert set(pin) <= {"name", "newName", "newTag", "digest"}, pin
        if "digest" in pin:
            assert PINNED_DIGEST.fullmatch(pin["digest"]) and len(set(pin["digest"][7:])) > 1, pin
        else:
            assert PINNED_TAG.fullmatch(str(pin.get("newTag", ""))), f"{overlay.name}: {name} is not pinned: {pin}"
    for image in built_images(overlay):
        name, tag, digest = split_image(image)
        assert name in by_name, f"{overlay.name}: {image} is deployed but not pinned in its images:"
        assert digest == by_name[name].get("digest", "") and tag == ("" if digest else by_name[name]["newTag"])


def test_default_overlay_pins_the_versions_the_images_are_built_from() -> None:
    import mlflow

    pins = {p["name"]: p for p in yaml.safe_load((DEFAULT_OVERLAY / "kustomization.yaml").read_text())["images"]}
    version = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pins["ghcr.io/clipflow/clipflow"]["newTag"] == version
    assert pins["ghcr.io/clipflow/mlflow"]["newTag"] == mlflow.__version__
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "kustomize edit set image" in readme


# --- the offline kustomize build is kustomize's ---------------------------------------------------------

def write_kustomization(directory: Path, spec: dict[str, Any], **files: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    for name, docs in files.items():
        (directory / name.replace("__", ".")).write_text(yaml.safe_dump_all(docs if isinstance(docs, list) else [docs]))
    return directory


DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "other"},
              "spec": {"template": {"spec": {"containers": [
                  {"name": "app", "image": "reg.example:5000/app:1.0", "env": [{"name": "A", "value": "1"}],
                   "resources": {"limits": {"cpu": "1"}}},
                  {"name": "side", "image": "busybox@sha256:" + "ab" * 32}]}}}}
BINDING = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "b"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
           "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "default"}]}


def test_offline_build_merges_patches_sets_namespace_labels_and_images(tmp_path: Path) -> None:
    base = write_kustomization(tmp_path / "base", {"resources": ["app__yaml"]}, app__yaml=[DEPLOYMENT, BINDING])
    (base / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["app.yaml"]}))
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
             "spec": {"template": {"spec": {"containers": [
                 {"name": "app", "env": [{"name": "B", "value": "2"}], "resources": {"limits": {"memory": "1Gi"}}},
                 {"name": "new", "image": "app"}]}}}}
    overlay = write_kustomization(tmp_path / "overlay", {
        "resources": ["../base"], "namespace": "clipflow", "patches": [{"path": "patch.yaml"}],
        "labels": [{"pairs": {"team": "ml"}}],
        "images": [{"name": "reg.example:5000/app", "newTag": "2.0"}, {"name": "app", "newName": "reg.example/app",
                                                                       "digest": "sha256:" + "cd" * 32}]},
        patch__yaml=patch)
    deployment, binding = build_kustomization(overlay)
    app, side, new = deployment["spec"]["template"]["spec"]["containers"]
    assert [v["name"] for v in app["env"]] == ["A", "B"]  # merged by name, not replaced
    assert app["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    assert app["image"] == "reg.example:5000/app:2.0" and side["image"] == DEPLOYMENT["spec"]["template"]["spec"][
        "containers"][1]["image"]
    assert new["image"] == "reg.example/app@sha256:" + "cd" * 32
    assert deployment["metadata"]["namespace"] == "clipflow" and deployment["metadata"]["labels"] == {"team": "ml"}
    assert binding["subjects"][0]["namespace"] == "clipflow"


def test_offline_build_replaces_custom_resource_lists_as_kustomize_does(tmp_path: Path) -> None:
    job = _rayjob()
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    patch = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": job["metadata"]["name"]},
             "spec": {"rayClusterSpec": {"workerGroupSpecs": [{**groups[0], "maxReplicas": 1}]}}}
    overlay = write_kustomization(tmp_path / "o", {"resources": ["job.yaml"], "patches": [{"path": "p.yaml"}]},
                                  job__yaml=job, p__yaml=patch)
    (built,) = build_kustomization(overlay)
    assert built["spec"]["rayClusterSpec"]["workerGroupSpecs"] == [{**groups[0], "maxReplicas": 1}]


@pytest.mark.parametrize("spec, files, message", [
    ({"resources": ["a.yaml"], "configMapGenerator": []}, {"a__yaml": BINDING}, "not supported by this offline build"),
    ({"resources": ["../outside.yaml"]}, {}, "outside"),
    ({"resources": ["a.yaml", "b.yaml"]}, {"a__yaml": BINDING, "b__yaml": BINDING}, "defined more than once"),
    ({"resources": ["a.yaml"], "patches": [{"path": "p.yaml", "target": {"kind": "RoleBinding"}}]},
     {"a__yaml": BINDING, "p__yaml": BINDING}, "exactly one of path/patch"),
    ({"resources": ["a.yaml"], "patches": [{"patch": "- {op: remove, path: /subjects}"}]}, {"a__yaml": BINDING},
     "JSON 6902 patches are not supported"),
    ({"resources": ["a.yaml"], "patches": [{"patch": "{kind: RoleBinding, metadata: {name: nope}}"}]},
     {"a__yaml": BINDING}, "matches 0 objects"),
    ({"resources": ["a.yaml"], "labels": [{"pairs": {"x": "y"}, "includeSelectors": True}]}, {"a__yaml": BINDING},
     "not supported by this build"),
])
def test_offline_build_refuses_what_it_does_not_implement(tmp_path: Path, spec: dict, files: dict,
                                                          message: str) -> None:
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(BINDING))
    directory = write_kustomization(tmp_path / "k", spec, **files)
    with pytest.raises(UserError, match=message):
        build_kustomization(directory)


# --- the operator runs what the manifests need ---------------------------------------------------------

def helm_install_command() -> list[str]:
    """README's `helm install kuberay-operator ...` (step 1) as argv, line continuations joined."""
    text = (PROJECT_ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("helm install kuberay-operator ")]
    return shlex.split(line, comments=True)


def test_operator_install_enables_the_feature_gates_the_manifests_need() -> None:
    needed = {GATED_KINDS[doc["kind"]] for _, doc in all_docs() if doc["kind"] in GATED_KINDS}
    assert needed, "no gated kind shipped: is raycronjob-eval.yaml gone?"
    argv = helm_install_command()
    assert not [a for a in argv if "featureGates" in a], "--set featureGates[N]... replaces the chart's whole list"
    values_files = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("-f", "--values")]
    assert values_files == [OPERATOR_VALUES.relative_to(PROJECT_ROOT).as_posix()]
    gates = yaml.safe_load(OPERATOR_VALUES.read_text())["featureGates"]
    assert all(set(g) == {"name", "enabled"} and isinstance(g["enabled"], bool) for g in gates), gates
    names = [g["name"] for g in gates]
    assert len(names) == len(set(names))
    enabled = {g["name"] for g in gates if g["enabled"]}
    assert needed <= enabled, f"{OPERATOR_VALUES.name} leaves off the feature gates {sorted(needed - enabled)}"
    # The list replaces the chart's own, so it must repeat that chart version's defaults: bumping the
    # chart in the README without revisiting the values file fails here.
    version = argv[argv.index("--version") + 1]
    assert f"chart {version}" in OPERATOR_VALUES.read_text()


# --- cross-file consistency ---------------------------------------------------------------------------

def test_ray_version_is_the_pinned_ray() -> None:
    cluster_versions = {doc["spec"]["rayVersion"] for _, doc in all_docs() if doc["kind"] == "RayCluster"}
    cluster_versions |= {spec["rayClusterSpec"]["rayVersion"] for _, spec in ray_jobs()}
    assert cluster_versions == {ray.__version__}
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.*]+)"', pyproject).group(1)
    assert re.fullmatch(pin.replace(".", r"\.").replace("*", r"\d+"), ray.__version__)
    base = re.search(r"^FROM (\S+)", (PROJECT_ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_one_project_image_everywhere() -> None:
    images = {c["image"] for _, doc in all_docs() if doc["kind"].startswith("Ray") for c in containers(doc)}
    configs = {load_config(PROJECT_ROOT / c).k8s.image for c in referenced_configs()}
    assert len(images) == 1 and images == configs


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def pip_installs(path: Path) -> list[list[str]]:
    """argv of every `pip install` the Dockerfile's RUN steps execute, in order."""
    out = []
    for instruction, args in dockerfile_instructions(path):
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)  # quotes kept, `&&`, `(` ... split off
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "(", ")", "|"):
                if argv[:2] == ["pip", "install"]:
                    out.append(argv[2:])
                argv = []
            else:
                argv.append(token)
    return out


def test_image_installs_the_project_as_users_do_on_the_images_torch() -> None:
    """Not editable, with the gpu extra, and no torch that pip picks: torch, numpy and ray are constraints
    taken from the image, torch present in them (the image's, else TORCH_VERSION installed by name first)."""
    dockerfile = PROJECT_ROOT / "Dockerfile"
    installs = pip_installs(dockerfile)
    (project,) = [argv for argv in installs if any(a.startswith(".") for a in argv)]
    assert project[-1] == ".[gpu]" and not {"-e", "--editable"} & set(project)
    constraints = project[project.index("-c") + 1]
    run = " ".join(args for instruction, args in dockerfile_instructions(dockerfile) if instruction == "RUN")
    assert f"grep -iE '^(torch|numpy|ray)==' > {constraints}" in run
    assert f"grep -q '^torch==' {constraints}" in run, "the build must fail rather than let pip pick a torch"
    torch_installs = [argv for argv in installs if any(a.startswith("torch") for a in argv)]
    assert torch_installs == [["--no-cache-dir", "torch==${TORCH_VERSION}"]]
    assert installs.index(torch_installs[0]) < installs.index(project)
    for argv in installs:  # anything else brings no dependencies, so no torch either
        assert argv in (project, torch_installs[0]) or "--no-deps" in argv, argv
    args = dict(a.split("=", 1) for i, a in dockerfile_instructions(dockerfile) if i == "ARG")
    makefile_pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == makefile_pin
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r for r in extras["gpu"] if r.startswith("nvidia-ml-py")], extras["gpu"]


def test_mlflow_image_matches_pinned_mlflow() -> None:
    import mlflow

    dockerfile = (K8S / "mlflow.Dockerfile").read_text()
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:v(\S+)$", dockerfile, re.M).group(1) == mlflow.__version__
    deployment = mlflow_docs()["Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{mlflow.__version__}")
    assert f"-t {container['image']}" in dockerfile  # the build command produces the deployed tag
    args = " ".join(container["args"])
    assert "--artifacts-destination=s3://" in args and "backend-store-uri" not in args
    env = {var["name"]: var for var in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://$(DB_USER):$(DB_PASSWORD)@")
    assert {"readinessProbe", "livenessProbe"} <= set(container)


def test_mlflow_reads_its_backend_store_uri_from_the_environment() -> None:
    """`mlflow server --backend-store-uri` takes MLFLOW_BACKEND_STORE_URI, which is how the URI stays out of argv."""
    from mlflow.cli import server

    (option,) = [p for p in server.params if p.name == "backend_store_uri"]
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


def referenced_configs() -> set[str]:
    """Config paths named by the entrypoints of the shipped RayJobs."""
    out = set()
    for _, spec in ray_jobs():
        argv = shlex.split(spec["entrypoint"])
        out.add(argv[argv.index("--config") + 1])
    return out


def test_entrypoints_are_real_clipflow_commands() -> None:
    assert ray_jobs()
    for path, spec in ray_jobs():
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "clipflow" and argv[1] in COMMANDS, f"{path}: {spec['entrypoint']}"
        args = build_parser(argv[1]).parse_args(argv[1:])  # the stage's own parser accepts the flags
        assert (PROJECT_ROOT / args.config).is_file(), f"{path}: config {args.config} does not exist"
        cfg = load_config(PROJECT_ROOT / args.config, args.overrides)
        assert cfg.k8s.namespace == "clipflow"


def test_configs_track_to_the_in_cluster_mlflow_service() -> None:
    service = mlflow_docs()["Service"]
    port = service["spec"]["ports"][0]["port"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    for config in referenced_configs():
        assert load_config(PROJECT_ROOT / config).mlflow.tracking_uri == \
            f"http://{name}.{namespace}.svc.cluster.local:{port}"


def test_every_secret_reference_has_a_template_and_no_value_is_committed() -> None:
    templates: dict[str, set[str]] = {}
    for path in SECRET_TEMPLATES:
        (secret,) = load_documents(path)
        assert secret["kind"] == "Secret" and "data" not in secret
        assert all(value == "" for value in secret["stringData"].values()), f"{path} holds a value"
        templates[secret["metadata"]["name"]] = set(secret["stringData"])
    refs = {ref for _, doc in all_docs() for ref in secret_refs(doc)}
    assert refs, "no secretKeyRef found"
    for name, key in refs:
        assert key in templates.get(name, set()), f"secretKeyRef {name}/{key} has no template"
    for _, doc in all_docs():
        if doc["kind"] == "Secret":
            assert all(v == "" for v in doc.get("stringData", {}).values()) and not doc.get("data")


def test_gpu_workers_request_gpus_and_tolerate_gpu_nodes() -> None:
    group = _gpu_group(_cluster())
    pod = group["template"]["spec"]
    assert gpus_of(group) > 0 and pod["nodeSelector"] and pod["tolerations"]
    cpu_groups = [g for g in _cluster()["spec"]["workerGroupSpecs"] if not gpus_of(g)]
    assert len(cpu_groups) == 1 and cpu_groups[0]["maxReplicas"] > 0


# --- clipflow k8s render ------------------------------------------------------------------------------

GENERATED = sorted(p for p in K8S.rglob("ray*job-*.yaml"))


@pytest.mark.parametrize("path", GENERATED, ids=lambda p: p.name)
def test_committed_jobs_are_the_render_output(path: Path, tmp_path: Path) -> None:
    """Each generated file names its command in line 1; re-running it reproduces the file."""
    header = path.read_text().splitlines()[0]
    command = re.fullmatch(r"# Generated by `(clipflow k8s render .*)`;.*", header).group(1)
    argv = shlex.split(command)[1:]
    out = tmp_path / "out.yaml"
    argv = [a if not a.startswith("configs/") else str(PROJECT_ROOT / a) for a in argv]
    assert main([*argv, "--output", str(out)]) == 0
    assert load_documents(out) == load_documents(path), f"{path} is stale: re-run `{command}`"


def test_render_takes_sizes_image_and_namespace_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    config = PROJECT_ROOT / "configs" / "vit_b32_laion400m.yaml"
    assert main(["k8s", "render", "--config", str(config), "--set", "scaling.min_workers=9",
                 "--set", "scaling.max_workers=20", "--set", "k8s.image=registry.example/clip:7",
                 "--set", "k8s.namespace=research"]) == 0
    (doc,) = yaml.safe_load_all(capsys.readouterr().out)
    assert validate_manifest(doc) == []
    assert doc["metadata"]["namespace"] == "research"
    assert shlex.split(doc["spec"]["entrypoint"]) == [
        "clipflow", "train", "--run-id", "vit-b32-laion400m-train",  # retries of the job continue one run
        "--config", "configs/vit_b32_laion400m.yaml", "--set", "scaling.min_workers=9",
        "--set", "scaling.max_workers=20", "--set", "k8s.image=registry.example/clip:7",
        "--set", "k8s.namespace=research"]
    spec = doc["spec"]["rayClusterSpec"]
    gpu = _gpu_group({"spec": spec})
    per_pod = gpus_of(gpu)
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (
        -(-9 // per_pod), -(-9 // per_pod), -(-20 // per_pod))
    assert {c["image"] for c in containers(doc)} == {"registry.example/clip:7"}


def test_render_stages_size_the_gpu_group() -> None:
    config = PROJECT_ROOT / "configs" / "vit_b32_laion400m.yaml"
    cfg = load_config(config)
    pre = k8s_render.render(cfg, str(config), "preprocess")
    assert not [g for g in pre["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpus_of(g)]
    assert shlex.split(pre["spec"]["entrypoint"])[:2] == ["clipflow", "preprocess"]
    ev = k8s_render.render(cfg, str(config), "eval", schedule="0 * * * *")
    assert ev["kind"] == "RayCronJob" and validate_manifest(ev) == []
    gpu = _gpu_group({"spec": ev["spec"]["jobTemplate"]["rayClusterSpec"]})
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (0, -(-cfg.eval.num_actors // gpus_of(gpu)))
    assert "--pending" in shlex.split(ev["spec"]["jobTemplate"]["entrypoint"])
    cpu_cfg = load_config(config, ["scaling.use_gpu=false"])
    train = k8s_render.render(cpu_cfg, str(config), "train", ["scaling.use_gpu=false"])
    assert not [g for g in train["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpus_of(g)]


def test_the_train_job_names_its_run_so_that_retries_continue_it(capsys: pytest.CaptureFixture[str]) -> None:
    config = PROJECT_ROOT / "configs" / "vit_b32_laion400m.yaml"
    cfg = load_config(config)
    entrypoint = lambda doc: shlex.split(doc["spec"]["entrypoint"])  # noqa: E731
    default = entrypoint(k8s_render.render(cfg, str(config), "train"))
    assert default[2:4] == ["--run-id", k8s_render.job_name(cfg, "train")] == ["--run-id", "vit-b32-laion400m-train"]
    assert entrypoint(k8s_render.render(cfg, str(config), "train", run_id="vit-b32-try2"))[2:4] == [
        "--run-id", "vit-b32-try2"]
    own = load_config(config, ["train.run_id=mine"])  # the config's own run id: carried by the --set
    assert "--run-id" not in entrypoint(k8s_render.render(own, str(config), "train", ["train.run_id=mine"]))
    assert "--run-id" not in entrypoint(k8s_render.render(cfg, str(config), "preprocess"))
    assert main(["k8s", "render", "--config", str(config), "--run-id", "x/y"]) == 2
    assert "train.run_id 'x/y' must be 1 to 100 letters" in capsys.readouterr().err
    assert main(["k8s", "render", "--config", str(config), "--stage", "eval", "--run-id", "r"]) == 2
    assert "--run-id only applies to --stage train" in capsys.readouterr().err
    assert main(["k8s", "render", "--config", str(config), "--run-id", "r2", "--suspend"]) == 0
    out = capsys.readouterr().out
    assert "--suspend --run-id r2`" in out.splitlines()[0]  # the header's command reproduces the file
    (doc,) = yaml.safe_load_all(out)
    assert entrypoint(doc)[2:4] == ["--run-id", "r2"]


def test_render_rejects_a_config_the_cluster_cannot_see(tmp_path: Path, capsys) -> None:
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    assert main(["k8s", "render", "--config", str(outside)]) == 2
    assert "outside the project" in capsys.readouterr().err
    with pytest.raises(UserError, match="longer than"):
        k8s_render.render(load_config(None, ["name=" + "x" * 60]), None, "train")
