"""Small real inputs for the registry and eval tests: tiny checkpoints and tiny eval sets on disk.

Zero-shot classes are flat colours, so a model that has seen nothing still produces a well-defined
ranking and the metrics are computable; the tests compare pipelines, not model quality.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from pathlib import Path

import torch
from mlflow import MlflowClient
from PIL import Image

from clip_core import Tokenizer, create_model, load_templates, save_checkpoint
from workflows.artifacts import DataManifest
from workflows.common.config import Config, load_config
from workflows.tracking import registry

from tiny_data import COLORS as TINY_COLORS

COLORS = {name: TINY_COLORS[name] for name in ("red", "green", "blue")}
WORDS = ["red", "green", "blue", "photo", "of", "a", "the", "small", "big", "square", "colour"]


def train_tokenizer(seed: int = 0) -> Tokenizer:
    rng = random.Random(seed)
    return Tokenizer.train([" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(200)], vocab_size=540,
                           context_length=16)


def make_checkpoint(directory: Path, tokenizer: Tokenizer, seed: int, step: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16)
    return save_checkpoint(directory, model, tokenizer, trainer_state={"step": step, "samples_seen": step * 8})


def tracking_home(root: Path, tokenizer: Tokenizer) -> Path:
    """A home with a training-data manifest and its tokenizer, as `clipflow preprocess` leaves them (no shards:
    enough for the tracker, which records the data's tokenizer and hash)."""
    data = root / "data" / "train"
    manifest = DataManifest(shards=[], tokenizer=tokenizer.id, context_length=16, image_size=32, content_hash="abc123",
                            counts={"input": 3, "written": 3, "duplicates": 0, "rejected": {}})
    tokenizer.save(data / manifest.tokenizer_path)
    manifest.write(str(data))
    return root


def jpeg(color: tuple[int, int, int], size: int = 40, noise: int = 0) -> bytes:
    img = Image.new("RGB", (size, size), tuple(max(0, min(255, c + noise)) for c in color))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def make_eval_sets(root: Path, per_class: int = 4) -> tuple[Path, Path]:
    """ImageFolder zero-shot set (3 colours) and a retrieval set, in the layout sample-data writes."""
    zs = root / "zeroshot"
    for i, (name, color) in enumerate(COLORS.items()):
        (zs / f"{i:02d}_{name}").mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            (zs / f"{i:02d}_{name}" / f"{n}.jpg").write_bytes(jpeg(color, noise=5 * n))
    (zs / "classnames.txt").write_text("\n".join(COLORS) + "\n")
    rt = root / "retrieval"
    (rt / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (name, color) in enumerate(list(COLORS.items()) * 2):
        (rt / "images" / f"{n}.jpg").write_bytes(jpeg(color, noise=7 * n))
        lines.append(json.dumps({"image": f"images/{n}.jpg", "captions": [f"a {name} square", f"{name} photo"]}))
    (rt / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return zs, rt


def make_config(home: Path, uri: str, model_name: str, **sets: Path) -> Config:
    overrides = [f"home={home}", f"mlflow.tracking_uri={uri}", f"mlflow.registered_model={model_name}",
                 "mlflow.experiment=clipflow-tests", "eval.batch_size=8", "eval.lease_seconds=120"]
    if "zeroshot" in sets:
        overrides.append(f"eval.zeroshot=[{sets['zeroshot']}]")
    if "retrieval" in sets:
        overrides.append(f"eval.retrieval=[{sets['retrieval']}]")
    return load_config(None, overrides)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def training_run(client: MlflowClient) -> str:
    from workflows.tracking.run import get_or_create_experiment

    return client.create_run(get_or_create_experiment(client, "clipflow-tests"), run_name="train").info.run_id


def publish(client: MlflowClient, name: str, run_id: str, checkpoint: Path, step: int) -> str:
    mv = registry.publish_checkpoint(client, name=name, run_id=run_id, checkpoint_uri=str(checkpoint), step=step,
                                     samples_seen=step * 8, templates=load_templates())
    return mv.version
