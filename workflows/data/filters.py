"""Per-sample validation and image work: caption checks, decode, resize, re-encode, content hash.

Each check returns a reject reason (a short code counted in the manifest) instead of raising, so
the pipeline can count every sample. Captions are checked first (cheap), then the image; a sample
failing several checks counts once, under the first.

Image reasons: ``image_empty``, ``image_corrupt``, ``image_truncated``, ``image_too_large``
(decompression-bomb guard, checked on the header before decoding), ``image_format_not_allowed``
(a format PIL knows but ``image_formats`` does not list: only those parsers run), ``image_too_small``
(short side < ``min_side``), ``bad_aspect_ratio``. Caption reasons: ``invalid_utf8``,
``empty_caption``, ``caption_too_short``, ``caption_too_long``.
"""

from __future__ import annotations

import hashlib
import io
import unicodedata

from clip_core.transforms import ImageDecodeError, decode_image, resize_center_crop, resize_keep_aspect
from workflows.common.config import PreprocessConfig


def clean_caption(raw: bytes, cfg: PreprocessConfig) -> tuple[str, str]:
    """(cleaned caption, "") or ("", reason). Cleaning drops control characters and collapses whitespace."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "invalid_utf8"
    text = "".join(c for c in text if unicodedata.category(c)[0] != "C" or c in "\t\n\r")
    text = " ".join(text.split())
    if not text:
        return "", "empty_caption"
    if len(text) < cfg.caption_min_chars:
        return "", "caption_too_short"
    if len(text) > cfg.caption_max_chars:
        return "", "caption_too_long"
    return text, ""


def process_image(data: bytes, cfg: PreprocessConfig) -> tuple[bytes, str]:
    """Raw image bytes -> (re-encoded JPEG at the training resolution, "") or (b"", reason).

    JPEGs are decoded in draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8) while both sides stay
    >= max(image_size, min_side): decode cost drops several-fold on large photos, the bicubic resize
    that follows still starts from at least the target resolution, and the min-side check stays
    exact (a drafted image is only smaller than the original when both sides exceed the bound). The
    aspect-ratio check sees the drafted size, which differs from the original by under one pixel per
    scale step.
    """
    try:
        img = decode_image(data, max_pixels=cfg.max_image_pixels, draft_size=max(cfg.image_size, cfg.min_side),
                           formats=cfg.image_formats)
    except ImageDecodeError as e:
        return b"", f"image_{e.reason}"
    width, height = img.size
    if min(width, height) < cfg.min_side:
        return b"", "image_too_small"
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return b"", "bad_aspect_ratio"
    if cfg.resize_mode == "center_crop":
        img = resize_center_crop(img, cfg.image_size)
    else:
        img = resize_keep_aspect(img, cfg.image_size)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=cfg.jpeg_quality)
    return out.getvalue(), ""


def content_hash(image: bytes, caption: str | None = None) -> bytes:
    """Exact-dedup key: BLAKE2b-128 of the raw image bytes (and the cleaned caption, if given)."""
    h = hashlib.blake2b(image, digest_size=16)
    if caption is not None:
        h.update(b"\0" + caption.encode("utf-8"))
    return h.digest()
