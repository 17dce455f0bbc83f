"""Image decoding and CLIP's preprocessing, on PIL + numpy + torch only (no torchvision).

Geometry matches torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` and
``RandomResizedCrop`` (OpenCLIP's train/eval transforms) so pretrained OpenAI/OpenCLIP weights see
the pixels they were trained on. Normalisation is separate and runs on tensors (on the GPU when the
batch is there), so the data path can ship uint8 -- 4x fewer bytes than float32.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    """Bytes that do not give a usable image. ``reason`` is a short code for reject counters:
    "empty", "corrupt", "truncated" or "too_large"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def decode_image(data: bytes, max_pixels: int | None = None, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image, refusing decompression bombs before decoding.

    ``max_pixels``: width x height limit checked on the header (default: PIL's MAX_IMAGE_PIXELS).
    ``draft_size``: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale (several times cheaper)
    while the shorter side stays >= draft_size; pass the short side you will resize to.
    """
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard (2x its global limit) fired first
        raise ImageDecodeError("too_large", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - hostile bytes can make any PIL plugin raise anything
        raise ImageDecodeError("corrupt", f"not a readable image ({exc})") from exc
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels > limit {limit}")
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - see above
        # PIL has no exception type for truncation; its messages say "truncated" (e.g. "image file
        # is truncated", "Truncated File Read").
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(reason, f"decoding failed ({exc})") from exc


def _resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(int): short side -> size, long side -> int(size * long / short)."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's eval transform: bicubic resize of the short side to ``size``, then a centred square."""
    img = _resize_short_side(img, size)
    width, height = img.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def resize_keep_aspect(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longer side is at most ``max_side``; keeps the whole picture,
    e.g. for training shards that random-crop later."""
    width, height = img.size
    if max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(new_size, Image.Resampling.BICUBIC)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop clamped to ``ratio``),
    drawing from a numpy Generator so data workers are reproducible from a seed."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """PIL image -> contiguous uint8 array (3, H, W), the layout models and ``normalize`` expect."""
    array = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std`` with OpenAI's statistics, on x's device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {x.dtype}")
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std
