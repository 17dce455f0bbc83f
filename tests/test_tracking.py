"""The rank-0 Tracker against a real ``mlflow server``: one run per run key, params/tags/artifacts,
no metric step lost across a server outage, a bounded buffer, checkpoint publication (metric points never wait
behind a slow one); a server that is down when the run ends (the spool and `clipflow sync`), a hung server,
runs ended FAILED/KILLED, and no credentials in what is logged."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from clip_core import Tokenizer, create_model, save_checkpoint
from clip_core.checkpoint import MODEL_FILE
from workflows.common import runtime
from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.ops import cli
from workflows.tracking.run import RUN_KEY_TAG, get_or_create_experiment, scrub_uri, tracking_uri
from workflows.tracking.spool import PENDING_FILE, Spool
from workflows.tracking.tracker import Tracker, TrainingTracking

from mlflow_helpers import tracking_home

WORDS = ["red", "green", "blue", "circle", "square", "photo", "of", "a", "the", "small"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    return Tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(200)], vocab_size=540,
                           context_length=16)


@pytest.fixture()
def home(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    return tracking_home(tmp_path, tokenizer)


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
    first = Tracker(cfg, run_key="run-a", tags={"clipflow.stage": "pretrain"})
    first.log_metrics({"loss": 2.0}, step=1)
    first.close(status="FAILED")  # a worker group died ...
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    second = Tracker(cfg, run_key="run-a")  # ... and the restarted one continues the same run
    second.log_metrics({"loss": 1.5, "zeroshot/image_retrieval_recall@1": 0.25, "x" * 300: 1.0}, step=2)
    second.log_artifact(str(home / "data" / "train" / "manifest.json"), "extra")
    second.log_artifact(str(home / "missing.txt"))  # refused at once, blocks nothing
    second.close()
    assert second.rejected == 2 and second.buffered == 0
    assert second.run_id == first.run_id

    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0005" and run.data.params["model.name"] == "demo-vit"
    tags = run.data.tags
    assert tags["clipflow.stage"] == "pretrain" and tags["clipflow.data_manifest_hash"] == "abc123"
    assert tags["clipflow.tokenizer"].startswith("bpe-") and tags["clipflow.code_version"]
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    assert run.data.metrics["zeroshot/image_retrieval_recall_at_1"] == 0.25  # MLflow names may not hold "@"
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"config.yaml", "data", "tokenizer", "extra"} <= artifacts
    assert "data/manifest.json" in {a.path for a in client.list_artifacts(first.run_id, "data")}


class LogEvent(logging.Handler):
    """Set when a clipflow.tracking record containing ``text`` is logged (by any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_server_outage_loses_no_metric_step(mlflow_server, home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stop the real server mid-run: training goes on, and every step arrives after the restart."""
    cfg = make_cfg(home, mlflow_server.uri)
    tracker = Tracker(cfg, run_key="outage")
    caplog.set_level(logging.WARNING, logger="clipflow.tracking")
    noticed = LogEvent("unreachable")
    logging.getLogger("clipflow.tracking").addHandler(noticed)
    for step in range(0, 10):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    mlflow_server.stop()
    try:
        for step in range(10, 20):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        assert noticed.seen.wait(timeout=120), "the delivery thread never saw the outage"
        assert tracker.buffered >= 20
        late = Tracker(cfg, run_key="started-during-outage")  # a worker group (re)starting now
        late.log_metrics({"loss": 3.0}, step=7)
        assert late.run_id == ""
    finally:
        mlflow_server.start()
    for step in range(20, 25):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    tracker.close()
    late.close()
    logging.getLogger("clipflow.tracking").removeHandler(noticed)
    assert tracker.buffered == 0 and tracker.dropped == 0 and tracker.spool.read() is None
    assert any("is back" in r.getMessage() for r in caplog.records)
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(25))
    # the run that could not be created during the outage was created afterwards, fully set up
    late_run = client.get_run(late.run_id)
    assert late_run.data.tags["clipflow.run_key"] == "started-during-outage"
    assert late_run.data.params["train.lr"] and late_run.data.metrics["loss"] == 3.0


def test_unreachable_server_buffer_is_bounded(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(home, f"http://127.0.0.1:{free_port()}", "mlflow.buffer_size=5", "mlflow.close_timeout_seconds=1")
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
    spooled = tracker.spool.read()  # the newest 5 are kept for `clipflow sync`, with how the run ended
    assert [m.step for m in spooled.metrics] == list(range(7, 12)) and spooled.end == "FINISHED"
    assert spooled.run_key == "nowhere" and spooled.run_id == ""


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


def wait_until(done, what: str, bound_s: float = 120.0) -> None:
    """Until ``done()`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + bound_s
    while not done():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def test_metric_points_reach_the_server_while_a_publication_is_pending(
        mlflow_server, home: Path, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """A store that shows a checkpoint's files before their bytes: every file its checkpoint.json lists exists,
    but the weights do not verify yet, so the publication waits (registry.stage_weights retries). Points
    logged meanwhile reach the server while it waits (on one delivery thread they queued behind it, and died
    with rank 0 when its group was torn down); the version follows once the weights land."""
    cfg = make_cfg(home, mlflow_server.uri, f"mlflow.registered_model=track-{uuid.uuid4().hex[:8]}")
    name, client = cfg.mlflow.registered_model, MlflowClient(mlflow_server.uri)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)
    whole = save_checkpoint(home / "whole" / "checkpoint_00000002", model, tokenizer, trainer_state={"step": 2})
    landing = home / "runs" / "checkpoint_00000002"
    shutil.copytree(whole, landing)
    (landing / MODEL_FILE).write_bytes(b"")  # listed and present, its bytes not there yet
    caplog.set_level(logging.WARNING, logger="clipflow.tracking")
    tracker = Tracker(cfg, run_key="slow-publication")
    tracker.log_metrics({"loss": 1.0}, step=1)
    wait_until(lambda: tracker.run_id and not tracker.buffered, "the first point reached the server")
    assert tracker.publish_checkpoint(str(landing), step=2, samples_seen=16, final=False) is None
    # Publishing has begun (it creates the registered model first) and now waits for the weights.
    wait_until(lambda: client.search_registered_models(f"name='{name}'"), "the publication started")
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    wait_until(lambda: len(client.get_metric_history(tracker.run_id, "loss")) == 4, "the later points arrived")
    assert client.search_model_versions(f"name='{name}'") == [], "the publication should still be waiting"
    assert "is not registered" not in caplog.text, "the points arrived only once the publication gave up"
    shutil.copy(whole / MODEL_FILE, landing / f"{MODEL_FILE}.part")
    os.replace(landing / f"{MODEL_FILE}.part", landing / MODEL_FILE)  # the weights land
    tracker.close()
    run = client.get_run(tracker.run_id)
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == [1, 2, 3, 4]
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.tags["step"] == "2" and version.run_id == tracker.run_id
    assert run.info.status == "FINISHED" and run.info.end_time >= version.creation_timestamp  # ended after it


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


def versions_by_step(client: MlflowClient, name: str) -> list[str]:
    return sorted(mv.tags["step"] for mv in client.search_model_versions(f"name='{name}'"))


def test_server_down_at_close_loses_nothing_and_sync_delivers_it_once(
        mlflow_server, home: Path, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """The server goes away before the run ends: close gives up after mlflow.close_timeout_seconds, the spool
    holds every pending point and registration, one line names `clipflow sync`, and sync delivers each once."""
    cfg = make_cfg(home, mlflow_server.uri, f"mlflow.registered_model=track-{uuid.uuid4().hex[:8]}",
                   "mlflow.close_timeout_seconds=2")
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)
    run_key = f"ending-{uuid.uuid4().hex[:6]}"
    tracker = Tracker(cfg, run_key=run_key, tags={"clipflow.data_manifest_hash": "abc123"})
    caplog.set_level(logging.INFO, logger="clipflow.tracking")
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    uploading = home / "runs" / run_key / "checkpoint_00000002"
    tracker.publish_checkpoint(str(uploading), step=2, samples_seen=16, final=False)  # queued before the outage
    mlflow_server.stop()
    try:
        save_checkpoint(uploading, model, tokenizer, trainer_state={"step": 2})  # its upload completes
        for step in range(5, 10):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        final = save_checkpoint(home / "runs" / run_key / "checkpoint_00000004", model, tokenizer,
                                trainer_state={"step": 4})
        assert tracker.publish_checkpoint(str(final), step=4, samples_seen=32, final=True) is None
        tracker.close()
        assert sum("training goes on" in r.getMessage() for r in caplog.records) == 1, "one warning per outage"
        lines = [r.getMessage() for r in caplog.records if "clipflow sync" in r.getMessage()]
        assert len(lines) == 1 and f"`clipflow sync {tracker.spool.directory}`" in lines[0]
        assert "2 checkpoint registrations" in lines[0] and "the run's end (FINISHED)" in lines[0]
        spooled = tracker.spool.read()
        assert {m.step for m in spooled.metrics if m.key == "loss"} >= set(range(5, 10))
        assert [p.step for p in spooled.publications] == [2, 4] and spooled.end == "FINISHED"
        # a server that is down: sync says so on one line (exit 2) and keeps the spool. (A port of its own: once
        # stopped, the fixture's port may be taken by another process on a shared machine.)
        nowhere = f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}"
        assert cli.main(["sync", str(home / "runs" / run_key), "--set", nowhere]) == 2
        assert tracker.spool.read() is not None
    finally:
        mlflow_server.start()
    assert cli.main(["sync", str(home / "runs" / run_key)]) == 0  # the run directory; the spooled server URI
    assert tracker.spool.read() is None and not os.path.exists(tracker.spool.directory)
    assert cli.main(["sync", str(home / "runs" / run_key)]) == 0  # again: nothing pending, nothing doubled

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags[RUN_KEY_TAG] == run_key
    for key in ("loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(10))
    assert versions_by_step(client, cfg.mlflow.registered_model) == ["2", "4"]


class HungServer:
    """A TCP server that accepts connections and never answers: a hung (not refusing) tracking server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted, self.client_gave_up = threading.Event(), threading.Event()
        self.connections: list[socket.socket] = []
        self.closing = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.set()
            threading.Thread(target=self._watch, args=(conn,), daemon=True).start()

    def _watch(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            return
        if not self.closing:  # the client closed its end: it stopped waiting for an answer
            self.client_gave_up.set()

    def close(self) -> None:
        self.closing = True
        self.sock.close()
        for conn in self.connections:
            conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def test_hung_server_never_blocks_the_training_thread(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Tracker call returns while the delivery thread's request is still unanswered; close gives up on
    its own deadline and spools what the server never took."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # the client itself never gives up in this test
    server = HungServer()
    try:
        cfg = make_cfg(home, f"http://127.0.0.1:{server.port}", "mlflow.close_timeout_seconds=1")
        tracker = Tracker(cfg, run_key="hung")
        assert server.accepted.wait(timeout=120), "the delivery thread never reached the server"
        for step in range(50):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
        assert tracker.publish_checkpoint(str(home / "runs" / "hung" / "checkpoint_00000001"), 1, 8, False) is None
        assert not server.client_gave_up.is_set(), "a call waited for the hung request"
        tracker.close()
        assert not server.client_gave_up.is_set(), "close waited for the hung request"
        spooled = tracker.spool.read()
        assert len(spooled.metrics) == 100 and len(spooled.publications) == 1 and spooled.end == "FINISHED"
    finally:
        server.close()


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_the_driver_ends_a_run_its_workers_left_running(mlflow_server, home: Path, status: str) -> None:
    """Rank 0 died without closing (a killed worker group) or the user pressed Ctrl-C: the driver, which sees
    the failure, ends the run as FAILED / KILLED instead of leaving it RUNNING."""
    cfg = make_cfg(home, mlflow_server.uri)
    setup = SimpleNamespace(run_name=f"left-{uuid.uuid4().hex[:6]}", manifest_hash="abc123")
    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(get_or_create_experiment(client, cfg.mlflow.experiment), run_name=setup.run_name,
                            tags={RUN_KEY_TAG: setup.run_name})  # what rank 0 left behind
    assert TrainingTracking.for_config(cfg).end(setup, status) == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == status
    # nothing to end when no worker ever opened the run
    assert TrainingTracking.for_config(cfg).end(SimpleNamespace(run_name="never-opened", manifest_hash=""),
                                                status) == ""


def test_the_driver_ends_a_run_within_close_timeout_on_a_hung_server(home: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM handler ends the run inside a grace period: ``end`` returns while its request to a hung server is
    still unanswered (after mlflow.close_timeout_seconds), and the end status waits in the spool."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # the client itself never gives up in this test
    server = HungServer()
    try:
        cfg = make_cfg(home, f"http://127.0.0.1:{server.port}", "mlflow.close_timeout_seconds=1")
        setup = SimpleNamespace(run_name="hung-end", manifest_hash="abc123")
        assert TrainingTracking(cfg).end(setup, "KILLED") == ""  # (for_config would wait on the credential check)
        assert server.accepted.wait(timeout=120) and not server.client_gave_up.is_set()
        assert Spool.for_run(cfg.storage.path, "hung-end").read().end == "KILLED"
    finally:
        server.close()


def test_sync_refuses_what_is_not_a_spool(home: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["sync", str(home / "no-such-run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    spool = home / "runs" / "broken" / "mlflow-spool"
    spool.mkdir(parents=True)
    (spool / PENDING_FILE).write_text('{"kind": "run", "version": 1}\n{"kind": "metric"}\n')
    assert cli.main(["sync", str(spool)]) == 2
    err = capsys.readouterr().err
    assert "is not a clipflow MLflow spool" in err and len(err.strip().splitlines()) == 1
    assert Spool.find(str(spool.parent)).directory == str(spool)


def test_scrub_uri_removes_credentials() -> None:
    assert scrub_uri("https://alice:s3cret@mlflow.example.com:5000/x") == "https://***@mlflow.example.com:5000/x"
    assert scrub_uri("postgresql://mlflow:pw@db/mlflow") == "postgresql://***@db/mlflow"
    assert scrub_uri("['s3://bucket/a', 'http://token@minio:9000']") == "['s3://bucket/a', 'http://***@minio:9000']"
    for unchanged in ("", "http://127.0.0.1:5000", "sqlite:////tmp/x@y/mlflow.db", "/data/a@b", "s3://b/k@v1"):
        assert scrub_uri(unchanged) == unchanged


def test_credentials_in_the_tracking_uri_are_not_logged(mlflow_server, home: Path, tmp_path: Path) -> None:
    uri = mlflow_server.uri.replace("http://", "http://alice:s3cret@")
    cfg = make_cfg(home, uri, "storage.s3_endpoint=http://key:secret2@127.0.0.1:9")
    tracker = Tracker(cfg, run_key="credentials")
    tracker.close()
    client = MlflowClient(mlflow_server.uri)
    params = client.get_run(tracker.run_id).data.params
    assert params["mlflow.tracking_uri"] == mlflow_server.uri.replace("http://", "http://***@")
    assert params["storage.s3_endpoint"] == "http://***@127.0.0.1:9"
    logged = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "s3cret" not in logged and "secret2" not in logged and "***@" in logged


def test_env_defaults_keep_what_the_user_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """One table owns them; a later role replaces clipflow's own default but never the user's value."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    runtime.set_env_defaults("tracking")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    runtime.set_env_defaults("eval")  # the demo evaluates in the process that trained
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    runtime.set_env_defaults("tracking")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
