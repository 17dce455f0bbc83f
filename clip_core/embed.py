"""Embeddings of raw inputs: encoded images and texts -> L2-normalised features, as eval and serving need.

The eval job, training's in-process zero-shot and the served model all embed through these, so what
`mlflow models serve` answers is what the eval numbers measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_core.model import CLIP
from clip_core.tokenizer import Tokenizer
from clip_core.transforms import decode_image, normalize, resize_center_crop, to_uint8_chw


def images_to_tensor(images: Sequence[bytes], image_size: int) -> torch.Tensor:
    """Encoded images -> uint8 (N, 3, S, S), resized and centre-cropped as at preprocessing time."""
    return torch.from_numpy(np.stack([
        to_uint8_chw(resize_center_crop(decode_image(data, draft_size=image_size), image_size)) for data in images
    ]))


@torch.no_grad()
def embed_images(model: CLIP, pixels: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, 3, S, S) -> L2-normalised float32 (N, D) on the CPU."""
    features = model.encode_image(normalize(pixels.to(device)))
    return F.normalize(features.float(), dim=-1).cpu()


@torch.no_grad()
def embed_texts(model: CLIP, tokenizer: Tokenizer, texts: Sequence[str], device: str | torch.device = "cpu",
                batch_size: int = 256) -> torch.Tensor:
    """Texts -> L2-normalised float32 (N, D) on the CPU, tokenized to the model's context length."""
    context = model.positional_embedding.shape[0]
    out = [F.normalize(model.encode_text(tokenizer(list(texts[i:i + batch_size]), context).to(device)).float(),
                       dim=-1).cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


def model_image_size(model: CLIP) -> int:
    return int(model.config.vision.image_size)
