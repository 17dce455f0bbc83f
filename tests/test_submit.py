"""`clipflow submit`: the request it builds, its errors, and a real job on a real Ray head node.

The integration test starts its own `ray start --head` (with the dashboard, which hosts the Job
Submission API) on free ports and a private temp dir, submits a cheap stage through the CLI with
``--wait`` and stops only the processes it started: other suites may run Ray on this machine too.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from clip_core import load_checkpoint
from workflows.cli import build_parser, main
from workflows.config import load_config
from workflows.errors import UserError
from workflows.local_services import free_port, wait_http
from workflows.manifests import PROJECT_ROOT
from workflows.submit import EXCLUDES, build_request

BIN = Path(sys.executable).parent
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


@pytest.mark.parametrize("argv, message", [
    (["--stage", "train", "--pending"], "only apply to --stage eval"),
    (["--env", "NOEQUALS"], "--env expects KEY=VALUE"),
])
def test_bad_requests_are_user_errors(argv: list[str], message: str) -> None:
    args = parse("--address", "http://h:8265", *argv)
    with pytest.raises(UserError, match=message):
        build_request(load_config(None), args)


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


def _dashboard_missing() -> str | None:
    import ray._private.utils

    error = ray._private.utils.get_dashboard_dependency_error()
    return f"the Ray job server needs ray[default] ({error})" if error else None


HEAD_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A private Ray head with the job server and token auth (``HEAD_TOKEN``); yields its http address."""
    missing = _dashboard_missing()
    if missing:
        pytest.skip(missing)
    tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    dash = free_port()
    # Every port Ray would otherwise default (agent 52365, metrics, ...) is a free one: another Ray runtime
    # on this machine (the suite's own) already holds the defaults.
    ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": HEAD_TOKEN}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", *(f"--{flag}={p}" for flag, p in ports.items()),
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={tmp}"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = f"http://127.0.0.1:{dash}"
        try:
            wait_http(f"{address}/api/version", timeout=120)
        except UserError:
            logs = sorted(tmp.glob("session_latest/logs/dashboard*.log")) + sorted(tmp.glob("session_latest/logs/raylet.out"))
            raise AssertionError("the Ray dashboard did not come up; its logs end with:\n" + "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs))
        yield address
    finally:
        _stop_ray_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_ray_under(tmp: Path) -> None:
    """Stop the Ray processes of this head only: those whose command line names its temp dir.

    `ray stop` would kill every Ray instance of the user, including other suites' clusters.
    """
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(tmp) in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_submit_runs_a_stage_on_a_real_ray_head(ray_head: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", HEAD_TOKEN)
    home = tmp_path / "home"
    code = main(["submit", "--address", ray_head, "--stage", "sample-data", "--config", str(CONFIG),
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
def test_submitted_training_job_checkpoints_and_registers(ray_head: str, train_data: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    """`clipflow train` as a Ray job on the head: Ray Train inside the job, a checkpoint, a registered version."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", HEAD_TOKEN)
    home, store = tmp_path / "home", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"home={home}", f"train.data={train_data}", "model.name=tiny-vit", "tokenizer.context_length=16",
                 "train.global_batch_size=16", "train.epochs=1", "train.warmup_steps=1", "train.log_every=3",
                 "scaling.min_workers=1", "scaling.max_workers=1", f"mlflow.tracking_uri={store}",
                 "mlflow.system_metrics=false", "mlflow.registered_model=submitted"]
    code = main(["submit", "--address", ray_head, "--stage", "train", "--config", str(CONFIG),
                 *[a for o in overrides for a in ("--set", o)], "--wait", "--timeout", "270"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "status      SUCCEEDED" in out and "[train] step 6/6" in out  # 96 rows / 16 = 6 steps, logs streamed

    (checkpoint,) = home.glob("runs/*/checkpoint_00000006")
    assert load_checkpoint(checkpoint).trainer_state["step"] == 6
    (version,) = MlflowClient(store).search_model_versions("name = 'submitted'")
    assert version.tags["step"] == "6" and version.tags["eval_status"] == "pending"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_failed_job_exits_non_zero(ray_head: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """A stage that fails on the cluster (here: its home is a file, not a directory) fails `submit --wait`."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", HEAD_TOKEN)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    code = main(["submit", "--address", ray_head, "--stage", "sample-data", "--set", f"home={not_a_dir}",
                 "--wait", "--timeout", "100"])
    out = capsys.readouterr().out
    assert code == 1 and "status      FAILED" in out


@pytest.mark.integration
def test_wrong_token_is_one_line_error(ray_head: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", "--address", ray_head, "--stage", "sample-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the cluster's auth token" in err and len(err.splitlines()) == 1
