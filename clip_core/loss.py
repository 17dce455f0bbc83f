"""Contrastive losses over the *global* batch, after OpenCLIP's loss.py.

CLIP's negatives for a pair are all other pairs in the batch, and the paper's batch (32k) is spread
over many workers. So each rank all-gathers the features of every rank and scores its pairs against
the whole global batch.

Shares. Rank r of W holds rows ``[r*G//W, (r+1)*G//W)`` of the global batch of G (``share_bounds``:
contiguous, balanced floors, so shares differ by at most one and any W <= G works). Gathers pad every
share to the largest, all-gather, and drop the padding (their backward pads, reduce-scatters and drops
it again). With equal shares nothing is padded or weighted: the same operations, bit for bit, as before
unequal shares were possible.
A loss that knows ``global_batch`` checks that its local batch is this rank's share; without it every
rank is assumed to hold the same number of rows.

Gradient bookkeeping. DDP averages parameter gradients over ranks, so the objective it optimises is
the MEAN of the per-rank losses. What each mode gives, for any shares and any W > 1, compared with
one process on the concatenated batch (W = 1, where nothing is gathered and every mode is exact):

- Global loss (``local_loss=False``), ``gather_with_grad=True``: every rank computes the global loss
  itself; the gather's backward (a reduce-scatter) sums every rank's gradient for a slice onto the rank
  that owns it. Loss and gradients exact.
- Global loss, ``gather_with_grad=False`` (OpenCLIP's default): the gathered copies are constants
  except this rank's own slot, so only this rank's loss reaches its features. Loss exact, logit_scale's
  gradient exact, every other gradient exactly 1/W of the global-batch gradient (Adam is nearly
  scale-invariant, but the step does depend on W).
- ``local_loss=True``, ``gather_with_grad=True``: each rank scores only its own rows against all
  columns (labels offset by its first row): O(local x global) logits instead of O(global^2), the choice
  for large batches. Its mean cross-entropy is weighted by ``W * share / G`` (exactly 1 for equal
  shares), so the mean over ranks is the global-batch loss: loss (mean over ranks) and gradients exact.
- ``local_loss=True``, ``gather_with_grad=False``: the columns are constants, so each sample's features
  get only the gradient of its own rows (as the query), never the one from being another row's
  negative. An approximation, but the same one at every W > 1 (the loss is exact, weighted as above).
- ``SigLipLoss``: this rank's images against ALL texts, gathered with gradient; the row sum is divided
  by G / W (the local batch for equal shares, as in the paper and OpenCLIP). Loss (mean over ranks) and
  gradients exact.

A rank's loss value under ``local_loss`` or SigLIP is its own part; the global-batch loss is the mean
over ranks.
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


def share_bounds(global_batch: int, world_size: int) -> list[int]:
    """Rank r of ``world_size`` holds rows ``[bounds[r], bounds[r + 1])`` of a global batch: contiguous,
    balanced floors. The one definition of who trains what (the feed, the batch plan and the losses)."""
    if not 1 <= world_size <= global_batch:
        raise ValueError(f"a global batch of {global_batch} cannot give each of {world_size} ranks a sample")
    return [r * global_batch // world_size for r in range(world_size + 1)]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's when initialised, else a single process."""
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


def _shares(global_batch: int | None, local: int, rank: int, world_size: int) -> tuple[int, ...]:
    """Every rank's row count; checks that this rank holds its share of ``global_batch``."""
    if global_batch is None:
        return (local,) * world_size
    bounds = share_bounds(global_batch, world_size)
    shares = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    if local != shares[rank]:
        raise ValueError(f"rank {rank} of {world_size} holds {local} rows, but its share of the global batch "
                         f"{global_batch} is {shares[rank]} (rows {bounds[rank]}..{bounds[rank + 1] - 1})")
    return shares


def _padded(rows: torch.Tensor, width: int) -> torch.Tensor:
    """``rows`` with zero rows appended up to ``width`` (itself when it has them)."""
    if rows.shape[0] == width:
        return rows
    return torch.cat([rows, rows.new_zeros((width - rows.shape[0], *rows.shape[1:]))])


def _unpadded(gathered: torch.Tensor, shares: tuple[int, ...]) -> torch.Tensor:
    """Each rank's valid rows of an all-gather of shares padded to the largest, concatenated."""
    width = max(shares)
    if min(shares) == width:
        return gathered
    return torch.cat([gathered[r * width:r * width + n] for r, n in enumerate(shares)])


def _gather(features: torch.Tensor, shares: tuple[int, ...]) -> torch.Tensor:
    width = max(shares)
    gathered = features.new_empty((len(shares) * width, *features.shape[1:]))
    _all_gather_single(gathered, _padded(features, width).contiguous())
    return _unpadded(gathered, shares)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``features`` concatenated in rank order. Backward: every rank's loss has a gradient
    for every slice, so each rank receives the sum over ranks of the gradient for its own slice."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, rank: int, shares: tuple[int, ...]) -> torch.Tensor:
        ctx.rank, ctx.shares = rank, shares
        return _gather(features, shares)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        shares, width = ctx.shares, max(ctx.shares)
        padded = grad if min(shares) == width else torch.cat([_padded(g, width) for g in grad.split(shares)])
        local = grad.new_empty((width, *grad.shape[1:]))
        _reduce_scatter_single(local, padded.contiguous())  # sum
        return local[:shares[ctx.rank]], None, None


def all_gather_features(features: torch.Tensor, rank: int, shares: tuple[int, ...], *, with_grad: bool,
                        keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate ``features`` from all ranks along dim 0, in rank order; rank r holds ``shares[r]`` rows.

    ``with_grad``: backward sums each rank's gradient for slice r onto rank r (exact global grads).
    Otherwise the gathered copies are constants; ``keep_local_grad`` puts the local tensor back in
    its slot so at least this rank's own loss reaches its features.
    """
    if with_grad:
        return _GatherWithGrad.apply(features, rank, shares)
    with torch.no_grad():
        gathered = _gather(features, shares)
    if not keep_local_grad:
        return gathered
    parts = list(gathered.split(shares))
    parts[rank] = features
    return torch.cat(parts)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (the CLIP paper's loss): mean of image->text and text->image cross-entropy.

    Returns this rank's loss; with ``local_loss=False`` it is the global-batch loss itself (same on
    every rank), with ``local_loss=True`` the mean over ranks is the global-batch loss.
    ``global_batch``: the G the ranks' shares add up to (``share_bounds``); None = equal shares.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 rank: int | None = None, world_size: int | None = None, global_batch: int | None = None) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world_size = _rank_and_world(self.rank, self.world_size)
        n = image_features.shape[0]
        shares = _shares(self.global_batch, n, rank, world_size)
        all_image, all_text = image_features, text_features
        if world_size > 1:
            gather = dict(with_grad=self.gather_with_grad, keep_local_grad=not self.local_loss)
            all_image = all_gather_features(image_features, rank, shares, **gather)
            all_text = all_gather_features(text_features, rank, shares, **gather)
        if self.local_loss:
            # this rank's rows against every column; its positives start at its first row
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            first_label = sum(shares[:rank])
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            first_label = 0
        labels = torch.arange(logits_per_image.shape[0], device=image_features.device) + first_label
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        if self.local_loss and world_size * n != sum(shares):  # an unequal share: weight its mean by W * n / G
            loss = loss * (world_size * n / sum(shares))
        return loss


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training").

    Every (image, text) pair of the global batch is an independent binary problem: +1 for matching
    pairs, -1 otherwise; summed and divided by the local batch size (G / W), as in the paper and OpenCLIP.
    Distributed: this rank's images against ALL texts, gathered WITH gradient (one all_gather;
    OpenCLIP instead passes text chunks around a ring to save memory, which gives the same loss).
    The mean over ranks is the single-process loss on the concatenated batch, for any shares
    (``global_batch`` as in ``ClipLoss``).
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None,
                 global_batch: int | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> torch.Tensor:
        rank, world_size = _rank_and_world(self.rank, self.world_size)
        n = image_features.shape[0]
        shares = _shares(self.global_batch, n, rank, world_size)
        if world_size > 1:
            text_features = all_gather_features(text_features, rank, shares, with_grad=True)
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        signs = -torch.ones_like(logits)
        positives = torch.arange(n, device=logits.device)
        signs[positives, positives + sum(shares[:rank])] = 1.0
        return -F.logsigmoid(signs * logits).sum() / (sum(shares) / world_size)  # G / W: n for equal shares
