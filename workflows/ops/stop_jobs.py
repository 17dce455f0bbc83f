"""The Ray head pod's preStop hook: stop the cluster's running jobs gracefully before the pod goes.

A RayJob's driver (its entrypoint, e.g. ``clipflow train``) runs on the head pod. When that pod is deleted or its node
drained, Kubernetes runs this hook, then SIGTERMs the container and SIGKILLs what is left at the end of the pod's
terminationGracePeriodSeconds. Without the hook the driver dies with the head's Ray processes, SIGKILLed: no stop
checkpoint, and the RayJob's retry continues from the last periodic one. The hook asks the job server of its own pod
(127.0.0.1, with the cluster's token from where `clipflow submit` finds it, never printed) to stop every job still
pending or running (clipflow's or not: each dies with the head anyway, and SIGTERM first gives it the chance to end
cleanly). That is `ray job stop`: SIGTERM to the driver, which `clipflow train` turns into a stop checkpoint
and exit 130 (``workflows.train.preemption``), then SIGKILL ``RAY_JOB_STOP_WAIT_TIME_S`` later (set on the head pod).
It returns once every job ended, or at its deadline, which ``k8s_checks`` keeps inside the grace period.

    python -m workflows.ops.stop_jobs [--address http://127.0.0.1:8265] [--deadline-seconds 100]

Exit code 0: every job ended; 1: some were still running at the deadline; 2: the job server did not answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from workflows.common.errors import EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR, UserError
from workflows.common.log import get_logger, setup_logging
from workflows.ops.submit import TERMINAL, auth_headers

ADDRESS = "http://127.0.0.1:8265"  # the head's own job server (the dashboard port)
# ray_cluster.yaml runs the hook with 100: past STOP_WAIT_S (90), after which a stopped `clipflow train` gives up on
# its stop checkpoint and ends anyway, and 20 s (k8s_checks.RAY_STOP_MARGIN_S) inside the head's 120 s grace period.
DEADLINE_S = 100.0
POLL_S = 1.0
ACTIVE = ("PENDING", "RUNNING")

log = get_logger("stop_jobs")


def stop_jobs(address: str, deadline_s: float) -> list[str]:
    """Ask the job server at ``address`` to stop every active job, and wait until they all ended or ``deadline_s``
    passed (counted from the call). Returns the ids of the jobs still not ended."""
    start = time.monotonic()
    client = _client(address)
    active = _answer(address, lambda: [job.submission_id for job in client.list_jobs()
                                       if job.submission_id and str(job.status.value) in ACTIVE])
    if not active:
        log.info("no running job to stop on %s", address)
        return []
    for job_id in active:
        log.info("stopping job %s (SIGTERM to its driver)", job_id)
        _answer(address, lambda: client.stop_job(job_id))
    left = list(active)
    while left and time.monotonic() - start < deadline_s:
        time.sleep(POLL_S)
        status = {job_id: str(_answer(address, lambda: client.get_job_status(job_id)).value) for job_id in left}
        for job_id in left:
            if status[job_id] in TERMINAL:
                log.info("job %s ended %s, %.0f s after the stop", job_id, status[job_id], time.monotonic() - start)
        left = [job_id for job_id in left if status[job_id] not in TERMINAL]
    if left:
        log.warning("job(s) %s still running at the %.0f s deadline: the pod's shutdown kills them; a stopped "
                    "`clipflow train` continues from its latest checkpoint when run again with its run id",
                    ", ".join(left), deadline_s)
    return left


def _client(address: str) -> Any:
    """A JobSubmissionClient for the head's own job server, with the cluster's token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError:
        raise UserError(f"the Ray job server at {address} refused the cluster token: the pod's RAY_AUTH_TOKEN (or "
                        f"RAY_AUTH_TOKEN_PATH) must hold the token the cluster runs with") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"the Ray job server at {address} does not answer ({exc}); no job was stopped") from None


def _answer(address: str, call: Any) -> Any:
    """``call()``, with the job server going away mid-way (the head is stopping) as a one-line UserError."""
    try:
        return call()
    except (OSError, RuntimeError) as exc:  # requests' errors are OSErrors; the SDK raises RuntimeError on a 5xx
        raise UserError(f"the Ray job server at {address} stopped answering ({exc})") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.ops.stop_jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=ADDRESS, help=f"the job server (default: {ADDRESS})")
    parser.add_argument("--deadline-seconds", type=float, default=DEADLINE_S, metavar="S",
                        help=f"return after this long even if jobs are still running (default: {DEADLINE_S:.0f})")
    args = parser.parse_args(argv)
    setup_logging()
    if not args.deadline_seconds > 0:
        print(f"stop_jobs: error: --deadline-seconds must be > 0, got {args.deadline_seconds}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return EXIT_FAILED if stop_jobs(args.address, args.deadline_seconds) else EXIT_OK
    except UserError as exc:
        print(f"stop_jobs: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
