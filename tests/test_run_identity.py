"""Run identity: ``train.run_id`` names a run's checkpoint directory and MLflow run, and a new driver with the
same run id continues it (Ray Train V2 restores its latest checkpoint), reports a finished one without starting
workers, and refuses what would mix two runs (resume=never, another global batch, an ambiguous resume_from).

The driver-side decisions are tested on real checkpoints (``save_checkpoint``) without Ray; one integration
test runs a driver that dies mid-run and a second driver that continues it, on the suite's Ray runtime."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import ray
import ray.train
from mlflow import MlflowClient
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from clip_core import load_checkpoint, save_checkpoint
from clip_core.checkpoint import MODEL_FILE
from workflows.common.config import ConfigError, load_config
from workflows.common.errors import UserError
from workflows.ops.cli import main
from workflows.ops.stages import format_train
from workflows.tracking.run import RUN_KEY_TAG, tracking_uri
from workflows.tracking.tracker import TrainingTracking
from workflows.train.driver import latest_run_checkpoint, prepare_run, run_training
from workflows.train.loop import TrainDebug, build_model

from tiny_data import CONTEXT

RUN = "tiny-run-1"


def _cfg(data: Path, home: Path, *extra: str):
    return load_config(None, [
        f"home={home}", f"train.data={data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
        "train.global_batch_size=16", "train.max_steps=9", "train.warmup_steps=2", "train.log_every=3",
        "train.checkpoint_every=3", "train.keep_checkpoints=2", f"train.run_id={RUN}", *extra])


def _checkpoint(cfg, root: Path, step: int, **state) -> Path:
    """A real checkpoint of the run under ``root``, as the training loop writes it."""
    setup = prepare_run(_cfg(cfg.train.data, cfg.home, "train.run_id="), TrainDebug())  # the model, the tokenizer
    trainer_state = {"step": step, "samples_seen": step * 16, "global_batch_size": 16, "data_manifest_hash": "tiny-v1",
                     "loss": 1.5, "mlflow_run_id": "abc", "world_size": 2, **state}
    return save_checkpoint(root / f"checkpoint_{step:08d}", build_model(cfg, setup), setup.tokenizer,
                           trainer_state=trainer_state)


def _refused(cfg) -> str:
    with pytest.raises(UserError) as caught:
        prepare_run(cfg, TrainDebug())
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ---- without Ray -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["a/b", "../up", "-x", "x" * 101, "spaced id", "ünï"])
def test_a_run_id_that_is_no_safe_name_is_one_config_error(run_id: str) -> None:
    with pytest.raises(ConfigError, match="must be 1 to 100 letters, digits") as caught:
        load_config(None, [f"train.run_id={run_id}"])
    assert "\n" not in str(caught.value)
    assert load_config(None, ["train.run_id=vit-b32.v2_1"]).train.resume == "auto"
    with pytest.raises(ConfigError, match=r"train.resume: 'sometimes' is not one of \['auto', 'never'\]"):
        load_config(None, ["train.resume=sometimes"])


def test_a_run_id_names_the_run_and_its_checkpoint_directory(train_data: Path, tmp_path: Path) -> None:
    setup = prepare_run(_cfg(train_data, tmp_path), TrainDebug())
    assert setup.run_name == RUN and setup.checkpoint_root == str(tmp_path / "runs" / RUN)
    assert not setup.resume_checkpoint and not setup.finished_checkpoint
    fresh = prepare_run(_cfg(train_data, tmp_path, "train.run_id="), TrainDebug()).run_name
    assert fresh.startswith("demo-") and fresh != prepare_run(_cfg(train_data, tmp_path, "train.run_id="),
                                                              TrainDebug()).run_name  # one name per invocation


def test_a_new_driver_continues_the_latest_whole_checkpoint(train_data: Path, tmp_path: Path, caplog) -> None:
    cfg = _cfg(train_data, tmp_path)
    root = tmp_path / "runs" / RUN
    _checkpoint(cfg, root, 3)
    six = _checkpoint(cfg, root, 6)
    cut = shutil.copytree(six, root / "checkpoint_00000009")  # an upload cut short: its weights are truncated
    (cut / MODEL_FILE).write_bytes((cut / MODEL_FILE).read_bytes()[:100])
    # No Ray snapshot (a copied run directory): the driver hands the newest whole checkpoint to the first group.
    with caplog.at_level("INFO", logger="clipflow.train"):
        setup = prepare_run(cfg, TrainDebug())
    assert setup.resume_checkpoint == str(six) and not setup.finished_checkpoint
    assert f"{cut} is not a whole checkpoint (a save cut short): skipped" in caplog.text
    assert f"run {RUN}: continuing from step 6 (checkpoint {six})" in caplog.text

    # With Ray's snapshot, Ray Train restores its latest registered checkpoint itself.
    snapshot = {"ray_version": ray.__version__, "latest_checkpoint_result": {"checkpoint_dir_name": six.name},
                "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000003"},
                                       {"checkpoint_dir_name": six.name}]}
    (root / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(json.dumps(snapshot))
    assert latest_run_checkpoint(str(root), "") == (str(six), True)
    assert prepare_run(cfg, TrainDebug()).resume_checkpoint == ""
    # ... unless Ray would refuse the snapshot: one line that says how to go on.
    (root / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(json.dumps({**snapshot, "ray_version": "2.0.0"}))
    assert "was written by Ray 2.0.0" in _refused(cfg)
    shutil.rmtree(root / "checkpoint_00000003")
    (root / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(json.dumps(snapshot))
    message = _refused(cfg)
    assert "lists checkpoint(s) checkpoint_00000003 that no longer exist" in message and "delete" in message


def test_what_would_mix_two_runs_is_refused_in_one_line(train_data: Path, tmp_path: Path) -> None:
    cfg = _cfg(train_data, tmp_path)
    ckpt = _checkpoint(cfg, tmp_path / "runs" / RUN, 6)
    assert "already has checkpoints (latest" in _refused(_cfg(train_data, tmp_path, "train.resume=never"))
    assert "choose another train.run_id" in _refused(_cfg(train_data, tmp_path, "train.resume=never"))
    message = _refused(_cfg(train_data, tmp_path, "train.global_batch_size=32"))
    assert f"checkpoint {ckpt} was trained with global batch 16" in message
    other = _checkpoint(cfg, tmp_path / "elsewhere", 3)
    assert "is ambiguous: drop --resume-from" in _refused(_cfg(train_data, tmp_path, f"train.resume_from={other}"))
    # A run started with --resume-from continues when the same command runs again (a RayJob retry).
    shutil.rmtree(tmp_path / "runs" / RUN)
    started = _checkpoint(cfg, tmp_path / "runs" / RUN, 6, resume_from=str(other))
    setup = prepare_run(_cfg(train_data, tmp_path, f"train.resume_from={other}"), TrainDebug())
    assert setup.resume_checkpoint == str(started)
    # Without checkpoints of its own, a run id starts from train.resume_from.
    fresh = prepare_run(_cfg(train_data, tmp_path, f"train.resume_from={other}", "train.run_id=another"),
                        TrainDebug())
    assert (fresh.run_name, fresh.resume_checkpoint) == ("another", str(other))


def test_a_finished_run_is_reported_without_starting_workers(train_data: Path, tmp_path: Path, capsys) -> None:
    cfg = _cfg(train_data, tmp_path)
    final = _checkpoint(cfg, tmp_path / "runs" / RUN, 9, loss=0.25, samples_per_second=40.0)
    result = run_training(cfg)  # no Ray runtime is needed: none is started
    assert result.already_finished
    assert (result.steps, result.samples_seen, result.checkpoint_uri) == (9, 144, str(final))
    assert (result.mlflow_run_id, result.run_name, result.final_loss) == ("abc", RUN, 0.25)
    assert f"run         {RUN} had already finished: nothing trained now" in format_train(result)
    # `clipflow train` with the same run id: the summary, exit 0, and no MLflow run opened.
    argv = ["train", *[a for o in [f"home={tmp_path}", f"train.data={train_data}", "model.name=tiny-vit",
                                   f"tokenizer.context_length={CONTEXT}", "train.global_batch_size=16",
                                   "train.max_steps=9"] for a in ("--set", o)]]
    assert main([*argv, "--run-id", RUN]) == 0
    assert "had already finished" in capsys.readouterr().out
    assert not (tmp_path / "mlflow" / "mlflow.db").exists()  # the local store was never opened
    assert main([*argv, "--run-id", "no/slashes"]) == 2
    assert "train.run_id 'no/slashes' must be 1 to 100 letters" in capsys.readouterr().err


# ---- a driver that dies, and the next one -----------------------------------------------------------------


def _ledger_steps(directory: Path) -> collections.Counter:
    """step -> how many samples were trained at it, over every attempt (``TrainDebug.ledger_dir``)."""
    return collections.Counter(int(line.split("\t")[1]) for f in directory.glob("rank-*.tsv")
                               for line in f.read_text().splitlines())


@pytest.mark.integration
@pytest.mark.timeout(420)  # two short Ray Train runs (271 s measured on a heavily loaded 2-core machine)
def test_a_new_driver_with_the_run_id_continues_the_run_in_the_same_mlflow_run(ray_runtime, train_data, tmp_path):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    cfg = _cfg(train_data, tmp_path, "mlflow.system_metrics=false",  # the local MLflow store under home
               "mlflow.experiment=run-identity", "mlflow.registered_model=run-identity",
               "scaling.min_workers=1", "scaling.max_workers=1", "scaling.max_failures=0")
    # The first driver's only worker dies after step 7 (5 s after it, so Ray has registered checkpoint 6),
    # and with no retries left the driver fails: what a lost RayJob attempt leaves behind.
    debug = TrainDebug(ledger_dir=str(ledger), fail_at_step=7, fail_rank=0, fail_after_s=5)
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(cfg, debug, TrainingTracking.for_config(cfg))
    root = tmp_path / "runs" / RUN
    assert latest_run_checkpoint(str(root), "") == (str(root / "checkpoint_00000006"), True)
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name("run-identity").experiment_id
    (first,) = client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{RUN}'")
    assert first.info.status == "FAILED"

    # The next driver: same command, same run id. Ray Train restores checkpoint 6 (its snapshot) into the new
    # group, which trains steps 7..9 on exactly the samples of those steps, in the same MLflow run.
    result = run_training(cfg, debug, TrainingTracking.for_config(cfg))
    assert (result.run_name, result.steps, result.samples_seen) == (RUN, 9, 9 * 16)
    assert result.mlflow_run_id == first.info.run_id and not result.already_finished
    assert _ledger_steps(ledger) == {**{s: 16 for s in range(1, 10)}, 7: 32}  # step 7 twice, from step 6
    assert load_checkpoint(result.checkpoint_uri).trainer_state["samples_seen"] == 9 * 16
    (run,) = client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{RUN}'")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert sorted(p.step for p in client.get_metric_history(run.info.run_id, "loss")) == [3, 6, 9]

    # Once more: finished, so nothing trains and the run's figures come back.
    again = run_training(cfg, debug, TrainingTracking.for_config(cfg))
    assert again.already_finished and (again.steps, again.checkpoint_uri) == (9, result.checkpoint_uri)
    assert again.mlflow_run_id == run.info.run_id
    assert _ledger_steps(ledger)[9] == 16
