"""``load_pretrained``: a CLIP model from released weights or a clipflow checkpoint on local disk.

The file layouts it reads, and what says which activation (GELU or QuickGELU) the weights need --
the keys and shapes are the same for both, so a wrong guess loads with ``strict=True`` and quietly
computes other embeddings:

* a clipflow checkpoint directory: its ``model_config.json`` records the activation;
* a TorchScript archive (OpenAI's released ``.pt`` files): the class name of its activation modules
  (OpenAI's are ``QuickGELU``), QuickGELU when the archive does not show it;
* a state dict (OpenCLIP's ``.bin``/``.pt``, possibly ``{"state_dict": ...}`` with DDP's "module."
  prefixes, or ``.safetensors``): nothing, so the caller must say (``model_name`` or ``quick_gelu``).

Trust boundary: state dicts are read without running code (``torch.load(weights_only=True)`` or
safetensors). A TorchScript archive is a program: ``torch.jit.load`` compiles the TorchScript code
it carries and may run its ``__setstate__`` methods while loading. It is opened only because
OpenAI's weights ship in no other form, so load only archives you trust, such as OpenAI's files
checked against the sha256 in their download URL. Nothing is downloaded: every path is local.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from clip_core.checkpoint import load_checkpoint
from clip_core.model import CLIP, config_from_openai_state_dict, get_model_config, model_from_state_dict

DDP_PREFIX = "module."
# What an archive's activation modules are called in OpenAI's, OpenCLIP's and clip_core's code.
ARCHIVE_ACTIVATIONS = {"QuickGELU": True, "GELU": False}
OPENAI_ARCHIVE_QUICK_GELU = True  # OpenAI trained every released model with QuickGELU


def load_pretrained(path: str | Path, model_name: str | None = None, *, quick_gelu: bool | None = None,
                    device: str | torch.device = "cpu") -> CLIP:
    """The model stored at ``path`` (a file or a clipflow checkpoint directory), in eval mode.

    ``model_name`` (a zoo name: ``"ViT-B-32"`` is GELU, ``"ViT-B-32-quickgelu"`` QuickGELU, as in
    OpenCLIP) builds exactly that architecture; ``quick_gelu`` overrides its activation, as in
    ``create_model``. With ``quick_gelu`` alone the architecture is read from the weights' shapes
    (heads = width / 64, as in every released model). Either is required for a plain state dict;
    for an archive or a checkpoint, which record their activation, it must agree with the record (a
    checkpoint's config decides the rest). Weights come back in float32 on ``device``.
    """
    path = Path(path)
    requested = _requested_quick_gelu(model_name, quick_gelu)
    if path.is_dir():
        model = load_checkpoint(path, device=device).model
        _check_activation(model.config.quick_gelu, requested, f"{path} (its model_config.json)")
        return model.eval()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; load_pretrained reads local files only (download the "
                                f"weights first, e.g. OpenAI's .pt or OpenCLIP's open_clip_model.safetensors)")
    if _is_torchscript(path):
        state_dict, recorded = _read_torchscript(path)
        _check_activation(recorded, requested, f"the TorchScript archive {path}")
        quick = _first_given(requested, recorded, OPENAI_ARCHIVE_QUICK_GELU)
    else:
        state_dict = _read_state_dict(path)
        if requested is None:
            raise ValueError(f"{path} is a state dict, which cannot tell GELU from QuickGELU weights: pass "
                             f"model_name (e.g. 'ViT-B-32' for OpenCLIP's LAION/DataComp weights, "
                             f"'ViT-B-32-quickgelu' for OpenAI's and OpenCLIP's -quickgelu ones) or quick_gelu=")
        quick = requested
    return _build(state_dict, model_name, quick, device, path).eval()


def _requested_quick_gelu(model_name: str | None, quick_gelu: bool | None) -> bool | None:
    """The activation the caller asked for: ``quick_gelu`` if given, else ``model_name``'s, else None."""
    if quick_gelu is not None:
        return quick_gelu
    return None if model_name is None else get_model_config(model_name).quick_gelu


def _first_given(*choices: bool | None) -> bool:
    return next(choice for choice in choices if choice is not None)


def _check_activation(recorded: bool | None, requested: bool | None, source: str) -> None:
    if None not in (recorded, requested) and recorded != requested:
        raise ValueError(f"{source} holds {_activation(recorded)} weights but {_activation(requested)} was asked "
                         f"for: drop model_name/quick_gelu, or pass the name of the other activation")


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _build(state_dict: Mapping[str, torch.Tensor], model_name: str | None, quick_gelu: bool,
           device: str | torch.device, path: Path) -> CLIP:
    if model_name is None:
        try:
            cfg = config_from_openai_state_dict(state_dict, quick_gelu)
        except KeyError as exc:
            raise ValueError(f"{path} is not a CLIP state dict with OpenAI's/OpenCLIP's key names (it has no "
                             f"{exc}); clip_core reads those only") from exc
        return model_from_state_dict(cfg, state_dict, device)
    cfg = dataclasses.replace(get_model_config(model_name), quick_gelu=quick_gelu)
    try:
        return model_from_state_dict(cfg, state_dict, device)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {path} are not a {model_name}; pass the right model_name, or only "
                         f"quick_gelu= to build the architecture from the weights' shapes. {exc}") from exc


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip whose top folder holds ``constants.pkl`` (as torch.load checks)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _read_torchscript(path: Path) -> tuple[dict[str, torch.Tensor], bool | None]:
    """The archive's state dict, and its activation when its ``mlp.gelu`` modules name one."""
    archive = torch.jit.load(str(path), map_location="cpu")
    names = {module.original_name for name, module in archive.named_modules() if name.endswith("mlp.gelu")}
    found = {ARCHIVE_ACTIVATIONS[n] for n in names if n in ARCHIVE_ACTIVATIONS}
    if len(found) > 1:
        raise ValueError(f"{path} mixes GELU and QuickGELU layers; a clip_core CLIP has one activation throughout")
    return archive.state_dict(), found.pop() if found else None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state_dict = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ValueError(f"{path} does not load as a state dict without unpickling code ({reason}); clip_core "
                             f"runs no code from weight files: re-save the state dict alone (torch.save of "
                             f"model.state_dict(), or safetensors) from a copy you trust") from exc
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict:  # OpenCLIP's training checkpoints
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    if state_dict and all(k.startswith(DDP_PREFIX) for k in state_dict):
        state_dict = {k.removeprefix(DDP_PREFIX): v for k, v in state_dict.items()}
    return dict(state_dict)
