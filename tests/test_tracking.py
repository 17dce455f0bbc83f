"""The rank-0 Tracker against a real ``mlflow server``: one run per run key, params/tags/artifacts,
no metric step lost across a server outage, a bounded buffer, and checkpoint publication."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clip_core import Tokenizer, create_model, save_checkpoint
from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.tracking.client import Tracker, tracking_uri

WORDS = ["red", "green", "blue", "circle", "square", "photo", "of", "a", "the", "small"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(200)], vocab_size=540,
                           context_length=16)


@pytest.fixture()
def home(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    """A home with a training-data manifest and its tokenizer, as `clipflow preprocess` leaves them."""
    data = tmp_path / "data" / "train"
    tokenizer.save(data / "tokenizer")
    (data / "manifest.json").write_text(json.dumps({"version": 1, "tokenizer": tokenizer.id,
                                                    "tokenizer_path": "tokenizer", "content_hash": "abc123",
                                                    "context_length": 16, "image_size": 32, "shards": [],
                                                    "counts": {"input": 3, "written": 3, "duplicates": 0,
                                                               "rejected": {}}}))
    return tmp_path


def make_cfg(home: Path, uri: str, *extra: str):
    return load_config(None, [f"home={home}", f"mlflow.tracking_uri={uri}", "mlflow.system_metrics=false",
                              f"mlflow.experiment=track-{uuid.uuid4().hex[:8]}", *extra])


def test_tracking_uri_resolution(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(load_config(None, [f"home={home}"])) == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    with pytest.raises(UserError, match="mlflow.tracking_uri"):
        tracking_uri(load_config(None, ["home=s3://bucket/clipflow"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(load_config(None, [f"home={home}"])) == "http://env:5000"
    assert tracking_uri(load_config(None, [f"home={home}", "mlflow.tracking_uri=http://cfg:5000"])) == "http://cfg:5000"


def test_one_run_per_run_key_with_params_tags_artifacts(mlflow_server, home: Path) -> None:
    cfg = make_cfg(home, mlflow_server.uri, "train.lr=0.0005")
    first = Tracker(cfg, run_key="run-a", tags={"clipflow.world_size": "2"})
    first.log_metrics({"loss": 2.0}, step=1)
    first.close(status="FAILED")  # a worker group died ...
    second = Tracker(cfg, run_key="run-a")  # ... and the restarted one continues the same run
    second.log_metrics({"loss": 1.5, "zeroshot/image_retrieval_recall@1": 0.25, "x" * 300: 1.0}, step=2)
    second.log_artifact(str(home / "data" / "train" / "manifest.json"), "extra")
    second.log_artifact(str(home / "missing.txt"))  # refused at once, blocks nothing
    second.close()
    assert second.rejected == 2 and second.buffered == 0
    assert second.run_id == first.run_id

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0005" and run.data.params["model.name"] == "demo-vit"
    tags = run.data.tags
    assert tags["clipflow.world_size"] == "2" and tags["clipflow.data_manifest_hash"] == "abc123"
    assert tags["clipflow.tokenizer"].startswith("bpe-") and tags["clipflow.code_version"]
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    assert run.data.metrics["zeroshot/image_retrieval_recall_at_1"] == 0.25  # MLflow names may not hold "@"
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"config.yaml", "data", "tokenizer", "extra"} <= artifacts
    assert "data/manifest.json" in {a.path for a in client.list_artifacts(first.run_id, "data")}


def test_server_outage_loses_no_metric_step(mlflow_server, home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stop the real server mid-run: training calls stay fast, and every step arrives after the restart."""
    cfg = make_cfg(home, mlflow_server.uri)
    tracker = Tracker(cfg, run_key="outage")
    caplog.set_level(logging.WARNING, logger="clipflow.tracking")
    for step in range(0, 10):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    mlflow_server.stop()
    try:
        start = time.monotonic()
        for step in range(10, 20):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        assert time.monotonic() - start < 20, "an outage must not stall training"
        assert tracker.buffered >= 20
        assert any("unreachable" in r.getMessage() for r in caplog.records)
        late = Tracker(cfg, run_key="started-during-outage")  # a worker group (re)starting now
        late.log_metrics({"loss": 3.0}, step=7)
        assert late.run_id == ""
    finally:
        mlflow_server.start()
    for step in range(20, 25):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    tracker.close()
    late.close()
    assert tracker.buffered == 0 and tracker.dropped == 0
    assert any("is back" in r.getMessage() for r in caplog.records)
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(25))
    # the run that could not be created during the outage was created afterwards, fully set up
    late_run = client.get_run(late.run_id)
    assert late_run.data.tags["clipflow.run_key"] == "started-during-outage"
    assert late_run.data.params["train.lr"] and late_run.data.metrics["loss"] == 3.0


def test_unreachable_server_buffer_is_bounded(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(home, f"http://127.0.0.1:{free_port()}", "mlflow.buffer_size=5")
    caplog.set_level(logging.WARNING, logger="clipflow.tracking")
    tracker = Tracker(cfg, run_key="nowhere")  # must not raise
    for step in range(12):
        tracker.log_metrics({"loss": 1.0}, step=step)
    tracker.close()
    assert tracker.run_id == ""
    assert tracker.buffered == 5 and tracker.dropped == 7
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("training goes on" in w for w in warnings) == 1, "one warning per outage, not one per call"
    assert any("7 points dropped" in w for w in warnings)


def test_publish_checkpoint_registers_pending_version(mlflow_server, home: Path, tokenizer: Tokenizer) -> None:
    """A non-final checkpoint still uploading is published once complete, without blocking the caller."""
    cfg = make_cfg(home, mlflow_server.uri, f"mlflow.registered_model=track-{uuid.uuid4().hex[:8]}")
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)
    tracker = Tracker(cfg, run_key="publish", tags={"clipflow.data_manifest_hash": "abc123"})
    uploading = home / "runs" / "checkpoint_00000002"
    start = time.monotonic()
    assert tracker.publish_checkpoint(str(uploading), step=2, samples_seen=16, final=False) is None
    assert time.monotonic() - start < 5, "publishing an incomplete checkpoint must not wait for the upload"
    save_checkpoint(uploading, model, tokenizer, trainer_state={"step": 2})  # the upload completes
    final = save_checkpoint(home / "runs" / "checkpoint_00000004", model, tokenizer, trainer_state={"step": 4})
    version = tracker.publish_checkpoint(str(final), step=4, samples_seen=32, final=True)
    tracker.close()

    client = MlflowClient(mlflow_server.uri)
    versions = {mv.tags["step"]: mv for mv in client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")}
    assert sorted(versions) == ["2", "4"] and versions["4"].version == version
    mv = versions["4"]
    assert mv.run_id == tracker.run_id
    assert mv.tags["eval_status"] == "pending" and mv.tags["samples_seen"] == "32"
    assert mv.tags["checkpoint_uri"] == str(final) and mv.tags["data_manifest"] == "abc123"
    assert versions["2"].tags["checkpoint_uri"] == str(uploading)


def test_checkpoint_deleted_before_publication_is_dropped_and_later_ones_still_register(
        mlflow_server, home: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Ray deletes old checkpoints (train.keep_checkpoints), possibly while one is being published: that
    publication is dropped with a warning instead of blocking the queue as an outage."""
    from workflows.tracking import registry

    real = registry.publish_checkpoint

    def ray_deletes_it_first(client, **kwargs):
        if kwargs["step"] == 2:
            shutil.rmtree(kwargs["checkpoint_uri"])
        return real(client, **kwargs)

    monkeypatch.setattr(registry, "publish_checkpoint", ray_deletes_it_first)
    cfg = make_cfg(home, mlflow_server.uri, f"mlflow.registered_model=track-{uuid.uuid4().hex[:8]}")
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)
    tracker = Tracker(cfg, run_key="deleted")
    doomed = save_checkpoint(home / "runs" / "checkpoint_00000002", model, tokenizer, trainer_state={"step": 2})
    assert tracker.publish_checkpoint(str(doomed), step=2, samples_seen=16, final=False) is None
    final = save_checkpoint(home / "runs" / "checkpoint_00000004", model, tokenizer, trainer_state={"step": 4})
    with caplog.at_level(logging.WARNING, logger="clipflow.tracking"):
        version = tracker.publish_checkpoint(str(final), step=4, samples_seen=32, final=True)
        tracker.close()
    assert version is not None and "it is no longer complete at that path" in caplog.text
    versions = MlflowClient(mlflow_server.uri).search_model_versions(f"name='{cfg.mlflow.registered_model}'")
    assert [(mv.version, mv.tags["step"]) for mv in versions] == [(version, "4")]


def test_run_artifacts_from_s3_training_data(mlflow_server, s3_server, home: Path) -> None:
    """On a cluster the manifest and tokenizer live on S3; the run still gets them as artifacts."""
    bucket = s3_server.create_bucket(f"track-{uuid.uuid4().hex[:8]}")
    s3 = s3_server.client()
    local = home / "data" / "train"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key=f"train/{path.relative_to(local).as_posix()}", Body=path.read_bytes())
    cfg = make_cfg(home, mlflow_server.uri, f"train.data=s3://{bucket}/train",
                   f"storage.s3_endpoint={s3_server.endpoint}")
    tracker = Tracker(cfg, run_key="s3-data")
    tracker.close()
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(tracker.run_id).data.tags["clipflow.data_manifest_hash"] == "abc123"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "data")] == ["data/manifest.json"]
    expected = sorted(f"tokenizer/{p.name}" for p in (local / "tokenizer").iterdir())
    assert sorted(a.path for a in client.list_artifacts(tracker.run_id, "tokenizer")) == expected
