"""Global batch arithmetic and feature-cached gradient accumulation (OpenCLIP's ``--accum-freq``).

The contrastive loss's negatives are the whole batch, so splitting a batch into micro-batches
and summing their losses would train on a smaller batch. Instead (Cui et al.'s GradCache, as in
OpenCLIP): embed every micro-batch without autograd, then re-run each micro-batch with autograd
and compute the loss over the WHOLE cached batch with that micro-batch's slot replaced by the live
features; each pass sends exactly its own micro-batch's share of the full-batch gradient. Only one
micro-batch's activations are alive at a time, and the loss always sees the global batch
(``ClipLoss`` all-gathers the local batch of every rank).

Sizes: ``global = per_worker x world_size`` and ``per_worker = micro x accum_steps``. A global
batch that a world size does not divide is rejected before workers start (``check_world_sizes``):
every rank must pass the same local batch to the loss's all-gather, and changing the global batch
would change the optimisation. ``micro_batch_size`` is a cap; the accumulation count is the
smallest that divides the per-worker batch into micro-batches no larger than the cap.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from workflows.common.errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    per_worker: int  # samples each rank contributes to one optimizer step
    accum_steps: int  # micro-batches per rank per step

    @property
    def micro_batch(self) -> int:
        return self.per_worker // self.accum_steps


def check_world_sizes(global_batch: int, min_workers: int, max_workers: int) -> None:
    """Every world size the elastic range allows must divide the global batch."""
    bad = [w for w in range(min_workers, max_workers + 1) if global_batch % w]
    if bad:
        raise UserError(
            f"train.global_batch_size {global_batch} is not divisible by world size(s) {bad} allowed by "
            f"scaling.min_workers={min_workers}..max_workers={max_workers}; choose a global batch that every "
            f"size divides (e.g. {math.lcm(*range(min_workers, max_workers + 1))}) or narrow the worker range")


def plan_batches(global_batch: int, world_size: int, micro_batch_cap: int = 0) -> BatchPlan:
    if global_batch % world_size:
        raise UserError(f"train.global_batch_size {global_batch} is not divisible by world size {world_size}")
    per_worker = global_batch // world_size
    accum = math.ceil(per_worker / micro_batch_cap) if micro_batch_cap else 1
    while per_worker % accum:  # terminates: accum == per_worker always divides
        accum += 1
    return BatchPlan(global_batch, world_size, per_worker, accum)


def accumulate_gradients(model: nn.Module, loss_fn: LossFn, images: torch.Tensor, tokens: torch.Tensor,
                         accum_steps: int, autocast: contextlib.AbstractContextManager,
                         temperature: list[nn.Parameter]) -> torch.Tensor:
    """Backward of the loss over (images, tokens) — this rank's whole per-step batch — in
    ``accum_steps`` micro-batches. Leaves gradients in ``.grad``; returns the detached loss.

    ``model`` may be DDP-wrapped (gradients are all-reduced once, on the last micro-batch).
    ``temperature``: logit_scale (and logit_bias) take the same full gradient in every pass, so it
    is divided by ``accum_steps`` at the end to count once, as in the single-batch step.
    """
    if accum_steps == 1:
        with autocast:
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        return loss.detach()

    image_chunks, token_chunks = images.chunk(accum_steps), tokens.chunk(accum_steps)
    with torch.no_grad(), autocast:
        cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks)]
    cached_images = [c[0] for c in cached]
    cached_texts = [c[1] for c in cached]
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for j in range(accum_steps):
        last = j == accum_steps - 1
        with contextlib.nullcontext() if last else no_sync():
            with autocast:
                image_features, text_features, logit_scale = model(image_chunks[j], token_chunks[j])
                all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])
                all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])
                loss = loss_fn(all_images, all_texts, logit_scale)
            loss.backward()
    for param in temperature:
        if param.grad is not None:
            param.grad.div_(accum_steps)
    return loss.detach()
