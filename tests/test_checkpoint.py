"""Checkpoint directories: exact round trip, atomic replace, hash verification, no code run on load,
loadable without Ray."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_core.checkpoint import (CONFIG_FILE, FORMAT_VERSION, MANIFEST, MODEL_FILE, TRAINER_STATE_FILE,
                                  TRAINING_STATE_FILE, CheckpointError, export_weights, load_checkpoint,
                                  save_checkpoint, verify_checkpoint)
from clip_core.model import CLIP, create_model
from clip_core.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
TRAINER_STATE = {"step": 120, "samples_seen": 15360, "epoch": 2, "data_position": {"shard": 3, "row": 17}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    words = ["cat", "dog", "red", "blue", "photo", "of", "a", "the", "small", "big", "car", "tree"]
    rng = random.Random(0)
    captions = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)]
    return Tokenizer.train(captions, vocab_size=530, context_length=16)


@pytest.fixture(scope="module")
def model(tokenizer) -> CLIP:
    torch.manual_seed(0)
    return create_model("tiny-vit", vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def training_state(model, tokenizer) -> dict:
    """The trainer's layout (optimizer, scheduler, per-rank RNG list, scaler) after one real optimizer step,
    so the optimizer state holds tensors, plus numpy's and Python's RNG states in their native types."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model(torch.randn(2, 3, 32, 32), tokenizer(["a cat", "a dog"]))[0].sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
            "rng": [{"torch": torch.get_rng_state(), "cuda": None}],
            "numpy_rng": np.random.default_rng(1).bit_generator.state,  # a dict of Python ints
            "numpy_legacy_rng": np.random.RandomState(2).get_state(),  # a tuple holding a uint32 array
            "python_rng": random.Random(3).getstate()}  # a tuple of ints


@pytest.fixture
def saved(tmp_path, model, tokenizer, training_state) -> Path:
    return save_checkpoint(tmp_path / "step-120", model, tokenizer, trainer_state=TRAINER_STATE,
                           training_state=training_state)


def test_round_trip_is_exact(saved, model, tokenizer, training_state):
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]  # no temp dirs left behind
    assert {p.name for p in saved.iterdir()} == {"model.safetensors", "model_config.json", "tokenizer",
                                                 "training_state.pt", "trainer_state.json", "checkpoint.json"}
    ckpt = load_checkpoint(saved)
    assert ckpt.path == saved and ckpt.trainer_state == TRAINER_STATE
    assert ckpt.model.config == model.config
    original, loaded = model.state_dict(), ckpt.model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert ckpt.tokenizer.id == tokenizer.id
    manifest = json.loads((saved / "checkpoint.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2 and manifest["tokenizer_id"] == tokenizer.id
    assert set(manifest["files"]) == {"model.safetensors", "model_config.json", "training_state.pt",
                                      "trainer_state.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
                                      "tokenizer/tokenizer_config.json"}


def assert_identical(loaded, saved, where: str = "training_state") -> None:
    """Same Python types all the way down, tensors and arrays equal bit for bit."""
    assert type(loaded) is type(saved), where
    if isinstance(saved, dict):
        assert loaded.keys() == saved.keys(), where
        for key in saved:
            assert_identical(loaded[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(saved, list | tuple):
        assert len(loaded) == len(saved), where
        for i, (a, b) in enumerate(zip(loaded, saved)):
            assert_identical(a, b, f"{where}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), where
    elif isinstance(saved, np.ndarray):
        assert loaded.dtype == saved.dtype and np.array_equal(loaded, saved), where
    else:
        assert loaded == saved, where


def test_training_state_round_trip_is_exact(saved, training_state):
    """Optimizer and scheduler state and the torch, numpy and Python RNGs come back as saved, and the
    restored generators continue with the same draws."""
    loaded = load_checkpoint(saved).load_training_state()
    assert training_state["optimizer"]["state"]
    assert_identical(loaded, training_state)

    torch.set_rng_state(loaded["rng"][0]["torch"])
    resumed_torch = torch.rand(3)
    torch.set_rng_state(training_state["rng"][0]["torch"])
    assert torch.equal(resumed_torch, torch.rand(3))
    legacy = np.random.RandomState()
    legacy.set_state(loaded["numpy_legacy_rng"])
    assert np.array_equal(legacy.rand(3), np.random.RandomState(2).rand(3))
    generator = np.random.default_rng()
    generator.bit_generator.state = loaded["numpy_rng"]
    assert np.array_equal(generator.random(3), np.random.default_rng(1).random(3))
    python = random.Random()
    python.setstate(loaded["python_rng"])
    original = random.Random(3)
    assert [python.random() for _ in range(3)] == [original.random() for _ in range(3)]


def test_numpy_values_of_every_shape_and_kind_round_trip(tmp_path, model, tokenizer):
    state = {"empty": np.zeros((0, 3)), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
             "scalar": np.float32(2.5), "int": np.int64(-7), "flags": np.array([True, False]),
             "size": torch.Size([2, 3]), "nested": [(np.arange(3, dtype=np.uint8), {"x": 1.5})]}
    saved = save_checkpoint(tmp_path / "c", model, tokenizer, training_state=state)
    assert_identical(load_checkpoint(saved).load_training_state(), state)


def test_training_state_that_cannot_load_without_pickle_is_refused_on_save(saved, model, tokenizer):
    with pytest.raises(TypeError, match=r"training_state\['extra'\] is a object"):
        save_checkpoint(saved, model, tokenizer, training_state={"extra": object()})
    with pytest.raises(TypeError, match="numpy <U1"):
        save_checkpoint(saved, model, tokenizer, training_state={"names": np.array(["a"])})
    assert load_checkpoint(saved).trainer_state == TRAINER_STATE  # the previous checkpoint is intact


def test_optional_parts_absent(tmp_path, model, tokenizer):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "bare", model, tokenizer))
    assert ckpt.trainer_state == {} and ckpt.load_training_state() is None


def test_weights_export_is_a_lean_checkpoint_with_the_same_model(saved, tmp_path, model, tokenizer):
    """What the registry gets: weights, config and tokenizer byte for byte, under a new file list; no optimizer
    or trainer state (AdamW's two moments: twice the weights), so it is smaller by at least that much."""
    lean = export_weights(saved, tmp_path / "export" / "checkpoint")
    assert sorted(p.name for p in lean.parent.iterdir()) == ["checkpoint"]  # no temp dirs left behind
    files = json.loads((lean / MANIFEST).read_text())["files"]
    original = json.loads((saved / MANIFEST).read_text())["files"]
    assert files == {name: digest for name, digest in original.items()
                     if name not in (TRAINING_STATE_FILE, TRAINER_STATE_FILE)}
    assert {p.name for p in lean.iterdir()} == {MODEL_FILE, CONFIG_FILE, "tokenizer", MANIFEST}
    verify_checkpoint(lean)
    ckpt = load_checkpoint(lean)
    assert ckpt.trainer_state == {} and ckpt.load_training_state() is None
    assert ckpt.model.config == model.config and ckpt.tokenizer.id == tokenizer.id
    assert all(torch.equal(v, ckpt.model.state_dict()[k]) for k, v in model.state_dict().items())

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    assert size(saved) - size(lean) >= (saved / TRAINING_STATE_FILE).stat().st_size
    assert export_weights(lean, tmp_path / "again").exists()  # an export exports as it is


def test_weights_export_refuses_a_bad_source_and_itself(saved, tmp_path):
    with pytest.raises(CheckpointError, match="onto itself"):
        export_weights(saved, saved)
    assert load_checkpoint(saved).load_training_state() is not None  # untouched
    (saved / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"vocab\.json is corrupt"):
        export_weights(saved, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_save_replaces_existing_checkpoint(saved, model, tokenizer):
    save_checkpoint(saved, model, tokenizer, trainer_state={"step": 200})
    assert load_checkpoint(saved).trainer_state == {"step": 200}
    assert not (saved / TRAINING_STATE_FILE).exists()  # nothing of the old checkpoint survives
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]


def test_failed_save_leaves_previous_checkpoint_intact(saved, model, tokenizer):
    with pytest.raises(TypeError):
        save_checkpoint(saved, model, tokenizer, trainer_state={"not json": object()})
    assert load_checkpoint(saved).trainer_state == TRAINER_STATE
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]


def test_flipped_byte_in_model_is_detected(saved):
    weights = saved / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_checkpoint(saved)


@pytest.mark.parametrize("name", [MODEL_FILE, "tokenizer/vocab.json", MANIFEST])
def test_missing_file_is_named(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is missing"):
        load_checkpoint(saved)


def test_garbled_manifest_is_named(saved):
    (saved / "checkpoint.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is corrupt"):
        load_checkpoint(saved)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    assert issubclass(CheckpointError, ValueError)


def test_loads_without_ray_or_mlflow(saved):
    """A fresh interpreter loads the checkpoint through clip_core alone and never imports Ray/MLflow."""
    code = ("import sys; from clip_core.checkpoint import load_checkpoint; "
            f"c = load_checkpoint({str(saved)!r}); "
            "bad = [m for m in ('ray', 'mlflow', 'workflows', 'kubernetes', 'boto3') if m in sys.modules]; "
            "print(c.trainer_state['step'], c.tokenizer.id, bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["120", load_checkpoint(saved).tokenizer.id, "[]"]


def test_checkpoint_copied_elsewhere_still_loads(saved, tmp_path):
    copy = shutil.copytree(saved, tmp_path / "elsewhere" / "ckpt")
    assert load_checkpoint(copy).trainer_state == TRAINER_STATE


def test_channels_last_model_round_trips(tmp_path, tokenizer):
    """The trainer puts ResNet towers in channels_last; safetensors needs row-major tensors."""
    model = create_model("tiny-rn", vocab_size=tokenizer.vocab_size).to(memory_format=torch.channels_last)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "rn", model, tokenizer))
    assert all(torch.equal(ckpt.model.state_dict()[k], v) for k, v in model.state_dict().items())


# --- tampering: the hashes are integrity, not authenticity ---------------------------------------------


class Payload:
    """Unpickling this runs code: it touches the file named in ``flag``."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def rehash(checkpoint: Path) -> None:
    """What an attacker who can write the directory does after editing a file: make checkpoint.json agree."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
                         for name in manifest["files"]}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_pickle_payload_in_training_state_is_refused_and_never_runs(saved, tmp_path):
    flag = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(Payload(flag)))  # the payload does run when unpickled normally
    assert flag.exists()
    flag.unlink()
    torch.save({"optimizer": Payload(flag)}, saved / TRAINING_STATE_FILE)
    rehash(saved)
    ckpt = load_checkpoint(saved)  # the hashes match: they cannot tell a tampered file from a real one
    with pytest.raises(CheckpointError, match=r"training_state\.pt holds more than tensors"):
        ckpt.load_training_state()
    assert not flag.exists()


def test_pickle_payload_as_model_weights_is_refused_and_never_runs(saved, tmp_path):
    flag = tmp_path / "payload-ran"
    torch.save({"visual.proj": Payload(flag)}, saved / MODEL_FILE)
    rehash(saved)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        load_checkpoint(saved)
    assert not flag.exists()


@pytest.mark.parametrize("name", ["model.pt", "tokenizer/extra.json", ".hidden"])
def test_unlisted_file_is_refused(saved, name):
    (saved / name).write_bytes(b"anything")
    with pytest.raises(CheckpointError, match=f"does not list: {name.replace('.', '[.]')}; .* tampering"):
        load_checkpoint(saved)


def test_listed_path_outside_the_checkpoint_is_refused(saved, tmp_path):
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"]["../outside.json"] = hashlib.sha256(b"{}").hexdigest()
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"outside\.json is missing"):
        load_checkpoint(saved)


def test_format_1_checkpoint_is_refused_unread(saved):
    """Format 1 kept the training state as a full pickle: it is refused before any file is opened."""
    (saved / MODEL_FILE).rename(saved / "model.pt")
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"written by an older clipflow \(checkpoint format 1\).*"
                                              r"load_pretrained\('.*model\.pt', quick_gelu="):
        load_checkpoint(saved)


def test_newer_format_asks_for_an_upgrade(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer clipflow.*upgrade"):
        load_checkpoint(saved)


def test_file_names_are_constants():
    """Other modules name checkpoint files through these constants only."""
    assert (MODEL_FILE, CONFIG_FILE, TRAINING_STATE_FILE, TRAINER_STATE_FILE, MANIFEST) == (
        "model.safetensors", "model_config.json", "training_state.pt", "trainer_state.json", "checkpoint.json")
