"""The linear probe against CLIP_benchmark's protocol, re-computed here in its own style (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workflows.common.errors import UserError
from workflows.eval.linear_probe import WEIGHT_DECAYS, ProbeSettings, fit_and_score, search_weight_decay, train_probe

SETTINGS = ProbeSettings(epochs=4, lr=0.1, batch_size=8, seed=3)


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes around orthogonal directions of R^6, L2-normalised like CLIP features: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = F.one_hot(labels * 2, 6).float() + 0.15 * torch.randn(len(labels), 6, generator=g)
    return F.normalize(features, dim=-1), labels


def reference_probe(x: torch.Tensor, y: torch.Tensor, weight_decay: float, s: ProbeSettings) -> torch.nn.Linear:
    """CLIP_benchmark's train(): seed, Linear, shuffling DataLoader, AdamW, cosine_lr(warmup 0) per step."""
    torch.manual_seed(s.seed)
    model = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=s.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=weight_decay)
    steps = s.epochs * len(loader)
    for epoch in range(s.epochs):
        for i, (xb, yb) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + np.cos(np.pi * (i + epoch * len(loader)) / steps)) * s.lr
            optimizer.zero_grad()
            torch.nn.CrossEntropyLoss()(model(xb), yb).backward()
            optimizer.step()
    return model


def test_probe_is_clip_benchmarks_training_and_leaves_the_global_rng_alone() -> None:
    x, y = separable(10, seed=0)
    state = torch.get_rng_state()
    probe = train_probe(x, y, 3, 1e-4, SETTINGS)
    assert torch.equal(torch.get_rng_state(), state)
    expected = reference_probe(x, y, 1e-4, SETTINGS)
    torch.testing.assert_close(probe.weight, expected.weight)
    torch.testing.assert_close(probe.bias, expected.bias)


def test_separable_set_scores_perfectly() -> None:
    train_x, train_y = separable(12, seed=0)
    test_x, test_y = separable(5, seed=1)
    m = fit_and_score(train_x, train_y, test_x, test_y, 3, SETTINGS)
    assert m == {"lp_acc1": 1.0, "lp_acc5": 1.0, "lp_mean_per_class_recall": 1.0, "lp_weight_decay": 0.0}
    # an unlearnable test set (labels rotated): every prediction wrong, per-class recall 0
    assert fit_and_score(train_x, train_y, test_x, (test_y + 1) % 3, 3, SETTINGS)["lp_acc1"] == 0.0
    searched = fit_and_score(train_x, train_y, test_x, test_y, 3, SETTINGS, val_proportion=0.25)
    assert searched["lp_weight_decay"] in WEIGHT_DECAYS and searched["lp_acc1"] == 1.0
    with pytest.raises(UserError, match="leaves 0 of 36 train images for validation"):
        fit_and_score(train_x, train_y, test_x, test_y, 3, SETTINGS, val_proportion=0.01)


@pytest.mark.parametrize("peak", range(len(WEIGHT_DECAYS)))
def test_weight_decay_search_finds_the_peak_of_any_unimodal_curve(peak: int) -> None:
    calls: list[float] = []

    def accuracy(wd: float) -> float:
        calls.append(wd)
        return 1.0 - abs(WEIGHT_DECAYS.index(wd) - peak) / 200

    assert search_weight_decay(accuracy) == WEIGHT_DECAYS[peak]
    assert len(calls) == len(set(calls)) <= 7 + 4 * 2  # 7 coarse points, then at most 2 new ones per span


def test_weight_decay_search_keeps_clip_benchmarks_start() -> None:
    # no candidate ever scores above 0: CLIP_benchmark's find_peak keeps index 0, i.e. 1e-6
    assert search_weight_decay(lambda wd: 0.0) == WEIGHT_DECAYS[0] == pytest.approx(1e-6)
