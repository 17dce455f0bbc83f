"""Global batch arithmetic and feature-cached gradient accumulation (OpenCLIP's ``--accum-freq``).

The contrastive loss's negatives are the whole batch, so splitting a batch into micro-batches
and summing their losses would train on a smaller batch. Instead (Cui et al.'s GradCache, as in
OpenCLIP): embed every micro-batch without autograd, then re-run each micro-batch with autograd
and compute the loss over the WHOLE cached batch with that micro-batch's slot replaced by the live
features; each pass sends exactly its own micro-batch's share of the full-batch gradient. Only one
micro-batch's activations are alive at a time, and the loss always sees the global batch
(``ClipLoss`` all-gathers the local batch of every rank).

Sizes: every world size trains the same global batch G. Rank r of W trains positions
``[r*G//W, (r+1)*G//W)`` of each step (``clip_core.loss.share_bounds``: shares differ by at most one
sample, so any W <= G works, and the losses weight unequal shares so that the step is the global-batch
step). ``micro_batch_size`` is a cap: ``accum_steps`` is the smallest count that splits the largest share
into micro-batches no larger than the cap, and it is the SAME on every rank (each micro pass runs the
loss's collectives), so a rank splits its share into ``accum_steps`` near-equal micro-batches
(``tensor_split``). ``check_world_sizes`` refuses, before workers start, a range with a world size that
leaves a rank without a sample or a micro-batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from clip_core.loss import share_bounds
from workflows.common.errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    rank: int
    per_worker: int  # samples this rank contributes to one optimizer step (its share)
    accum_steps: int  # micro-batches per rank per step, the same on every rank

    @property
    def micro_batch(self) -> int:
        """This rank's largest micro-batch."""
        return math.ceil(self.per_worker / self.accum_steps)

    def describe(self) -> str:
        """e.g. ``per-worker batch 1365-1366 = 3 x <=456`` (G = 32,768 at W = 24), for the run's log."""
        bounds = share_bounds(self.global_batch, self.world_size)
        shares = sorted({b - a for a, b in zip(bounds, bounds[1:])})
        largest = math.ceil(shares[-1] / self.accum_steps)
        return f"per-worker batch {'-'.join(map(str, shares))} = {self.accum_steps} x <={largest}"


def plan_batches(global_batch: int, world_size: int, micro_batch_cap: int = 0, rank: int = 0) -> BatchPlan:
    """Rank ``rank``'s share of the global batch and the accumulation count every rank uses."""
    if not 1 <= world_size <= global_batch:
        raise UserError(f"train.global_batch_size {global_batch} gives fewer than one sample to each of "
                        f"{world_size} workers; raise it or lower scaling.max_workers to at most {global_batch}")
    bounds = share_bounds(global_batch, world_size)
    smallest, largest = bounds[1] - bounds[0], bounds[-1] - bounds[-2]
    accum = math.ceil(largest / micro_batch_cap) if micro_batch_cap else 1
    if accum > smallest:
        raise UserError(f"train.micro_batch_size {micro_batch_cap} splits the largest per-worker share of "
                        f"{largest} at world size {world_size} into {accum} micro-batches, more than the smallest "
                        f"share of {smallest} samples can fill; set train.micro_batch_size to 2 or more")
    return BatchPlan(global_batch, world_size, rank, bounds[rank + 1] - bounds[rank], accum)


def check_world_sizes(global_batch: int, min_workers: int, max_workers: int, micro_batch_cap: int = 0) -> None:
    """Every world size the elastic range allows can train the global batch (``plan_batches`` raises)."""
    plan_batches(global_batch, max_workers, micro_batch_cap)  # the largest first: it may be past the batch
    for world_size in range(min_workers, max_workers):
        plan_batches(global_batch, world_size, micro_batch_cap)


def accumulate_gradients(model: nn.Module, loss_fn: LossFn, images: torch.Tensor, tokens: torch.Tensor,
                         accum_steps: int, autocast: contextlib.AbstractContextManager,
                         temperature: list[nn.Parameter]) -> torch.Tensor:
    """Backward of the loss over (images, tokens) — this rank's whole per-step batch — in
    ``accum_steps`` micro-batches (sizes differ by at most one; ``chunk`` could return fewer, and every rank
    must run the same passes). Leaves gradients in ``.grad``; returns the detached loss.

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

    image_chunks, token_chunks = images.tensor_split(accum_steps), tokens.tensor_split(accum_steps)
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
