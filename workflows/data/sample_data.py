"""`clipflow sample-data`: a small, learnable image-caption data set generated from a seed.

Each image is one shape (8 kinds) in one colour (8 hues) with a random size, position and small
rotation on a plain, lightly noisy background; its caption comes from varied templates naming the
colour and shape and, often, the size, position or background ("small blue star near the top left").
A tiny CLIP learns the colour/shape words from it in minutes on a CPU, so zero-shot accuracy on the
held-out set is far above chance. Same seed => byte-identical files, with any number of rendering
processes (each sample has its own random stream; fixed tar metadata, sorted members, deterministic
JPEG encoding).

Layout under ``sample_data.output``:
    raw/train-00000.tar ...          webdataset shards: {key}.jpg, {key}.json, {key}.txt
    eval/zeroshot/<class>/<n>.jpg    ImageFolder; classnames.txt: line i = class of the i-th folder (sorted)
    eval/retrieval/images/<key>.jpg  + captions.jsonl ({"image": "images/<key>.jpg", "captions": [...]})

With ``bad_samples`` the first shard also holds one sample of each kind of damage the preprocessor
must count (corrupt / truncated / zero-byte JPEG, empty, non-UTF-8 and missing caption, missing
image, an exact duplicate) and the last shard is cut off in the middle of its last image.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from workflows.common import storage
from workflows.common.config import SampleDataConfig
from workflows.common.log import Progress

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")
COLORS = {"red": (220, 35, 35), "orange": (245, 140, 20), "yellow": (235, 215, 30), "green": (40, 165, 60),
          "cyan": (30, 200, 215), "blue": (35, 70, 220), "purple": (140, 50, 190), "pink": (250, 125, 190)}
BACKGROUNDS = {"white": (245, 245, 245), "light grey": (190, 190, 190), "dark grey": (80, 80, 80),
               "black": (20, 20, 20)}
SIZES = {"small": (0.18, 0.25), "medium": (0.25, 0.33), "large": (0.33, 0.42)}  # radius / image side
# Captions are composed from a template and phrase variants, so the text is varied (a BPE vocabulary of
# ~1k tokens can be learnt from it) while every caption names the drawn colour and shape exactly.
TEMPLATES = (
    "{a_size_color} {shape}{thing}",
    "{intro} {a_size_color} {shape}{thing} {where}",
    "{intro} {a_color} {shape} {on_bg}",
    "{a_size_color} {shape} {where} {on_bg}{tail}",
    "{color} {shape}, {size}, {pos}",
    "the {shape} {in_picture} is {color}",
    "{intro} {a_size} {shape} {painted} {color}{tail}",
    "{count} {color} {shape}{thing} {on_bg}",
    "{color} {shape} {where}{tail}",
    "{intro} {a_color} {shape}{thing}{tail}",
)
INTROS = ("a photo of", "a picture of", "an image of", "a drawing of", "a sketch of", "an illustration of",
          "a rendering of", "a snapshot of", "a close-up of", "a simple graphic of", "a flat icon of",
          "a cartoon of", "a painting of", "a digital render of", "a low resolution photo of", "a blurry photo of",
          "a clean vector drawing of", "a thumbnail of", "a minimalist poster showing", "a screenshot showing",
          "a diagram with", "a sticker of", "clip art of", "there is", "here we see", "this shows", "you can see",
          "look at", "a scan of", "a mockup featuring", "an abstract composition with", "a textbook figure of")
SIZE_WORDS = {"small": ("small", "tiny", "little", "compact", "miniature"),
              "medium": ("medium", "medium-sized", "moderate", "average-sized", "mid-sized", "regular"),
              "large": ("large", "big", "huge", "enormous", "giant", "massive")}
ROW_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower"), "": ("",)}
CENTER_WORDS = ("center", "middle", "centre", "central area")
WHERE = ("in the {pos}", "near the {pos}", "towards the {pos}", "placed at the {pos}", "positioned in the {pos}",
         "sitting in the {pos}", "floating near the {pos}", "located at the {pos}", "drawn in the {pos}",
         "resting around the {pos}")
BACKGROUND_WORDS = {"white": ("white", "snow white", "bright white", "off-white"),
                    "light grey": ("light grey", "light gray", "silver", "pale grey"),
                    "dark grey": ("dark grey", "dark gray", "charcoal", "slate"),
                    "black": ("black", "jet black", "pitch dark", "ebony")}
ON_BG = ("on {a_bg} background", "against {a_bg} backdrop", "over {a_bg} canvas", "on a plain {bg} surface",
         "in front of {a_bg} wall", "set on {bg} paper", "with {a_bg} background", "on {bg}")
THINGS = ("", "", "", "", " shape", " figure", " symbol", " form", " object", " motif", " emblem", " silhouette",
          " sign", " pictogram")
PAINTED = ("coloured", "colored", "painted", "filled with", "tinted", "shaded in", "rendered in")
IN_PICTURE = ("in this picture", "here", "in the image", "shown", "in the frame", "on the screen")
COUNT_WORDS = ("one", "a single", "exactly one", "just one", "only one", "a lone", "one solitary")
TAILS = ("", "", "", ", nothing else", ", centered composition", ", high contrast", ", slightly noisy",
         ", simple geometry", ", minimal style", ", flat colours", " with soft edges", ", drawn by hand",
         ", generated by a computer", " for a children's book", ", stock image", ", vintage print",
         ", crisp outline", ", synthetic data", ", no text", ", empty surroundings", ", photographed indoors",
         ", watercolor texture", ", pixel art", ", overexposed", ", underexposed", ", soft lighting",
         ", studio lighting", ", isometric view", ", seen from above", " with a subtle gradient", ", jpeg artifacts",
         ", desktop wallpaper", ", album cover", ", logo design", ", educational material", ", geometry lesson",
         ", kindergarten worksheet", ", museum catalogue", ", machine learning dataset", ", printed on cardboard",
         ", embroidered patch", ", neon glow", ", matte finish", ", glossy surface", ", symmetrical layout")
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges without fonts or extra libraries
JPEG_QUALITY = 90
# One random stream per sample and purpose (the purpose goes last and is never 0).
TRAIN, ZEROSHOT, RETRIEVAL, DAMAGE = 1, 2, 3, 4
# Every kind of damage put into the first shard, named by the preprocess reject reason it must produce.
BAD_REASONS = ("image_corrupt", "image_truncated", "image_empty", "empty_caption", "invalid_utf8",
               "missing_caption", "missing_image")

@dataclass
class Scene:
    shape: str
    color: str
    size: str
    position: str
    background: str


def generate_sample_data(cfg: SampleDataConfig, endpoint: str = "") -> dict[str, Any]:
    """Write the train shards and the held-out eval sets; returns a summary (paths, counts, expected rejects).
    With more than one worker it spawns processes, so a script that calls it needs the usual
    ``if __name__ == "__main__":`` guard (the ``clipflow`` command has it)."""
    cfg.validate()
    start = time.monotonic()
    endpoint = storage.s3_endpoint(endpoint)
    out = cfg.output
    classes = SHAPES if cfg.zeroshot_task == "shape" else tuple(COLORS)
    folders = sorted(c.replace(" ", "_") for c in classes)
    jobs = ([(cfg.seed, cfg.image_size, TRAIN, i, None) for i in range(cfg.train_samples)]
            + [(cfg.seed, cfg.image_size, ZEROSHOT, c * cfg.zeroshot_per_class + n, (cfg.zeroshot_task, folder))
               for c, folder in enumerate(folders) for n in range(cfg.zeroshot_per_class)]
            + [(cfg.seed, cfg.image_size, RETRIEVAL, n, None) for n in range(cfg.retrieval_samples)])
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, len(jobs) // 500))
    with Progress(len(jobs), "sample-data: rendering", "images") as bar, \
            _renderer(workers) as render_all:
        drawn = iter(render_all(jobs))

        raw, shards = storage.join(out, "raw"), []
        per_shard = np.array_split(np.arange(cfg.train_samples), cfg.train_shards)
        for shard_index, indices in enumerate(per_shard):
            samples = []
            for i in indices:
                image, scene, captions = next(drawn)
                samples.append((f"{int(i):08d}", image, captions[0].encode(), scene))
                bar.update(1)
            if cfg.bad_samples and shard_index == 0:
                samples += _bad_samples(samples[0], np.random.default_rng([cfg.seed, 0, DAMAGE]))
            last = shard_index == len(per_shard) - 1
            uri = storage.join(raw, f"train-{shard_index:05d}.tar")
            storage.write_bytes(uri, _tar_bytes(samples, truncate_last=cfg.bad_samples and last), endpoint)
            shards.append(uri)

        zs_dir = storage.join(out, "eval", "zeroshot")
        for folder in folders:
            for n in range(cfg.zeroshot_per_class):
                storage.write_bytes(storage.join(zs_dir, folder, f"{n:04d}.jpg"), next(drawn)[0], endpoint)
                bar.update(1)
        storage.write_bytes(storage.join(zs_dir, "classnames.txt"),
                            "".join(f"{f.replace('_', ' ')}\n" for f in folders).encode(), endpoint)

        rt_dir = storage.join(out, "eval", "retrieval")
        lines = []
        for n in range(cfg.retrieval_samples):
            image, _, captions = next(drawn)
            name = f"images/{n:06d}.jpg"
            storage.write_bytes(storage.join(rt_dir, name), image, endpoint)
            lines.append(json.dumps({"image": name, "captions": captions}))
            bar.update(1)
        storage.write_bytes(storage.join(rt_dir, "captions.jsonl"), ("\n".join(lines) + "\n").encode(), endpoint)

    expected = {reason: 1 for reason in BAD_REASONS + ("truncated_tar",)} if cfg.bad_samples else {}
    return {
        "output": out,
        "train_shards": shards,
        "train_samples": cfg.train_samples + (len(BAD_REASONS) + 1 if cfg.bad_samples else 0),
        "expected_rejects": expected,
        "expected_duplicates": 1 if cfg.bad_samples else 0,
        "zeroshot_dir": zs_dir,
        "zeroshot_classes": [f.replace("_", " ") for f in folders],
        "zeroshot_images": len(folders) * cfg.zeroshot_per_class,
        "retrieval_dir": rt_dir,
        "retrieval_images": cfg.retrieval_samples,
        "workers": workers,
        "seconds": round(time.monotonic() - start, 2),
    }


Job = tuple[int, int, int, int, "tuple[str, str] | None"]  # seed, image size, purpose, index, fixed attribute


def draw(job: Job) -> tuple[bytes, Scene, list[str]]:
    """One sample from its own random stream (seed, index, purpose): the JPEG, its scene and its
    captions (one for training, two with different templates for retrieval, none for zero-shot).
    Independent streams make the output the same whichever process draws which sample."""
    seed, size, purpose, index, fixed = job
    rng = np.random.default_rng([seed, index, purpose])  # purpose last: never 0 (see train.feed.seeded)
    scene = random_scene(rng, **({fixed[0]: fixed[1].replace("_", " ")} if fixed else {}))
    image = encode_jpeg(render(scene, size, rng))
    if purpose == TRAIN:
        captions = [caption(scene, rng)]
    elif purpose == RETRIEVAL:
        captions = [caption(scene, rng, t) for t in rng.choice(len(TEMPLATES), size=2, replace=False)]
    else:
        captions = []
    return image, scene, captions


@contextlib.contextmanager
def _renderer(workers: int) -> Iterator[Callable[[list[Job]], Iterator[tuple[bytes, Scene, list[str]]]]]:
    """``draw`` over jobs, in order: in this process, or in a pool of ``workers`` spawned processes
    (spawned, not forked: the caller may hold threads, e.g. torch's or Ray's)."""
    if workers == 1:
        yield lambda jobs: map(draw, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield lambda jobs: pool.imap(draw, jobs, chunksize=32)


# ---- scenes, captions, rendering ------------------------------------------------------------------------

def random_scene(rng: np.random.Generator, shape: str | None = None, color: str | None = None) -> Scene:
    return Scene(shape=shape or SHAPES[rng.integers(len(SHAPES))],
                 color=color or list(COLORS)[rng.integers(len(COLORS))],
                 size=list(SIZES)[rng.integers(len(SIZES))],
                 position="",  # set by render(), which draws the position
                 background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> str:
    """A varied caption naming ``scene``'s colour and shape (template ``template`` or a random one)."""
    index = int(rng.integers(len(TEMPLATES))) if template is None else int(template)

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    size, color, bg = pick(SIZE_WORDS[scene.size]), scene.color, pick(BACKGROUND_WORDS[scene.background])
    words = scene.position.split()  # "top left", "bottom", "right", "center", ...
    row = words[0] if words[0] in ROW_WORDS else ""
    col = words[-1] if words[-1] in ("left", "right") else ""
    pos = pick(CENTER_WORDS) if scene.position == "center" else " ".join(w for w in (pick(ROW_WORDS[row]), col) if w)
    return TEMPLATES[index].format(
        shape=scene.shape, color=color, size=size, pos=pos, intro=pick(INTROS),
        a_size_color=_article(f"{size} {color}"), a_color=_article(color), a_size=_article(size),
        where=pick(WHERE).format(pos=pos), on_bg=pick(ON_BG).format(bg=bg, a_bg=_article(bg)), painted=pick(PAINTED),
        in_picture=pick(IN_PICTURE), count=pick(COUNT_WORDS), thing=pick(THINGS), tail=pick(TAILS))


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` (and record its position word in it) as an RGB image of ``size`` x ``size``."""
    big = size * SUPERSAMPLE
    low, high = SIZES[scene.size]
    radius = rng.uniform(low, high) * big
    cx, cy = rng.uniform(radius, big - radius, size=2)
    rotation = rng.uniform(-math.pi / 9, math.pi / 9)
    scene.position = _position_word(cx / big, cy / big)
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[scene.color], jitter))
    _draw_shape(ImageDraw.Draw(img), scene.shape, cx, cy, radius, rotation, fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    noise = rng.normal(0.0, rng.uniform(0.0, 10.0), size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _position_word(x: float, y: float) -> str:
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    col = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return " ".join(w for w in (row, col) if w) or "center"


def _polygon(cx: float, cy: float, radii: list[float], rotation: float, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(start + rotation + 2 * math.pi * k / n),
             cy + r * math.sin(start + rotation + 2 * math.pi * k / n)) for k, r in enumerate(radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float,
                fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.1] * 4, rot, start=-math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, [r * 1.15] * 3, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.1, r * 0.45] * 5, rot), fill=fill)
    elif shape == "cross":
        w = r * 0.36
        arm = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=fill)
    elif shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            x, y = x * r / 16, y * r / 16
            pts.append((cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---- shards ----------------------------------------------------------------------------------------------

Sample = tuple[str, "bytes | None", "bytes | None", "Scene | None"]


def _bad_samples(good: Sample, rng: np.random.Generator) -> list[Sample]:
    """One damaged sample per reason in BAD_REASONS plus an exact duplicate of ``good``; their keys
    sort right after ``good``'s, inside the first shard."""
    key, image, text, _ = good
    damaged = {
        "image_corrupt": (b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes(), text),
        "image_truncated": (image[: len(image) // 2], text),
        "image_empty": (b"", text),
        "empty_caption": (image, b"  \n"),
        "invalid_utf8": (image, b"a red \xff\xfe circle"),
        "missing_caption": (image, None),
        "missing_image": (None, text),
    }
    bad = [(f"{key}-bad-{i:02d}-{reason}", img, txt, None) for i, (reason, (img, txt)) in enumerate(damaged.items())]
    return bad + [(f"{key}-bad-{len(bad):02d}-duplicate", image, text, None)]


def _tar_bytes(samples: list[Sample], truncate_last: bool) -> bytes:
    """A webdataset shard with fixed metadata (byte-identical for the same samples); with
    ``truncate_last`` the archive ends halfway through the last sample's image."""
    buf = io.BytesIO()
    cut = None
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, text, scene in sorted(samples, key=lambda s: s[0]):
            members = []
            if image is not None:
                members.append((f"{key}.jpg", image))
            if scene is not None:
                meta = {"key": key, "caption": text.decode(), "shape": scene.shape, "color": scene.color,
                        "size": scene.size, "position": scene.position, "background": scene.background}
                members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
            if text is not None:
                members.append((f"{key}.txt", text))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                header_end = buf.tell() + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                tar.addfile(info, io.BytesIO(data))
                if name.endswith(".jpg"):
                    cut = header_end + len(data) // 2
    data = buf.getvalue()
    return data[:cut] if truncate_last and cut is not None else data


