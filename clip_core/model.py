"""CLIP (Radford et al., 2021): an image tower and a text tower trained to agree in one embedding space.

State-dict keys and shapes are those of OpenAI's released checkpoints (and OpenCLIP's ``CLIP`` class),
so their weights load with ``strict=True``; the text tower's modules sit at the top level for that reason.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_core.lock import Group, batch_norms, image_groups, lock, text_groups
from clip_core.model_configs import MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig
from clip_core.modified_resnet import ModifiedResNet
from clip_core.transformer import Transformer, VisionTransformer, patches_kept

# Metadata entries in OpenAI's JIT checkpoints that are not parameters.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
MAX_LOGIT_SCALE = math.log(100.0)  # the paper clips the temperature at 100 to keep training stable


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.fixed_norms: list[nn.Module] = []  # BatchNorm layers kept in eval mode (lock_image_tower)
        v, t = config.vision, config.text
        if v.is_resnet:
            self.visual: nn.Module = ModifiedResNet(v.layers, config.embed_dim, v.heads, v.image_size, v.width)
        else:
            self.visual = VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio,
                                            config.embed_dim, v.patch_dropout, config.quick_gelu)

        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.quick_gelu)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))

        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(torch.tensor(config.init_logit_bias))

        # OpenAI's text-tower init (the image towers initialise themselves).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_openai_()
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, embed_dim), not L2-normalised."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, embed_dim), not L2-normalised; the feature is read at the EOT token."""
        if tokens.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"tokens have length {tokens.shape[1]} but the model's context_length is "
                             f"{self.positional_embedding.shape[0]}: tokenize with that context_length")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x, causal=True)
        # EOT has the highest id in the vocabulary; LayerNorm is per token, so pool first, then normalise.
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.ln_final(x) @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Call after each optimizer step: the temperature may not exceed 100."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in backward. ResNet towers are left alone: recomputing a
        BatchNorm forward would update its running statistics twice."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def image_layer_groups(self) -> list[Group]:
        """The image tower's layer groups, input first (``clip_core.lock``)."""
        return image_groups(self.visual)

    def text_layer_groups(self) -> list[Group]:
        """The text tower's layer groups, input first (``clip_core.lock``)."""
        return text_groups(self.token_embedding, self.positional_embedding, self.transformer.resblocks,
                           self.ln_final, self.text_projection)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """LiT (Zhai et al., 2022): train only the image tower's last ``unlocked_groups`` layer groups.

        ``freeze_bn_stats`` keeps the locked groups' BatchNorm layers in eval mode, so a locked ResNet
        tower computes the function it was loaded with; OpenCLIP's default (False) lets their running
        statistics drift in train mode."""
        locked = lock(self.image_layer_groups(), unlocked_groups, "image")
        self.fixed_norms = batch_norms(locked) if freeze_bn_stats else []
        self.train(self.training)

    def lock_text_tower(self, unlocked_groups: int = 0) -> None:
        """LiT's locked text tower: train only its last ``unlocked_groups`` layer groups."""
        lock(self.text_layer_groups(), unlocked_groups, "text")

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for norm in self.fixed_norms:  # a locked tower's BatchNorm statistics stay fixed
            norm.eval()
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Accepts OpenCLIP state dicts and raw OpenAI ones (whose metadata entries are dropped)."""
        state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_METADATA_KEYS}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


# create_model's overrides, and the part of the config each one sets.
_OVERRIDES = {
    "image_size": "vision", "patch_dropout": "vision",
    "context_length": "text", "vocab_size": "text",
    "embed_dim": "model", "quick_gelu": "model", "init_logit_scale": "model", "init_logit_bias": "model",
}


def get_model_config(name: str) -> CLIPConfig:
    """A copy of the zoo entry ``name``; an unknown name is an error that suggests the closest one."""
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(MODEL_CONFIGS)}")
    return copy.deepcopy(MODEL_CONFIGS[name])


def create_model(name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 *, grad_checkpointing: bool = False, **overrides: Any) -> CLIP:
    """Build a zoo model with fresh weights, e.g. ``create_model("ViT-B-32", vocab_size=tok.vocab_size)``."""
    cfg = get_model_config(name)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown model override(s) {unknown}; valid: {sorted(_OVERRIDES) + ['grad_checkpointing']}")
    parts = {part: {k: v for k, v in overrides.items() if _OVERRIDES[k] == part} for part in ("vision", "text", "model")}
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **parts["vision"]),
                              text=dataclasses.replace(cfg.text, **parts["text"]), **parts["model"])
    model = create_model_from_config(cfg, device, dtype)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def create_model_from_config(cfg: CLIPConfig, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None) -> CLIP:
    """``device="meta"`` builds the structure without allocating (or initialising) any weights."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = CLIP(cfg)
    return model.to(dtype) if dtype is not None else model


def config_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Recover the architecture from the shapes in an OpenAI (or OpenCLIP) checkpoint, as OpenAI's loader does.

    Shapes cannot show the activation (OpenAI's is QuickGELU, the default) nor the head count, which is
    taken as width / 64 as in every released model. The name is the zoo entry it equals, else "custom".
    """
    sd = state_dict
    if "visual.proj" in sd:
        width, _, patch_size, _ = sd["visual.conv1.weight"].shape
        layers = len({k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")})
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(patch_size * grid, layers, width, patch_size)
    else:
        depths = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5))
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(grid * 32, depths, sd["visual.layer1.0.conv1.weight"].shape[0], None)
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width, heads=text_width // 64,
        layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))
    bias = sd.get("logit_bias")
    cfg = CLIPConfig(sd["text_projection"].shape[1], vision, text, quick_gelu=quick_gelu,
                     init_logit_bias=None if bias is None else float(bias), name="custom")
    zoo = (name for name, entry in MODEL_CONFIGS.items() if dataclasses.replace(entry, name=cfg.name) == cfg)
    return dataclasses.replace(cfg, name=next(zoo, "custom"))


def model_from_state_dict(cfg: CLIPConfig, state_dict: Mapping[str, torch.Tensor],
                          device: str | torch.device | None = None) -> CLIP:
    """A float32 ``cfg`` model made of ``state_dict``'s tensors (strict), for weights just read from a
    file: it is built on the meta device and takes the tensors over (float32 ones are shared, not
    copied), so no weights are initialised only to be overwritten."""
    model = create_model_from_config(cfg, device="meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32)


def load_openai_state_dict(state_dict: Mapping[str, torch.Tensor], device: str | torch.device | None = None) -> CLIP:
    """A model holding a copy of an OpenAI checkpoint's state dict (e.g. ``torch.jit.load(path).state_dict()``),
    as the ``-quickgelu`` architecture: OpenAI's activation."""
    model = create_model_from_config(config_from_openai_state_dict(state_dict, quick_gelu=True), device)
    model.load_state_dict(state_dict, strict=True)
    return model


def model_flops_per_sample(cfg: CLIPConfig, training: bool = True) -> float:
    """Forward FLOPs for one image and one caption, for MFU (a training step is ~3x this).

    Counts every matmul and convolution as 2*m*n*k: patch embedding / ResNet convolutions, attention
    projections, attention scores and weighted sums (causal attention counted in full, as the dense
    kernels compute it), MLPs and output projections. Leaves out normalisation, activations, softmax,
    pooling, embedding lookups and the batch-dependent logits. ``training`` counts only the tokens
    patch dropout keeps.
    """
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        image = _resnet_flops(v, cfg.embed_dim)
    else:
        patches = (v.image_size // v.patch_size) ** 2
        tokens = 1 + (patches_kept(patches, v.patch_dropout) if training and v.patch_dropout else patches)
        image = (2 * patches * 3 * v.patch_size ** 2 * v.width
                 + _transformer_flops(tokens, v.width, v.layers, v.mlp_ratio)
                 + 2 * v.width * cfg.embed_dim)
    text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * cfg.embed_dim
    return float(image + text)


def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)  # qkv, out, mlp in + out
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v, summed over heads
    return layers * (projections + attention)


def _resnet_flops(v: VisionConfig, embed_dim: int) -> int:
    def conv(c_in: int, c_out: int, k: int, res: int) -> int:
        return 2 * c_in * c_out * k * k * res * res

    w, res = v.width, v.image_size // 2  # the stem's first convolution has stride 2
    flops = conv(3, w // 2, 3, res) + conv(w // 2, w // 2, 3, res) + conv(w // 2, w, 3, res)
    res //= 2
    inplanes = w
    for stage, blocks in enumerate(v.layers):
        planes = w * 2 ** stage
        for block in range(blocks):
            out_res = res // 2 if stage > 0 and block == 0 else res
            flops += conv(inplanes, planes, 1, res) + conv(planes, planes, 3, res) + conv(planes, 4 * planes, 1, out_res)
            if block == 0:  # the downsample branch
                flops += conv(inplanes, 4 * planes, 1, out_res)
            inplanes, res = 4 * planes, out_res
    width, tokens = 32 * w, res * res + 1
    # attention pool: k, v over all tokens; one query (the mean token); output projection
    return flops + 2 * 2 * tokens * width * width + 2 * width * width + 2 * 2 * tokens * width + 2 * width * embed_dim
