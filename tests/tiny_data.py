"""Tiny training shards in the preprocess contract's format (Parquet + manifest.json + tokenizer/), written
directly so training tests and a submitted training job start in seconds instead of after a preprocess run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from clip_core import Tokenizer

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 30, 160), "orange": (250, 140, 20)}
SHAPES = ["square", "stripe"]
ROWS, SHARDS, CONTEXT, SIZE = 32, 3, 16, 32


def shape_jpeg(color: tuple[int, int, int], shape: str, rng: np.random.Generator) -> bytes:
    """A SIZE-px JPEG, as `clipflow preprocess` stores them (the manifest's image_size is the stored size)."""
    pixels = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(-20, 20, (SIZE, SIZE, 3)).astype(np.uint8)
    if shape == "square":
        pixels[6:26, 6:26] = color
    else:
        pixels[:, 11:21] = color
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_train_data(root: Path) -> Path:
    """SHARDS shards of ROWS captioned coloured shapes under ``root``; returns ``root``."""
    rng = np.random.default_rng(0)
    names = [(c, s) for c in COLORS for s in SHAPES]
    captions = [f"a photo of a {c} {s}" for c, s in names]
    tok = Tokenizer.train(captions * 4, vocab_size=550, context_length=CONTEXT)
    tok.save(root / "tokenizer")
    shards = []
    for shard in range(SHARDS):
        keys, images, caps = [], [], []
        for row in range(ROWS):
            color, shape = names[int(rng.integers(len(names)))]
            keys.append(f"s{shard}-{row:03d}")
            images.append(shape_jpeg(COLORS[color], shape, rng))
            caps.append(f"a photo of a {color} {shape}")
        tokens = [t.tolist() for t in tok(caps).to(torch.int32)]
        table = pa.table({"key": keys, "image": pa.array(images, pa.binary()), "caption": caps,
                          "tokens": pa.array(tokens, pa.list_(pa.int32()))})
        name = f"shard-{shard:05d}.parquet"
        pq.write_table(table, root / name, row_group_size=10)  # several row groups: partial reads are exercised
        shards.append({"path": name, "rows": ROWS, "bytes": (root / name).stat().st_size, "sha256": "-"})
    total = SHARDS * ROWS
    (root / "manifest.json").write_text(json.dumps({
        "version": 1, "counts": {"input": total, "written": total, "duplicates": 0, "rejected": {}},
        "shards": shards, "tokenizer": tok.id, "tokenizer_path": "tokenizer", "context_length": CONTEXT,
        "image_size": SIZE, "resize_mode": "center_crop", "sources": [], "input_fingerprint": "x",
        "content_hash": "tiny-v1", "config": {}, "bytes": sum(s["bytes"] for s in shards)}))
    return root
