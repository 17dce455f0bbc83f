"""A checkpoint is one self-describing directory, loadable with clip_core alone (no Ray, no MLflow):

    model.pt             state_dict (OpenAI/OpenCLIP key names)
    model_config.json    CLIPConfig.to_dict()
    tokenizer/           Tokenizer.save
    training_state.pt    optional: optimizer/scheduler/scaler/RNG states (any picklable dict)
    trainer_state.json   optional: step, samples_seen, epoch, data position, ...
    checkpoint.json      format version, creation time, sha256 of every other file

It is written into a temporary sibling directory and renamed into place, so a reader never sees a
half-written checkpoint, and the hashes catch anything damaged later (partial copies, bit rot).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_core.model import CLIP, CLIPConfig, create_model_from_config
from clip_core.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    model: CLIP
    tokenizer: Tokenizer
    trainer_state: dict[str, Any]
    path: Path

    def load_training_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Optimizer/scheduler/scaler/RNG states, or None when the checkpoint was saved without them.

        Loaded with full unpickling (RNG states hold numpy arrays): only load checkpoints you wrote.
        """
        path = self.path / TRAINING_STATE_FILE
        if not path.exists():
            return None
        return torch.load(path, map_location=map_location, weights_only=False)


def save_checkpoint(directory: str | Path, model: CLIP, tokenizer: Tokenizer, *,
                    trainer_state: dict[str, Any] | None = None,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint to ``directory`` atomically (replacing one already there); returns its path.

    Pass the bare model, not a DDP/compile wrapper, so state-dict keys stay OpenAI's.
    """
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(model.state_dict(), tmp / MODEL_FILE)
        _write_json(tmp / CONFIG_FILE, model.config.to_dict())
        tokenizer.save(tmp / TOKENIZER_DIR)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
        if trainer_state is not None:
            _write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        files = {path.relative_to(tmp).as_posix(): _sha256_and_sync(path)
                 for path in sorted(tmp.rglob("*")) if path.is_file()}
        _write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer_id": tokenizer.id,
            "files": files,
        })
        _sha256_and_sync(tmp / MANIFEST)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify every file against checkpoint.json, then rebuild the model and tokenizer."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    manifest = _read_json(path / MANIFEST, path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path / MANIFEST} is corrupt: expected an object with a 'files' map")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / MANIFEST}: format_version {manifest.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; this clip_core cannot read it")
    files = manifest["files"]
    for required in (MODEL_FILE, CONFIG_FILE):
        if required not in files:
            raise CheckpointError(f"{path / MANIFEST} does not list {required}; not a complete checkpoint")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST}); the checkpoint is incomplete")
        actual = _sha256_and_sync(file, sync=False)
        if actual != expected:
            raise CheckpointError(f"{file} is corrupt: sha256 {actual[:12]}... does not match {expected[:12]}... "
                                  f"recorded in {MANIFEST}; restore it or use another checkpoint")
    try:
        config = CLIPConfig.from_dict(_read_json(path / CONFIG_FILE, path))
        tokenizer = Tokenizer.load(path / TOKENIZER_DIR)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    model = create_model_from_config(config, device=device)
    state_dict = torch.load(path / MODEL_FILE, map_location=device, weights_only=True)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit {CONFIG_FILE}: {exc}") from exc
    trainer_state = _read_json(path / TRAINER_STATE_FILE, path) if TRAINER_STATE_FILE in files else {}
    return Checkpoint(model=model, tokenizer=tokenizer, trainer_state=trainer_state, path=path)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_json(path: Path, checkpoint: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing; {checkpoint} is not a complete checkpoint") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from exc


def _sha256_and_sync(path: Path, sync: bool = True) -> str:
    """Hash a file; when writing, also fsync it so the rename below never publishes unflushed data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``. An existing target is first renamed aside and deleted after, so
    readers see the old checkpoint or the new one (or briefly none), never a mix."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old is not None:
            old.rename(target)  # put the previous checkpoint back
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old)
