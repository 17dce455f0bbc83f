"""The paper's optimisation recipe: AdamW with decoupled weight decay on weight matrices only,
linear warmup then cosine decay (Radford et al., 2021, section 2.5 and table 20).

Weight decay is a prior on the size of the projection matrices; applied to gains, biases,
embeddings or the temperature it only drags them toward zero, so (as in the paper and OpenCLIP)
those get no decay: every parameter with fewer than 2 dims, plus embeddings and ``logit_scale``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workflows.config import TrainConfig

# Parameters exempt from weight decay besides 0-d/1-d ones (gains, biases, logit_scale, logit_bias).
NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding", "logit_scale", "logit_bias")


def exclude_from_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else with weight_decay 0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if exclude_from_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    fused = next(model.parameters()).is_cuda  # the fused kernel is the fast path on GPU only
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=train.eps, fused=fused)


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
