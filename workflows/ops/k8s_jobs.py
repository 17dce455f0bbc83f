"""`clipflow k8s run` / `clipflow k8s status`: drive the stage RayJobs that `kubectl apply -k k8s/` created.

`kubectl apply -k k8s/` creates ``<run>-preprocess``, ``<run>-train`` and ``<run>-eval`` suspended. ``run``
resumes them one at a time through the Kubernetes API (the README's ``kubectl patch ... suspend:false``) and
follows each until the RayJob as a whole has ended, so a failed stage never starts the next one. Output is
one line per status change, readable in CI logs. The names and namespace come from the run config, exactly
as `clipflow k8s render` names the jobs.

Credentials are those of ``kubectl``: the kubeconfig's current context (or ``--context``), or the pod's
ServiceAccount when running inside the cluster. The `kubernetes` client is imported only when a command
talks to the API, so `clipflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from workflows.common.config import Config
from workflows.common.errors import EXIT_FAILED, EXIT_OK, UserError
from workflows.ops.k8s_render import STAGES, add_config_arguments, job_name

if TYPE_CHECKING:
    from kubernetes.client import ApiException, CustomObjectsApi

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
# (connect, read) seconds per request: an unreachable API server is a one-line error, never a hang.
REQUEST_TIMEOUT = (10, 30)
# KubeRay's terminal deployment statuses. jobStatus alone is not enough: with backoffLimit a FAILED attempt
# is retried (deployment status Retrying), so only the deployment status says the RayJob has ended.
FAILED_DEPLOYMENTS = ("Failed", "ValidationFailed")
COMPLETE_DEPLOYMENT = "Complete"
DEFAULT_KUBECONFIG = "~/.kube/config"


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The `run` and `status` subcommands of `clipflow k8s`."""
    run = sub.add_parser("run", help="resume the stage RayJobs in order and follow them",
                         description="Resume the suspended stage RayJobs that `kubectl apply -k k8s/` created, "
                                     "one at a time, and follow each until it ends. Exit 0: every stage "
                                     "succeeded; 1: a job failed (or --timeout passed); 2: no cluster access, "
                                     "RayJob missing or bad config.")
    add_config_arguments(run)
    run.add_argument("--stages", type=_stages, default=STAGES, metavar="LIST",
                     help=f"comma-separated stages, run in pipeline order (default: {','.join(STAGES)})")
    run.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                     help="stop following after this long in all (the running job keeps running)")
    run.add_argument("--poll", type=_positive, default=10.0, metavar="SECONDS",
                     help="seconds between status checks (default: 10)")
    _add_context_argument(run)
    run.set_defaults(_k8s_main=run_main)
    status = sub.add_parser("status", help="one line per stage RayJob of a run config",
                            description="Show each stage RayJob of a run config: suspended, deployment and job "
                                        "status, start and end time.")
    add_config_arguments(status)
    _add_context_argument(status)
    status.set_defaults(_k8s_main=status_main)


def _add_context_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", default=None,
                        help="kubeconfig context to use (default: the current context, or the pod's "
                             "ServiceAccount inside the cluster)")


def _stages(value: str) -> tuple[str, ...]:
    """Stages from a comma list, in pipeline order: train must never start before preprocess."""
    chosen = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in chosen)


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def run_main(cfg: Config, args: argparse.Namespace) -> int:
    names = {stage: job_name(cfg, stage) for stage in args.stages}
    return run(connect(cfg.k8s.namespace, args.context), names, poll=args.poll, timeout=args.timeout)


def status_main(cfg: Config, args: argparse.Namespace) -> int:
    names = {stage: job_name(cfg, stage) for stage in STAGES}
    return status(connect(cfg.k8s.namespace, args.context), names)


# --- the API ------------------------------------------------------------------------------------------

class RayJobs:
    """The RayJobs of one namespace; every API failure becomes a one-line UserError that says what to do."""

    def __init__(self, api: CustomObjectsApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.host = api.api_client.configuration.host

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get", self.api.get_namespaced_custom_object, name=name)

    def by_name(self) -> dict[str, dict[str, Any]]:
        """Every RayJob of the namespace by name (one request, for `status`)."""
        items = self._call("list", self.api.list_namespaced_custom_object).get("items", [])
        return {item["metadata"]["name"]: item for item in items}

    def resume(self, name: str) -> None:
        """What `kubectl patch rayjob NAME --type merge -p '{"spec":{"suspend":false}}'` does."""
        self._call("patch", self.api.patch_namespaced_custom_object, name=name,
                   body={"spec": {"suspend": False}}, _content_type="application/merge-patch+json")

    def _call(self, verb: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return method(group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                          _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            raise UserError(self._api_error(exc, verb, kwargs.get("name"))) from None
        except HTTPError as exc:
            reason = str(getattr(exc, "reason", None) or exc).split(": ")[-1]
            raise UserError(f"cannot reach the Kubernetes API server at {self.host} ({reason}): check the "
                            "cluster is up and `kubectl config current-context` names it, or pass --context") from None

    def _api_error(self, exc: ApiException, verb: str, name: str | None) -> str:
        what = f"RayJob {self.namespace}/{name}" if name else f"RayJobs in namespace {self.namespace}"
        ns = self.namespace
        if exc.status == 0:  # the client reports TLS failures this way
            return (f"cannot talk TLS to the Kubernetes API server at {self.host}: check the cluster's "
                    "certificate-authority in the kubeconfig")
        if exc.status == 401:
            return (f"the Kubernetes API server at {self.host} rejected the credentials (401 Unauthorized): "
                    f"log in again or renew the token (`kubectl -n {ns} create token clipflow-deployer`)")
        if exc.status == 403:
            return (f"not allowed to {verb} {what} (403 Forbidden): use credentials bound to the "
                    f"clipflow-deployer Role of k8s/base/rbac.yaml (`kubectl -n {ns} create token clipflow-deployer`)")
        if exc.status == 404 and name and _is_object_not_found(exc):
            return f"{what} not found: create the RayJobs with `kubectl apply -k k8s/` first"
        if exc.status == 404:
            return (f"the API server at {self.host} serves no {GROUP}/{VERSION} RayJobs: install the KubeRay "
                    "operator (README, step 1), then `kubectl apply -k k8s/`")
        return (f"the Kubernetes API server answered {exc.status} {exc.reason} when asked to {verb} {what}: "
                f"retry, or check with `kubectl -n {ns} get rayjobs`")


def _is_object_not_found(exc: ApiException) -> bool:
    """A 404 about the object itself (a Status naming it), not about the RayJob API missing altogether."""
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        return False
    return isinstance(body, dict) and (body.get("details") or {}).get("kind") == PLURAL


def connect(namespace: str, context: str | None) -> RayJobs:
    """RayJobs through the pod's ServiceAccount inside the cluster, else through the kubeconfig (as kubectl).

    An explicit ``--context`` or ``$KUBECONFIG`` wins over the in-cluster account. ConfigException texts can
    embed kubeconfig entries (tokens included), so they are never printed for kubeconfig files.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    kubeconfig = os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not (context or os.environ.get("KUBECONFIG")):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise UserError(f"cannot use the pod's ServiceAccount ({exc}): run the pod as clipflow-deployer with "
                            "automountServiceAccountToken: true, or set $KUBECONFIG") from None
    else:
        if not any(Path(p).expanduser().is_file() for p in kubeconfig.split(os.pathsep) if p):
            raise UserError(f"no kubeconfig at {kubeconfig}: set $KUBECONFIG to one, or create it with your "
                            "cluster's login command (e.g. `aws eks update-kubeconfig`, `gcloud container "
                            "clusters get-credentials`)")
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration,
                                    persist_config=False)
        except ConfigException:
            where = f"context {context!r}" if context else "its current context"
            raise UserError(f"cannot use {where} of the kubeconfig {kubeconfig}: check it with "
                            "`kubectl config get-contexts`, or pass --context") from None
    return RayJobs(client.CustomObjectsApi(client.ApiClient(configuration)), namespace)


# --- clipflow k8s run ---------------------------------------------------------------------------------

@dataclass
class StageResult:
    """One summary line: what became of a stage's RayJob in this run."""

    stage: str
    name: str
    status: str = "not started"
    duration: str = "-"
    note: str = ""


def run(jobs: RayJobs, names: dict[str, str], *, poll: float, timeout: float | None) -> int:
    """Resume and follow each stage's RayJob in order; stop at the first one that does not succeed."""
    for name in names.values():  # every RayJob must exist before any is resumed
        jobs.get(name)
    deadline = None if timeout is None else time.monotonic() + timeout
    results = [StageResult(stage, name) for stage, name in names.items()]
    failure = None
    for result in results:
        failure = run_stage(jobs, result, poll, deadline)
        if failure:
            break
    _print_summary(results)
    if failure:
        print(f"clipflow k8s run: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_stage(jobs: RayJobs, result: StageResult, poll: float, deadline: float | None) -> str | None:
    """Resume ``result.name`` unless it already ran, follow it to its end; the error line if it did not succeed."""
    name, ns = result.name, jobs.namespace
    obj = jobs.get(name)
    ended = final_status(obj)
    if ended == "SUCCEEDED":
        _say(f"{name}: already SUCCEEDED, skipping")
        result.status, result.duration, result.note = ended, _duration(obj), "(earlier run)"
        return None
    if ended:  # resuming cannot restart a finished RayJob
        result.status, result.duration = ended, _duration(obj)
        return (f"RayJob {ns}/{name} already {ended} in an earlier run{_reason(obj)}; read its logs with "
                f"`kubectl -n {ns} logs job/{name}`; to run it again, `kubectl -n {ns} delete rayjob {name}` "
                f"and apply it again (`kubectl apply -k k8s/`, or the file `clipflow k8s render` wrote)")
    if (obj.get("spec") or {}).get("suspend"):
        jobs.resume(name)
        _say(f"{name}: resumed")
    else:
        _say(f"{name}: already resumed, following it")
    obj, ended = follow(jobs, name, poll, deadline)
    result.status, result.duration = ended or f"still {_deployment(obj)}", _duration(obj)
    if ended == "SUCCEEDED":
        return None
    if ended is None:
        return (f"stopped waiting; RayJob {ns}/{name} is still {_deployment(obj)} and keeps running: run "
                f"`clipflow k8s run` again to follow it, or `kubectl -n {ns} get rayjob {name} -w`")
    if ended == "SUSPENDED":
        return f"RayJob {ns}/{name} was suspended again while it ran; run `clipflow k8s run` again to resume it"
    return f"RayJob {ns}/{name} {ended}{_reason(obj)}: read its logs with `kubectl -n {ns} logs job/{name}`"


def follow(jobs: RayJobs, name: str, poll: float, deadline: float | None) -> tuple[dict[str, Any], str | None]:
    """Poll the RayJob, printing each status change, until it ends or ``deadline`` passes (status None)."""
    last = None
    while True:
        obj = jobs.get(name)
        state = (_deployment(obj), (obj.get("status") or {}).get("jobStatus") or "-")
        if state != last:
            _say(f"{name}: {state[0]} (job {state[1]})")
            last = state
        ended = final_status(obj)
        if ended:
            return obj, ended
        if (obj.get("spec") or {}).get("suspend"):
            return obj, "SUSPENDED"
        if deadline is not None and time.monotonic() + poll > deadline:
            return obj, None
        time.sleep(poll)


def final_status(obj: dict[str, Any]) -> str | None:
    """SUCCEEDED, FAILED or STOPPED once the RayJob as a whole has ended; None while it may still run."""
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus")
    if deployment in FAILED_DEPLOYMENTS:
        return "FAILED"
    if deployment == COMPLETE_DEPLOYMENT:
        return status.get("jobStatus") or None  # SUCCEEDED, or STOPPED when the Ray job was stopped
    return None


def _deployment(obj: dict[str, Any]) -> str:
    return (obj.get("status") or {}).get("jobDeploymentStatus") or "New"


def _reason(obj: dict[str, Any]) -> str:
    """`` (reason: first line of the message)`` from the RayJob status, kept to one short line."""
    status = obj.get("status") or {}
    message = (status.get("message") or "").strip().splitlines()
    text = ": ".join(filter(None, [status.get("reason"), message[0] if message else ""]))
    return f" ({text[:200]})" if text else ""


def _duration(obj: dict[str, Any]) -> str:
    """The RayJob's own start-to-end time (the operator's timestamps), so skipped stages have one too."""
    status = obj.get("status") or {}
    start, end = _time(status.get("startTime")), _time(status.get("endTime"))
    if not (start and end):
        return "-"
    seconds = int((end - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def _time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp of the API (``...Z``)."""
    return datetime.fromisoformat(value) if value else None


def _say(line: str) -> None:
    """One timestamped progress line, flushed so CI logs show it at once."""
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def _print_summary(results: list[StageResult]) -> None:
    rows = [("STAGE", "RAYJOB", "STATUS", "DURATION", "")]
    rows += [(r.stage, r.name, r.status, r.duration, r.note) for r in results]
    print("\nclipflow k8s run: summary\n" + _table(rows), flush=True)


# --- clipflow k8s status ------------------------------------------------------------------------------

def status(jobs: RayJobs, names: dict[str, str]) -> int:
    """One line per stage RayJob; missing ones read "not applied"."""
    found = jobs.by_name()
    rows = [("STAGE", "RAYJOB", "SUSPENDED", "DEPLOYMENT", "JOB", "START", "END")]
    for stage, name in names.items():
        obj = found.get(name)
        if obj is None:
            rows.append((stage, name, "not applied", "", "", "", ""))
            continue
        st = obj.get("status") or {}
        rows.append((stage, name, "yes" if (obj.get("spec") or {}).get("suspend") else "no", _deployment(obj),
                     st.get("jobStatus") or "-", st.get("startTime") or "-", st.get("endTime") or "-"))
    print(f"RayJobs in namespace {jobs.namespace} at {jobs.host}\n" + _table(rows))
    return EXIT_OK


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
