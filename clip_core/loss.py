"""Contrastive losses over the *global* batch, after OpenCLIP's loss.py.

CLIP's negatives for a pair are all other pairs in the batch, and the paper's batch (32k) is spread
over many workers. So each rank all-gathers the features of every rank and scores its pairs against
the whole global batch. Gradient bookkeeping (why ``gather_with_grad`` matters):

- DDP averages parameter gradients over ranks, so the objective it optimises is the MEAN of the
  per-rank losses. For that mean to equal the single-process loss on the concatenated batch, the
  gradient that rank s's loss sends to rank r's features must reach rank r.
- ``gather_with_grad=True`` gathers with an all-gather whose backward is a reduce-scatter: it sums
  every rank's gradient for a slice back onto the rank that owns it. Exact.
- ``gather_with_grad=False`` gathers without autograd and puts the local tensor back in its slot, so
  only this rank's own loss reaches its features: with ``local_loss=False`` (every rank computes the
  full loss) the resulting step is the exact gradient divided by world_size (OpenCLIP's default;
  Adam is nearly scale-invariant); with ``local_loss=True`` terms are dropped (an approximation).
- ``local_loss=True`` scores only this rank's rows against all columns (labels offset by rank):
  O(local x global) logits instead of O(global^2), the choice for large batches.

Every rank must pass the same local batch size (all_gather needs equal shapes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# torch 2.13 renames the single-tensor collectives (the old names warn there); older GPU images have
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's when initialised, else a single process."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``features`` concatenated in rank order. Backward: every rank's loss has a gradient
    for every slice, so each rank receives the sum over ranks of the gradient for its own slice."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        gathered = features.new_empty((dist.get_world_size() * features.shape[0], *features.shape[1:]))
        _all_gather_single(gathered, features.contiguous())
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        local = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous())  # sum
        return local


def all_gather_features(features: torch.Tensor, rank: int, world_size: int, *, with_grad: bool,
                        keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate ``features`` from all ranks along dim 0, in rank order.

    ``with_grad``: backward sums each rank's gradient for slice r onto rank r (exact global grads).
    Otherwise the gathered copies are constants; ``keep_local_grad`` puts the local tensor back in
    its slot so at least this rank's own loss reaches its features.
    """
    if with_grad:
        return _GatherWithGrad.apply(features)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    with torch.no_grad():
        dist.all_gather(gathered, features.contiguous())
    if keep_local_grad:
        gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (the CLIP paper's loss): mean of image->text and text->image cross-entropy.

    Returns this rank's loss; with ``local_loss=False`` it is the global-batch loss itself (same on
    every rank), with ``local_loss=True`` the mean over ranks is the global-batch loss.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world_size = _rank_and_world(self.rank, self.world_size)
        all_image, all_text = image_features, text_features
        if world_size > 1:
            gather = dict(with_grad=self.gather_with_grad, keep_local_grad=not self.local_loss)
            all_image = all_gather_features(image_features, rank, world_size, **gather)
            all_text = all_gather_features(text_features, rank, world_size, **gather)
        if self.local_loss:
            # this rank's rows against every column; its positives sit at offset rank * n
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            first_label = rank * image_features.shape[0]
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            first_label = 0
        labels = torch.arange(logits_per_image.shape[0], device=image_features.device) + first_label
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").

    Every (image, text) pair of the global batch is an independent binary problem: +1 for matching
    pairs, -1 otherwise; summed and divided by the local batch size, as in the paper and OpenCLIP.
    Distributed: this rank's images against ALL texts, gathered WITH gradient (one all_gather;
    OpenCLIP instead passes text chunks around a ring to save memory, which gives the same loss).
    The mean over ranks is the single-process loss on the concatenated batch.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        rank, world_size = _rank_and_world(self.rank, self.world_size)
        if world_size > 1:
            text_features = all_gather_features(text_features, rank, world_size, with_grad=True)
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        n = image_features.shape[0]
        signs = -torch.ones_like(logits)
        positives = torch.arange(n, device=logits.device)
        signs[positives, positives + rank * n] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n
