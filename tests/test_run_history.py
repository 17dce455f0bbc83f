"""One clean MLflow history however often a run restarts, against a real ``mlflow server``: steps a restarted
worker group re-trains are not logged twice (also when the earlier group's points come from the spool), the
group-start metrics (``world_size``, ``group_starts``, ``resumed_from_step``) count on across worker groups and
drivers, a new driver of a run left RUNNING records the lost attempt, and a checkpoint whose publication died
with its worker group gets exactly one model version when the next group starts. One short Ray Train run (rank 0
killed mid-run) checks the same in the training loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from clip_core import Tokenizer, create_model, save_checkpoint
from workflows.common.config import Config, load_config
from workflows.common.runtime import free_port
from workflows.tracking.run import ATTEMPT_TAG, ATTEMPTS_TAG, LOST, PREVIOUS_END_TAG, tracking_uri
from workflows.tracking.tracker import Tracker, TrainingTracking
from workflows.train.driver import run_training
from workflows.train.loop import TrainDebug, publish_kept

from mlflow_helpers import tracking_home, train_tokenizer
from tiny_data import CONTEXT


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tracking_home(tmp_path, train_tokenizer())


def overrides(home: Path, uri: str, *extra: str) -> list[str]:
    return [f"home={home}", f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false",
            f"mlflow.experiment=history-{uuid.uuid4().hex[:8]}", *extra]


def make_cfg(home: Path, uri: str, *extra: str) -> Config:
    return load_config(None, overrides(home, uri, *extra))


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_delivered(tracker: Tracker, bound_s: float = 120.0) -> None:
    """Until the server took everything queued (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + bound_s
    while tracker.buffered or not tracker.run_id:
        assert time.monotonic() < deadline, "the delivery thread never delivered"
        time.sleep(0.2)


def test_steps_a_restarted_group_logs_again_are_not_logged_twice(mlflow_server, home: Path) -> None:
    cfg = make_cfg(home, mlflow_server.uri)
    first = Tracker(cfg, run_key="rollback")
    for step in (5, 10, 15, 20, 25):
        first.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step=step)
    first.close(status="FAILED")  # the group died after step 26; the next one restores step 20
    second = Tracker(cfg, run_key="rollback")
    for step in (25, 30):
        second.log_metrics({"loss": 2.0 / step, "lr": 0.2, "new_metric": 1.0}, step=step)
    second.close()
    client = MlflowClient(mlflow_server.uri)
    assert history(client, first.run_id, "loss") == [(5, 0.2), (10, 0.1), (15, 1 / 15), (20, 0.05), (25, 0.04),
                                                     (30, 2 / 30)]
    assert [s for s, _ in history(client, first.run_id, "lr")] == [5, 10, 15, 20, 25, 30]
    assert history(client, first.run_id, "new_metric") == [(25, 1.0), (30, 1.0)]  # the run had none of it yet


def test_spooled_points_of_a_dead_group_are_delivered_first_and_not_doubled(mlflow_server, home: Path) -> None:
    """The first group never reached the server: its points and its group start wait in the spool. The next group
    (same run key and storage path) delivers them, numbers both group starts, and drops its own re-logged step."""
    down = make_cfg(home, f"http://127.0.0.1:{free_port()}", "mlflow.close_timeout_seconds=1")
    first = Tracker(down, run_key="spooled")
    first.log_group_start(world_size=2, step=0, restored=False)
    for step in (5, 10, 15, 20, 25):
        first.log_metrics({"loss": 1.0 / step}, step=step)
    first.close(status="FAILED")
    spooled = first.spool.read()
    assert len(spooled.metrics) == 5 and len(spooled.group_starts) == 1

    cfg = make_cfg(home, mlflow_server.uri)
    second = Tracker(cfg, run_key="spooled")
    second.log_group_start(world_size=1, step=20, restored=True)
    for step in (25, 30):
        second.log_metrics({"loss": 2.0 / step}, step=step)
    second.close()
    assert second.spool.read() is None
    client = MlflowClient(mlflow_server.uri)
    assert history(client, second.run_id, "loss") == [(5, 0.2), (10, 0.1), (15, 1 / 15), (20, 0.05), (25, 0.04),
                                                      (30, 2 / 30)]
    assert history(client, second.run_id, "group_starts") == [(0, 1.0), (20, 2.0)]
    assert history(client, second.run_id, "world_size") == [(0, 2.0), (20, 1.0)]
    assert history(client, second.run_id, "resumed_from_step") == [(20, 20.0)]


def test_group_starts_count_on_across_groups_and_drivers(mlflow_server, home: Path) -> None:
    """Driver A's first group fails, its second is left RUNNING (driver A dies); driver B continues the run: the
    group starts go 1, 2, 3, and the run records B as the second driver attempt and A's end as lost."""
    cfg = make_cfg(home, mlflow_server.uri)
    setup = SimpleNamespace(run_name=f"attempts-{uuid.uuid4().hex[:6]}", manifest_hash="abc123")
    client = MlflowClient(mlflow_server.uri)
    driver_a = TrainingTracking.for_config(cfg)
    group = driver_a(setup)
    group.log_group_start(world_size=2, step=0, restored=False)
    group.log_metrics({"loss": 1.0}, step=5)
    group.close(status="FAILED")
    group = driver_a(setup)  # Ray Train restarts the group, in the same driver
    group.log_group_start(world_size=1, step=4, restored=True)
    group.log_metrics({"loss": 0.9}, step=10)
    wait_delivered(group)  # then driver A dies: nothing ends the run
    run_id = group.run_id
    tags = client.get_run(run_id).data.tags
    assert tags[ATTEMPT_TAG] == driver_a.attempt and tags[ATTEMPTS_TAG] == "1" and PREVIOUS_END_TAG not in tags
    assert client.get_run(run_id).info.status == "RUNNING"

    driver_b = TrainingTracking.for_config(cfg)
    group = driver_b(setup)
    group.log_group_start(world_size=2, step=10, restored=True)
    group.log_metrics({"loss": 0.8}, step=15)
    group.close(status="KILLED")  # driver B is stopped in turn (SIGTERM): a third attempt would record KILLED
    run = client.get_run(run_id)
    assert group.run_id == run_id and run.info.status == "KILLED"
    assert run.data.tags[ATTEMPT_TAG] == driver_b.attempt and run.data.tags[ATTEMPTS_TAG] == "2"
    assert run.data.tags[PREVIOUS_END_TAG] == LOST
    assert history(client, run_id, "group_starts") == [(0, 1.0), (4, 2.0), (10, 3.0)]
    assert history(client, run_id, "world_size") == [(0, 2.0), (4, 1.0), (10, 2.0)]
    assert history(client, run_id, "resumed_from_step") == [(4, 4.0), (10, 10.0)]
    assert "clipflow.world_size" not in run.data.tags  # the metric's history replaces the overwritten tag

    driver_c = TrainingTracking.for_config(cfg)
    group = driver_c(setup)
    group.close()
    tags = client.get_run(run_id).data.tags
    assert tags[ATTEMPTS_TAG] == "3" and tags[PREVIOUS_END_TAG] == "KILLED"


# A worker group's rank 0 that queues the publication of a checkpoint still uploading, then dies with its node.
DOOMED_RANK0 = """
import json, os, signal, sys, time
from workflows.common.config import load_config
from workflows.tracking.tracker import Tracker
overrides, run_key, checkpoint = json.loads(sys.argv[1])
tracker = Tracker(load_config(None, overrides), run_key=run_key)
tracker.publish_checkpoint(checkpoint, 4, 32, final=False)
while not tracker.run_id:
    time.sleep(0.1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def versions_by_step(client: MlflowClient, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for mv in client.search_model_versions(f"name='{name}'"):
        out.setdefault(int(mv.tags["step"]), []).append(mv.version)
    return out


def test_a_publication_lost_with_its_worker_group_is_registered_once_by_the_next(
        mlflow_server, home: Path) -> None:
    model_name = f"history-{uuid.uuid4().hex[:8]}"
    extra = (f"mlflow.registered_model={model_name}", "train.checkpoint_every=2")
    args = overrides(home, mlflow_server.uri, *extra)
    cfg = load_config(None, args)
    run_key = f"torn-down-{uuid.uuid4().hex[:6]}"
    root = home / "runs" / run_key
    tokenizer: Tokenizer = train_tokenizer()
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)

    first = Tracker(cfg, run_key=run_key)  # group 1 publishes step 2 and ends
    first.publish_checkpoint(str(save_checkpoint(root / "checkpoint_00000002", model, tokenizer,
                                                 trainer_state={"step": 2})), 2, 16, final=True)
    first.close(status="FAILED")
    doomed = subprocess.run([sys.executable, "-c", DOOMED_RANK0, json.dumps([args, run_key,
                                                                            str(root / "checkpoint_00000004")])],
                            timeout=300)
    assert doomed.returncode == -signal.SIGKILL
    # Its upload completed (Ray registered it: the next group restores it), but the publication was only in the
    # dead process's memory: no version, no spool.
    save_checkpoint(root / "checkpoint_00000004", model, tokenizer, trainer_state={"step": 4})
    (root / "checkpoint_00000006").mkdir()  # a later save cut short: not restored, not the run's
    (root / "checkpoint_00000006" / "upload-in-progress").write_bytes(b"")
    client = MlflowClient(mlflow_server.uri)
    assert sorted(versions_by_step(client, model_name)) == [2]
    spooled = first.spool.read()
    assert spooled is None or all(p.step != 4 for p in spooled.publications)

    setup = SimpleNamespace(checkpoint_root=str(root), total_steps=8)
    for _ in range(2):  # the next group restores step 4; and the one after it, restoring step 4 again
        group = Tracker(cfg, run_key=run_key)
        publish_kept(cfg, setup, group, restored_step=4)
        group.close()
    published = versions_by_step(client, model_name)
    assert sorted(published) == [2, 4] and all(len(v) == 1 for v in published.values()), published
    (four,) = client.search_model_versions(f"name='{model_name}' and tags.step='4'")
    assert four.run_id == first.run_id and four.tags["samples_seen"] == str(4 * cfg.train.global_batch_size)


def _train_cfg(data: Path, home: Path, *extra: str) -> Config:
    return load_config(None, [
        f"home={home}", f"train.data={data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
        "train.global_batch_size=16", "train.max_steps=8", "train.warmup_steps=2", "train.log_every=1",
        "train.checkpoint_every=2", "train.keep_checkpoints=4", "scaling.max_failures=2", "mlflow.system_metrics=false",
        f"mlflow.registered_model=history-{uuid.uuid4().hex[:8]}", *extra])


@pytest.mark.timeout(600)
def test_a_run_whose_rank0_dies_has_one_history_and_every_checkpoint_registered(ray_runtime, mlflow_server,
                                                                                 train_data, tmp_path) -> None:
    """Rank 0 dies after step 5 (checkpoints 2 and 4 reported); the next group restores step 4 and trains 5
    again. Each step has one loss point, the group starts are recorded, and each kept checkpoint one version."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    cfg = _train_cfg(train_data, tmp_path, f"mlflow.tracking_uri={mlflow_server.uri}")
    result = run_training(cfg, TrainDebug(ledger_dir=str(ledger), fail_at_step=5, fail_rank=0, fail_after_s=4),
                          TrainingTracking.for_config(cfg))
    assert (ledger / "failed-at-5").exists() and (result.steps, result.samples_seen) == (8, 8 * 16)
    client = MlflowClient(tracking_uri(cfg))
    run_id = result.mlflow_run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[ATTEMPTS_TAG] == "1"
    assert [s for s, _ in history(client, run_id, "loss")] == list(range(1, 9))
    assert history(client, run_id, "group_starts") == [(0, 1.0), (4, 2.0)]
    assert history(client, run_id, "world_size") == [(0, 2.0), (4, 2.0)]
    assert history(client, run_id, "resumed_from_step") == [(4, 4.0)]
    published = versions_by_step(client, cfg.mlflow.registered_model)
    assert sorted(published) == [2, 4, 6, 8] and all(len(v) == 1 for v in published.values()), published
    assert os.path.isdir(Path(result.checkpoint_uri).parent / "checkpoint_00000004")
