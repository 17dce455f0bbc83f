"""Stop and preemption (``workflows.train.preemption``): the ranks' agreement on a gloo group of two processes
(no Ray), and a real `clipflow train` driver stopped by SIGTERM mid-run: a stop checkpoint off the
checkpoint_every grid, registered, the MLflow run KILLED, exit code 130, and the same command with the same run
id continuing from exactly that step, in the same MLflow run. Then the head pod's preStop hook
(``workflows.ops.stop_jobs``) on a real `ray start` head with token auth: it stops a running job through the job API
(SIGTERM, a graceful stop that outlasts Ray's default 3 s), waits for it to end STOPPED, and returns at its deadline
when a job takes longer. (A node drained for preemption: ``test_multinode.py``.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from clip_core import load_checkpoint
from workflows.common.config import load_config
from workflows.common.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR
from workflows.common.runtime import free_port
from workflows.ops.submit import STOP_WAIT_ENV
from workflows.tracking.run import tracking_uri
from workflows.train.preemption import STOP_CHECK_EVERY, agree

from ray_head import RayHead, ray_head
from tiny_data import CONTEXT

REPO = Path(__file__).resolve().parent.parent
CASES = [[False, False], [True, False], [False, True]]  # each rank's flag
# One rank of a gloo group of two (torch alone, no Ray): agree() on each case, then the cost of one call.
RANK = """
import json, sys, time
import torch.distributed as dist
from workflows.train.preemption import agree
rank, port, cases = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
answers = [agree(case[rank]) for case in cases]
start = time.perf_counter()
for _ in range(200):
    agree(False)
print(json.dumps({"answers": answers, "ms": (time.perf_counter() - start) / 200 * 1e3}))
dist.destroy_process_group()
"""


@pytest.mark.timeout(180)
def test_ranks_agree_on_a_stop_any_rank_saw():
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(port), json.dumps(CASES)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [json.loads(p.communicate(timeout=150)[0]) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0]
    assert [out["answers"] for out in outputs] == [[any(case) for case in CASES]] * 2
    print(f"flag all-reduce (gloo, 2 processes): {max(out['ms'] for out in outputs):.3f} ms a call")


def test_agree_without_a_process_group_is_the_local_flag():
    assert agree(True) and not agree(False)


def _train_command(home: Path, data: Path, run_id: str, max_steps: int) -> list[str]:
    sets = [f"home={home}", f"train.data={data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
            "train.global_batch_size=16", f"train.max_steps={max_steps}", "train.warmup_steps=2",
            "train.log_every=1", "train.checkpoint_every=100", f"storage.path={home / 'runs'}"]
    return [sys.executable, "-m", "workflows.ops.cli", "train", "--run-id", run_id,
            *[arg for value in sets for arg in ("--set", value)]]


def _wait_for_step(log: Path, proc: subprocess.Popen, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(s) for s in re.findall(r"step (\d+)/\d+ loss", log.read_text(errors="replace"))]
        if done and max(done) >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()}):\n{log.read_text()[-3000:]}")


@pytest.mark.timeout(420)
def test_sigterm_checkpoints_ends_killed_and_the_run_id_continues_there(ray_runtime, train_data, tmp_path):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    run_id, log = "sigterm-run", tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_train_command(tmp_path, train_data, run_id, 400), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_for_step(log, proc, 3, timeout=240)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == EXIT_INTERRUPTED, output[-3000:]

    # One checkpoint: the stop's, at the first check after the SIGTERM, off the checkpoint_every (100) grid.
    checkpoints = sorted((tmp_path / "runs" / run_id).glob("checkpoint_0*"))
    assert len(checkpoints) == 1, (checkpoints, output[-6000:])
    checkpoint = checkpoints[0]
    stopped = load_checkpoint(checkpoint).trainer_state["step"]
    assert stopped % STOP_CHECK_EVERY == 0 and stopped % 100 and 3 <= stopped < 400, stopped
    assert f"stopped by SIGTERM at step {stopped}" in output

    cfg = load_config(None, [f"home={tmp_path}"])
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`clipflow.run_key` = '{run_id}'")
    assert run.info.status == "KILLED"
    versions = [v for v in client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
                if v.run_id == run.info.run_id]
    assert [int(v.tags["step"]) for v in versions] == [stopped]  # the stop checkpoint is registered

    # The same command with the same run id continues at exactly that step, in the same MLflow run.
    again = subprocess.run(_train_command(tmp_path, train_data, run_id, stopped + 2), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == EXIT_OK, (again.stdout + again.stderr)[-3000:]
    assert f"steps {stopped}->{stopped + 2} (resumed)" in again.stdout + again.stderr
    final = sorted((tmp_path / "runs" / run_id).glob("checkpoint_0*"))[-1]
    assert load_checkpoint(final).trainer_state["step"] == stopped + 2
    (continued,) = client.search_runs([experiment.experiment_id], f"tags.`clipflow.run_key` = '{run_id}'")
    assert continued.info.run_id == run.info.run_id and continued.info.status == "FINISHED"
    assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "loss")) == list(
        range(1, stopped + 3))


# A job's driver on the head, as `clipflow train` is one: on SIGTERM it takes stop_s to stop (a stop checkpoint's
# save and upload: longer than Ray's default 3 s before SIGKILL), leaves a mark that it did, and exits 130 (DriverStop).
GRACEFUL_JOB = """
import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep({stop_s})
    pathlib.Path({mark!r}).write_text("stopped gracefully")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def job_head() -> Iterator[RayHead]:
    """A `ray start` head with the job server, token auth and, as ray_cluster.yaml gives the head pod, the time a job
    stop waits before SIGKILL."""
    with ray_head(num_cpus=1, env={STOP_WAIT_ENV: "120"}) as head:
        yield head


def _hook(head: RayHead, deadline_s: float, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The head pod's preStop command, run as the pod runs it (the token in RAY_AUTH_TOKEN, as KubeRay sets it)."""
    done = subprocess.run([sys.executable, "-m", "workflows.ops.stop_jobs", "--address", head.dashboard,
                           "--deadline-seconds", str(deadline_s)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_TOKEN": token or head.token}, timeout=deadline_s + 120)
    assert head.token not in done.stdout + done.stderr
    return done


def _running_job(head: RayHead, mark: Path, stop_s: int):
    """A client of the head's job server and a GRACEFUL_JOB it runs, once the job has its SIGTERM handler."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {head.token}"})
    job_id = client.submit_job(entrypoint=shlex.join(
        [sys.executable, "-c", GRACEFUL_JOB.format(stop_s=stop_s, mark=str(mark))]))
    deadline = time.monotonic() + 120
    while "ready" not in client.get_job_logs(job_id):
        assert time.monotonic() < deadline and str(client.get_job_status(job_id).value) in ("PENDING", "RUNNING"), (
            client.get_job_status(job_id), client.get_job_logs(job_id))
        time.sleep(0.5)
    return client, job_id


def test_the_head_prestop_hook_refuses_what_it_cannot_do_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from workflows.ops.stop_jobs import main

    assert main(["--deadline-seconds", "0"]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == "stop_jobs: error: --deadline-seconds must be > 0, got 0.0"
    nobody = f"http://127.0.0.1:{free_port()}"
    assert main(["--address", nobody, "--deadline-seconds", "5"]) == EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"stop_jobs: error: the Ray job server at {nobody} does not answer"), line


@pytest.mark.timeout(300)
def test_the_head_prestop_hook_with_no_running_job_returns_at_once(job_head: RayHead) -> None:
    done = _hook(job_head, deadline_s=60)
    assert done.returncode == EXIT_OK and "no running job to stop" in done.stderr, done.stderr
    refused = _hook(job_head, deadline_s=60, token="not-the-token")
    assert refused.returncode == EXIT_USER_ERROR, refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("stop_jobs: error: the Ray job server"), refused.stderr
    assert "Traceback" not in refused.stderr and "not-the-token" not in refused.stderr


@pytest.mark.timeout(300)
def test_the_head_prestop_hook_stops_a_running_job_gracefully_and_waits_for_it(job_head: RayHead,
                                                                               tmp_path: Path) -> None:
    client, job_id = _running_job(job_head, tmp_path / "stopped", stop_s=5)
    done = _hook(job_head, deadline_s=60)
    assert done.returncode == EXIT_OK, done.stderr
    assert f"stopping job {job_id}" in done.stderr and f"job {job_id} ended STOPPED" in done.stderr, done.stderr
    assert str(client.get_job_status(job_id).value) == "STOPPED"
    assert (tmp_path / "stopped").read_text() == "stopped gracefully"  # SIGTERM, then time to stop: no SIGKILL


@pytest.mark.timeout(300)
def test_the_head_prestop_hook_returns_at_its_deadline(job_head: RayHead, tmp_path: Path) -> None:
    client, job_id = _running_job(job_head, tmp_path / "stopped", stop_s=10)
    early = _hook(job_head, deadline_s=2)
    assert early.returncode == EXIT_FAILED, early.stderr
    assert f"{job_id} still running at the 2 s deadline" in early.stderr, early.stderr
    assert str(client.get_job_status(job_id).value) == "RUNNING" and not (tmp_path / "stopped").exists()
    # The job goes on stopping gracefully; the hook run again waits for it.
    again = _hook(job_head, deadline_s=60)
    assert again.returncode == EXIT_OK and f"job {job_id} ended STOPPED" in again.stderr, again.stderr
    assert (tmp_path / "stopped").read_text() == "stopped gracefully"
