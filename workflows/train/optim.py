"""The paper's optimisation recipe: AdamW with decoupled weight decay on weight matrices only,
linear warmup then cosine decay (Radford et al., 2021, section 2.5 and table 20); and the optimizer
step that applies it, shared by the trainer and the benchmarks.

Weight decay is a prior on the size of the projection matrices; applied to gains, biases,
embeddings or the temperature it only drags them toward zero, so (as in the paper and OpenCLIP)
those get no decay: every parameter with fewer than 2 dims, plus embeddings and ``logit_scale``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from clip_core import lock, normalize
from clip_core.model import CLIP
from workflows.common.config import TrainConfig
from workflows.train.accumulation import LossFn, accumulate_gradients

# Parameters exempt from weight decay besides 0-d/1-d ones (gains, biases, logit_scale, logit_bias).
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale", "logit_bias")


def exclude_from_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)


def param_groups(model: CLIP, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters: decayed weight matrices, and everything else with
    weight_decay 0. Each group's ``lr_scale`` (timm's name) multiplies the base lr.

    ``layer_decay`` < 1 (layer-wise lr decay, as BEiT and FLIP fine-tune): within each tower, the
    parameters of layer group d (``clip_core.lock``: 0 = embeddings ... num_layers + 1 = projection) get
    lr x layer_decay ** (num_layers + 1 - d), so the layers nearest the input, which pretraining made
    most general, move least; logit_scale and logit_bias get the full lr. 1.0 keeps the two groups.
    Groups come in decreasing lr_scale, so the first one's lr is the schedule's (what the loop logs).
    """
    scales = lr_scales(model, layer_decay) if layer_decay != 1.0 else {}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((scales.get(id(param), 1.0), not exclude_from_decay(name, param)), []).append(param)
    if layer_decay == 1.0:  # both groups, even an empty one: the layout of existing checkpoints' optimizer states
        return [{"params": groups.get((1.0, decayed), []), "weight_decay": weight_decay if decayed else 0.0,
                 "lr_scale": 1.0} for decayed in (True, False)]
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (scale, decayed), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))]


def lr_scales(model: CLIP, layer_decay: float) -> dict[int, float]:
    """id(parameter) -> its layer-wise lr multiplier, for every parameter of both towers."""
    scales = {}
    for groups in (model.image_layer_groups(), model.text_layer_groups()):
        top = len(groups) - 1  # num_layers + 1: the projection's group
        for depth, group in enumerate(groups):
            scales.update((id(p), layer_decay ** (top - depth)) for p in lock.parameters(group))
    return scales


def build_optimizer(model: CLIP, train: TrainConfig) -> torch.optim.AdamW:
    fused = next(model.parameters()).is_cuda  # the fused kernel is the fast path on GPU only
    groups = [{**g, "lr": train.lr * g["lr_scale"]} for g in param_groups(model, train.weight_decay, train.layer_decay)]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, fused=fused)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at ``step`` (0-based, the step about to be taken): linear from 1/warmup to 1 over
    ``warmup_steps``, then cosine from 1 to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state_dict (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))


def optimizer_step(model: nn.Module, raw: CLIP, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, images: torch.Tensor, tokens: torch.Tensor,
                   accum_steps: int, autocast: contextlib.AbstractContextManager, grad_clip_norm: float,
                   cudagraphs: bool = False, channels_last: bool = False) -> torch.Tensor:
    """One optimizer step on this rank's per-step batch (uint8 images on the device); returns the loss.

    ``model`` is what to call (DDP and/or compiled), ``raw`` the bare CLIP underneath. No host sync:
    the loss stays on the device until the caller reads it. The levers of ``acceleration``:
    ``cudagraphs``, the model was compiled with CUDA graphs, whose replays must be told where a step
    begins; ``channels_last``, its image tower is NHWC, so the uint8 images are converted (the
    cheapest copy: one byte a value, and ``normalize`` keeps the layout)."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    temperature = [p for p in (raw.logit_scale, raw.logit_bias) if p is not None]
    loss = accumulate_gradients(model, loss_fn, normalize(images), tokens, accum_steps, autocast, temperature)
    if grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), grad_clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    raw.clamp_logit_scale()
    return loss
