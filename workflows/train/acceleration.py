"""The speed levers of a training step, shared by the trainer and ``benchmarks/gpu_bench.py``, so the
benchmark measures exactly what ``clipflow train`` runs (``model.compile``, ``model.compile_mode``,
``model.channels_last``).

- Compilation: ``regional`` compiles each transformer block and ResNet bottleneck in place. The
  blocks of a tower share one compiled graph, so compile time stays flat in depth, and the state dict
  and DDP wrapper are untouched. ``full`` compiles the whole (DDP-wrapped) model and the loss, which
  can fuse across blocks but compiles for longer.
- CUDA graphs (``reduce-overhead`` / ``max-autotune``) replay a step's kernels without launching them
  from Python: they matter for small models at small batches. Each optimizer step must then call
  ``torch.compiler.cudagraph_mark_step_begin()`` (``optim.optimizer_step`` does when asked).
- channels_last: cuDNN's fast convolution kernels want NHWC, so ResNet image towers (and their
  input) use that layout. Transformers have no convolutions beyond the patch embedding: no effect.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from clip_core.model import CLIP
from clip_core.modified_resnet import Bottleneck
from clip_core.transformer import ResidualAttentionBlock
from workflows.common.config import CompileMode, CompileScope
from workflows.train.accumulation import LossFn

COMPILE_SCOPES: tuple[str, ...] = typing.get_args(CompileScope)
COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
REGIONS = (ResidualAttentionBlock, Bottleneck)  # what ``regional`` compiles, one module at a time
RECOMPILE_LIMIT = 64  # RN50 has 8 bottleneck shapes, x2 grad modes under feature-cached accumulation


def uses_cudagraphs(scope: CompileScope, mode: CompileMode) -> bool:
    return scope != "none" and mode in CUDAGRAPH_MODES


def compile_for_training(model: nn.Module, loss_fn: LossFn, scope: CompileScope, mode: CompileMode = "default",
                         backend: str = "inductor") -> tuple[nn.Module, LossFn]:
    """(model, loss) to call. ``model`` may be the DDP wrapper of a clip_core CLIP; regional
    compilation reaches its blocks through ``modules()`` and compiles them in place."""
    if scope == "none":
        return model, loss_fn
    options = dict(mode=mode, backend=backend, dynamic=False)
    if scope == "full":
        return torch.compile(model, **options), torch.compile(loss_fn, **options)
    _allow_recompiles()
    for module in model.modules():
        if isinstance(module, REGIONS):
            module.compile(**options)
    return model, loss_fn


def _allow_recompiles() -> None:
    """Dynamo compiles the shared block code once per distinct block shape and grad mode: raise its
    per-code-object limit above that, so no block silently falls back to eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def use_channels_last(model: CLIP) -> bool:
    """Converts a ResNet image tower's weights to channels_last in place; True if the images fed to it
    should be converted too (``images.contiguous(memory_format=torch.channels_last)``)."""
    if not model.config.vision.is_resnet:
        return False
    model.visual.to(memory_format=torch.channels_last)
    return True
