"""`clipflow submit`: the request it builds, its errors, and a real job on a real Ray head node.

The integration test starts its own `ray start --head` (with the dashboard, which hosts the Job
Submission API) on free ports and a private temp dir, submits a cheap stage through the CLI with
``--wait`` and stops only the processes it started: other suites may run Ray on this machine too.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from clip_core import load_checkpoint
from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.ops.cli import build_parser, main
from workflows.ops.submit import EXCLUDES, build_request, resubmit_command

from ray_head import RayHead
from ray_head import ray_head as start_ray_head

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout these tests belong to (and run from)
CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("submit").parse_args(["submit", *argv])


def test_request_runs_the_local_command_in_an_uploaded_copy_of_the_project() -> None:
    args = parse("--address", "http://h:8265", "--config", str(CONFIG), "--stage", "eval", "--alias", "champion",
                 "--set", "eval.batch_size=64", "--env", "MLFLOW_TRACKING_URI=http://mlflow:5000")
    request = build_request(load_config(CONFIG, args.overrides), args)
    assert shlex.split(request.entrypoint) == ["clipflow", "eval", "--alias", "champion", "--config",
                                               "configs/demo.yaml", "--set", "eval.batch_size=64"]
    assert request.runtime_env["working_dir"] == str(PROJECT_ROOT)
    assert {".venv", ".clipflow", ".git"} <= set(request.runtime_env["excludes"]) == set(EXCLUDES)
    assert request.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert request.submission_id.startswith("clipflow-demo-eval-")
    assert request.metadata == {"clipflow.stage": "eval", "clipflow.run": "demo", "clipflow.config": "configs/demo.yaml"}
    # the stage's flags are the ones its own parser defines
    assert build_parser("eval").parse_args(shlex.split(request.entrypoint)[1:]).alias == "champion"


def test_a_train_job_always_carries_a_run_id() -> None:
    """The same run id continues the run (train.run_id); without one, submit makes one and prints the command."""
    args = parse("--address", "http://h:8265", "--config", str(CONFIG), "--stage", "train", "--set", "train.lr=1e-4")
    request = build_request(load_config(CONFIG, args.overrides), args)
    argv = shlex.split(request.entrypoint)
    assert argv[:3] == ["clipflow", "train", "--run-id"] and argv[3] == request.run_id
    assert re.fullmatch(r"demo-\d{8}-\d{6}-[0-9a-f]{6}", request.run_id)
    assert request.metadata["clipflow.run_id"] == request.run_id
    assert build_parser("train").parse_args(argv[1:]).run_id == request.run_id
    assert resubmit_command(args, "r1") == shlex.join([
        "clipflow", "submit", "--address", "http://h:8265", "--stage", "train", "--config", str(CONFIG),
        "--set", "train.lr=1e-4", "--run-id", "r1"])
    again = parse("--address", "http://h:8265", "--config", str(CONFIG), "--stage", "train", "--run-id", "r1")
    assert shlex.split(build_request(load_config(CONFIG), again).entrypoint)[2:4] == ["--run-id", "r1"]
    in_config = parse("--address", "http://h:8265", "--stage", "train", "--set", "train.run_id=r2")
    request = build_request(load_config(None, in_config.overrides), in_config)
    assert request.run_id == "r2" and "--run-id" not in shlex.split(request.entrypoint)  # the --set carries it
    eval_job = parse("--address", "http://h:8265", "--stage", "eval", "--pending")
    assert build_request(load_config(None), eval_job).run_id == ""


@pytest.mark.parametrize("argv, message", [
    (["--stage", "train", "--pending"], "only apply to --stage eval"),
    (["--env", "NOEQUALS"], "--env expects KEY=VALUE"),
    (["--stage", "eval", "--run-id", "r1"], "--run-id only applies to --stage train"),
    (["--stage", "train", "--run-id", "a/b"], "train.run_id 'a/b' must be 1 to 100 letters"),
])
def test_bad_requests_are_user_errors(argv: list[str], message: str) -> None:
    args = parse("--address", "http://h:8265", *argv)
    with pytest.raises(UserError, match=message):
        build_request(load_config(None), args)


@pytest.mark.parametrize("item", [
    "AWS_SECRET_ACCESS_KEY=abc", "AWS_ACCESS_KEY_ID=AKIA123", "AWS_SESSION_TOKEN=x", "MLFLOW_TRACKING_PASSWORD=pw",
    "RAY_AUTH_TOKEN=t", "HF_TOKEN=hf_x", "my_api_key=k", "GOOGLE_APPLICATION_CREDENTIALS=/k.json",
    "MLFLOW_TRACKING_URI=http://alice:s3cret@mlflow:5000",
])
def test_credentials_are_refused_in_the_jobs_environment(item: str) -> None:
    """A job's env_vars are visible in the dashboard and the state API: a credential there is one clear error."""
    args = parse("--address", "http://h:8265", "--env", "MLFLOW_EXPERIMENT_NAME=x", "--env", item)
    with pytest.raises(UserError, match=rf"^--env {item.split('=')[0]}: looks like a credential.*Kubernetes Secret"):
        build_request(load_config(None), args)


def test_the_local_credentials_never_reach_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing of this machine's environment is copied into the job: the pods have their own credentials."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "local-secret")
    args = parse("--address", "http://h:8265", "--env", "AWS_DEFAULT_REGION=eu-west-1", "--env",
                 "MLFLOW_TRACKING_URI=http://mlflow:5000")
    env_vars = build_request(load_config(None), args).runtime_env["env_vars"]
    assert env_vars == {"PYTHONUNBUFFERED": "1", "AWS_DEFAULT_REGION": "eu-west-1",
                        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    assert "local-secret" not in repr(build_request(load_config(None), args))


def test_a_train_job_gives_its_stop_checkpoint_time_and_a_user_value_wins() -> None:
    """`ray job stop` SIGKILLs 3 s after SIGTERM unless the job's environment says otherwise (Ray's supervisor
    reads it): a train job gets the driver's stop wait plus room to end the run; other stages keep Ray's."""
    def env(*extra: str, stage: str = "train") -> dict[str, str]:
        args = parse("--address", "http://h:8265", "--stage", stage, *extra)
        return build_request(load_config(None), args).runtime_env["env_vars"]

    assert env()["RAY_JOB_STOP_WAIT_TIME_S"] == "120"
    assert env("--env", "RAY_JOB_STOP_WAIT_TIME_S=300")["RAY_JOB_STOP_WAIT_TIME_S"] == "300"
    assert "RAY_JOB_STOP_WAIT_TIME_S" not in env(stage="preprocess")


def test_config_outside_the_project_is_refused(tmp_path: Path, capsys) -> None:
    outside = tmp_path / "c.yaml"
    outside.write_text("name: c\n")
    assert main(["submit", "--address", "http://127.0.0.1:9", "--config", str(outside)]) == 2
    assert "outside the project" in capsys.readouterr().err


def test_unreachable_job_server_is_one_line_error(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "--stage", "sample-data"]) == 2
    assert "no Ray job server address" in capsys.readouterr().err
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--stage", "sample-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Ray job server" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A private Ray head with the job server and token auth."""
    with start_ray_head(num_cpus=2) as head:
        yield head


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_submit_runs_a_stage_on_a_real_ray_head(ray_head: RayHead, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    home = tmp_path / "home"
    code = main(["submit", "--address", ray_head.dashboard, "--stage", "sample-data", "--config", str(CONFIG),
                 "--set", "sample_data.train_samples=20", "--set", "sample_data.train_shards=1",
                 "--set", "sample_data.retrieval_samples=10", "--set", "sample_data.zeroshot_per_class=2",
                 "--set", f"home={home}", "--wait", "--timeout", "150"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "status      SUCCEEDED" in out
    job_id = out.split("submitted ", 1)[1].split(":", 1)[0]
    assert job_id.startswith("clipflow-demo-sample-data-")
    assert sorted(p.name for p in (home / "data" / "raw").glob("*.tar")) == ["train-00000.tar"]
    assert (home / "data" / "eval" / "zeroshot" / "classnames.txt").is_file()
    captions = (home / "data" / "eval" / "retrieval" / "captions.jsonl").read_text().splitlines()
    assert captions and "captions" in json.loads(captions[0])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_submitted_training_job_checkpoints_and_registers(ray_head: RayHead, train_data: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    """`clipflow train` as a Ray job on the head: Ray Train inside the job, a checkpoint, a registered version."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    home, store = tmp_path / "home", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"home={home}", f"train.data={train_data}", "model.name=tiny-vit", "tokenizer.context_length=16",
                 "train.global_batch_size=16", "train.epochs=1", "train.warmup_steps=1", "train.log_every=3",
                 "scaling.min_workers=1", "scaling.max_workers=1", f"mlflow.tracking_uri={store}",
                 "mlflow.system_metrics=false", "mlflow.registered_model=submitted"]
    code = main(["submit", "--address", ray_head.dashboard, "--stage", "train", "--config", str(CONFIG),
                 *[a for o in overrides for a in ("--set", o)], "--wait", "--timeout", "270"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "status      SUCCEEDED" in out and "clipflow.train: step 6/6" in out  # 96 rows / 16 = 6 steps, logs streamed
    run_id = re.search(r"^run id (\S+): to continue this run after a stop or failure", out, re.M).group(1)
    again = out.split(f"run id {run_id}: to continue this run after a stop or failure, submit it again with the "
                      f"same run id:\n  ", 1)[1].splitlines()[0]
    assert again == shlex.join(["clipflow", "submit", "--address", ray_head.dashboard, "--stage", "train", "--config",
                                str(CONFIG), *[a for o in overrides for a in ("--set", o)], "--run-id", run_id])

    (checkpoint,) = home.glob(f"runs/{run_id}/checkpoint_00000006")
    assert load_checkpoint(checkpoint).trainer_state["step"] == 6
    (version,) = MlflowClient(store).search_model_versions("name = 'submitted'")
    assert version.tags["step"] == "6" and version.tags["eval_status"] == "pending"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_failed_job_exits_non_zero(ray_head: RayHead, tmp_path: Path, capsys, monkeypatch) -> None:
    """A stage that fails on the cluster (here: its home is a file, not a directory) fails `submit --wait`."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code = main(["submit", "--address", ray_head.dashboard, "--stage", "sample-data", "--set", f"home={not_a_dir}",
                 "--wait", "--timeout", "100"])
    out = capsys.readouterr().out
    assert code == 1 and "status      FAILED" in out


@pytest.mark.integration
def test_wrong_token_is_one_line_error(ray_head: RayHead, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", "--address", ray_head.dashboard, "--stage", "sample-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the cluster's auth token" in err and len(err.splitlines()) == 1


@pytest.mark.integration
def test_the_head_refuses_a_job_without_the_token(ray_head: RayHead) -> None:
    """What anyone else on the network would try: the Job Submission API without the token runs nothing."""
    import requests

    reply = requests.post(f"{ray_head.dashboard}/api/jobs/", json={"entrypoint": "id"}, timeout=60)
    assert reply.status_code in (401, 403), reply.text
    listed = requests.get(f"{ray_head.dashboard}/api/jobs/", timeout=60)
    assert listed.status_code in (401, 403)
