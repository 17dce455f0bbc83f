"""Architecture hyper-parameters: the paper's nine released models plus small CPU configs.

The paper's entries are OpenAI's released models (Radford et al., 2021, tables 19-20), with the
same numbers as OpenCLIP's ``model_configs/*.json``; their parameter counts are checked in the tests.
Each comes under OpenCLIP's two names: the plain name (``ViT-B-32``) is the GELU architecture of
OpenCLIP's LAION/DataComp weights, ``-quickgelu`` (``ViT-B-32-quickgelu``) the QuickGELU one OpenAI
trained. The weights cannot tell them apart (same keys and shapes), so the name is what says which.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionConfig:
    """A ViT when ``layers`` is an int, a ModifiedResNet when it is 4 stage depths."""

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    patch_size: int | None = 32  # ViT only
    head_width: int = 64  # heads = width / head_width (ViT), width * 32 / head_width (ResNet pool)
    mlp_ratio: float = 4.0
    patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training (ViT only)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if self.is_resnet:
            if len(self.layers) != 4:
                raise ValueError(f"a ResNet image tower needs 4 stage depths, got layers={self.layers}")
            if self.patch_dropout:
                raise ValueError("patch_dropout works on ViT patch tokens; it is not available for ResNet towers")
            if self.image_size % 32:
                raise ValueError(f"a ResNet image tower needs an image_size divisible by 32, got {self.image_size}")
        elif not self.patch_size or self.image_size % self.patch_size:
            raise ValueError(f"a ViT image tower needs an image_size ({self.image_size}) divisible by its "
                             f"patch_size ({self.patch_size})")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if (self.width * 32 if self.is_resnet else self.width) % self.head_width:
            raise ValueError(f"vision width {self.width} does not split into heads of width {self.head_width}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by {self.heads} heads")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # nn.GELU, as OpenCLIP's plain names; OpenAI trained with QuickGELU ("-quickgelu")
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (e.g. -10) to add SigLIP's learnable logit bias
    name: str = "custom"  # the zoo entry this config started from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        vision = _build(VisionConfig, d.pop("vision", {}), "vision")
        text = _build(TextConfig, d.pop("text", {}), "text")
        return _build(cls, {**d, "vision": vision, "text": text}, "model")


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {where} config key(s) {unknown}; valid keys: {sorted(known)}")
    return cls(**d)


def _resnet(name: str, embed_dim: int, layers: tuple[int, int, int, int], width: int, image_size: int,
            text_width: int) -> CLIPConfig:
    return CLIPConfig(embed_dim, VisionConfig(image_size, layers, width, patch_size=None),
                      TextConfig(width=text_width, heads=text_width // 64), name=name)


def _vit(name: str, embed_dim: int, layers: int, width: int, patch_size: int, image_size: int,
         text_width: int) -> CLIPConfig:
    return CLIPConfig(embed_dim, VisionConfig(image_size, layers, width, patch_size),
                      TextConfig(width=text_width, heads=text_width // 64), name=name)


def _gelu_and_quickgelu(cfg: CLIPConfig) -> list[CLIPConfig]:
    """OpenCLIP's pair of names for one architecture: ``name`` (GELU) and ``name-quickgelu``.
    ModifiedResNet has no GELU, but the ResNet models' text tower does, so they come in pairs too."""
    return [cfg, dataclasses.replace(cfg, quick_gelu=True, name=cfg.name + "-quickgelu")]


MODEL_CONFIGS: dict[str, CLIPConfig] = {c.name: c for c in [
    *_gelu_and_quickgelu(_resnet("RN50", 1024, (3, 4, 6, 3), 64, 224, 512)),
    *_gelu_and_quickgelu(_resnet("RN101", 512, (3, 4, 23, 3), 64, 224, 512)),
    *_gelu_and_quickgelu(_resnet("RN50x4", 640, (4, 6, 10, 6), 80, 288, 640)),
    *_gelu_and_quickgelu(_resnet("RN50x16", 768, (6, 8, 18, 8), 96, 384, 768)),
    *_gelu_and_quickgelu(_resnet("RN50x64", 1024, (3, 15, 36, 10), 128, 448, 1024)),
    *_gelu_and_quickgelu(_vit("ViT-B-32", 512, 12, 768, 32, 224, 512)),
    *_gelu_and_quickgelu(_vit("ViT-B-16", 512, 12, 768, 16, 224, 512)),
    *_gelu_and_quickgelu(_vit("ViT-L-14", 768, 24, 1024, 14, 224, 768)),
    *_gelu_and_quickgelu(_vit("ViT-L-14-336", 768, 24, 1024, 14, 336, 768)),
    # Unit-test sizes (a few hundred thousand parameters; vocab_size is usually overridden by the tokenizer's).
    CLIPConfig(32, VisionConfig(32, 2, 64, 8, head_width=32),
               TextConfig(context_length=16, vocab_size=1024, width=64, heads=2, layers=2), name="tiny-vit"),
    CLIPConfig(32, VisionConfig(64, (1, 1, 1, 1), 8, None, head_width=32),
               TextConfig(context_length=16, vocab_size=1024, width=64, heads=2, layers=2), name="tiny-rn"),
    # The CPU demo: 64 px images, 32-token captions, a vocabulary learned from the sample captions.
    CLIPConfig(128, VisionConfig(64, 4, 192, 8),
               TextConfig(context_length=32, vocab_size=1024, width=128, heads=2, layers=4), name="demo-vit"),
]}
