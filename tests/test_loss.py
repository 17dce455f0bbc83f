"""ClipLoss / SigLipLoss: single-process formulas, and 2-process (gloo) == 1-process on the global batch.

The distributed test runs every loss configuration in one spawn of 2 CPU processes (spawning costs
seconds) and writes each rank's loss and gradients to a file; the parent compares them with the
single-process reference on the concatenated batch. DDP averages parameter gradients over ranks, so
the gradient DDP applies is the rank mean; for features, rank r's gradient / world_size is its share.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_core.loss import ClipLoss, SigLipLoss
from workflows.common.runtime import free_port

WORLD = 2
LOCAL_BATCH = 4
IN_DIM, EMBED_DIM = 6, 5
CLIP_CONFIGS = [(False, True), (True, True), (False, False)]  # (local_loss, gather_with_grad)


def _problem() -> dict[str, torch.Tensor]:
    """A global batch of inputs and a tiny linear 'encoder' per modality (same on every process)."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL_BATCH
    return {
        "x_image": torch.randn(n, IN_DIM, generator=g),
        "x_text": torch.randn(n, IN_DIM, generator=g),
        "w_image": torch.randn(EMBED_DIM, IN_DIM, generator=g),
        "w_text": torch.randn(EMBED_DIM, IN_DIM, generator=g),
    }


def _run(loss_fn, rows: slice, siglip: bool) -> dict[str, torch.Tensor]:
    """Forward + backward on the given rows; returns the loss and the gradients we compare."""
    p = _problem()
    w_image = p["w_image"].requires_grad_()
    w_text = p["w_text"].requires_grad_()
    logit_scale = torch.tensor(math.log(10.0), requires_grad=True)
    logit_bias = torch.tensor(-2.0, requires_grad=True)
    image = F.normalize(p["x_image"][rows] @ w_image.T, dim=-1)
    text = F.normalize(p["x_text"][rows] @ w_text.T, dim=-1)
    image.retain_grad()
    text.retain_grad()
    if siglip:
        loss = loss_fn(image, text, logit_scale.exp(), logit_bias)
    else:
        loss = loss_fn(image, text, logit_scale.exp())
    loss.backward()
    out = {"loss": loss.detach(), "image": image.grad, "text": text.grad, "w_image": w_image.grad,
           "w_text": w_text.grad, "logit_scale": logit_scale.grad}
    if siglip:
        out["logit_bias"] = logit_bias.grad
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {f"clip-{local}-{grad}": _run(ClipLoss(local_loss=local, gather_with_grad=grad), rows, False)
                   for local, grad in CLIP_CONFIGS}
        results["siglip"] = _run(SigLipLoss(), rows, True)
        # model.compile=full compiles the loss: the gather's autograd function must trace (aot_eager:
        # Dynamo and AOTAutograd, without Inductor's codegen time).
        compiled = torch.compile(ClipLoss(local_loss=True, gather_with_grad=True), backend="aot_eager")
        results["clip-compiled"] = _run(compiled, rows, False)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 60
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "2-process gloo run did not finish in 60 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _reference(key: str) -> dict[str, torch.Tensor]:
    if key == "siglip":
        return _run(SigLipLoss(rank=0, world_size=1), slice(None), True)
    return _run(ClipLoss(rank=0, world_size=1), slice(None), False)


def _assert_matches_single_process(results: list[dict], key: str) -> None:
    ref = _reference(key)
    ranks = [r[key] for r in results]
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"])
    for name in ("image", "text"):  # rank r's features are rows r*B:(r+1)*B of the global batch
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, ref[name])
    for name in ("w_image", "w_text", "logit_scale", "logit_bias"):  # DDP's all-reduce mean
        if name in ref:
            torch.testing.assert_close(torch.stack([r[name] for r in ranks]).mean(0), ref[name])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_two_processes_equal_one_process(distributed_results, local_loss):
    _assert_matches_single_process(distributed_results, f"clip-{local_loss}-True")
    if not local_loss:  # every rank computes the whole global loss
        for rank in distributed_results:
            torch.testing.assert_close(rank[f"clip-{local_loss}-True"]["loss"], _reference("clip")["loss"])


@pytest.mark.timeout(120)
def test_compiled_clip_loss_two_processes_equal_one_process(distributed_results):
    _assert_matches_single_process(distributed_results, "clip-compiled")


@pytest.mark.timeout(120)
def test_siglip_two_processes_equal_one_process(distributed_results):
    _assert_matches_single_process(distributed_results, "siglip")


@pytest.mark.timeout(120)
def test_gather_without_grad_gives_gradients_scaled_by_world_size(distributed_results):
    """The check above can fail: without gradient through the gather, DDP's step is grad / world."""
    with pytest.raises(AssertionError):
        _assert_matches_single_process(distributed_results, "clip-False-False")
    ref = _reference("clip")
    ranks = [r["clip-False-False"] for r in distributed_results]
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"])  # the loss value itself is right
    torch.testing.assert_close(torch.stack([r["w_image"] for r in ranks]).mean(0), ref["w_image"] / WORLD)


def test_clip_loss_single_process_matches_formula():
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * image @ text.T
    expected = 0.0
    for i in range(5):  # -log softmax of the matching pair, both directions
        expected -= torch.log_softmax(logits[i], 0)[i] + torch.log_softmax(logits[:, i], 0)[i]
    torch.testing.assert_close(ClipLoss()(image, text, scale), expected / 10)
    torch.testing.assert_close(ClipLoss(local_loss=True)(image, text, scale), expected / 10)
    # perfectly aligned, well separated pairs -> loss ~ 0
    eye = torch.eye(5)
    assert ClipLoss()(eye, eye, torch.tensor(100.0)) < 1e-6


def test_siglip_single_process_matches_formula():
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = 0.0
    for i in range(4):
        for j in range(4):
            z = scale * image[i] @ text[j] + bias
            label = 1.0 if i == j else -1.0
            expected += math.log1p(math.exp(-label * z.item()))
    torch.testing.assert_close(SigLipLoss()(image, text, scale, bias), torch.tensor(expected / 4))
