"""A world size that does not divide the global batch trains the same step: 3 real DDP ranks (gloo) with
unequal shares (3+3+4 of G=10) and feature-cached accumulation (2 micro-batches on every rank, of 2+1 or
2+2 samples) give the single-process, single-batch loss and gradients, for every exact loss mode
(clip_core/loss.py's docstring), and OpenCLIP's no-gradient gather gives exactly 1/W of them.

One spawn of 3 CPU processes computes every mode; DDP itself averages the gradients, so every rank holds
the gradient the optimizer would apply. Also: ``scaling.resize_interval_s`` (Ray's resize check) is checked.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip_core.loss import ClipLoss, SigLipLoss
from workflows.common.config import ConfigError, load_config
from workflows.common.runtime import free_port
from workflows.train.accumulation import accumulate_gradients, plan_batches

GLOBAL, WORLD, MICRO_CAP = 10, 3, 2
IN_DIM, EMBED_DIM = 6, 5
MODES = ("clip-False-True", "clip-True-True", "siglip", "clip-False-False")  # clip-<local_loss>-<gather_with_grad>
TOL = dict(rtol=1e-6, atol=1e-6)


class TinyClip(nn.Module):
    """A linear 'tower' per modality with CLIP's (image features, text features, logit_scale) interface."""

    def __init__(self, siglip: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.image = nn.Parameter(torch.randn(EMBED_DIM, IN_DIM, generator=g))
        self.text = nn.Parameter(torch.randn(EMBED_DIM, IN_DIM, generator=g))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if siglip else None  # DDP needs every parameter used

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (F.normalize(images @ self.image.T, dim=-1), F.normalize(texts @ self.text.T, dim=-1),
                self.logit_scale.exp())


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL, IN_DIM, generator=g), torch.randn(GLOBAL, IN_DIM, generator=g)


def _step(mode: str, rank: int, world: int, rows: slice, accum: int, ddp: bool) -> dict[str, torch.Tensor]:
    """One accumulated backward of ``mode`` on ``rows`` of the global batch; the loss and the gradients."""
    raw = TinyClip(siglip=mode == "siglip")
    model = DistributedDataParallel(raw) if ddp else raw
    if mode == "siglip":
        siglip = SigLipLoss(rank=rank, world_size=world, global_batch=GLOBAL)
        loss_fn = lambda i, t, s: siglip(i, t, s, raw.logit_bias)  # noqa: E731
    else:
        _, local, grad = mode.split("-")
        loss_fn = ClipLoss(local_loss=local == "True", gather_with_grad=grad == "True", rank=rank, world_size=world,
                           global_batch=GLOBAL)
    images, texts = _batch()
    temperature = [p for p in (raw.logit_scale, raw.logit_bias) if p is not None]
    loss = accumulate_gradients(model, loss_fn, images[rows], texts[rows], accum, contextlib.nullcontext(), temperature)
    return {"loss": loss, **{name: p.grad.clone() for name, p in raw.named_parameters()}}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        plan = plan_batches(GLOBAL, WORLD, MICRO_CAP, rank)
        first = sum(plan_batches(GLOBAL, WORLD, MICRO_CAP, r).per_worker for r in range(rank))
        rows = slice(first, first + plan.per_worker)
        results = {mode: _step(mode, rank, WORLD, rows, plan.accum_steps, ddp=True) for mode in MODES}
        torch.save({"plan": plan, "results": results}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("elastic")
    context = mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "3-process DDP run did not finish in 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(mode: str) -> dict[str, torch.Tensor]:
    """One process, the whole global batch in one pass: the step every world size must take."""
    return _step(mode, 0, 1, slice(None), 1, ddp=False)


@pytest.mark.timeout(300)
def test_every_rank_plans_its_share_and_the_same_accumulation(ranks):
    plans = [r["plan"] for r in ranks]
    assert [p.per_worker for p in plans] == [3, 3, 4]
    assert {p.accum_steps for p in plans} == {2}  # the micro passes' collectives pair up across ranks
    assert plans[0].describe() == "per-worker batch 3-4 = 2 x <=2"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES[:3])
def test_unequal_shares_with_accumulation_train_the_single_process_step(ranks, mode):
    ref = _reference(mode)
    results = [r["results"][mode] for r in ranks]
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), ref["loss"], **TOL)
    for result in results:  # DDP averaged: every rank holds the step's gradient
        assert result.keys() == ref.keys()
        for name in ref.keys() - {"loss"}:
            torch.testing.assert_close(result[name], ref[name], **TOL, msg=f"{mode} {name}")


@pytest.mark.timeout(300)
def test_gather_without_grad_scales_the_tower_gradients_by_one_over_w(ranks):
    ref = _reference("clip-False-False")
    for result in (r["results"]["clip-False-False"] for r in ranks):
        torch.testing.assert_close(result["loss"], ref["loss"], **TOL)  # every rank: the global loss
        torch.testing.assert_close(result["image"], ref["image"] / WORLD, **TOL)
        torch.testing.assert_close(result["text"], ref["text"] / WORLD, **TOL)
        torch.testing.assert_close(result["logit_scale"], ref["logit_scale"], **TOL)


@pytest.mark.parametrize(("value", "message"), [("0", "got 0.0"), ("-5", "got -5.0"), ("nan", "got nan")])
def test_the_resize_interval_must_be_positive(value, message):
    assert load_config(overrides=["scaling.resize_interval_s=15"]).scaling.resize_interval_s == 15.0
    with pytest.raises(ConfigError, match=f"scaling.resize_interval_s must be > 0 seconds, {message}"):
        load_config(overrides=[f"scaling.resize_interval_s={value}"])
