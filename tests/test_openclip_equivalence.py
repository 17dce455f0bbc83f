"""clip_core's CLIP against OpenCLIP's reference implementation: same weights -> same embeddings.

OpenCLIP is installed without its dependencies (its torchvision wheel would replace the CPU torch), so
``import open_clip`` fails: the package ``__init__`` pulls in torchvision and timm. Its model code itself is
torch-only, apart from ``utils.py`` importing ``torchvision.ops.misc.FrozenBatchNorm2d`` (used only when
freezing BatchNorm, which these tests never do). The ``openclip`` fixture therefore puts a stand-in
``torchvision.ops.misc`` module into ``sys.modules`` and registers a bare ``open_clip`` package whose
``__path__`` is the installed folder, so ``open_clip.model`` imports without running ``__init__``;
both are removed again afterwards.

Names: each paper model comes as OpenCLIP's pair, ``ViT-B-32`` (GELU) and ``ViT-B-32-quickgelu``
(QuickGELU, OpenAI's), built here from OpenCLIP's own JSON of the same name. Both load each other's
weights with ``strict=True`` -- which is why the names must mean the same as in OpenCLIP.

Tolerance: embeddings must agree to 1e-5 in float32, measured as max |ours - OpenCLIP| divided by
max |OpenCLIP| (the features are unnormalised, so the bound is relative to their scale); for the
L2-normalised features, whose scale is 1, that is an absolute bound.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from clip_core.model import create_model, list_models

PAPER_MODELS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]
OPENCLIP_NAMES = [n for name in PAPER_MODELS for n in (name, f"{name}-quickgelu")]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def openclip() -> Iterator[types.ModuleType]:
    with openclip_model_module() as module:
        yield module


@contextlib.contextmanager
def openclip_model_module() -> Iterator[types.ModuleType]:
    """OpenCLIP's ``open_clip.model`` module, imported without the package ``__init__`` (the fixture's
    body, shared with test_pretrained)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.fail("open_clip_torch is not installed: `pip install --no-deps open-clip-torch==3.3.0` (make install)")
    root = Path(spec.origin).parent
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}

    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc
    torchvision = types.ModuleType("torchvision")
    torchvision.ops = ops
    sys.modules.update({"torchvision": torchvision, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    package = types.ModuleType("open_clip")
    package.__path__ = [str(root)]
    sys.modules["open_clip"] = package
    module = importlib.import_module("open_clip.model")
    module.CONFIG_DIR = root / "model_configs"
    try:
        yield module
    finally:
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def openclip_config(openclip: types.ModuleType, name: str) -> dict:
    return json.loads((openclip.CONFIG_DIR / f"{name}.json").read_text())


def openclip_model(openclip: types.ModuleType, name: str, device: str = "cpu",
                   quick_gelu: bool | None = None) -> torch.nn.Module:
    """OpenCLIP's CLIP: the paper models from OpenCLIP's own JSON config of that name, the small ones
    from ours; ``quick_gelu`` overrides the activation (OpenCLIP's ``force_quick_gelu``, in both ways)."""
    if name in OPENCLIP_NAMES:
        kwargs = openclip_config(openclip, name)
    else:
        cfg = create_model(name, device="meta").config
        v, t = cfg.vision, cfg.text
        kwargs = {
            "embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
            "vision_cfg": {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                           "width": v.width, "patch_size": v.patch_size, "head_width": v.head_width,
                           "mlp_ratio": v.mlp_ratio},
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
        }
    if quick_gelu is not None:
        kwargs["quick_gelu"] = quick_gelu
    with torch.device(device):
        return openclip.CLIP(**kwargs)


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def activations(model: torch.nn.Module) -> dict[str, str]:
    """The class of every transformer MLP's activation: what the weights cannot show."""
    return {name: type(m).__name__ for name, m in model.named_modules() if name.endswith("mlp.gelu")}


def test_zoo_has_every_openclip_name():
    config_dir = Path(importlib.util.find_spec("open_clip").origin).parent / "model_configs"
    assert set(OPENCLIP_NAMES) <= {p.stem for p in config_dir.iterdir()}  # OpenCLIP 3.3.0 ships each of them
    assert set(OPENCLIP_NAMES) <= set(list_models())


@pytest.mark.parametrize("name", OPENCLIP_NAMES)
def test_state_dict_layout_and_activation_match_openclip(openclip, name):
    ours = create_model(name, device="meta")
    theirs = openclip_model(openclip, name, device="meta")
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    quick_gelu = openclip_config(openclip, name).get("quick_gelu", False)
    assert ours.config.quick_gelu == quick_gelu == name.endswith("-quickgelu")
    assert activations(ours) == activations(theirs)
    assert set(activations(ours).values()) == {"QuickGELU" if ours.config.quick_gelu else "GELU"}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_same_embeddings(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (2, cfg.text.context_length), generator=g)
    tokens[0, 5], tokens[0, 6:] = cfg.text.vocab_size - 1, 0  # EOT mid-sequence, padding after
    tokens[1, -1] = cfg.text.vocab_size - 1  # EOT at the last position (a truncated caption)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for encode, x in (("encode_image", images), ("encode_text", tokens)):
            mine, reference = getattr(ours, encode)(x), getattr(theirs, encode)(x)
            assert relative_error(mine, reference) < TOLERANCE, encode
            assert (F.normalize(mine, dim=-1) - F.normalize(reference, dim=-1)).abs().max() < TOLERANCE, encode


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "RN50-quickgelu", "tiny-vit", "tiny-rn"])
def test_embeddings_match_openclip_both_ways(openclip, name):
    torch.manual_seed(0)
    theirs = openclip_model(openclip, name)
    ours = create_model(name)
    our_init = {k: v.clone() for k, v in ours.state_dict().items()}

    ours.load_state_dict(theirs.state_dict(), strict=True)  # OpenCLIP -> ours
    assert_same_embeddings(ours, theirs)

    theirs.load_state_dict(our_init, strict=True)  # ours -> OpenCLIP, with our own init's weights
    ours.load_state_dict(our_init, strict=True)
    assert_same_embeddings(ours, theirs)


def test_small_configs_match_openclip_layout(openclip):
    """The small configs use only hyper-parameters OpenCLIP also has, so their weights port both ways."""
    for name in sorted(set(list_models()) - set(PAPER_MODELS)):
        assert shapes(create_model(name, device="meta")) == shapes(openclip_model(openclip, name, "meta")), name


def test_weights_load_strictly_into_the_other_activation_but_compute_other_embeddings(openclip):
    """The bug the names guard against: GELU weights fit a QuickGELU model key for key."""
    torch.manual_seed(0)
    theirs = openclip_model(openclip, "tiny-vit").eval()  # GELU
    wrong = create_model("tiny-vit", quick_gelu=True).eval()
    wrong.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(wrong.encode_image(images), theirs.encode_image(images)) > 1e-3
