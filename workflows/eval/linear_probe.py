"""CLIP_benchmark's ``linear_probe`` task in plain torch: a linear layer on the frozen image tower's features.

The protocol of ``clip_benchmark/metrics/linear_probe.py``: L2-normalised image features; a ``Linear(D, C)``
trained with cross-entropy, AdamW and a cosine learning rate (no warm-up) over ``epochs`` passes of shuffled
mini-batches, torch seeded with ``seed`` before the layer is built; with a validation share
(``val_proportion`` > 0, CLIP_benchmark's ``--val_proportion``) the weight decay is searched on it, as the
CLIP paper (appendix A.3) did, over 97 log-spaced values in [1e-6, 1e2]: 7 coarse points, then halving
steps around the best; the probe is then retrained on train + validation with that weight decay.
Without a validation share the weight decay is 0. Metrics are CLIP_benchmark's names: ``lp_acc1``,
``lp_acc5``, ``lp_mean_per_class_recall`` (top-5 means top-C below 5 classes, as for zero-shot here).

Deterministic: the same features, labels and settings give the same numbers (global RNG state is left
as it was). Training runs on the features in memory, on the GPU when the process has one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from clip_core.zero_shot import classification_metrics
from workflows.common.config import EvalConfig
from workflows.common.errors import UserError
from workflows.data.eval_sets import DatasetResult, LinearProbeSet

# CLIP_benchmark's sweep: 97 values, searched from the 7 of them that np.logspace(-6, 2, 7) also gives.
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
COARSE = [i for i, value in enumerate(WEIGHT_DECAYS) if value in np.logspace(-6, 2, num=7).tolist()]


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 64
    seed: int = 0

    @classmethod
    def of(cls, section: EvalConfig) -> ProbeSettings:
        return cls(section.linear_probe_epochs, section.linear_probe_lr, section.linear_probe_batch_size,
                   section.linear_probe_seed)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                settings: ProbeSettings, device: str | torch.device = "cpu") -> torch.nn.Linear:
    """One probe, trained as CLIP_benchmark's ``train()``: seed, build, AdamW, cosine lr set before each step."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = torch.nn.Linear(features.shape[1], num_classes).to(device)
        loader = DataLoader(TensorDataset(features, labels), batch_size=settings.batch_size, shuffle=True)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=weight_decay)
        steps = settings.epochs * len(loader)
        for epoch in range(settings.epochs):
            for i, (x, y) in enumerate(loader):
                lr = 0.5 * (1 + math.cos(math.pi * (i + epoch * len(loader)) / steps)) * settings.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(probe(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
    return probe


def search_weight_decay(accuracy: Callable[[float], float]) -> float:
    """CLIP_benchmark's ``tune_weight_decay``: the 7 coarse points, then [left, peak, right] at spans 8, 4, 2,
    1 around the peak, a tie keeping the earlier candidate. ``accuracy(wd)`` is the validation top-1 of a probe
    trained with weight decay ``wd``; each value is trained once (training is deterministic)."""
    seen: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0  # CLIP_benchmark's start: index 0 unless some candidate scores above 0
        for idx in candidates:
            if idx not in seen:
                seen[idx] = accuracy(WEIGHT_DECAYS[idx])
            if best_acc < seen[idx]:
                best, best_acc = idx, seen[idx]
        return best

    idx = peak(COARSE)
    span = 8
    while span > 0:
        idx = peak([max(idx - span, 0), idx, min(idx + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[idx]


def _split(n: int, val_proportion: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows): a seeded permutation, the first ``round(p * n)`` rows validating."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(val_proportion * n)
    if not 0 < n_val < n:
        raise UserError(f"eval.linear_probe_val_proportion={val_proportion} leaves {n_val} of {n} train images for "
                        f"validation; pick a share that leaves at least one on each side, or 0 to skip the search")
    return order[n_val:], order[:n_val]


def fit_and_score(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  num_classes: int, settings: ProbeSettings, val_proportion: float = 0.0,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """The whole protocol on features: weight decay (searched or 0), final probe, test metrics."""
    weight_decay = 0.0
    if val_proportion > 0:
        fit, val = _split(len(train_x), val_proportion, settings.seed)

        def val_accuracy(wd: float) -> float:
            probe = train_probe(train_x[fit], train_y[fit], num_classes, wd, settings, device)
            with torch.no_grad():
                return (probe(train_x[val].to(device)).argmax(1).cpu() == train_y[val]).float().mean().item()

        weight_decay = search_weight_decay(val_accuracy)
    probe = train_probe(train_x, train_y, num_classes, weight_decay, settings, device)
    with torch.no_grad():
        logits = probe(test_x.to(device)).float().cpu()
    m = classification_metrics(logits, test_y)
    return {"lp_acc1": m["acc1"], "lp_acc5": m["acc5"], "lp_mean_per_class_recall": m["mean_per_class_recall"],
            "lp_weight_decay": weight_decay}


def linear_probe_result(data: LinearProbeSet, features: torch.Tensor, ok: np.ndarray,
                        section: EvalConfig) -> DatasetResult:
    """A linear-probe set's metrics from its embedded train + test images (in ``data.images`` order).
    Unreadable images are left out of training and testing, and counted."""
    keep = torch.from_numpy(ok)
    n_train = len(data.train_images)
    train_keep, test_keep = keep[:n_train], keep[n_train:]
    if not train_keep.any() or not test_keep.any():
        raise UserError(f"no image of linear-probe set {data.name}'s {'train' if not train_keep.any() else 'test'} "
                        f"split could be read")
    metrics = fit_and_score(features[:n_train][train_keep], torch.tensor(data.train_labels)[train_keep],
                            features[n_train:][test_keep], torch.tensor(data.test_labels)[test_keep],
                            data.num_classes, ProbeSettings.of(section), section.linear_probe_val_proportion,
                            "cuda" if torch.cuda.is_available() else "cpu")
    return DatasetResult({**metrics, "lp_train_images": float(train_keep.sum()),
                          "lp_test_images": float(test_keep.sum()), "lp_unreadable_images": float((~keep).sum())})
