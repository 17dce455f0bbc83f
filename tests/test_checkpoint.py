"""Checkpoint directories: exact round trip, atomic replace, hash verification, loadable without Ray."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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
    """One real optimizer step, so the optimizer state holds tensors, plus RNG states."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32), tokenizer(["a cat", "a dog"]))[0].sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.default_rng(1).bit_generator.state}


@pytest.fixture
def saved(tmp_path, model, tokenizer, training_state) -> Path:
    return save_checkpoint(tmp_path / "step-120", model, tokenizer, trainer_state=TRAINER_STATE,
                           training_state=training_state)


def test_round_trip_is_exact(saved, model, tokenizer, training_state):
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]  # no temp dirs left behind
    assert {p.name for p in saved.iterdir()} == {"model.pt", "model_config.json", "tokenizer", "training_state.pt",
                                                 "trainer_state.json", "checkpoint.json"}
    ckpt = load_checkpoint(saved)
    assert ckpt.path == saved and ckpt.trainer_state == TRAINER_STATE
    assert ckpt.model.config == model.config
    original, loaded = model.state_dict(), ckpt.model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert ckpt.tokenizer.id == tokenizer.id
    loaded_state = ckpt.load_training_state()
    assert loaded_state["numpy_rng"] == training_state["numpy_rng"]
    assert torch.equal(loaded_state["torch_rng"], training_state["torch_rng"])
    saved_moments, loaded_moments = training_state["optimizer"]["state"], loaded_state["optimizer"]["state"]
    assert saved_moments and saved_moments.keys() == loaded_moments.keys()
    assert all(torch.equal(loaded_moments[i]["exp_avg"], saved_moments[i]["exp_avg"]) for i in saved_moments)
    manifest = json.loads((saved / "checkpoint.json").read_text())
    assert manifest["format_version"] == 1 and manifest["tokenizer_id"] == tokenizer.id
    assert set(manifest["files"]) == {"model.pt", "model_config.json", "training_state.pt", "trainer_state.json",
                                      "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json"}


def test_optional_parts_absent(tmp_path, model, tokenizer):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "bare", model, tokenizer))
    assert ckpt.trainer_state == {} and ckpt.load_training_state() is None


def test_save_replaces_existing_checkpoint(saved, model, tokenizer):
    save_checkpoint(saved, model, tokenizer, trainer_state={"step": 200})
    assert load_checkpoint(saved).trainer_state == {"step": 200}
    assert not (saved / "training_state.pt").exists()  # nothing of the old checkpoint survives
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]


def test_failed_save_leaves_previous_checkpoint_intact(saved, model, tokenizer):
    with pytest.raises(TypeError):
        save_checkpoint(saved, model, tokenizer, trainer_state={"not json": object()})
    assert load_checkpoint(saved).trainer_state == TRAINER_STATE
    assert sorted(p.name for p in saved.parent.iterdir()) == ["step-120"]


def test_flipped_byte_in_model_is_detected(saved):
    weights = saved / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt"):
        load_checkpoint(saved)


@pytest.mark.parametrize("name", ["model.pt", "tokenizer/vocab.json", "checkpoint.json"])
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
