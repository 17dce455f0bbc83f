"""Layer groups of CLIP's towers: what LiT locking (Zhai et al., 2022) leaves trainable, and the depth
layer-wise learning-rate decay counts.

A tower's groups run from its input to its output, as OpenCLIP's ``lock_image_tower`` /
``lock_text_tower`` define them (``open_clip/transformer.py``), so ``unlocked_groups=N`` trains the
same parameters here as ``--lock-image-unlocked-groups N`` / ``--lock-text-unlocked-layers N`` there:

* ViT image tower: [patch embedding, class and position embeddings, ln_pre], each block but the last,
  [last block, ln_post], [proj] -- ``layers + 2`` groups;
* text tower: [token and position embeddings], each block but the last, [last block, ln_final],
  [text_projection] -- ``layers + 2`` groups;
* ModifiedResNet image tower (OpenCLIP locks it only whole): [the stem's three convolutions], each of
  the four stages, [attention pool] -- 6 groups.

``logit_scale`` and ``logit_bias`` belong to neither tower: locking leaves them trainable.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

from torch import nn

from clip_core.modified_resnet import ModifiedResNet
from clip_core.transformer import VisionTransformer

Unit = nn.Module | nn.Parameter
Group = list[Unit]


def image_groups(visual: nn.Module) -> list[Group]:
    """The image tower's layer groups, input first."""
    if isinstance(visual, VisionTransformer):
        blocks = visual.transformer.resblocks
        return [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
                *([block] for block in blocks[:-1]), [blocks[-1], visual.ln_post], [visual.proj]]
    if isinstance(visual, ModifiedResNet):
        stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
        return [stem, [visual.layer1], [visual.layer2], [visual.layer3], [visual.layer4], [visual.attnpool]]
    raise TypeError(f"no layer groups are defined for a {type(visual).__name__} image tower")


def text_groups(token_embedding: nn.Embedding, positional_embedding: nn.Parameter, resblocks: Sequence[nn.Module],
                ln_final: nn.LayerNorm, text_projection: nn.Parameter) -> list[Group]:
    """The text tower's layer groups, input first (its modules sit at CLIP's top level)."""
    return [[token_embedding, positional_embedding], *([block] for block in resblocks[:-1]),
            [resblocks[-1], ln_final], [text_projection]]


def parameters(group: Group) -> list[nn.Parameter]:
    return list(chain.from_iterable([u] if isinstance(u, nn.Parameter) else u.parameters() for u in group))


def lock(groups: list[Group], unlocked_groups: int, tower: str) -> list[Group]:
    """Stop gradients to every group but the last ``unlocked_groups``; returns the locked groups."""
    if not 0 <= unlocked_groups <= len(groups):
        raise ValueError(f"the {tower} tower has {len(groups)} layer groups; unlocked_groups={unlocked_groups} "
                         f"must be in 0..{len(groups)}")
    cut = len(groups) - unlocked_groups
    for i, group in enumerate(groups):
        for param in parameters(group):
            param.requires_grad_(i >= cut)
    return groups[:cut]


def batch_norms(groups: list[Group]) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers in ``groups``, whose running statistics a locked tower keeps fixed."""
    modules = chain.from_iterable(u.modules() for group in groups for u in group if isinstance(u, nn.Module))
    return [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
