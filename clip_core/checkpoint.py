"""A checkpoint is one self-describing directory, loadable with clip_core alone (no Ray, no MLflow):

    model.safetensors    state_dict (OpenAI/OpenCLIP key names)
    model_config.json    CLIPConfig.to_dict()
    tokenizer/           Tokenizer.save
    training_state.pt    optional: optimizer/scheduler/scaler/RNG states (tensors and plain data only)
    trainer_state.json   optional: step, samples_seen, epoch, data position, ...
    checkpoint.json      format version, creation time, sha256 of every other file

``export_weights`` writes the weights-only form (the first three files, ``weights_only``, and checkpoint.json):
what a registry version, serving and eval need.

A checkpoint is written into a temporary sibling directory and renamed into place, so a reader never sees a
half-written checkpoint, and the hashes catch anything damaged later (partial copies, bit rot).

No file is unpickled with code: the weights are safetensors, the training state is read with
``torch.load(weights_only=True)``. The hashes are integrity, not authenticity -- anyone who can
write the directory can re-hash it -- so safety rests on the loaders, never on checkpoint.json.
For the same reason a file that checkpoint.json does not list is refused (leftovers or tampering).
``verify_checkpoint`` runs every check of a load without building the model, so a trainer can refuse a
bad checkpoint before it starts workers. A writer killed mid-save leaves its temporary sibling behind;
the next save to the same path removes those older than ``STALE_TMP_S``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors
import safetensors.torch
import torch

from clip_core.model import CLIP, CLIPConfig, create_model_from_config, model_from_state_dict
from clip_core.tokenizer import Tokenizer

# 2: weights in safetensors, the training state loadable with weights_only, unlisted files refused.
FORMAT_VERSION = 2
MANIFEST = "checkpoint.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
FORMAT_1_MODEL_FILE = "model.pt"  # format 1's weights: a plain state dict, still safe to read alone
# A numpy array in the training state is stored as {NDARRAY_TAG: its bytes, "dtype": ..., "shape": ...}.
NDARRAY_TAG = "__clipflow_ndarray__"
NUMERIC_KINDS = "biufc"  # bool, int, unsigned, float, complex: numpy dtypes whose bytes are the whole value
STALE_TMP_S = 60 * 60  # a save's temporary sibling untouched this long belongs to a killed writer


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt; the message names the file."""


@dataclass
class Checkpoint:
    model: CLIP
    tokenizer: Tokenizer
    trainer_state: dict[str, Any]
    path: Path

    def load_training_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Optimizer/scheduler/scaler/RNG states as they were saved (numpy arrays, tuples and all), or
        None when the checkpoint was saved without them. Read with ``weights_only=True``: no code runs."""
        path = self.path / TRAINING_STATE_FILE
        if not path.exists():
            return None
        return _decode(_read_training_state(path, map_location))


def save_checkpoint(directory: str | Path, model: CLIP, tokenizer: Tokenizer, *,
                    trainer_state: dict[str, Any] | None = None,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint to ``directory`` atomically (replacing one already there); returns its path.

    Pass the bare model, not a DDP/compile wrapper, so state-dict keys stay OpenAI's. ``training_state``
    may hold tensors, numpy arrays and scalars, numbers, strings, None, and lists, tuples and dicts of
    them (optimizer/scheduler ``state_dict()``s, ``random.getstate()``, ``np.random.get_state()``):
    what loads back without unpickling code. Anything else is a TypeError before anything is written.
    """
    encoded = None if training_state is None else _encode(training_state, "training_state")

    def fill(tmp: Path) -> None:
        # contiguous: safetensors stores row-major tensors (a channels_last ResNet's are not)
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / MODEL_FILE)
        _write_json(tmp / CONFIG_FILE, model.config.to_dict())
        tokenizer.save(tmp / TOKENIZER_DIR)
        if encoded is not None:
            torch.save(encoded, tmp / TRAINING_STATE_FILE)
        if trainer_state is not None:
            _write_json(tmp / TRAINER_STATE_FILE, trainer_state)

    return _write_atomically(directory, tokenizer.id, fill)


def export_weights(src: str | Path, dest: str | Path) -> Path:
    """Write the weights-only part of the checkpoint at ``src`` to ``dest``, atomically; returns its path.

    What serving and evaluation read (weights, config, tokenizer) under a new checkpoint.json, without the
    training state (AdamW's two moments: twice the weights) or the trainer state, so a registry version does
    not carry them into every download. The files are copied, not rebuilt, after ``src`` verifies, and must
    still match its hashes. ``load_checkpoint`` reads the export (``load_training_state`` is None); a trainer
    refuses it as a resume point, and it initialises fine-tuning as any checkpoint does. Only the files it
    keeps (``weights_only``) need be in ``src``: a publisher downloads just those and checkpoint.json.
    """
    source, target = Path(src).absolute(), Path(dest).absolute()
    if source == target:
        raise CheckpointError(f"cannot export {source} onto itself: that would drop its training state; "
                              f"export to another directory")
    wanted = _verified_files(source, weights_only)
    _, tokenizer = _config_and_tokenizer(source)

    def fill(tmp: Path) -> None:
        for name in wanted:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, tmp / name)

    return _write_atomically(target, tokenizer.id, fill, expected=wanted)


def weights_only(name: str) -> bool:
    """A file (as checkpoint.json lists it) that the weights-only form keeps: what serving and evaluation read."""
    return name in (MODEL_FILE, CONFIG_FILE) or name.startswith(f"{TOKENIZER_DIR}/")


def _write_atomically(directory: str | Path, tokenizer_id: str, fill: Callable[[Path], None],
                      expected: dict[str, str] | None = None) -> Path:
    """Let ``fill`` write a checkpoint's files into a temporary sibling of ``directory``, list them with their
    hashes in checkpoint.json, and rename it into place. ``expected``: the hashes the files must have (a copy)."""
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        fill(tmp)
        files = {path.relative_to(tmp).as_posix(): _sha256_and_sync(path)
                 for path in sorted(tmp.rglob("*")) if path.is_file()}
        if expected is not None and files != expected:
            changed = sorted(set(files) ^ set(expected) | {n for n in files if expected.get(n) != files[n]})
            raise CheckpointError(f"{', '.join(changed)} changed while they were copied to {target}; the source "
                                  f"is being rewritten: try again once it is complete")
        _write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer_id": tokenizer_id,
            "files": files,
        })
        _sha256_and_sync(tmp / MANIFEST)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Verify that the directory holds exactly the files checkpoint.json lists, with their hashes,
    then rebuild the model and tokenizer."""
    path = Path(directory)
    files = _verified_files(path)
    config, tokenizer = _config_and_tokenizer(path)
    try:
        state_dict = safetensors.torch.load_file(path / MODEL_FILE, device=str(device))
    except safetensors.SafetensorError as exc:
        raise CheckpointError(f"{path / MODEL_FILE} is not a safetensors file ({exc}); use another checkpoint") from exc
    try:
        model = model_from_state_dict(config, state_dict, device)
    except RuntimeError as exc:
        raise CheckpointError(f"{path / MODEL_FILE} does not fit {CONFIG_FILE}: {exc}") from exc
    return Checkpoint(model=model, tokenizer=tokenizer, trainer_state=_trainer_state(path, files), path=path)


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CheckpointError (naming the file) for anything ``load_checkpoint`` or ``load_training_state``
    would refuse: the file list and every hash, the config and tokenizer, the weights' names and shapes
    against the config (the safetensors header; no tensor is read), the trainer state, and the training
    state, unpickled with ``weights_only`` from a memory map (its tensors are not read either)."""
    path = Path(directory)
    files = _verified_files(path)
    config, _ = _config_and_tokenizer(path)
    try:
        with safetensors.safe_open(path / MODEL_FILE, framework="pt") as weights:
            shapes = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except safetensors.SafetensorError as exc:
        raise CheckpointError(f"{path / MODEL_FILE} is not a safetensors file ({exc}); use another checkpoint") from exc
    expected = {name: list(t.shape) for name, t in create_model_from_config(config, device="meta").state_dict().items()}
    if shapes != expected:
        wrong = sorted(set(shapes) ^ set(expected)) + sorted(k for k in set(shapes) & set(expected)
                                                             if shapes[k] != expected[k])
        raise CheckpointError(f"{path / MODEL_FILE} does not fit {CONFIG_FILE}: {len(wrong)} tensor(s) missing, "
                              f"unexpected or of another shape ({', '.join(wrong[:3])}...); use another checkpoint")
    _trainer_state(path, files)
    if TRAINING_STATE_FILE in files:
        _read_training_state(path / TRAINING_STATE_FILE, "cpu", mmap=True)


def _config_and_tokenizer(path: Path) -> tuple[CLIPConfig, Tokenizer]:
    try:
        return CLIPConfig.from_dict(_read_json(path / CONFIG_FILE, path)), Tokenizer.load(path / TOKENIZER_DIR)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _trainer_state(path: Path, files: dict[str, str]) -> dict[str, Any]:
    state = _read_json(path / TRAINER_STATE_FILE, path) if TRAINER_STATE_FILE in files else {}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} is corrupt: expected an object; use another checkpoint")
    return state


def _read_training_state(path: Path, map_location: str | torch.device, mmap: bool = False) -> Any:
    """The training state as saved (numpy arrays still encoded); never runs code from the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds more than tensors and plain data, so it is refused "
                              f"(was it tampered with?); use another checkpoint") from exc
    except (RuntimeError, EOFError, UnicodeDecodeError) as exc:  # what a damaged zip archive raises
        raise CheckpointError(f"{path} is not a readable training state ({str(exc).splitlines()[0]}); "
                              f"use another checkpoint") from exc


def _verified_files(path: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, str]:
    """checkpoint.json's file map, once every listed file matches its hash and no other file is there.
    With ``wanted``: the map of the listed files it accepts, once those match (the others may be absent)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    manifest = _read_json(path / MANIFEST, path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path / MANIFEST} is corrupt: expected an object with a 'files' map")
    _check_format(manifest.get("format_version"), path)
    files = manifest["files"]
    for required in (MODEL_FILE, CONFIG_FILE):
        if required not in files:
            raise CheckpointError(f"{path / MANIFEST} does not list {required}; not a complete checkpoint")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_symlink() or not p.is_dir()}
    present.discard(MANIFEST)
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CheckpointError(f"{path} holds files that {MANIFEST} does not list: {', '.join(unlisted)}; they are "
                              f"leftovers or tampering, so the checkpoint is refused: remove them, or use another")
    if wanted is not None:
        files = {name: digest for name, digest in files.items() if wanted(name)}
    for name, expected in files.items():
        file = path / name
        if name not in present:
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST}); the checkpoint is incomplete")
        actual = _sha256_and_sync(file, sync=False)
        if actual != expected:
            raise CheckpointError(f"{file} is corrupt: sha256 {actual[:12]}... does not match {expected[:12]}... "
                                  f"recorded in {MANIFEST}; restore it or use another checkpoint")
    return files


def _check_format(version: Any, path: Path) -> None:
    if version == FORMAT_VERSION:
        return
    if version == 1:
        raise CheckpointError(
            f"{path} was written by an older clipflow (checkpoint format 1), whose training state is a pickle "
            f"that could run code, so this clipflow does not read it. Resume from a format-{FORMAT_VERSION} "
            f"checkpoint or start the run afresh; its weights alone still load safely with "
            f"clip_core.load_pretrained('{path / FORMAT_1_MODEL_FILE}', quick_gelu=<quick_gelu in {CONFIG_FILE}>)")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path / MANIFEST}: format_version {version} was written by a newer clipflow; "
                              f"this clip_core reads format {FORMAT_VERSION}: upgrade it")
    raise CheckpointError(f"{path / MANIFEST} is corrupt: format_version {version!r} is not a known format")


def _encode(value: Any, where: str) -> Any:
    """``value`` with numpy arrays and scalars turned into tagged byte tensors; TypeError (naming
    where) for anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"{where} is a numpy {value.dtype} value; only numeric numpy dtypes can be stored")
        array = np.asarray(value)
        return {NDARRAY_TAG: torch.from_numpy(np.frombuffer(array.tobytes(), dtype=np.uint8).copy()),
                "dtype": array.dtype.str, "shape": list(array.shape), "scalar": isinstance(value, np.generic)}
    if isinstance(value, dict):
        if NDARRAY_TAG in value:
            raise TypeError(f"{where} has the key {NDARRAY_TAG!r}, which checkpoints reserve for numpy arrays")
        for key in value:
            if not isinstance(key, str | int | float) and key is not None:
                raise TypeError(f"{where} has a {type(key).__name__} key; use str or int keys")
        return {key: _encode(item, f"{where}[{key!r}]") for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_encode(item, f"{where}[{i}]") for i, item in enumerate(value))
    if value is None or isinstance(value, str | int | float | torch.Tensor | torch.Size):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint's training state holds only tensors, numpy "
                    f"arrays, numbers, strings, None and lists/tuples/dicts of them (it loads without unpickling)")


def _decode(value: Any) -> Any:
    """The inverse of ``_encode``."""
    if isinstance(value, dict):
        if NDARRAY_TAG in value:
            data = value[NDARRAY_TAG].cpu().numpy().tobytes()
            array = np.frombuffer(data, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
            return array[()] if value["scalar"] else array
        return {key: _decode(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_decode(item) for item in value)
    return value


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


def _remove_stale_tmp(target: Path) -> None:
    """Delete the temporary directories that killed saves to ``target`` left (their old checkpoint, renamed
    aside, only once ``target`` is back: until then it is the only copy)."""
    cutoff = time.time() - STALE_TMP_S
    leftovers = list(target.parent.glob(f".{target.name}.tmp-*"))
    if target.exists():
        leftovers += target.parent.glob(f".{target.name}.old-*")
    for path in leftovers:
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
        except FileNotFoundError:  # another save removed it first
            continue


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
