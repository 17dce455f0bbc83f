"""Offline checks for the Kubernetes manifests: what `kubectl apply` and the KubeRay operator would reject.

No API server runs in CI, so manifests are validated against schemas instead:

- core kinds (Deployment, CronJob, Secret, RBAC, ...) against the pinned Kubernetes release's schema
  (`kubernetes-validate`, strict: unknown fields are errors, as with `kubectl apply --validate=strict`).
  It bundles the schemas of many Kubernetes releases (~100 MB), so it is a dev dependency, imported only
  when a core kind is validated: `clipflow k8s render` writes KubeRay kinds only;
- KubeRay kinds (RayCluster, RayJob, RayCronJob) against the v1 CRDs' openAPIV3Schema vendored in
  ``workflows/ops/kuberay_schemas/`` (package data, so any install validates) — made strict the same way,
  since the API server's field validation rejects fields a structural schema does not declare;
- semantic rules the schemas cannot express but the operator or this project relies on (the head runs
  no training, worker ranges are ordered, every container declares requests and limits, ...), among
  them the security rules: Ray token auth on every Ray cluster, every pod within the "restricted" Pod
  Security Standard the namespace enforces, no Secret expanded into a command line, and the labels the
  NetworkPolicies select pods by.

Every check returns a list of readable errors (``where: what``) so one run reports all of them.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

from workflows.common.errors import UserError
from workflows.ops.project import project_root
from workflows.train.preemption import STOP_WAIT_S

KUBERNETES_VERSION = "1.32.0"  # oldest Kubernetes minor still supported upstream when this was pinned
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
# RayJob.spec.submissionMode is a free string in the CRD; the operator accepts only these.
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
# What k8s/base/networkpolicies.yaml selects clipflow's pods by: a pod without it can reach nothing.
PART_OF = {"app.kubernetes.io/part-of": "clipflow"}
SUBMITTER_LABELS = {**PART_OF, "app.kubernetes.io/component": "ray-job-submitter"}
# The operator sets these from authOptions only in containers that do not set them, so a container's own win.
OPERATOR_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
# Volume types the "restricted" Pod Security Standard allows (no hostPath, no network filesystems).
RESTRICTED_VOLUME_TYPES = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret")
MAX_INT32 = 2**31 - 1
# Where Kubernetes clients (the autoscaler's among them) read the pod's ServiceAccount token, CA and namespace.
API_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# A Kubernetes $(VAR) reference; $$ escapes it.
_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
# A Train worker pod's preStop hook: drain its own node for preemption, so Ray Train checkpoints, and live until the
# deadline (workflows.train.preemption). After the hook, Ray itself needs this long within the grace period to stop.
PREEMPTION_DRAIN = re.compile(r"ray drain-node .*--reason DRAIN_NODE_REASON_PREEMPTION\b.*"
                              r"--deadline-remaining-seconds (\d+) && sleep (\d+)", re.S)
RAY_STOP_MARGIN_S = 20
# The head pod's preStop hook (workflows.ops.stop_jobs): stop the jobs whose drivers run there, wait up to N s.
HEAD_STOP_HOOK = re.compile(r"\bpython -m workflows\.ops\.stop_jobs\b.*--deadline-seconds (\d+)\b")
JOB_STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's job supervisor: SIGKILL this long after a job's SIGTERM


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a manifest file."""
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


@functools.cache
def kuberay_schema(kind: str) -> dict[str, Any]:
    """The vendored CRD schema for ``kind``, with undeclared fields made errors."""
    path = resources.files("workflows.ops").joinpath("kuberay_schemas", f"{kind.lower()}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; regenerate with k8s/schemas/vendor_kuberay.py")
    schema = json.loads(path.read_text())
    schema.pop("$comment", None)
    return _strict(schema)


def _strict(node: Any) -> Any:
    """Objects with declared properties accept no others, unless marked to preserve unknown fields."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_manifest(doc: dict[str, Any], where: str = "") -> list[str]:
    """Schema errors plus semantic errors for one manifest document."""
    where = where or f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"
    kind = doc.get("kind")
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        if doc["apiVersion"] != "ray.io/v1" or kind not in KUBERAY_KINDS:
            return [f"{where}: unsupported KubeRay kind {doc.get('apiVersion')}/{kind}"]
        errors = _schema_errors(kuberay_schema(kind), doc, where)
        if errors:  # the semantic rules below assume well-typed input
            return errors
        if kind == "RayCluster":
            errors += check_ray_cluster_spec(doc.get("spec", {}), f"{where}.spec")
        elif kind == "RayJob":
            errors += check_ray_job_spec(doc.get("spec", {}), f"{where}.spec")
        else:
            errors += check_ray_job_spec(doc.get("spec", {}).get("jobTemplate", {}), f"{where}.spec.jobTemplate")
        return errors
    errors = _core_errors(doc, where)
    if errors:
        return errors
    for path, pod in pod_specs(doc):
        errors += check_pod_spec(pod, f"{where}.{path}")
    return errors


def _schema_errors(schema: dict[str, Any], doc: dict[str, Any], where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _core_errors(doc: dict[str, Any], where: str) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        raise UserError(f"{where}: validating core Kubernetes kinds needs kubernetes-validate: "
                        "pip install 'clipflow[dev]'") from None
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path)) or "<root>"
        return [f"{where}: {path}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: no Kubernetes {KUBERNETES_VERSION} schema: {exc.message}"]
    return []


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodSpec) for every pod template a core workload creates."""
    spec = doc.get("spec", {})
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "spec.template.spec", spec.get("template", {}).get("spec", {})
    elif kind == "CronJob":
        yield ("spec.jobTemplate.spec.template.spec",
               spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {}))
    elif kind == "Pod":
        yield "spec", spec


def check_pod_spec(pod: dict[str, Any], where: str, read_only_root: bool = True) -> list[str]:
    """Requests and limits everywhere; the "restricted" Pod Security Standard; read-only root where asked;
    Secrets kept out of argv."""
    errors = _check_pod_restricted(pod, where)
    pod_ctx = pod.get("securityContext", {})
    for group in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(group, [])):
            at = f"{where}.{group}[{i}]({c.get('name')})"
            errors += _check_container(c, pod_ctx, at, read_only_root)
            errors += _check_env_references(c, at)
    return errors


def _check_pod_restricted(pod: dict[str, Any], where: str) -> list[str]:
    """The pod-level rules of the "restricted" Pod Security Standard (the namespace rejects such pods)."""
    errors = [f"{where}.{key}: host namespaces are not allowed (restricted Pod Security Standard)"
              for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kinds = sorted(set(volume) - {"name"})
        if not set(kinds) <= set(RESTRICTED_VOLUME_TYPES):
            errors.append(f"{where}.volumes({volume.get('name')}): {', '.join(kinds)} volumes are not allowed "
                          f"(restricted Pod Security Standard); use one of {list(RESTRICTED_VOLUME_TYPES)}")
    if pod.get("securityContext", {}).get("runAsUser") == 0:
        errors.append(f"{where}.securityContext.runAsUser: 0 (root) is not allowed")
    return errors


def _check_container(c: dict[str, Any], pod_ctx: dict[str, Any], at: str, read_only_root: bool = True) -> list[str]:
    """One container against the project's rules and the restricted Pod Security Standard; a container's
    securityContext overrides its pod's."""
    errors = []
    res = c.get("resources", {})
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in res.get(section, {}):
                errors.append(f"{at}: resources.{section}.{resource} is not set")
    ctx = c.get("securityContext", {})
    if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
        errors.append(f"{at}: runAsNonRoot is not true")
    if ctx.get("runAsUser") == 0:
        errors.append(f"{at}: securityContext.runAsUser: 0 (root) is not allowed")
    seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        errors.append(f"{at}: seccompProfile.type must be RuntimeDefault (pod or container)")
    if ctx.get("privileged"):
        errors.append(f"{at}: securityContext.privileged is not allowed")
    if ctx.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{at}: securityContext.allowPrivilegeEscalation must be false")
    capabilities = ctx.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []):
        errors.append(f"{at}: securityContext.capabilities.drop must include ALL")
    if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
        errors.append(f"{at}: securityContext.capabilities.add may hold only NET_BIND_SERVICE "
                      "(restricted Pod Security Standard)")
    if any(port.get("hostPort") for port in c.get("ports", [])):
        errors.append(f"{at}: hostPort is not allowed: expose the port through a Service")
    if read_only_root and ctx.get("readOnlyRootFilesystem") is not True:
        errors.append(f"{at}: securityContext.readOnlyRootFilesystem must be true")
    return errors


def _check_env_references(c: dict[str, Any], at: str) -> list[str]:
    """No Secret-derived $(VAR) in command/args: argv is readable by every process on the node (`ps`,
    /proc/PID/cmdline), the environment is not. And $(VAR) in env must name a variable defined before it,
    or Kubernetes passes the text on literally."""
    errors = []
    env_from = c.get("envFrom", [])
    secret_from_env_from = any("secretRef" in source for source in env_from)
    defined: set[str] = set()
    secret: set[str] = set()

    def is_secret(name: str) -> bool:
        return name in secret or (name not in defined and secret_from_env_from)

    for var in c.get("env", []):
        refs = _references(str(var.get("value", "")))
        for ref in refs:
            if ref not in defined and not env_from:
                errors.append(f"{at}: env {var['name']} refers to $({ref}), which no env entry before it defines "
                              f"(Kubernetes would pass the text on literally): define {ref} above it")
        if "secretKeyRef" in var.get("valueFrom", {}) or any(is_secret(ref) for ref in refs):
            secret.add(var["name"])
        defined.add(var["name"])
    for field in ("command", "args"):
        for arg in c.get(field, []):
            leaked = [ref for ref in _references(str(arg)) if is_secret(ref)]
            if leaked:
                errors.append(f"{at}.{field}: $({leaked[0]}) expands a Secret into the command line, where every "
                              "process on the node can read it; pass it in an env var the program reads instead "
                              "(e.g. MLFLOW_BACKEND_STORE_URI for `mlflow server`)")
    return errors


def _references(text: str) -> list[str]:
    """The variable names of the $(VAR) references in ``text`` (escaped $$(VAR) excluded)."""
    return [m.group(1) for m in _VAR_REFERENCE.finditer(text) if m.group(1)]


def ray_groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, group) for the head group and every worker group of a RayClusterSpec."""
    yield "headGroupSpec", spec.get("headGroupSpec", {})
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        yield f"workerGroupSpecs[{i}]({group.get('groupName')})", group


def gpus_of(group: dict[str, Any]) -> int:
    """GPUs one pod of the group asks for (``nvidia.com/gpu`` limits of its containers)."""
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers)


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> list[str]:
    """What the operator and this project need beyond the schema."""
    errors = []
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append(f"{where}.enableInTreeAutoscaling must be true (worker groups autoscale)")
    head = spec.get("headGroupSpec", {})
    params = head.get("rayStartParams", {})
    if params.get("num-gpus") != "0" or gpus_of(head):
        errors.append(f"{where}.headGroupSpec: the head must have no GPUs (rayStartParams num-gpus: \"0\", "
                      "no nvidia.com/gpu) so no training is scheduled on it")
    if params.get("num-cpus") != "0":
        errors.append(f"{where}.headGroupSpec: rayStartParams num-cpus must be \"0\" so no tasks land on the head")
    if spec.get("authOptions", {}).get("mode") != "token":
        errors.append(f"{where}.authOptions: set {{mode: token}}: without it anyone who reaches the head's "
                      "dashboard (8265) can submit jobs, and they run with the pods' S3 credentials")
    errors += _check_autoscaler(spec, where)
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for path, group in ray_groups(spec):
        at = f"{where}.{path}"
        if path != "headGroupSpec":
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            replicas = group.get("replicas", low)
            if not 0 <= low <= replicas <= high:
                errors.append(f"{at}: need 0 <= minReplicas ({low}) <= replicas ({replicas}) <= maxReplicas ({high})")
        template = group.get("template", {})
        pod = template.get("spec", {})
        errors += _check_network_labels(template, f"{at}.template", PART_OF)
        errors += _check_auth_env(pod.get("containers", []), f"{at}.template.spec")
        # Ray writes its session, spill and runtime-env files next to the image's Python under /home/ray
        # and /tmp, so Ray pods keep a writable root filesystem; everything else is still enforced.
        errors += check_pod_spec(pod, f"{at}.template.spec", read_only_root=False)
        errors += _check_shm(pod, at)
        if path == "headGroupSpec":
            errors += _check_head_stop_hook(pod, at)
        if gpus_of(group):
            errors += _check_preemption_notice(pod, at)
        for gpu_container in pod.get("containers", []):
            res = gpu_container.get("resources", {})
            if res.get("limits", {}).get("nvidia.com/gpu") != res.get("requests", {}).get("nvidia.com/gpu"):
                errors.append(f"{at}: nvidia.com/gpu requests and limits must be equal")
    return errors


def _check_preemption_notice(pod: dict[str, Any], at: str) -> list[str]:
    """A GPU (Train) pod that is evicted or reclaimed tells Ray before it dies, and lives long enough for the
    stop checkpoint: a preStop hook that drains its node with a deadline and waits it out, inside the grace period."""
    hooks = [" ".join(map(str, c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])))
             for c in pod.get("containers", [])]
    found = next((m for m in map(PREEMPTION_DRAIN.search, hooks) if m), None)
    if found is None:
        return [f"{at}: a Train worker container needs a preStop hook `ray drain-node --reason "
                f"DRAIN_NODE_REASON_PREEMPTION --reason-message ... --deadline-remaining-seconds N && sleep N`, so an "
                f"evicted pod lets Ray Train checkpoint before it dies (see ray_cluster.yaml)"]
    deadline, wait = int(found.group(1)), int(found.group(2))
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    if wait < deadline or wait + RAY_STOP_MARGIN_S > grace:
        return [f"{at}: the preStop hook must wait out its drain deadline ({deadline} s; it sleeps {wait} s) and leave "
                f"Ray {RAY_STOP_MARGIN_S} s to stop within terminationGracePeriodSeconds ({grace}): set it to at least "
                f"{max(deadline, wait) + RAY_STOP_MARGIN_S}"]
    return []


def _check_head_stop_hook(pod: dict[str, Any], at: str) -> list[str]:
    """The head pod runs the job drivers: deleted or evicted, it first stops its jobs gracefully (their drivers get
    SIGTERM; clipflow train saves a stop checkpoint) and waits for them, past the driver's own stop wait and inside the
    grace period; and Ray's job supervisor must not SIGKILL a driver before that wait is over."""
    container = (pod.get("containers") or [{}])[0]  # the Ray container (the operator's convention)
    hook = " ".join(map(str, container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])))
    found = HEAD_STOP_HOOK.search(hook)
    if found is None:
        return [f"{at}: the head container needs a preStop hook `python -m workflows.ops.stop_jobs --deadline-seconds "
                f"N`, so a deleted or evicted head pod stops its jobs gracefully (a stop checkpoint) instead of "
                f"SIGKILLing their drivers (see ray_cluster.yaml)"]
    deadline = int(found.group(1))
    grace = pod.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    errors = []
    if deadline < STOP_WAIT_S:
        errors.append(f"{at}: the head's stop hook waits {deadline} s, less than a stopped driver may take to save its "
                      f"stop checkpoint ({STOP_WAIT_S:.0f} s): set --deadline-seconds to at least {STOP_WAIT_S:.0f}")
    if deadline + RAY_STOP_MARGIN_S > grace:
        errors.append(f"{at}: the head's stop hook ({deadline} s) must leave Ray {RAY_STOP_MARGIN_S} s to stop within "
                      f"terminationGracePeriodSeconds ({grace}): set it to at least {deadline + RAY_STOP_MARGIN_S}")
    wait = next((str(v.get("value", "")) for v in container.get("env", []) if v.get("name") == JOB_STOP_WAIT_ENV), "")
    if not wait.isdigit() or int(wait) < deadline:
        errors.append(f"{at}: set env {JOB_STOP_WAIT_ENV} to at least the stop hook's {deadline} s in the head "
                      f"container (it has {wait or 'none'}; Ray's job supervisor SIGKILLs a stopped driver after it, "
                      f"3 s by default, before its stop checkpoint)")
    return errors


def _check_autoscaler(spec: dict[str, Any], where: str) -> list[str]:
    """The autoscaler sidecar the operator adds to the head pod runs under the same Pod Security Standard;
    it takes its securityContext, resources and env from autoscalerOptions."""
    if spec.get("enableInTreeAutoscaling") is not True:
        return []
    options = spec.get("autoscalerOptions", {})
    container = {"name": "autoscaler", "resources": options.get("resources", {}),
                 "securityContext": options.get("securityContext", {})}
    head = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    at = f"{where}.autoscalerOptions"
    return (_check_container(container, head.get("securityContext", {}), at)
            + _check_auth_env([{"name": "autoscaler", **options}], at) + _check_autoscaler_token(spec, where))


def _check_autoscaler_token(spec: dict[str, Any], where: str) -> list[str]:
    """The operator binds its autoscaler Role to the head pod's ServiceAccount, and the sidecar reads that
    account's token at API_TOKEN_DIR: it must be there for the autoscaler alone (not in the Ray container,
    where job drivers run), and no other pod may share the account (the binding would reach it too)."""
    head = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    at = f"{where}.headGroupSpec.template.spec"
    account = head.get("serviceAccountName")
    if not account or account == "default":
        return [f"{at}.serviceAccountName: set a ServiceAccount of the head's own (the operator binds the "
                "autoscaler's Role to it)"]
    errors = [f"{where}.{path}: uses the head's ServiceAccount {account!r}, which the operator binds to the "
              "autoscaler's Role; give the workers another account" for path, group in ray_groups(spec)
              if path != "headGroupSpec" and group.get("template", {}).get("spec", {}).get("serviceAccountName")
              == account]
    if head.get("automountServiceAccountToken") is not False:
        errors.append(f"{at}.automountServiceAccountToken: set false (an automounted token reaches the Ray "
                      "container too) and project the token into the autoscaler (autoscalerOptions.volumeMounts)")
    token_volumes = {v["name"] for v in head.get("volumes", []) if any(
        "serviceAccountToken" in source for source in v.get("projected", {}).get("sources", []))}
    mounts = spec.get("autoscalerOptions", {}).get("volumeMounts", [])
    if not any(m.get("name") in token_volumes and m.get("mountPath") == API_TOKEN_DIR for m in mounts):
        errors.append(f"{where}.autoscalerOptions.volumeMounts: mount a projected serviceAccountToken volume of the "
                      f"head pod at {API_TOKEN_DIR}: without it the autoscaler cannot call the Kubernetes API and "
                      "the worker groups never scale")
    for container in head.get("containers", []):
        if any(m.get("name") in token_volumes for m in container.get("volumeMounts", [])):
            errors.append(f"{at}.containers({container.get('name')}): mounts the API token; only the autoscaler "
                          "may (job drivers run in the Ray container)")
    return errors


def _check_auth_env(containers: list[dict[str, Any]], where: str) -> list[str]:
    """A container's own RAY_AUTH_MODE/RAY_AUTH_TOKEN would override what the operator sets from authOptions."""
    return [f"{where}({c.get('name')}): do not set {var['name']}: authOptions sets it, and a container's own value "
            "wins over the operator's (RAY_AUTH_MODE=disabled turns auth off)"
            for c in containers for var in c.get("env", []) if var.get("name") in OPERATOR_AUTH_ENV]


def _check_network_labels(template: dict[str, Any], where: str, labels: dict[str, str]) -> list[str]:
    """The pod template carries the labels k8s/base/networkpolicies.yaml admits its pods by."""
    have = template.get("metadata", {}).get("labels", {})
    missing = {k: v for k, v in labels.items() if have.get(k) != v}
    if not missing:
        return []
    return [(f"{where}.metadata.labels: add {missing}: k8s/base/networkpolicies.yaml selects pods by them, "
             "and a pod without them can reach nothing")]


def _check_shm(pod: dict[str, Any], where: str) -> list[str]:
    """/dev/shm must be a memory-backed emptyDir with a size (object store + NCCL need more than 64 MB)."""
    shm_volumes = {v["name"] for v in pod.get("volumes", [])
                   if v.get("emptyDir", {}).get("medium") == "Memory" and v["emptyDir"].get("sizeLimit")}
    ray_container = (pod.get("containers") or [{}])[0]
    mounts = {m.get("name") for m in ray_container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"}
    if not mounts & shm_volumes:
        return [f"{where}: mount a sized emptyDir (medium: Memory) at /dev/shm in the Ray container"]
    return []


def check_ray_job_spec(spec: dict[str, Any], where: str) -> list[str]:
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {mode!r} is not one of {list(SUBMISSION_MODES)}")
    has_spec, has_selector = bool(spec.get("rayClusterSpec")), bool(spec.get("clusterSelector"))
    if has_spec == has_selector:
        errors.append(f"{where}: set exactly one of rayClusterSpec and clusterSelector")
    if has_spec:
        errors += check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    if not spec.get("shutdownAfterJobFinishes") and (spec.get("ttlSecondsAfterFinished") or spec.get("suspend")):
        errors.append(f"{where}: ttlSecondsAfterFinished and suspend need shutdownAfterJobFinishes: true")
    if not str(spec.get("entrypoint", "")).strip():
        errors.append(f"{where}.entrypoint: empty")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and not 0 < deadline <= MAX_INT32:
        errors.append(f"{where}.activeDeadlineSeconds: {deadline} must be in 1..{MAX_INT32} (leave it out for "
                      "no deadline)")
    if spec.get("rayClusterSpec", {}).get("authOptions", {}).get("enableK8sTokenAuth"):
        errors.append(f"{where}.rayClusterSpec.authOptions.enableK8sTokenAuth: KubeRay supports it for "
                      "standalone RayClusters only; use mode: token")
    if mode == "K8sJobMode":
        errors += _check_submitter(spec.get("submitterPodTemplate"), f"{where}.submitterPodTemplate")
    return errors


def _check_submitter(template: dict[str, Any] | None, where: str) -> list[str]:
    """KubeRay's default submitter pod has no securityContext (the namespace's Pod Security Standard
    rejects it) and no labels (the NetworkPolicies block it), so K8sJobMode needs a template."""
    if template is None:
        return [(f"{where}: set it (`clipflow k8s render` does): the operator's default submitter pod is "
                 "neither restricted nor labelled for the NetworkPolicies")]
    return (_check_network_labels(template, where, SUBMITTER_LABELS)
            + check_pod_spec(template.get("spec", {}), f"{where}.spec", read_only_root=False))


# --- kustomize, offline ------------------------------------------------------------------------------------
#
# No kustomize binary (and no pure-Python kustomize) exists here, so `build_kustomization` resolves the subset
# of kustomize that k8s/ uses, the way `kustomize build` (v5) does, and refuses every other field instead of
# ignoring it, so a build here never silently differs from the cluster's:
# - resources: files inside the kustomization's directory (kustomize's load restrictor) or directories
#   holding a kustomization (built recursively, each with its own transformers first);
# - patches: strategic-merge patches (file `path:` or inline `patch:`), matched to one object by kind and
#   name. Maps merge key by key (null deletes); lists of core kinds merge by the Kubernetes merge keys
#   (STRATEGIC_MERGE_KEYS); every other list, and every list of a custom resource (KubeRay's kinds have
#   no merge keys for kustomize), is replaced whole;
# - namespace: set on every namespaced object and on ServiceAccount subjects of (Cluster)RoleBindings;
# - labels: `pairs` added to metadata.labels (not selectors, not templates);
# - images: `newName`, `newTag`, `digest` for every `containers`/`initContainers` image of that name at any
#   depth (kustomize's legacy image filter, which reaches the pods of a RayJob's rayClusterSpec too).

KUSTOMIZATION = "kustomization.yaml"
KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"})
# Kubernetes' patchMergeKey of the lists clipflow's core objects hold; lists not named here are replaced.
STRATEGIC_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
                        "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                            "PersistentVolume", "StorageClass", "PriorityClass"})


def build_kustomization(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kustomize build DIRECTORY` emits, for the subset of kustomize described above."""
    directory = Path(directory).resolve()
    spec = _read_kustomization(directory)
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += build_kustomization(path)
        else:
            docs += [copy.deepcopy(d) for d in load_documents(_inside(path, directory, "resource"))]
    ids = [_object_id(d) for d in docs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UserError(f"{directory / KUSTOMIZATION}: {' '.join(duplicates)} defined more than once")
    for i, patch in enumerate(spec.get("patches", [])):
        _apply_patch(docs, _patch_document(patch, directory, i), f"{directory / KUSTOMIZATION}: patches[{i}]")
    if spec.get("namespace"):
        for doc in docs:
            _set_namespace(doc, spec["namespace"])
    for label in spec.get("labels", []):
        if set(label) - {"pairs"}:
            raise UserError(f"{directory / KUSTOMIZATION}: labels {sorted(set(label) - {'pairs'})} are not "
                            "supported by this build (only pairs on metadata.labels)")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        for doc in docs:
            _set_images(doc, image)
    return docs


def kustomize_files(directory: str | Path) -> tuple[list[Path], list[Path]]:
    """(resource files, patch files) the kustomization at ``directory`` reads, its bases' included."""
    directory = Path(directory).resolve()
    spec = _read_kustomization(directory)
    resources_, patches = [], [directory / p["path"] for p in spec.get("patches", []) if "path" in p]
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            more_resources, more_patches = kustomize_files(path)
            resources_ += more_resources
            patches += more_patches
        else:
            resources_.append(path)
    return resources_, [p.resolve() for p in patches]


def _read_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise UserError(f"{directory}: no {KUSTOMIZATION}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise UserError(f"{path}: {unknown} not supported by this offline build (supported: "
                        f"{sorted(KUSTOMIZATION_FIELDS)}); extend k8s_checks.build_kustomization first")
    return spec


def _inside(path: Path, directory: Path, what: str) -> Path:
    """kustomize's load restrictor: a kustomization reads files only at or below its own directory."""
    if not path.is_relative_to(directory):
        raise UserError(f"{directory / KUSTOMIZATION}: {what} {path} is outside {directory} (kustomize refuses "
                        "files outside the kustomization's root; list its directory's kustomization instead)")
    if not path.is_file():
        raise UserError(f"{directory / KUSTOMIZATION}: {what} {path} not found")
    return path


def _object_id(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')}/{meta.get('namespace', '~')}/{meta.get('name')}"


def _patch_document(patch: dict[str, Any], directory: Path, index: int) -> dict[str, Any]:
    where = f"{directory / KUSTOMIZATION}: patches[{index}]"
    if set(patch) - {"path", "patch"} or len(patch) != 1:
        raise UserError(f"{where}: give exactly one of path/patch (targets, options and JSON 6902 patches are "
                        "not supported by this offline build)")
    if "path" in patch:
        text = _inside((directory / patch["path"]).resolve(), directory, "patch").read_text()
    else:
        text = patch["patch"]
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("metadata", {}).get("name"):
        raise UserError(f"{where}: a strategic-merge patch is one object with kind and metadata.name "
                        "(JSON 6902 patches are not supported by this offline build)")
    return doc


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any], where: str) -> None:
    name = patch["metadata"]["name"]
    targets = [i for i, d in enumerate(docs) if d.get("kind") == patch["kind"]
               and d.get("metadata", {}).get("name") == name]
    if len(targets) != 1:
        raise UserError(f"{where}: matches {len(targets)} objects ({patch['kind']}/{name}); it must match one")
    core = not str(docs[targets[0]].get("apiVersion", "")).startswith("ray.io/")
    docs[targets[0]] = _merge(docs[targets[0]], patch, core, where)


def _merge(base: Any, patch: Any, core: bool, where: str, key: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (both plain YAML data)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if any(k.startswith("$") for k in patch):
            raise UserError(f"{where}: directives ({[k for k in patch if k.startswith('$')]}) are not supported "
                            "by this offline build")
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base.get(k), v, core, where, k) if k in base else copy.deepcopy(v)
        return out
    merge_key = STRATEGIC_MERGE_KEYS.get(key) if core else None
    if isinstance(patch, list) and isinstance(base, list) and merge_key:
        out = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(out) if old.get(merge_key) == item.get(merge_key)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = _merge(out[at], item, core, where)
        return out
    return copy.deepcopy(patch)


def _set_namespace(doc: dict[str, Any], namespace: str) -> None:
    if doc.get("kind") not in CLUSTER_SCOPED:
        doc.setdefault("metadata", {})["namespace"] = namespace
    if doc.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
        for subject in doc.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference: ``registry:5000/app:1.0@sha256:...`` -> the three parts."""
    rest, _, digest = image.partition("@")
    name, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        name, tag = rest.rsplit(":", 1)
    return name, tag, digest


def _set_images(node: Any, image: dict[str, str]) -> None:
    """kustomize's images transformer (legacy filter): every containers/initContainers entry, at any depth."""
    if isinstance(node, list):
        for value in node:
            _set_images(value, image)
        return
    if not isinstance(node, dict):
        return
    for key in ("containers", "initContainers"):
        for container in node.get(key) or []:
            if isinstance(container, dict) and isinstance(container.get("image"), str):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                new_name = image.get("newName", name)
                if image.get("digest"):
                    container["image"] = f"{new_name}@{image['digest']}"
                elif image.get("newTag"):
                    container["image"] = f"{new_name}:{image['newTag']}"
                else:
                    container["image"] = new_name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    for value in node.values():
        _set_images(value, image)


# YAML under k8s/ that holds no Kubernetes object: the KubeRay operator's Helm values.
OPERATOR_VALUES = "kuberay-operator-values.yaml"
SECRET_TEMPLATES = "secrets/*.template.yaml"  # under k8s/: never applied, values created by hand (README)


def kustomizations(root: Path | None = None) -> list[Path]:
    """Every kustomization directory under k8s/ (k8s/ itself, base/, each overlay)."""
    root = root or project_root()
    return sorted(p.parent for p in (root / "k8s").rglob(KUSTOMIZATION))


def overlays(root: Path | None = None) -> list[Path]:
    """The deployable overlays, k8s/overlays/*/ (`kubectl apply -k k8s/overlays/NAME`)."""
    root = root or project_root()
    return sorted(p.parent for p in (root / "k8s" / "overlays").glob(f"*/{KUSTOMIZATION}"))


def manifest_files(root: Path | None = None) -> list[Path]:
    """Every file of whole Kubernetes objects the checkout ships: ray_cluster.yaml, the resources of every
    kustomization under k8s/ and the Secret templates (patches are partial objects: see build_kustomization)."""
    root = root or project_root()
    listed = {path for directory in kustomizations(root) for path in kustomize_files(directory)[0]}
    return [root / "ray_cluster.yaml", *sorted(listed | set((root / "k8s").glob(SECRET_TEMPLATES)))]
