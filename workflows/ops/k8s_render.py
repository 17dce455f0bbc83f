"""`clipflow k8s render`: the RayJob (or scheduled RayCronJob) for a run config (`run`/`status`: k8s_jobs).

The run config stays the single source of truth for a run: the worker range comes from
``scaling.min_workers/max_workers``, GPUs from ``scaling.use_gpu``, image, namespace and deadline from the
``k8s`` section, and the entrypoint is the very command a local user runs (``clipflow train --config ...``).
The node shapes (pod sizes, GPUs per pod, node selectors) come from ``ray_cluster.yaml``, so a RayJob
brings up the same cluster as ``kubectl apply -f ray_cluster.yaml`` with the GPU group sized for the run.
The committed ``k8s/overlays/paper-vit-b32/ray*job-*.yaml`` are this command's output (a test keeps them equal).

It writes whole RayJobs, not kustomize patches over a base: a RayJob embeds its cluster spec, KubeRay's
kinds have no strategic-merge keys for kustomize (a patch to one worker group replaces the whole list) and
JSON patches address groups by index, so a patch would restate the cluster anyway, or break silently when
ray_cluster.yaml reorders its groups. One source (ray_cluster.yaml + the run config) and a test that the
committed files equal the output keep the copies from drifting; an overlay's ``images:`` pins them.

Each job's Ray containers log in to MLflow as the stage's identity (MLFLOW_IDENTITY, k8s/mlflow_users.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.ops.k8s_checks import SUBMITTER_LABELS, gpus_of, load_documents, validate_manifest
from workflows.ops.project import project_root
from workflows.ops.stages import with_run_id

STAGES = ("preprocess", "train", "eval")
PATHS_ARE_REMOTE = True  # the jobs load the config in the cluster's image, where its paths resolve
MAX_RAYJOB_NAME = 47  # KubeRay derives cluster and submitter names from it; longer names are rejected
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# A retried RayJob brings up a fresh cluster and runs the same command: the train command carries the run id
# (default: the RayJob's name), so the retry continues that run from its latest checkpoint, in the same MLflow run.
BACKOFF_LIMIT = 2
TTL_SECONDS_AFTER_FINISHED = 3600  # keep a finished cluster an hour for logs, then free the nodes
# The Secret holding each stage's MLflow user (MLFLOW_TRACKING_USERNAME/PASSWORD); None: the stage never calls
# MLflow, so its pods get no MLflow credentials. ray_cluster.yaml carries the train identity.
MLFLOW_IDENTITY = {"preprocess": None, "train": "clipflow-mlflow-train", "eval": "clipflow-mlflow-eval"}
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from workflows.ops import k8s_jobs  # imported here: it imports this module (and no Kubernetes client yet)

    sub = parser.add_subparsers(dest="k8s_command", required=True, metavar="SUBCOMMAND")
    render = sub.add_parser("render", help="print the RayJob for a run config",
                            description="Print the KubeRay RayJob (or RayCronJob) that runs one stage of a run config.")
    add_config_arguments(render, "YAML run config (inside the project)")
    render.add_argument("--stage", choices=STAGES, default="train", help="which stage the job runs (default: train)")
    render.add_argument("--schedule", default=None, metavar="CRON",
                        help="render a RayCronJob on this cron schedule instead (eval runs with --pending)")
    render.add_argument("--suspend", action="store_true", help="create the RayJob suspended (resume it later)")
    render.add_argument("--run-id", default=None, metavar="ID",
                        help="the train job's run id: its retries and re-applies continue that run (default: "
                             "train.run_id, else the RayJob's name)")
    render.add_argument("--cluster", default=None,
                        help="RayCluster manifest whose spec the job's cluster copies "
                             "(default: the checkout's ray_cluster.yaml)")
    render.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    render.set_defaults(_k8s_main=render_main)
    k8s_jobs.add_arguments(sub)


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML run config") -> None:
    """Accept --config/--set after the subcommand too; SUPPRESS keeps values given before it."""
    parser.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=argparse.SUPPRESS,
                        metavar="KEY=VALUE", help="override one config value (repeatable)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    return args._k8s_main(cfg, args)


def render_main(cfg: Config, args: argparse.Namespace) -> int:
    doc = render(cfg, args.config, args.stage, args.overrides, cluster_path=args.cluster,
                 schedule=args.schedule, suspend=args.suspend, run_id=args.run_id)
    text = to_yaml(doc, _command_line(args))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {doc['kind']} {doc['metadata']['namespace']}/{doc['metadata']['name']} to {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def render(cfg: Config, config_path: str | None, stage: str, overrides: list[str] | None = None, *,
           cluster_path: str | Path | None = None, schedule: str | None = None,
           suspend: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """The validated RayJob / RayCronJob manifest for ``stage`` of the run ``cfg`` loaded from ``config_path``.

    ``cluster_path`` defaults to the checkout's ``ray_cluster.yaml`` (see :func:`project_root`). The train
    command carries the run id (``run_id``, else ``train.run_id``, else the job's name), so that every retry
    and re-apply of the job continues one run.
    """
    if stage not in STAGES:
        raise UserError(f"--stage must be one of {list(STAGES)}, got {stage!r}")
    if run_id and stage != "train":
        raise UserError("--run-id only applies to --stage train")
    cluster_path = cluster_path or project_root() / "ray_cluster.yaml"
    extra = ["--pending"] if stage == "eval" else []  # evaluate every version still waiting for eval
    if stage == "train":
        run_id = with_run_id(cfg, run_id).train.run_id if run_id else cfg.train.run_id or job_name(cfg, stage)
        extra = [] if run_id == cfg.train.run_id else ["--run-id", run_id]  # else the config carries it
    entrypoint = shlex.join(["clipflow", *stage_command(stage, project_relative(config_path), overrides, extra)])
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
        "backoffLimit": BACKOFF_LIMIT,
        "rayClusterSpec": cluster_spec(cfg, stage, cluster_path),
        "submitterPodTemplate": _submitter_template(cfg),
    }
    if suspend:
        job_spec["suspend"] = True
    deadline = active_deadline(cfg)
    if deadline:
        job_spec["activeDeadlineSeconds"] = deadline
    name = job_name(cfg, stage)
    labels = {"app.kubernetes.io/name": "clipflow", "app.kubernetes.io/component": stage,
              "clipflow.dev/run": _slug(cfg.name)}
    if schedule:
        doc = {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
               "metadata": {"name": f"{name}-scheduled", "namespace": cfg.k8s.namespace, "labels": labels},
               "spec": {"schedule": schedule, "jobTemplate": job_spec}}
    else:
        doc = {"apiVersion": "ray.io/v1", "kind": "RayJob",
               "metadata": {"name": name, "namespace": cfg.k8s.namespace, "labels": labels},
               "spec": job_spec}
    if len(doc["metadata"]["name"]) > MAX_RAYJOB_NAME:
        raise UserError(f"job name {doc['metadata']['name']!r} is longer than {MAX_RAYJOB_NAME} characters; "
                        "shorten the config's `name`")
    errors = validate_manifest(doc)
    if errors:
        raise UserError(f"rendered {doc['kind']} is invalid (check {cluster_path}): " + "; ".join(errors))
    return doc


def job_name(cfg: Config, stage: str) -> str:
    """The RayJob of ``stage`` for the run ``cfg``: what `render` writes and `k8s run`/`status` look up."""
    return f"{_slug(cfg.name)}-{stage}"


def stage_command(stage: str, config: str | None, overrides: list[str] | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """Arguments of the `clipflow` command that runs ``stage`` (shared with `clipflow submit`)."""
    args = [stage, *(extra or [])]
    if config:
        args += ["--config", config]
    for item in overrides or []:
        args += ["--set", item]
    return args


def project_relative(config_path: str | None) -> str | None:
    """The config's path inside the project: the image (and a submitted working dir) has it there."""
    if config_path is None:
        return None
    path = Path(config_path).resolve()
    if not path.is_file():
        raise UserError(f"config file not found: {config_path}")
    root = project_root()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise UserError(f"{config_path} is outside the project ({root}); the cluster only sees files "
                        "inside it: copy the config into configs/") from None


def cluster_spec(cfg: Config, stage: str, cluster_path: str | Path) -> dict[str, Any]:
    """ray_cluster.yaml's spec with the run's image and GPU group sized for ``stage``."""
    if not Path(cluster_path).is_file():
        raise UserError(f"{cluster_path} not found: run from a clipflow checkout or pass --cluster")
    docs = [d for d in load_documents(cluster_path) if d.get("kind") == "RayCluster"]
    if len(docs) != 1:
        raise UserError(f"{cluster_path}: expected exactly one RayCluster, found {len(docs)}")
    spec = copy.deepcopy(docs[0]["spec"])
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for container in group["template"]["spec"]["containers"]:
            container["image"] = cfg.k8s.image
            container["env"] = mlflow_identity_env(container.get("env", []), MLFLOW_IDENTITY[stage])
    gpu_groups = [g for g in spec.get("workerGroupSpecs", []) if gpus_of(g)]
    needed = {"train": (cfg.scaling.min_workers, cfg.scaling.max_workers),
              "eval": (0, cfg.eval.num_actors), "preprocess": None}[stage]
    if needed is None or not cfg.scaling.use_gpu:
        spec["workerGroupSpecs"] = [g for g in spec.get("workerGroupSpecs", []) if not gpus_of(g)]
        return spec
    if len(gpu_groups) != 1:
        raise UserError(f"{cluster_path}: expected one GPU worker group, found {len(gpu_groups)}")
    group = gpu_groups[0]
    per_pod = gpus_of(group)
    group["minReplicas"] = math.ceil(needed[0] / per_pod)
    group["maxReplicas"] = math.ceil(needed[1] / per_pod)
    group["replicas"] = group["minReplicas"]
    return spec


def mlflow_identity_env(env: list[dict[str, Any]], secret: str | None) -> list[dict[str, Any]]:
    """``env`` with the MLflow credentials read from ``secret`` (by secretKeyRef; where ray_cluster.yaml has
    them, else at the end), or without them (None)."""
    refs = {name: {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}
            for name in MLFLOW_CREDENTIAL_ENV} if secret else {}
    out = [refs.pop(var["name"], None) if var.get("name") in MLFLOW_CREDENTIAL_ENV else copy.deepcopy(var)
           for var in env]
    return [var for var in out if var is not None] + list(refs.values())


def active_deadline(cfg: Config) -> int | None:
    """``k8s.active_deadline_seconds`` as the RayJob's activeDeadlineSeconds (None = no deadline): a hung
    job then fails and gives its GPU nodes back instead of holding them forever."""
    seconds = cfg.k8s.active_deadline_seconds
    if seconds < 0:
        raise UserError(f"k8s.active_deadline_seconds must be >= 0 (0 = no deadline), got {seconds}")
    return seconds or None


def _submitter_template(cfg: Config) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills in its command and the cluster's auth token); small,
    non-root, no API access, labelled for its NetworkPolicy."""
    # SUBMITTER_LABELS: k8s/base/networkpolicies.yaml lets it reach the head's Jobs API (8265), nothing else.
    return {"metadata": {"labels": {"app.kubernetes.io/name": "clipflow", **SUBMITTER_LABELS}}, "spec": {
        "restartPolicy": "Never",
        "serviceAccountName": "clipflow",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "ray-job-submitter",
            "image": cfg.k8s.image,
            "resources": copy.deepcopy(SUBMITTER_RESOURCES),
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }],
    }}


def to_yaml(doc: dict[str, Any], command: str) -> str:
    header = f"# Generated by `{command}`; edit the run config or ray_cluster.yaml, then re-render.\n"
    return header + yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, width=120)


class _NoAliasDumper(yaml.SafeDumper):
    """Spell out values ray_cluster.yaml shares through YAML anchors: rendered jobs read standalone."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _command_line(args: argparse.Namespace) -> str:
    parts = ["clipflow", "k8s", "render"]
    if args.config:
        parts += ["--config", project_relative(args.config) or args.config]
    for item in args.overrides:
        parts += ["--set", item]
    if args.stage != "train":
        parts += ["--stage", args.stage]
    if args.schedule:
        parts += ["--schedule", args.schedule]
    if args.suspend:
        parts.append("--suspend")
    if args.run_id:
        parts += ["--run-id", args.run_id]
    return shlex.join(parts)


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not slug:
        raise UserError(f"config name {name!r} has no characters usable in a Kubernetes name")
    return slug
