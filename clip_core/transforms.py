"""Image decoding and CLIP's preprocessing, on PIL + numpy + torch only (no torchvision).

Geometry matches torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` and
``RandomResizedCrop`` (OpenCLIP's train/eval transforms) so pretrained OpenAI/OpenCLIP weights see
the pixels they were trained on. Normalisation is separate and runs on tensors (on the GPU when the
batch is there), so the data path can ship uint8 -- 4x fewer bytes than float32. The training crop
also exists as a batched tensor op (``resized_crops``, PIL's bicubic as matrices), so it can run on
the GPU while CPU workers only decode.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    """Bytes that do not give a usable image. ``reason`` is a short code for reject counters:
    "empty", "corrupt", "truncated", "too_large" or "format_not_allowed"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit greyscale (PNG gives I;16)


def decode_image(data: bytes, max_pixels: int | None = None, draft_size: int | None = None,
                 formats: Sequence[str] | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB PIL image, refusing decompression bombs before decoding.

    ``max_pixels``: width x height limit checked on the header (default: PIL's MAX_IMAGE_PIXELS).
    ``draft_size``: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale (several times cheaper)
    while the shorter side stays >= draft_size; pass the short side you will resize to.
    ``formats``: PIL format ids allowed to parse the bytes (None: every format PIL knows). Each PIL
    plugin is attack surface; bytes another format would claim are "format_not_allowed".
    EXIF orientation is applied (cameras store portraits sideways) and 16-bit greyscale is scaled to
    8 bits (PIL's own conversion clips it, turning most of the picture white).
    """
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        img = Image.open(io.BytesIO(data), formats=None if formats is None else list(formats))
    except Image.DecompressionBombError as exc:  # PIL's own guard (2x its global limit) fired first
        raise ImageDecodeError("too_large", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - hostile bytes can make any PIL plugin raise anything
        other = _claimed_by_other_format(data, formats) if formats is not None else None
        if other is not None:
            raise ImageDecodeError("format_not_allowed", f"{other} is not one of {', '.join(formats)}") from exc
        raise ImageDecodeError("corrupt", f"not a readable image ({exc})") from exc
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels > limit {limit}")
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    try:
        img.load()
        if img.mode in SIXTEEN_BIT_MODES:
            img = _sixteen_bit_to_l(img)
        ImageOps.exif_transpose(img, in_place=True)
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - see above
        # PIL has no exception type for truncation; its messages say "truncated" (e.g. "image file
        # is truncated", "Truncated File Read").
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(reason, f"decoding failed ({exc})") from exc


def _claimed_by_other_format(data: bytes, allowed: Sequence[str]) -> str | None:
    """The first PIL format outside ``allowed`` whose signature check accepts the bytes' first 16 bytes:
    the plugins' ``accept`` functions only compare magic numbers, so no foreign parser runs."""
    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in allowed and accept is not None and accept(prefix):
            return fmt
    return None


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit "L", 0..65535 mapped onto 0..255 with rounding (x / 257)."""
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    scaled = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # uint8 (H, W): mode "L"
    scaled.info = img.info  # keeps the EXIF orientation for exif_transpose
    return scaled


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


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.9, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop clamped to ``ratio``),
    drawing from a numpy Generator so data workers are reproducible from a seed.
    Returns the crop box as (left, top, width, height)."""
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
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """OpenCLIP's training crop: a random box (``random_resized_crop_box``), bicubic-resized to a square."""
    left, top, w, h = random_resized_crop_box(*img.size, rng, scale, ratio)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


def _pil_bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5; torch's own bicubic uses -0.75)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(N, out_size, in_size) matrices M with ``M[n] @ line`` = PIL's bicubic resize of
    ``line[starts[n]:starts[n] + lengths[n]]`` to ``out_size`` samples: PIL's tap positions, kernel,
    antialiasing (the kernel widens by the shrink factor) and edge rule (taps outside the crop are
    dropped and the rest renormalised), so nothing outside the crop is ever read."""
    starts, lengths = starts.float()[:, None, None], lengths.float()[:, None, None]
    scale = lengths / out_size
    centers = starts + (torch.arange(out_size, device=starts.device)[:, None] + 0.5) * scale
    taps = torch.arange(in_size, device=starts.device) + 0.5
    weights = _pil_bicubic((taps - centers) / scale.clamp(min=1.0))
    weights = weights * ((taps >= starts) & (taps < starts + lengths))
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of crop-and-resize on ``images``' device: uint8 (N, 3, H, W) and boxes (N, 4) as
    (left, top, width, height) -> uint8 (N, 3, size, size), so the random crop can run on the
    training GPU instead of CPU workers: two batched float32 matmuls, 0.14 GFLOP a sample at 224 px
    (float16 or bfloat16 would round the sums by a level or more). Like PIL, the horizontal pass
    comes first and is rounded and clipped to uint8 before the vertical one, so the result equals
    ``random_resized_crop``'s to within a level (float vs PIL's fixed-point coefficients)."""
    rows = resize_weights(boxes[:, 1], boxes[:, 3], images.shape[-2], size)  # (N, size, H)
    cols = resize_weights(boxes[:, 0], boxes[:, 2], images.shape[-1], size)  # (N, size, W)
    wide = (images.float() @ cols[:, None].transpose(-1, -2)).add_(0.5).floor_().clamp_(0, 255)  # (N, 3, H, size)
    return (rows[:, None] @ wide).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


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
