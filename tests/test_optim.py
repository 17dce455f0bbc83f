"""AdamW groups, warmup + cosine, batch arithmetic, feature-cached accumulation and MFU (no Ray)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from clip_core import ClipLoss, SigLipLoss, create_model
from workflows.common.config import TrainConfig
from workflows.common.errors import UserError
from workflows.train.accumulation import accumulate_gradients, check_world_sizes, plan_batches
from workflows.train.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine
from workflows.train.throughput import measure_cpu_peak_flops, mfu, peak_flops, peak_memory_bytes


def test_weight_decay_only_on_weight_matrices():
    model = create_model("tiny-vit", init_logit_bias=-10.0)
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    for name in ("logit_scale", "logit_bias", "token_embedding.weight", "positional_embedding",
                 "visual.class_embedding", "visual.positional_embedding", "ln_final.weight", "ln_final.bias",
                 "transformer.resblocks.0.attn.in_proj_bias"):
        assert name in exempt, name
    for name in ("text_projection", "visual.proj", "visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.0.mlp.c_fc.weight"):
        assert name in decayed, name
    assert decayed | exempt == set(names.values()) and not decayed & exempt


def test_optimizer_uses_paper_recipe_and_skips_frozen():
    model = create_model("tiny-vit")
    model.lock_image_tower()
    opt = build_optimizer(model, TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in trained for p in model.visual.parameters())


def test_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5)  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert warmup_cosine(14, 4, 14) == pytest.approx(0.0) and warmup_cosine(99, 4, 14) == pytest.approx(0.0)
    assert warmup_cosine(7, 4, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_batch_plan_gives_any_world_size_its_share_of_the_global_batch():
    assert plan_batches(128, 2) == plan_batches(128, 2, 0) and plan_batches(128, 2).accum_steps == 1
    plan = plan_batches(96, 2, micro_batch_cap=20)  # 48 per worker: 3 micro-batches of 16 (<= 20)
    assert (plan.per_worker, plan.accum_steps, plan.micro_batch) == (48, 3, 16)
    assert plan_batches(128, 1, 64).accum_steps == 2 and plan_batches(128, 1, 64).per_worker == 128
    assert [plan_batches(128, 3, rank=r).per_worker for r in range(3)] == [42, 43, 43]  # sums to 128
    # the accumulation count follows the largest share and is the same on every rank
    assert {plan_batches(8, 3, 2, rank=r).accum_steps for r in range(3)} == {2}  # shares 2, 3, 3
    assert plan_batches(50, 1, 20).accum_steps == 3  # near-equal micro-batches, not a count dividing 50
    check_world_sizes(128, 1, 2)
    check_world_sizes(8, 3, 3, 2)
    check_world_sizes(32_768, 24, 32, 512)  # configs/vit_b32_laion400m.yaml's range
    with pytest.raises(UserError, match="global_batch_size 8 gives fewer than one sample to each of 9 workers; "
                                        "raise it or lower scaling.max_workers to at most 8"):
        check_world_sizes(8, 2, 9)
    with pytest.raises(UserError, match="micro_batch_size 1 splits the largest per-worker share of 3 at world "
                                        "size 3 into 3 micro-batches, more than the smallest share of 2"):
        check_world_sizes(8, 2, 3, 1)


def _grads(model, loss_fn, images, tokens, accum):
    model.zero_grad(set_to_none=True)
    temperature = [p for p in (model.logit_scale, model.logit_bias) if p is not None]
    loss = accumulate_gradients(model, loss_fn, images, tokens, accum, contextlib.nullcontext(), temperature)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("accum", "sizes"), [(3, [2, 2, 2]), (4, [2, 2, 1, 1])])
def test_accumulation_splits_a_share_into_exactly_accum_micro_batches(accum, sizes):
    """6 samples in 4 passes: ``chunk`` would make 3 (2+2+2), one pass short of the other ranks' collectives."""
    torch.manual_seed(0)
    model = create_model("tiny-vit")
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    images, tokens = torch.randn(6, 3, 32, 32), torch.randint(1, 1000, (6, 16))
    loss, _ = _grads(model, ClipLoss(global_batch=6), images, tokens, accum)
    assert seen == sizes + sizes  # every micro-batch embedded without autograd, then again with it
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_feature_cached_accumulation_equals_full_batch_gradient(kind):
    """The point of feature caching: 4 micro-batches give the full-batch loss and gradient."""
    torch.manual_seed(0)
    model = create_model("tiny-vit", init_logit_bias=-10.0 if kind == "siglip" else None)
    if kind == "siglip":
        siglip = SigLipLoss()
        loss_fn = lambda i, t, s: siglip(i, t, s, model.logit_bias)  # noqa: E731
    else:
        loss_fn = ClipLoss()
    images = torch.randn(16, 3, 32, 32)
    tokens = torch.randint(1, 1000, (16, 16))
    tokens[:, -1] = 1023
    full_loss, full = _grads(model, loss_fn, images, tokens, 1)
    acc_loss, acc = _grads(model, loss_fn, images, tokens, 4)
    assert acc_loss == pytest.approx(full_loss.item(), rel=1e-5)
    assert full.keys() == acc.keys()
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mfu_counts_forward_and_backward_against_the_peak():
    # 1 GFLOP forward per sample, 100 samples/s on 2 devices of 1 TFLOP/s: 3 x 1e9 x 100 / 2e12 = 15 %.
    assert mfu(1e9, 100.0, 1e12, 2) == pytest.approx(0.15)
    cpu = torch.device("cpu")
    assert peak_flops(cpu, configured=5e12) == 5e12  # configured wins over measuring
    measured = measure_cpu_peak_flops(size=128, trials=2, seconds=0.01)
    assert 1e6 < measured < 1e14  # a real measurement of this CPU, in a plausible range
    assert peak_memory_bytes(cpu) > 10 * 2 ** 20  # this process's peak RSS (torch alone is bigger)
