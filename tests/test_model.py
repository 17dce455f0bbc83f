"""Unit tests for clip_core.model: zoo sizes, forward contract, training options, FLOP count."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import clip_core.transformer
from clip_core.model import (CLIPConfig, config_from_openai_state_dict, create_model, create_model_from_config,
                             list_models, load_openai_state_dict, model_flops_per_sample)

# Parameter counts of OpenAI's released checkpoints (logit_scale included, BatchNorm buffers not).
RELEASED_PARAMS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}
SMALL = ["tiny-vit", "tiny-rn"]
PAPER_NAMES = [n for name in RELEASED_PARAMS for n in (name, f"{name}-quickgelu")]  # GELU, QuickGELU


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(model, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and captions whose EOT (the highest id) sits at a random position."""
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision, model.config.text
    images = torch.randn(n, 3, v.image_size, v.image_size, generator=g)
    tokens = torch.randint(1, t.vocab_size - 1, (n, t.context_length), generator=g)
    for row, eot in enumerate(torch.randint(2, t.context_length, (n,), generator=g).tolist()):
        tokens[row, eot] = t.vocab_size - 1
        tokens[row, eot + 1:] = 0
    return images, tokens


def test_zoo_lists_the_paper_models_and_small_configs():
    assert set(PAPER_NAMES) | {"tiny-vit", "tiny-rn", "demo-vit"} <= set(list_models())


@pytest.mark.parametrize("name", PAPER_NAMES)
def test_parameter_count_matches_released_model(name):
    model = create_model(name, device="meta")
    assert n_params(model) == RELEASED_PARAMS[name.removesuffix("-quickgelu")]
    assert model.config.name == name and model.config.quick_gelu == name.endswith("-quickgelu")
    assert model.config.text.context_length == 77 and model.config.text.vocab_size == 49408
    assert model.config.text.layers == 12


def test_small_configs_are_small():
    for name in SMALL:
        assert 100_000 < n_params(create_model(name, device="meta")) < 1_000_000, name
    demo = create_model("demo-vit", device="meta").config
    assert (demo.vision.image_size, demo.vision.patch_size, demo.text.context_length) == (64, 8, 32)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_meta_build_allocates_no_weights():
    before = _rss_bytes()
    model = create_model("ViT-L-14", device="meta")  # 1.7 GB of float32 weights if materialised
    grown = _rss_bytes() - before
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert grown < 200 * 2 ** 20


@pytest.mark.parametrize("name", SMALL)
def test_forward_contract(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images, tokens = inputs(model)
    image_features, text_features, scale = model(images, tokens)
    dim = model.config.embed_dim
    assert image_features.shape == text_features.shape == (2, dim)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    # encode_* are the unnormalised features that forward normalises
    raw_image, raw_text = model.encode_image(images), model.encode_text(tokens)
    assert not torch.allclose(raw_image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(F.normalize(raw_image, dim=-1), image_features)
    torch.testing.assert_close(F.normalize(raw_text, dim=-1), text_features)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.logit_bias is None


def test_text_feature_is_read_at_eot_under_a_causal_mask():
    torch.manual_seed(0)
    model = create_model("tiny-vit").eval()
    _, tokens = inputs(model, n=1)
    eot = int(tokens.argmax())
    reference = model.encode_text(tokens)
    after = tokens.clone()
    after[0, eot + 1:] = 7  # tokens after EOT cannot be seen from the EOT position
    torch.testing.assert_close(model.encode_text(after), reference)
    before = tokens.clone()
    before[0, eot - 1] = (before[0, eot - 1] + 1) % (model.config.text.vocab_size - 1)
    assert not torch.allclose(model.encode_text(before), reference)


def test_logit_scale_clamped_at_100():
    model = create_model("tiny-vit")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


def test_patch_dropout_drops_tokens_only_in_training():
    model = create_model("tiny-vit", patch_dropout=0.5)
    seen: list[int] = []
    model.visual.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    images, _ = inputs(model)
    model.train().encode_image(images)
    model.eval().encode_image(images)
    grid = model.config.vision.image_size // model.config.vision.patch_size
    assert seen == [1 + grid * grid // 2, 1 + grid * grid]


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []
    real_checkpoint = clip_core.transformer.checkpoint
    monkeypatch.setattr(clip_core.transformer, "checkpoint",
                        lambda *a, **kw: calls.append(1) or real_checkpoint(*a, **kw))
    torch.manual_seed(0)
    plain = create_model("tiny-vit")
    checkpointed = create_model("tiny-vit", grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images, tokens = inputs(plain)
    grads = []
    for model in (plain, checkpointed):
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).logsumexp(dim=-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == 4  # 2 vision + 2 text blocks
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("tower", ["image", "text"])
def test_lock_tower(name, tower):
    model = create_model(name)
    getattr(model, f"lock_{tower}_tower")()
    model.train()
    bn_before = {n: b.clone() for n, b in model.visual.named_buffers()}
    images, tokens = inputs(model)
    image_features, text_features, scale = model(images, tokens)
    (image_features * text_features).sum().mul(scale).backward()
    visual = {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    for n, p in model.named_parameters():
        frozen = (n in visual) == (tower == "image") and n not in ("logit_scale", "logit_bias")
        assert (p.grad is None) == frozen, n
        assert p.requires_grad != frozen, n
    if name == "tiny-rn":
        bn_after = dict(model.visual.named_buffers())
        stats_fixed = all(torch.equal(bn_before[n], bn_after[n]) for n in bn_before)
        assert stats_fixed == (tower == "image")


@pytest.mark.parametrize("name, calls", [("tiny-vit", 4), ("tiny-rn", 3)])
def test_attention_runs_on_sdpa(name, calls, monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    model = create_model(name)
    model(*inputs(model))
    assert len(seen) == calls  # one per transformer block, plus the ResNet attention pool
    assert sum(kw.get("is_causal", False) for kw in seen) == model.config.text.layers


@pytest.mark.parametrize("name, overrides, training", [
    ("tiny-vit", {}, False),
    ("tiny-rn", {}, False),
    ("tiny-vit", {"patch_dropout": 0.25}, True),
    ("demo-vit", {}, False),
])
def test_flops_match_flop_counter(name, overrides, training):
    model = create_model(name, **overrides).train(training)
    images, tokens = inputs(model, n=1)
    # The math backend decomposes attention into bmm's, which FlopCounterMode counts.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, tokens)
    # Exact: the analytic count covers precisely the matmuls and convolutions the forward runs.
    assert counter.get_total_flops() == model_flops_per_sample(model.config, training=training)


def test_create_model_overrides():
    model = create_model("tiny-vit", vocab_size=300, context_length=8, image_size=48, init_logit_bias=-10.0)
    assert model.token_embedding.weight.shape[0] == 300
    assert model.positional_embedding.shape[0] == 8
    assert model.visual.positional_embedding.shape[0] == (48 // 8) ** 2 + 1
    assert model.logit_bias.item() == -10.0
    assert model.config.text.vocab_size == 300 and model.config.vision.image_size == 48
    model(*inputs(model))


def test_create_model_rejects_bad_input():
    with pytest.raises(ValueError, match="Did you mean 'ViT-B-32'.*RN50"):
        create_model("ViT-B/32")
    with pytest.raises(ValueError, match="unknown model override"):
        create_model("tiny-vit", widht=3)
    with pytest.raises(ValueError, match="not available for ResNet"):
        create_model("tiny-rn", patch_dropout=0.5)
    with pytest.raises(ValueError, match="divisible"):
        create_model("tiny-vit", image_size=30)
    with pytest.raises(ValueError, match="context_length is 16"):
        create_model("tiny-vit").encode_text(torch.zeros(1, 17, dtype=torch.long))


def test_config_round_trip_through_json():
    model = create_model("tiny-rn", vocab_size=500)
    d = json.loads(json.dumps(model.config.to_dict()))
    cfg = CLIPConfig.from_dict(d)
    assert cfg == model.config
    rebuilt = create_model_from_config(cfg)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    with pytest.raises(ValueError, match="unknown vision config key"):
        CLIPConfig.from_dict({**d, "vision": {**d["vision"], "depth": 3}})


@pytest.mark.parametrize("name", list(RELEASED_PARAMS))
def test_config_inferred_from_state_dict_shapes(name):
    """OpenAI's weights are the -quickgelu architecture; GELU only when asked, since shapes cannot show it."""
    state_dict = create_model(name, device="meta").state_dict()
    assert config_from_openai_state_dict(state_dict) == create_model(f"{name}-quickgelu", device="meta").config
    assert config_from_openai_state_dict(state_dict, quick_gelu=False) == create_model(name, device="meta").config


def test_raw_openai_state_dict_loads():
    model = create_model("tiny-rn", quick_gelu=True)
    # OpenAI's JIT checkpoints carry three metadata entries and half-precision weights.
    raw = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    raw |= {"input_resolution": torch.tensor(64), "context_length": torch.tensor(16), "vocab_size": torch.tensor(1024)}
    loaded = load_openai_state_dict(raw)
    assert loaded.config.vision.layers == (1, 1, 1, 1) and loaded.config.text.context_length == 16
    assert loaded.config.quick_gelu and loaded.config.name == "custom"  # no zoo entry has these sizes
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, raw[key].to(value.dtype), msg=key)
    create_model("tiny-rn").load_state_dict(raw, strict=True)
