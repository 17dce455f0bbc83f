"""Training-side faults on real file systems: stores that refuse writes (a full tmpfs, a read-only mount or
directory, a missing bucket) end the run on one line with exit 2 instead of Ray's retries; a damaged
``--resume-from`` checkpoint is refused before any worker starts; temp files of killed writers are removed.

The full and read-only file systems are real tmpfs mounts where this user may mount (root with
CAP_SYS_ADMIN); else the read-only store is a chmod 0o555 directory, and the ENOSPC tests are skipped."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pytest
import torch
from mlflow import MlflowClient

from clip_core import load_checkpoint, save_checkpoint
from clip_core.checkpoint import (MANIFEST, MODEL_FILE, STALE_TMP_S, TRAINER_STATE_FILE, TRAINING_STATE_FILE,
                                  CheckpointError, verify_checkpoint)
from workflows.common import storage
from workflows.common.config import load_config
from workflows.ops.cli import main
from workflows.tracking.run import tracking_uri
from workflows.tracking.tracker import TrainingTracking
from workflows.train.driver import _storage_failure, prepare_run, run_training
from workflows.train.loop import LOCAL_CHECKPOINT_PREFIX, TrainDebug, build_model, local_checkpoint_dir

from tiny_data import CONTEXT


def _mount_tmpfs(where: Path, *options: str) -> bool:
    where.mkdir()
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(["size=64k", *options]), "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """An empty 64 KiB tmpfs: a real file system that runs out of space (ENOSPC) after a few files."""
    where = tmp_path / "tiny"
    if not _mount_tmpfs(where):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def full_fs(tiny_fs: Path) -> Path:
    with pytest.raises(OSError) as filled, open(tiny_fs / "filler", "wb") as f:
        f.write(b"\0" * (1 << 20))
    assert filled.value.errno == errno.ENOSPC
    return tiny_fs


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (EROFS) where this user may mount, else a chmod 0o555 directory (EACCES)."""
    where = tmp_path / "readonly"
    if _mount_tmpfs(where, "ro"):
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root ignores chmod and cannot mount here: no read-only directory to test with")
    where.chmod(0o555)
    try:
        yield where
    finally:
        where.chmod(0o755)


# ---- classifying what the stores raise ---------------------------------------------------------------


def test_a_full_file_system_is_not_transient(full_fs: Path) -> None:
    with pytest.raises(OSError) as from_python, open(full_fs / "more", "wb") as f:
        f.write(b"\0" * 8192)
    with pytest.raises(OSError) as from_pyarrow, pafs.LocalFileSystem().open_output_stream(str(full_fs / "x")) as f:
        f.write(b"\0" * 8192)
    for error in (from_python.value, from_pyarrow.value):
        found = storage.storage_error(error, str(full_fs))
        assert found is not None and str(found) == (f"cannot write {full_fs}: No space left on device (ENOSPC); "
                                                    f"free space there or set storage.path to a store with room")
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = from_pyarrow.value
    assert "ENOSPC" in str(storage.storage_error(wrapped, "s3://b/run"))


def test_a_read_only_store_is_not_transient_and_other_errors_are(readonly_dir: Path) -> None:
    target = readonly_dir / "runs" / "f.bin"
    with pytest.raises(OSError) as refused:
        storage.write_bytes(str(target), b"x")
    found = storage.storage_error(refused.value, str(readonly_dir))
    assert found is not None and f"cannot write {target.parent}: " in str(found)  # the error's own path
    assert ("(EROFS); set storage.path to a writable location" in str(found)
            or "(EACCES); give this user write access there" in str(found))
    for transient in (ConnectionResetError(errno.ECONNRESET, "reset by peer"), OSError(errno.EIO, "I/O error"),
                      TimeoutError("timed out"), ValueError("No space left on device")):
        assert storage.storage_error(transient, str(readonly_dir)) is None


@pytest.mark.integration
def test_a_missing_bucket_is_not_transient(s3_server) -> None:
    uri = "s3://no-such-bucket-here/runs"
    with pytest.raises(OSError) as refused:
        storage.write_bytes(f"{uri}/f.bin", b"x", s3_server.endpoint)
    assert "AWS Error NO_SUCH_BUCKET" in str(storage.storage_error(refused.value, uri))
    with pytest.raises(storage.StorageError, match=f"cannot write {uri}: AWS Error NO_SUCH_BUCKET; check the bucket"):
        storage.check_writable(uri, s3_server.endpoint)


# ---- temp files of killed writers ----------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_next_write_removes_stale_temp_files_only(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    stale = directory / f"{storage.TEMP_PREFIX}0123-shard-00001.parquet"  # what a killed write_bytes leaves
    live = directory / f"{storage.TEMP_PREFIX}4567-shard-00002.parquet"  # a writer busy right now
    old_data = directory / "shard-00000.parquet"
    for path in (stale, live, old_data):
        path.write_bytes(b"partial")
    _age(stale, storage.STALE_TEMP_S + 60)
    _age(old_data, storage.STALE_TEMP_S + 60)
    storage.write_bytes(str(directory / "manifest.json"), b"{}")
    assert sorted(p.name for p in directory.iterdir()) == sorted([live.name, old_data.name, "manifest.json"])


def test_a_save_removes_the_stale_temporary_siblings_of_its_target(tmp_path: Path, train_data: Path) -> None:
    cfg = _cfg(train_data, tmp_path)
    setup = prepare_run(cfg, TrainDebug())
    model = build_model(cfg, setup)
    target = tmp_path / "ckpt"
    killed_save = tmp_path / ".ckpt.tmp-0badbeef"  # a save killed while writing
    killed_rmtree = tmp_path / ".ckpt.old-0badbeef"  # a save killed after the rename, before removing the old one
    running_save = tmp_path / ".ckpt.tmp-feedf00d"
    other = tmp_path / ".other.tmp-0badbeef"
    for path in (killed_save, killed_rmtree, running_save, other):
        path.mkdir()
        if path != running_save:
            _age(path, STALE_TMP_S + 60)
    save_checkpoint(target, model, setup.tokenizer)  # no target yet: the .old- one may be its only copy
    assert killed_rmtree.exists() and not killed_save.exists()
    save_checkpoint(target, model, setup.tokenizer)
    assert not killed_rmtree.exists() and running_save.exists() and other.exists()
    load_checkpoint(target)


# ---- verifying a checkpoint without loading it --------------------------------------------------------


def _overrides(data: Path | str, home: Path, *extra: str) -> list[str]:
    """A 4-step run of tests/test_pretrain.py's tiny model, checkpoints at steps 2 and 4."""
    return [f"home={home}", f"train.data={data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
            "train.global_batch_size=16", "train.max_steps=4", "train.warmup_steps=2", "train.log_every=1",
            "train.checkpoint_every=2", "scaling.max_failures=2", f"storage.path={home / 'runs'}", *extra]


def _cfg(data: Path | str, home: Path, *extra: str):
    return load_config(None, _overrides(data, home, *extra))


def _train(capsys: pytest.CaptureFixture[str], data: Path, home: Path, *extra: str) -> tuple[int, list[str]]:
    """`clipflow train` with ``_overrides``: its exit code and its error lines."""
    code = main(["train", *[arg for value in _overrides(data, home, *extra) for arg in ("--set", value)]])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipflow train: error: ")]
    return code, errors


def _rehash(checkpoint: Path) -> None:
    """What a writer with access does after changing a file: make checkpoint.json agree again."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
                         for name in manifest["files"]}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def resumable(tmp_path: Path, train_data: Path) -> Path:
    """A checkpoint at step 2 of the tiny run, with its optimizer state."""
    cfg = _cfg(train_data, tmp_path)
    setup = prepare_run(cfg, TrainDebug())
    model = build_model(cfg, setup)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(tmp_path / "step-2", model, setup.tokenizer,
                           trainer_state={"step": 2, "global_batch_size": 16, "data_manifest_hash": "tiny-v1"},
                           training_state={"optimizer": optimizer.state_dict()})


def _flip_a_byte(checkpoint: Path) -> str:
    data = bytearray((checkpoint / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / MODEL_FILE).write_bytes(bytes(data))
    return r"model\.safetensors is corrupt: sha256 .* does not match .* recorded in checkpoint\.json"


def _drop_the_training_state(checkpoint: Path) -> str:
    (checkpoint / TRAINING_STATE_FILE).unlink()
    return r"training_state\.pt is missing \(listed in checkpoint\.json\)"


def _truncate_the_training_state(checkpoint: Path) -> str:
    path = checkpoint / TRAINING_STATE_FILE
    path.write_bytes(path.read_bytes()[:200])
    _rehash(checkpoint)
    return r"training_state\.pt is not a readable training state \(PytorchStreamReader failed"


def _weights_of_another_model(checkpoint: Path) -> str:
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / MODEL_FILE)
    weights["visual.proj"] = torch.zeros(3, 3)
    save_file(weights, checkpoint / MODEL_FILE)
    _rehash(checkpoint)
    return r"model\.safetensors does not fit model_config\.json: 1 tensor\(s\) .* \(visual\.proj\.\.\.\)"


def _trainer_state_a_list(checkpoint: Path) -> str:
    (checkpoint / TRAINER_STATE_FILE).write_text("[1, 2]")
    _rehash(checkpoint)
    return r"trainer_state\.json is corrupt: expected an object"


DAMAGES = [_flip_a_byte, _drop_the_training_state, _truncate_the_training_state, _weights_of_another_model,
           _trainer_state_a_list]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_verify_checkpoint_names_what_is_wrong(resumable: Path, damage) -> None:
    verify_checkpoint(resumable)
    expected = damage(resumable)
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(resumable)


def test_a_damaged_training_state_is_a_checkpoint_error_on_load_too(resumable: Path) -> None:
    _truncate_the_training_state(resumable)
    with pytest.raises(CheckpointError, match=r"training_state\.pt is not a readable training state"):
        load_checkpoint(resumable).load_training_state()


def test_a_storage_failure_removes_the_partial_checkpoints_and_names_the_latest_whole_one(resumable: Path,
                                                                                          tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo-1"
    whole, partial = run / "checkpoint_00000002", run / "checkpoint_00000004"
    shutil.copytree(resumable, whole)
    shutil.copytree(resumable, partial)
    (partial / MODEL_FILE).write_bytes((partial / MODEL_FILE).read_bytes()[:100])  # where the upload stopped
    (run / "mlflow-spool").mkdir()
    (run / "mlflow-spool" / "pending.jsonl").write_text("{}")
    fatal = _storage_failure(OSError(errno.ENOSPC, "No space left on device"), str(run), "")
    assert str(fatal) == (f"cannot write {run}: No space left on device (ENOSPC); free space there or set "
                          f"storage.path to a store with room; removed the partial checkpoint(s) checkpoint_00000004; "
                          f"then continue from {whole} with --resume-from")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002", "mlflow-spool"]
    assert _storage_failure(ConnectionResetError(errno.ECONNRESET, "reset"), str(run), "") is None


# ---- through `clipflow train`: one line, exit 2, no worker started ---------------------------------------


def _ray_started() -> bool:
    import ray

    return ray.is_initialized()


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_resume_checkpoint_is_refused_before_any_worker(resumable: Path, train_data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str], damage) -> None:
    expected = damage(resumable)
    before = _ray_started()
    code, errors = _train(capsys, train_data, tmp_path, f"train.resume_from={resumable}")
    assert code == 2 and len(errors) == 1, errors
    assert f"train.resume_from {resumable} cannot be resumed: " in errors[0]
    assert re.search(expected, errors[0]), errors[0]
    assert not any((tmp_path / "runs").iterdir())  # Ray Train's controller creates the run's directory first
    assert _ray_started() == before


@pytest.mark.parametrize("store", ["readonly", "full"])
def test_a_store_that_refuses_writes_is_one_line_before_any_worker(request: pytest.FixtureRequest, train_data: Path,
                                                                    tmp_path: Path, capsys, store: str) -> None:
    root = request.getfixturevalue("readonly_dir" if store == "readonly" else "full_fs") / "runs"
    before = _ray_started()
    code, errors = _train(capsys, train_data, tmp_path, f"storage.path={root}")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"clipflow train: error: cannot write {root}")
    assert any(f"({name}); " in errors[0] for name in ("EROFS", "EACCES", "ENOSPC")), errors[0]
    assert _ray_started() == before


@pytest.mark.timeout(240)
def test_a_store_that_fills_up_mid_run_ends_it_at_the_first_attempt(ray_runtime, tiny_fs: Path, train_data: Path,
                                                                    tmp_path: Path) -> None:
    """The 64 KiB store takes the preflight probe and Ray's marker file, not the step-2 checkpoint. Ray would
    retry that worker error twice (scaling.max_failures=2), each attempt failing the same way."""
    root, ledger = tiny_fs / "runs", tmp_path / "ledger"
    ledger.mkdir()
    cfg = _cfg(train_data, tmp_path, f"storage.path={root}")
    with pytest.raises(storage.StorageError) as stopped:
        run_training(cfg, TrainDebug(ledger_dir=str(ledger)), TrainingTracking.for_config(cfg))
    (run,) = root.iterdir()
    message = str(stopped.value)  # what `clipflow train` prints after "error: ", exit 2
    assert "\n" not in message and message.startswith(f"cannot write {run}: No space left on device (ENOSPC); ")
    assert "; removed the partial checkpoint(s) checkpoint_00000002" in message
    assert not [p for p in run.iterdir() if p.is_dir()]  # no half-written checkpoint left

    # One worker group: each step trained once (a retry trains steps 1 and 2 again), and the run ended FAILED.
    steps = [line.split("\t")[1] for f in ledger.glob("rank-*.tsv") for line in f.read_text().splitlines()]
    assert steps and all(count == 2 * 8 for count in collections.Counter(steps).values())  # 2 ranks x 8 samples
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    (mlflow_run,) = client.search_runs([experiment.experiment_id], f"tags.`clipflow.run_key` = '{run.name}'")
    assert mlflow_run.info.status == "FAILED"


def test_local_checkpoint_copies_of_killed_writers_are_removed(tmp_path, monkeypatch):
    """Rank 0 writes each checkpoint locally before Ray uploads and deletes it; a writer killed during the
    upload leaves a whole checkpoint behind, which the next rank 0 on the node removes. A live writer's stays."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}{gone.pid}-abc"
    live = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}{os.getppid()}-def"  # pytest's parent: running
    unrelated = tmp_path / f"{LOCAL_CHECKPOINT_PREFIX}notapid"
    for path in (orphan, live, unrelated):
        (path / "part").parent.mkdir(parents=True)
        (path / "part").write_bytes(b"x" * 1024)
    new = Path(local_checkpoint_dir())
    assert not orphan.exists() and live.exists() and unrelated.exists()
    assert new.parent == tmp_path and new.name.startswith(f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-")
    assert not any(new.iterdir())
