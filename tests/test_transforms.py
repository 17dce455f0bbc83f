"""clip_core.transforms: decoding with reject reasons, torchvision-equivalent geometry, normalisation."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clip_core.transforms import (OPENAI_MEAN, OPENAI_STD, ImageDecodeError, decode_image, normalize,
                                  random_resized_crop, random_resized_crop_box, resize_center_crop, resize_keep_aspect,
                                  resized_crops, to_uint8_chw)


def _smooth_image(width: int, height: int) -> Image.Image:
    """Gradients plus a disc: smooth enough that JPEG's scaled decode stays close to the full one."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 4) ** 2
    rgb = np.stack([255 * x / width, 255 * y / height, np.where(disc, 220, 40)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG that declares width x height pixels: a decompression bomb's header."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_converts_to_rgb():
    for mode in ("L", "RGBA", "P", "CMYK"):
        img = _smooth_image(40, 30).convert(mode)
        decoded = decode_image(_encode(img, "JPEG" if mode == "CMYK" else "PNG"))
        assert decoded.mode == "RGB" and decoded.size == (40, 30)


@pytest.mark.parametrize("case, reason", [
    ("zero_bytes", "empty"),
    ("garbage", "corrupt"),
    ("damaged_png_data", "corrupt"),
    ("truncated_jpeg", "truncated"),
    ("truncated_png", "truncated"),
    ("bomb_header", "too_large"),
    ("over_max_pixels", "too_large"),
])
def test_decode_rejects_with_reason(case, reason):
    jpeg = _encode(_smooth_image(200, 150), "JPEG")
    png = _encode(_smooth_image(200, 150), "PNG")
    damaged = bytearray(png)
    damaged[100:140] = bytes(40)  # inside the zlib stream of IDAT
    data, max_pixels = {
        "zero_bytes": (b"", None),
        "garbage": (b"this is not an image at all" * 10, None),
        "damaged_png_data": (bytes(damaged), None),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], None),
        "truncated_png": (png[: len(png) // 2], None),
        "bomb_header": (_png_header_only(100_000, 100_000), None),
        "over_max_pixels": (png, 200 * 150 - 1),
    }[case]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=max_pixels)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and str(info.value).startswith(reason)


def test_max_pixels_limit_is_inclusive():
    assert decode_image(_encode(_smooth_image(200, 150), "PNG"), max_pixels=200 * 150).size == (200, 150)


def test_jpeg_draft_decodes_smaller_but_not_below_requested_size():
    img = _smooth_image(800, 600)
    data = _encode(img, "JPEG")
    full = decode_image(data)
    draft = decode_image(data, draft_size=64)
    assert full.size == (800, 600)
    assert draft.size == (100, 75)  # libjpeg's 1/8 scale: the largest that keeps the short side >= 64
    assert decode_image(data, draft_size=300).size == (400, 300)  # 1/2: 1/4 would be 150 < 300
    a = to_uint8_chw(resize_center_crop(full, 64)).astype(np.float32)
    b = to_uint8_chw(resize_center_crop(draft, 64)).astype(np.float32)
    assert np.abs(a - b).mean() < 3.0  # out of 255


def test_draft_size_ignored_for_non_jpeg():
    assert decode_image(_encode(_smooth_image(800, 600), "PNG"), draft_size=64).size == (800, 600)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    """PIL's own I;16 -> RGB conversion clips at 255: this ramp would come out nearly all white."""
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    grey = Image.fromarray(ramp)
    assert grey.mode == "I;16"
    decoded = np.asarray(decode_image(_encode(grey, "PNG")))
    assert decoded.shape == (16, 16, 3) and (decoded == np.arange(256).reshape(16, 16, 1)).all()


def test_exif_orientation_is_applied():
    """Orientation 6 (the camera turned 90 degrees clockwise): decoded upright, drafted or not."""
    img = Image.new("RGB", (80, 40), (250, 0, 0))
    img.paste((0, 0, 250), (0, 0, 20, 40))  # blue on the stored image's left = the upright image's top
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    for draft, size in ((None, (40, 80)), (16, (20, 40))):
        upright = decode_image(buf.getvalue(), draft_size=draft)
        assert upright.size == size
        top, bottom = upright.getpixel((size[0] // 2, 1)), upright.getpixel((size[0] // 2, size[1] - 2))
        assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]


def test_formats_limit_which_parsers_run():
    bmp, tiff, png = (_encode(_smooth_image(40, 30), fmt) for fmt in ("BMP", "TIFF", "PNG"))
    assert decode_image(bmp).size == (40, 30)  # formats=None: whatever PIL knows, as before
    for data, fmt in ((bmp, "BMP"), (tiff, "TIFF")):
        with pytest.raises(ImageDecodeError, match=f"format_not_allowed: {fmt} is not one of JPEG, PNG") as info:
            decode_image(data, formats=("JPEG", "PNG"))
        assert info.value.reason == "format_not_allowed"
    assert decode_image(png, formats=("PNG",)).size == (40, 30)
    with pytest.raises(ImageDecodeError) as info:  # bytes no format claims stay "corrupt"
        decode_image(b"this is not an image at all" * 10, formats=("PNG",))
    assert info.value.reason == "corrupt"


def test_resize_center_crop_equals_hand_computed_crop():
    # short side already == size: no resize, crop rows round((50 - 30) / 2) = 10 .. 40
    img = _smooth_image(30, 50)
    np.testing.assert_array_equal(np.asarray(resize_center_crop(img, 30)), np.asarray(img)[10:40, :])
    # 101x61 -> short 61 -> 30, long int(30 * 101 / 61) = 49; left = round((49 - 30) / 2) = round(9.5) = 10
    img = _smooth_image(101, 61)
    expected = img.resize((49, 30), Image.Resampling.BICUBIC).crop((10, 0, 40, 30))
    np.testing.assert_array_equal(np.asarray(resize_center_crop(img, 30)), np.asarray(expected))
    # portrait: 60x100 -> (30, 50), top = 10
    img = _smooth_image(60, 100)
    expected = img.resize((30, 50), Image.Resampling.BICUBIC).crop((0, 10, 30, 40))
    np.testing.assert_array_equal(np.asarray(resize_center_crop(img, 30)), np.asarray(expected))


def test_resize_keep_aspect():
    assert resize_keep_aspect(_smooth_image(300, 100), 64).size == (64, 21)
    assert resize_keep_aspect(_smooth_image(100, 300), 64).size == (21, 64)
    small = _smooth_image(40, 20)
    assert resize_keep_aspect(small, 64) is small  # never enlarges


def test_random_resized_crop_sampling():
    img = _smooth_image(120, 90)
    first = random_resized_crop(img, 32, np.random.default_rng(7))
    again = random_resized_crop(img, 32, np.random.default_rng(7))
    assert first.size == (32, 32) and first.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))  # reproducible from the seed
    crops = {np.asarray(random_resized_crop(img, 32, np.random.default_rng(s))).tobytes() for s in range(5)}
    assert len(crops) > 1  # and actually random
    # 4:1 panorama: no 10 tries can fit scale >= 0.9 with ratio <= 4/3, so torchvision's fallback:
    # w = round(100 * 4/3) = 133, h = 100, centred at left = (400 - 133) // 2 = 133
    wide = _smooth_image(400, 100)
    expected = wide.crop((133, 0, 266, 100)).resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(random_resized_crop(wide, 32, np.random.default_rng(0))),
                                  np.asarray(expected))
    # scale=(1, 1), ratio=(1, 1) on a square image: the whole image
    square = _smooth_image(64, 64)
    np.testing.assert_array_equal(
        np.asarray(random_resized_crop(square, 32, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1))),
        np.asarray(square.resize((32, 32), Image.Resampling.BICUBIC)))


def _photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour blobs plus sensor-like noise: JPEG-photo statistics, with some clipped highlights."""
    blobs = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(blobs).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_resized_crops_on_a_batch_match_pil(scale):
    """The device path (``train.augment_on=device``) against the CPU path, image by image: same box from
    the same seed, same pixels up to PIL's fixed-point rounding. Stored training images are never larger
    than the training size, so the crop is always enlarged (or kept); padding outside the stored image
    must never leak in."""
    rng, size = np.random.default_rng(0), 48
    padded, boxes, expected = [], [], []
    for i in range(24):
        if i % 3 == 0:
            width, height = size, size
        else:
            width, height = int(rng.integers(16, size + 1)), int(rng.integers(16, size + 1))
        img = _photo(width, height, rng)
        expected.append(to_uint8_chw(random_resized_crop(img, size, np.random.default_rng(i), scale=scale)))
        boxes.append(random_resized_crop_box(width, height, np.random.default_rng(i), scale=scale))
        canvas = np.full((3, size, size), 255, dtype=np.uint8)  # white padding: any leak shows
        canvas[:, :height, :width] = to_uint8_chw(img)
        padded.append(canvas)
    out = resized_crops(torch.from_numpy(np.stack(padded)), torch.tensor(boxes), size)
    assert out.shape == (24, 3, size, size) and out.dtype == torch.uint8
    diff = np.abs(out.numpy().astype(int) - np.stack(expected).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_resized_crops_shrinking_and_identity():
    """General boxes: shrinking uses PIL's widened (antialiasing) kernel; a box of the output size is a copy.
    Since Pillow 13, PIL runs the vertical pass first when the height shrinks much more than the width
    (the last box), so its rounding differs there; elsewhere both run the horizontal pass first."""
    rng = np.random.default_rng(1)
    img = _photo(90, 70, rng)
    boxes = [(0, 0, 90, 70), (10, 5, 64, 60), (3, 4, 32, 32), (20, 0, 40, 70)]
    expected = [to_uint8_chw(img.crop((x, y, x + w, y + h)).resize((32, 32), Image.Resampling.BICUBIC))
                for x, y, w, h in boxes]
    batch = torch.from_numpy(np.stack([to_uint8_chw(img)] * len(boxes)))
    out = resized_crops(batch, torch.tensor(boxes), 32).numpy()
    diff = np.abs(out.astype(int) - np.stack(expected).astype(int))
    assert diff.max() <= 2 and diff[:3].mean() < 0.01, (diff.max(), diff.mean())
    np.testing.assert_array_equal(out[2], to_uint8_chw(img)[:, 4:36, 3:35])  # 32x32 box -> 32 px: a copy


def test_to_uint8_chw():
    img = _smooth_image(20, 10)
    chw = to_uint8_chw(img)
    assert chw.shape == (3, 10, 20) and chw.dtype == np.uint8 and chw.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(chw[1], np.asarray(img)[:, :, 1])
    assert to_uint8_chw(img.convert("L")).shape == (3, 10, 20)


def test_normalize_matches_manual_computation():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    n, c, i, j = 1, 2, 3, 4
    manual = (x[n, c, i, j].item() / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c]
    assert out[n, c, i, j].item() == pytest.approx(manual, rel=1e-6)
    expected = (x.numpy() / 255.0 - np.array(OPENAI_MEAN)[:, None, None]) / np.array(OPENAI_STD)[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8, device="meta")).device.type == "meta"
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())
