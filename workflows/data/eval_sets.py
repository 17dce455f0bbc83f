"""Eval sets and what they measure of a model in memory: shared by `clipflow eval` and training.

Eval sets (``clipflow sample-data`` writes both): ImageFolder ``<dir>/<class>/<image>`` with an
optional ``classnames.txt`` (line i names the i-th class folder in sorted order), and retrieval
``<dir>/captions.jsonl`` lines ``{"image": "images/x.jpg", "captions": [...]}``. A set is named by its
folder's last path part; metrics are CLIP_benchmark's (``clip_core.zero_shot``).

The eval job embeds images on a Ray Data actor pool (``workflows.eval.job``); training's periodic
zero-shot (``train.zero_shot_every``) embeds in process with ``embed_images_local``. Both then score
with the same ``zero_shot_result`` / ``retrieval_result``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from clip_core import (CLIP, ImageDecodeError, Tokenizer, build_zero_shot_classifier, classification_metrics,
                       load_templates, retrieval_metrics)
from clip_core.embed import embed_images, embed_texts, images_to_tensor, model_image_size
from workflows.common import storage
from workflows.common.config import Config
from workflows.common.errors import UserError


@dataclass
class ZeroShotSet:
    name: str
    classnames: list[str]
    images: list[str]  # URIs
    labels: list[int]


@dataclass
class RetrievalSet:
    name: str
    images: list[str]
    captions: list[str]
    text_to_image: list[int]


def dataset_name(uri: str) -> str:
    return storage.basename(uri)


def read_zeroshot_set(uri: str, endpoint: str = "") -> ZeroShotSet:
    root = uri.rstrip("/")
    files = storage.list_files(root, endpoint, recursive=True)
    by_class: dict[str, list[str]] = {}
    for file in files:
        parts = file[len(root) + 1:].split("/")
        if len(parts) == 2 and not parts[1].startswith("."):
            by_class.setdefault(parts[0], []).append(file)
    if not by_class:
        raise UserError(f"zero-shot eval set {uri} has no <class>/<image> files (ImageFolder layout); "
                        f"run `clipflow sample-data` or fix eval.zeroshot")
    folders = sorted(by_class)
    names_uri = storage.join(root, "classnames.txt")
    if storage.exists(names_uri, endpoint):
        classnames = [line.strip() for line in storage.read_bytes(names_uri, endpoint).decode().splitlines()
                      if line.strip()]
        if len(classnames) != len(folders):
            raise UserError(f"{names_uri} names {len(classnames)} classes but {uri} has {len(folders)} class "
                            f"folders; line i must name the i-th folder in sorted order")
    else:
        classnames = [f.replace("_", " ") for f in folders]
    images, labels = [], []
    for label, folder in enumerate(folders):
        for file in sorted(by_class[folder]):
            images.append(file)
            labels.append(label)
    return ZeroShotSet(dataset_name(uri), classnames, images, labels)


def read_retrieval_set(uri: str, endpoint: str = "") -> RetrievalSet:
    root = uri.rstrip("/")
    index = storage.join(root, "captions.jsonl")
    if not storage.exists(index, endpoint):
        raise UserError(f"retrieval eval set {uri} has no captions.jsonl; run `clipflow sample-data` or fix "
                        f"eval.retrieval")
    images, captions, text_to_image = [], [], []
    for n, line in enumerate(storage.read_bytes(index, endpoint).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, texts = item["image"], list(item["captions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} line {n}: expected {{\"image\": ..., \"captions\": [...]}} ({exc})") from exc
        for text in texts:
            captions.append(str(text))
            text_to_image.append(len(images))
        images.append(storage.join(root, image))
    if not images or not captions:
        raise UserError(f"{index} lists no image with captions")
    return RetrievalSet(dataset_name(uri), images, captions, text_to_image)


def read_pixels(uris: list[str], image_size: int, endpoint: str) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded images and an ok-mask: an unreadable eval image is counted, not fatal."""
    ok = np.ones(len(uris), dtype=bool)
    pixels = []
    for i, uri in enumerate(uris):
        try:
            pixels.append(images_to_tensor([storage.read_bytes(uri, endpoint)], image_size)[0])
        except (OSError, ImageDecodeError):
            ok[i] = False
            pixels.append(torch.zeros(3, image_size, image_size, dtype=torch.uint8))
    return torch.stack(pixels), ok


def embed_images_local(model: CLIP, uris: list[str], cfg: Config, device: str | torch.device = "cpu"):
    """The same in-process (training's periodic eval, and the benchmark's baseline)."""
    start = time.perf_counter()
    features, oks = [], []
    for i in range(0, len(uris), cfg.eval.batch_size):
        pixels, ok = read_pixels(uris[i:i + cfg.eval.batch_size], model_image_size(model), cfg.storage.s3_endpoint)
        features.append(embed_images(model, pixels, device))
        oks.append(ok)
    return torch.cat(features), np.concatenate(oks), len(uris) / (time.perf_counter() - start)


@dataclass
class DatasetResult:
    metrics: dict[str, float]
    per_class: list[tuple[str, float | None, int]] = field(default_factory=list)  # (class, recall, support)
    confusion: list[list[int]] | None = None
    classnames: list[str] = field(default_factory=list)


def zero_shot_result(model: CLIP, tokenizer: Tokenizer, data: ZeroShotSet, features: torch.Tensor, ok: np.ndarray,
                     templates: list[str], device: str | torch.device = "cpu") -> DatasetResult:
    classifier = build_zero_shot_classifier(model, tokenizer, data.classnames, templates, device=device).cpu()
    keep = torch.from_numpy(ok)
    if not keep.any():
        raise UserError(f"no image of eval set {data.name} could be read")
    targets = torch.tensor(data.labels)[keep]
    m = classification_metrics(features[keep] @ classifier, targets)
    support = torch.bincount(targets, minlength=len(data.classnames)).tolist()
    metrics = {"acc1": m["acc1"], "acc5": m["acc5"], "mean_per_class_recall": m["mean_per_class_recall"],
               "images": float(keep.sum()), "unreadable_images": float((~keep).sum())}
    return DatasetResult(metrics, list(zip(data.classnames, m["per_class_recall"], support)), m["confusion_matrix"],
                         data.classnames)


def retrieval_result(model: CLIP, tokenizer: Tokenizer, data: RetrievalSet, features: torch.Tensor, ok: np.ndarray,
                     device: str | torch.device = "cpu") -> DatasetResult:
    """Unreadable images are masked out of the ranking but stay in the denominators: a broken eval
    image counts as a miss rather than making the task easier."""
    texts = embed_texts(model, tokenizer, data.captions, device)
    m = retrieval_metrics(features, texts, torch.tensor(data.text_to_image), image_ok=torch.from_numpy(ok))
    return DatasetResult({**m, "images": float(ok.sum()), "unreadable_images": float((~ok).sum())})


def zero_shot_in_process(model: CLIP, tokenizer: Tokenizer, cfg: Config,
                         device: str | torch.device = "cpu") -> dict[str, float]:
    """Zero-shot metrics of a model in memory, without Ray Data: for training's ``zero_shot_every``.

    Returns ``{"<dataset>/acc1": ..., "<dataset>/acc5": ..., "<dataset>/mean_per_class_recall": ...}``
    for every ``eval.zeroshot`` set. The caller switches the model to eval mode and back.
    """
    templates = load_templates(cfg.eval.templates or None)
    out: dict[str, float] = {}
    with torch.no_grad():
        for uri in cfg.eval.zeroshot:
            data = read_zeroshot_set(uri, cfg.storage.s3_endpoint)
            features, ok, _ = embed_images_local(model, data.images, cfg, device)
            result = zero_shot_result(model, tokenizer, data, features, ok, templates, device)
            out.update({f"{data.name}/{k}": v for k, v in result.metrics.items()
                        if k in ("acc1", "acc5", "mean_per_class_recall")})
    return out
