"""ClipLoss / SigLipLoss: single-process formulas, and W processes (gloo) == 1 process on the global batch,
for equal shares (W=2: 5+5 of G=10) and unequal ones (W=3: 3+3+4).

Each distributed run computes every loss configuration in one spawn of W CPU processes (spawning costs
seconds) and writes each rank's loss and gradients to a file; the parent compares them with the
single-process reference on the concatenated batch. DDP averages parameter gradients over ranks, so
the gradient DDP applies is the rank mean; for features, rank r's gradient / W is its share (each rank's
loss sends a gradient to every rank's features). clip_core/loss.py's docstring states the conventions.
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

from clip_core.loss import ClipLoss, SigLipLoss, share_bounds
from workflows.common.runtime import free_port

GLOBAL = 10
WORLDS = (2, 3)  # 5+5, and 3+3+4
COMPILED_WORLD = 3  # the compiled loss once (compiling costs tens of seconds per process here), unequal shares
IN_DIM, EMBED_DIM = 6, 5
CLIP_CONFIGS = [(False, True), (True, True), (False, False), (True, False)]  # (local_loss, gather_with_grad)
TOL = dict(rtol=1e-6, atol=1e-6)


def _problem() -> dict[str, torch.Tensor]:
    """A global batch of inputs and a tiny linear 'encoder' per modality (same on every process)."""
    g = torch.Generator().manual_seed(0)
    return {
        "x_image": torch.randn(GLOBAL, IN_DIM, generator=g),
        "x_text": torch.randn(GLOBAL, IN_DIM, generator=g),
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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        bounds = share_bounds(GLOBAL, world)
        rows = slice(bounds[rank], bounds[rank + 1])
        results = {f"clip-{local}-{grad}": _run(ClipLoss(local_loss=local, gather_with_grad=grad, global_batch=GLOBAL),
                                                rows, False)
                   for local, grad in CLIP_CONFIGS}
        results["siglip"] = _run(SigLipLoss(global_batch=GLOBAL), rows, True)
        if world == COMPILED_WORLD:
            # model.compile=full compiles the loss: the gather's autograd function must trace (aot_eager:
            # Dynamo and AOTAutograd, without Inductor's codegen time), padding and all.
            compiled = torch.compile(ClipLoss(local_loss=True, gather_with_grad=True, global_batch=GLOBAL),
                                     backend="aot_eager")
            results["clip-compiled"] = _run(compiled, rows, False)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict[int, list[dict]]:
    """world size -> each rank's results, one spawn per world size."""
    out = {}
    for world in WORLDS:
        out_dir = tmp_path_factory.mktemp(f"dist{world}")
        context = mp.start_processes(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 180
        try:
            while not context.join(timeout=1):
                assert time.monotonic() < deadline, f"{world}-process gloo run did not finish in 180 s"
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        out[world] = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    return out


def _reference(key: str) -> dict[str, torch.Tensor]:
    if key == "siglip":
        return _run(SigLipLoss(rank=0, world_size=1), slice(None), True)
    return _run(ClipLoss(rank=0, world_size=1), slice(None), False)


def _assert_matches(ranks: list[dict], ref: dict[str, torch.Tensor]) -> None:
    world = len(ranks)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), ref["loss"], **TOL)
    for name in ("image", "text"):  # rank r's features are rows share_bounds(G, W)[r:r + 2] of the global batch
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / world, ref[name], **TOL)
    for name in ("w_image", "w_text", "logit_scale", "logit_bias"):  # DDP's all-reduce mean
        if name in ref:
            torch.testing.assert_close(torch.stack([r[name] for r in ranks]).mean(0), ref[name], **TOL)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("key", ["clip-False-True", "clip-True-True", "siglip"])
def test_exact_modes_at_any_world_size_equal_one_process(distributed, world, key):
    """Global or local loss gathered with gradient, and SigLIP: loss (mean over ranks) and gradients are the
    single-process ones, whether the shares are equal or not."""
    _assert_matches([r[key] for r in distributed[world]], _reference("siglip" if key == "siglip" else "clip"))


@pytest.mark.timeout(420)
def test_compiled_loss_with_unequal_shares_equals_one_process(distributed):
    _assert_matches([r["clip-compiled"] for r in distributed[COMPILED_WORLD]], _reference("clip"))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", WORLDS)
def test_global_loss_is_bit_identical_to_one_process(distributed, world):
    """The gathered features are exact copies (padding and all), so every rank's global loss is the
    single-process one to the bit; without gradient through the gather each rank's own features get
    exactly the single-process gradient; with it, W identical gradients summed (exact for W=2)."""
    ref = _reference("clip")
    for rank in distributed[world]:
        assert torch.equal(rank["clip-False-True"]["loss"], ref["loss"])
        assert torch.equal(rank["clip-False-False"]["loss"], ref["loss"])
    for name in ("image", "text"):
        assert torch.equal(torch.cat([r["clip-False-False"][name] for r in distributed[world]]), ref[name])
        if world == 2:
            assert torch.equal(torch.cat([r["clip-False-True"][name] for r in distributed[world]]) / 2, ref[name])


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", WORLDS)
def test_gather_without_grad_gives_gradients_scaled_by_world_size(distributed, world):
    """The exactness check can fail: without gradient through the gather, DDP's step is grad / W (logit_scale's
    is exact)."""
    ranks = [r["clip-False-False"] for r in distributed[world]]
    with pytest.raises(AssertionError):
        _assert_matches(ranks, _reference("clip"))
    ref = _reference("clip")
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"])  # the loss value itself is right
    mean = {name: torch.stack([r[name] for r in ranks]).mean(0) for name in ("w_image", "w_text", "logit_scale")}
    torch.testing.assert_close(mean["w_image"], ref["w_image"] / world, **TOL)
    torch.testing.assert_close(mean["w_text"], ref["w_text"] / world, **TOL)
    torch.testing.assert_close(mean["logit_scale"], ref["logit_scale"], **TOL)


def _query_side_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The global loss with every column a constant: what local_loss without gather_with_grad differentiates."""
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(scale * image @ text.detach().T, labels)
            + F.cross_entropy(scale * text @ image.detach().T, labels)) / 2


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", WORLDS)
def test_local_loss_without_gather_grad_is_the_same_approximation_at_every_world_size(distributed, world):
    """Each sample's features get the gradient of its own rows only: the same at W=2 and W=3 (equal or
    unequal shares), and the loss (mean over ranks) is exact."""
    _assert_matches([r["clip-True-False"] for r in distributed[world]], _run(_query_side_loss, slice(None), False))
    ranks = [r["clip-True-False"] for r in distributed[world]]
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), _reference("clip")["loss"], **TOL)


def test_shares_are_balanced_contiguous_floors_and_checked():
    assert share_bounds(10, 3) == [0, 3, 6, 10] and share_bounds(8, 2) == [0, 4, 8]
    assert share_bounds(32_768, 24)[1:3] == [1365, 2730]
    with pytest.raises(ValueError, match="cannot give each of 11 ranks a sample"):
        share_bounds(10, 11)
    image = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match=r"rank 0 of 1 holds 4 rows, but its share of the global batch 10 is 10"):
        ClipLoss(rank=0, world_size=1, global_batch=10)(image, image, torch.tensor(10.0))
    with pytest.raises(ValueError, match="rank 0 of 1 holds 4 rows"):
        SigLipLoss(rank=0, world_size=1, global_batch=5)(image, image, torch.tensor(10.0), None)


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
