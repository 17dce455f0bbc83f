"""`clipflow submit`: run one stage on a Ray cluster through the Ray Job Submission API.

The job runs the same ``clipflow <stage> --config ...`` command a local user runs, in a copy of this
project uploaded as the job's working directory (so the cluster runs the code and configs you have
here, without rebuilding the image). ``--wait`` streams the job's logs and exits with its result.

    kubectl -n clipflow port-forward svc/clipflow-head-svc 8265:8265 &
    clipflow submit --address http://127.0.0.1:8265 --config configs/vit_b32_laion400m.yaml --stage train --wait

A train job always runs with a run id (``--run-id``, ``train.run_id``, else a new one), printed with the
command that submits it again: the same run id continues the run from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.common.config import Config
from workflows.common.errors import EXIT_FAILED, EXIT_OK, UserError
from workflows.ops.k8s_render import project_relative, stage_command
from workflows.ops.project import project_root
from workflows.ops.stages import with_run_id
from workflows.train.preemption import STOP_WAIT_S

STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # read by Ray's job supervisor from the job's environment
SUBMITTABLE = ("sample-data", "preprocess", "train", "eval")
# Never uploaded: environments, local stores, VCS data and build leftovers (Ray also honours .gitignore).
EXCLUDES = [".venv", ".clipflow", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "build", "dist"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PATHS_ARE_REMOTE = True  # the job loads the config on the cluster, where its relative paths resolve
# A job's runtime_env (env_vars included) is shown by the dashboard, `ray job status` and the state API to
# anyone who can reach the cluster, so credentials never go there: the pods get theirs from Kubernetes
# Secrets (secretKeyRef in ray_cluster.yaml), and S3 clients find them through the credential chain.
SECRET_NAME = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|PASSPHRASE|TOKEN|CREDENTIALS?|PRIVATE_KEY|API_KEY|"
                         r"ACCESS_KEY(_ID)?|SESSION_KEY)($|_)", re.IGNORECASE)
SECRET_IN_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]+@", re.IGNORECASE)  # scheme://user:password@


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="Ray dashboard / job server URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--stage", choices=SUBMITTABLE, default="train", help="stage to run (default: train)")
    parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its result")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="with --wait: give up waiting (the job keeps running) after this long")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: clipflow-<run>-<stage>-<time>)")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="with --stage train: the run to start or continue (default: train.run_id, else a new "
                             "<name>-<time>-<hex>, printed with the command that continues it)")
    eval_group = parser.add_argument_group("eval options (with --stage eval)")
    which = eval_group.add_mutually_exclusive_group()
    which.add_argument("--pending", action="store_true", help="evaluate every version waiting for eval")
    which.add_argument("--version", default=None, help="evaluate this model version")
    which.add_argument("--alias", default=None, help="evaluate the version behind this alias")


@dataclass
class JobRequest:
    """What is sent to the job server; built separately so it can be inspected without a cluster."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    run_id: str = ""  # the train job's run id ("" for other stages)


def build_request(cfg: Config, args: argparse.Namespace) -> JobRequest:
    """The job for ``args.stage``; its working dir is the checkout you run from, uploaded as it is."""
    root = project_root()
    extra = _eval_args(args)
    run_id = _run_id(cfg, args)
    if run_id != cfg.train.run_id:  # else the config or a --set already carries it
        extra += ["--run-id", run_id]
    config = project_relative(args.config)
    entrypoint = shlex.join(["clipflow", *stage_command(args.stage, config, args.overrides, extra)])
    env_vars = {"PYTHONUNBUFFERED": "1"}  # logs reach `--wait` as they are written
    if args.stage == "train":  # `ray job stop` waits this long after SIGTERM (Ray: 3 s) for the stop checkpoint
        env_vars[STOP_WAIT_ENV] = str(int(STOP_WAIT_S) + 30)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env expects KEY=VALUE, got {item!r}")
        refuse_credential(key, value)
        env_vars[key] = value
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    metadata = {"clipflow.stage": args.stage, "clipflow.run": cfg.name, "clipflow.config": config or ""}
    if run_id:
        metadata["clipflow.run_id"] = run_id
    return JobRequest(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars},
        submission_id=args.submission_id or f"clipflow-{run}-{args.stage}-{stamp}-{secrets.token_hex(2)}",
        metadata=metadata, run_id=run_id,
    )


def _run_id(cfg: Config, args: argparse.Namespace) -> str:
    """The train job's run id: --run-id, else train.run_id, else a new one; "" for other stages."""
    if args.stage != "train":
        if args.run_id:
            raise UserError("--run-id only applies to --stage train")
        return ""
    if args.run_id:
        return with_run_id(cfg, args.run_id).train.run_id
    if cfg.train.run_id:
        return cfg.train.run_id
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name).strip("-._")[:70] or "run"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def resubmit_command(args: argparse.Namespace, run_id: str) -> str:
    """The `clipflow submit` command that continues the run ``run_id`` (this one's arguments, with that run id)."""
    argv = ["clipflow", "submit", "--address", args.address, "--stage", args.stage]
    if args.config:
        argv += ["--config", args.config]
    argv += [a for item in args.overrides for a in ("--set", item)]
    argv += [a for item in args.env for a in ("--env", item)]
    return shlex.join([*argv, "--run-id", run_id])


def refuse_credential(key: str, value: str) -> None:
    """A credential-looking --env is refused before anything is sent: the job's env is no place for it."""
    if SECRET_NAME.search(key) or SECRET_IN_URI.match(value):
        raise UserError(f"--env {key}: looks like a credential, and a job's environment is shown to anyone who "
                        "can reach the cluster's dashboard or state API; put it in a Kubernetes Secret the Ray "
                        "pods read (secretKeyRef, as ray_cluster.yaml does for S3 and MLflow) instead")


def _eval_args(args: argparse.Namespace) -> list[str]:
    chosen = [["--pending"]] if args.pending else []
    chosen += [[flag, value] for flag, value in (("--version", args.version), ("--alias", args.alias)) if value]
    if chosen and args.stage != "eval":
        raise UserError("--pending/--version/--alias only apply to --stage eval")
    return chosen[0] if chosen else []


def main(cfg: Config, args: argparse.Namespace) -> int:
    if not args.address:
        raise UserError("no Ray job server address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    request = build_request(cfg, args)
    client = connect(args.address)
    if "://" not in cfg.home and not Path(cfg.home).is_absolute():
        print(f"clipflow submit: note: home {cfg.home!r} is relative, so on the cluster it lands inside the "
              "job's temporary working directory; use an absolute path or s3:// for results you keep",
              file=sys.stderr)
    started = time.monotonic()
    job_id = client.submit_job(entrypoint=request.entrypoint, runtime_env=request.runtime_env,
                               submission_id=request.submission_id, metadata=request.metadata)
    print(f"submitted {job_id}: {request.entrypoint}")
    if request.run_id:
        print(f"run id {request.run_id}: to continue this run after a stop or failure, submit it again with the "
              f"same run id:\n  {resubmit_command(args, request.run_id)}")
    if not args.wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {job_id}\n"
              f"dashboard:      {args.address.rstrip('/')}/#/jobs/{job_id}")
        return EXIT_OK
    status = wait_for(client, job_id, args.timeout)
    _summary(job_id, status, request, args.address, time.monotonic() - started)
    if status == "SUCCEEDED":
        return EXIT_OK
    if status not in TERMINAL:
        print(f"clipflow submit: stopped waiting; job {job_id} is still {status} "
              f"(ray job logs --address {args.address} --follow {job_id})", file=sys.stderr)
    return EXIT_FAILED


def connect(address: str):
    """A JobSubmissionClient, or a one-line error saying how to reach the head node."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError:
        raise UserError(f"the Ray job server at {address} refused the request: it needs the cluster's auth token; "
                        "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the token the head was started with") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray job server at {address} ({exc}); on Kubernetes run "
                        "`kubectl -n clipflow port-forward svc/clipflow-head-svc 8265:8265` first") from None


def auth_headers() -> dict[str, str]:
    """The cluster token where Ray's CLI looks ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), sent
    explicitly: Ray only sends it itself when this process runs with RAY_AUTH_MODE=token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def wait_for(client, job_id: str, timeout: float | None) -> str:
    """Stream the job's logs to stdout until it ends (or ``timeout``); return its status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(asyncio.wait_for(stream(), timeout))
    except TimeoutError:
        return str(client.get_job_status(job_id).value)
    # The log stream closes when the driver exits; the status can lag behind it briefly.
    deadline = time.monotonic() + 30
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def _summary(job_id: str, status: str, request: JobRequest, address: str, seconds: float) -> None:
    print("\n".join([
        "", "clipflow submit: summary",
        f"  job         {job_id}",
        f"  status      {status}",
        f"  command     {request.entrypoint}",
        f"  wall time   {seconds:.1f} s",
        f"  dashboard   {address.rstrip('/')}/#/jobs/{job_id}",
    ]))
