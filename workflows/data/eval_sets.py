"""Eval sets and what they measure of a model in memory: shared by `clipflow eval` and training.

Two layouts of a set's directory (``clipflow sample-data`` writes the first):

- files: zero-shot ImageFolder ``<dir>/<class>/<image>``; retrieval ``<dir>/captions.jsonl`` lines
  ``{"image": "images/x.jpg", "captions": [...]}``; linear probe ``<dir>/train/<class>/<image>`` and
  ``<dir>/test/<class>/<image>``.
- CLIP_benchmark's webdataset (``clip_benchmark_export_wds``): ``<dir>/test/`` (and ``<dir>/train/`` for a
  linear probe) holding uncompressed tar shards (``0.tar``..., named by ``nshards.txt`` when present), each
  sample a ``<key>.webp|png|jpg|jpeg`` image with ``<key>.cls`` (the class index) or ``<key>.txt`` (its
  captions, one a line). Images are read straight out of the shards (byte ranges), never unpacked.

Beside either, ``classnames.txt`` (line i names class i: the i-th class folder in sorted order) and
``zeroshot_classification_templates.txt`` (one prompt a line, ``{c}`` for the class name) override
``eval.classnames`` / ``eval.templates`` for that set. A set is named by its folder's last path part;
metrics are CLIP_benchmark's (``clip_core.zero_shot``).

The eval job embeds images on a Ray Data actor pool (``workflows.eval.job``); training's periodic
zero-shot (``train.zero_shot_every``) embeds in process with ``embed_images_local``. Both then score
with the same ``zero_shot_result`` / ``retrieval_result``.
"""

from __future__ import annotations

import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from clip_core import (CLIP, ImageDecodeError, Tokenizer, build_zero_shot_classifier, classification_metrics,
                       retrieval_metrics)
from clip_core.embed import embed_images, embed_texts, images_to_tensor, model_image_size
from clip_core.zero_shot import BUILTIN_CLASSNAMES, load_templates, templates_from_lines
from workflows.common import storage
from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.data.readers import IMAGE_EXTENSIONS, WEBDATASET_KEY

# The files of an eval set (CLIP_benchmark's names for the webdataset layout's).
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
CAPTIONS_FILE = "captions.jsonl"
NSHARDS_FILE = "nshards.txt"
TEST_SPLIT, TRAIN_SPLIT = "test", "train"


class TarMember(NamedTuple):
    """An image inside an uncompressed tar shard: its bytes are ``size`` bytes from ``offset``."""

    uri: str
    offset: int
    size: int


Image = str | TarMember  # a file's URI, or a member of a shard


@dataclass
class ZeroShotSet:
    name: str
    classnames: list[str]
    images: list[Image]
    labels: list[int]
    templates: list[str] | None = None  # the set's own zeroshot_classification_templates.txt


@dataclass
class RetrievalSet:
    name: str
    images: list[Image]
    captions: list[str]
    text_to_image: list[int]


@dataclass
class LinearProbeSet:
    name: str
    num_classes: int
    train_images: list[Image]
    train_labels: list[int]
    test_images: list[Image]
    test_labels: list[int]

    @property
    def images(self) -> list[Image]:
        """Train then test images: embedded in one pass with every other set's."""
        return self.train_images + self.test_images


def dataset_name(uri: str) -> str:
    return storage.basename(uri)


def _text(uri: str, endpoint: str) -> str | None:
    return storage.read_bytes(uri, endpoint).decode() if storage.exists(uri, endpoint) else None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---- CLIP_benchmark's webdataset layout ----------------------------------------------------------------

def _shards(root: str, split: str, endpoint: str) -> list[str]:
    """The split's tar shards: ``0.tar``..``{n-1}.tar`` when ``nshards.txt`` says n, else every ``*.tar``."""
    split_dir = storage.join(root, split)
    count = _text(storage.join(split_dir, NSHARDS_FILE), endpoint)
    if count is None:
        return [f for f in storage.list_files(split_dir, endpoint) if f.endswith(".tar")]
    if not count.strip().isdigit():
        raise UserError(f"{storage.join(split_dir, NSHARDS_FILE)} must hold the number of shards, got {count!r}")
    shards = [storage.join(split_dir, f"{i}.tar") for i in range(int(count))]
    missing = [s for s in shards if not storage.exists(s, endpoint)]
    if missing:
        raise UserError(f"{split_dir}: {NSHARDS_FILE} says {count.strip()} shards but {len(missing)} are missing "
                        f"(first: {missing[0]}); re-export the set or fix {NSHARDS_FILE}")
    return shards


def _scan_shard(uri: str, endpoint: str) -> list[tuple[str, dict[str, TarMember | bytes]]]:
    """(key, {extension: image member | cls/txt bytes}) per sample, in shard order; images are not read."""
    fs, path = storage.resolve(uri, endpoint)
    samples: dict[str, dict[str, TarMember | bytes]] = {}
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                match = WEBDATASET_KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if ext in IMAGE_EXTENSIONS:
                    samples.setdefault(key, {})[ext] = TarMember(uri, member.offset_data, member.size)
                elif ext in ("cls", "txt"):
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"eval shard {uri} is not a readable uncompressed tar ({exc}); re-export it with "
                        f"clip_benchmark_export_wds") from exc
    return list(samples.items())


def _read_shards(root: str, split: str, endpoint: str, member: str) -> tuple[list[TarMember], list[bytes]]:
    """Every sample's image and its ``member`` (``cls`` or ``txt``) bytes, shards scanned in parallel."""
    shards = _shards(root, split, endpoint)
    with ThreadPoolExecutor(max_workers=min(8, len(shards))) as pool:
        samples = [s for scanned in pool.map(lambda uri: _scan_shard(uri, endpoint), shards) for s in scanned]
    images, values, broken = [], [], []
    for key, files in samples:
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None or member not in files:
            broken.append(key)
            continue
        images.append(image)
        values.append(files[member])
    if broken:
        raise UserError(f"{storage.join(root, split)}: {len(broken)} sample(s) lack an image or a {member} member "
                        f"(first: {broken[0]}); each needs <key>.webp|png|jpg|jpeg and <key>.{member}")
    if not images:
        raise UserError(f"{storage.join(root, split)}: the shards hold no samples")
    return images, values


def _read_wds_labels(root: str, split: str, endpoint: str) -> tuple[list[TarMember], list[int]]:
    images, values = _read_shards(root, split, endpoint, "cls")
    try:
        labels = [int(v.decode().strip()) for v in values]
    except ValueError as exc:
        raise UserError(f"{storage.join(root, split)}: a .cls member is not a class index ({exc})") from exc
    if min(labels) < 0:
        raise UserError(f"{storage.join(root, split)}: class indices must be >= 0, found {min(labels)}")
    return images, labels


# ---- ImageFolder -----------------------------------------------------------------------------------------

def _read_image_folder(root: str, endpoint: str) -> tuple[list[str], list[int], list[str]]:
    """Images, labels (the index of their class folder in sorted order) and the sorted folders."""
    by_class: dict[str, list[str]] = {}
    for file in storage.list_files(root, endpoint, recursive=True):
        parts = file[len(root) + 1:].split("/")
        if len(parts) == 2 and not parts[1].startswith("."):
            by_class.setdefault(parts[0], []).append(file)
    folders = sorted(by_class)
    images, labels = [], []
    for label, folder in enumerate(folders):
        for file in sorted(by_class[folder]):
            images.append(file)
            labels.append(label)
    return images, labels, folders


def _classnames(root: str, endpoint: str, default: str, folders: list[str] | None,
                num_labels: int) -> list[str]:
    """The set's classnames.txt, else ``default`` (a built-in list or a file), else the folder names."""
    own = _text(storage.join(root, CLASSNAMES_FILE), endpoint)
    source = storage.join(root, CLASSNAMES_FILE)
    if own is not None:
        names = _lines(own)
    elif default in BUILTIN_CLASSNAMES:
        names, source = list(BUILTIN_CLASSNAMES[default]), f"eval.classnames={default}"
    elif default:
        names, source = _lines(storage.read_bytes(default, endpoint).decode()), default
    elif folders is not None:
        return [f.replace("_", " ") for f in folders]
    else:
        raise UserError(f"eval set {root} has no {CLASSNAMES_FILE}; add one (line i names class i) or set "
                        f"eval.classnames")
    if folders is not None and len(names) != len(folders):
        raise UserError(f"{source} names {len(names)} classes but {root} has {len(folders)} class folders; line i "
                        f"must name the i-th folder in sorted order")
    if len(names) < num_labels:
        raise UserError(f"{source} names {len(names)} classes but {root}'s labels go up to {num_labels - 1}")
    return names


def read_zeroshot_set(uri: str, endpoint: str = "", classnames: str = "") -> ZeroShotSet:
    """An ImageFolder or a webdataset ``test`` split; ``classnames`` is ``eval.classnames``."""
    root = uri.rstrip("/")
    if _shards(root, TEST_SPLIT, endpoint):
        images, labels = _read_wds_labels(root, TEST_SPLIT, endpoint)
        folders = None
    else:
        images, labels, folders = _read_image_folder(root, endpoint)
        if not images:
            raise UserError(f"zero-shot eval set {uri} has no <class>/<image> files (ImageFolder layout) and no "
                            f"{TEST_SPLIT}/*.tar shards (CLIP_benchmark's webdataset); run `clipflow sample-data` "
                            f"or fix eval.zeroshot")
    names = _classnames(root, endpoint, classnames, folders, max(labels) + 1)
    templates_uri = storage.join(root, TEMPLATES_FILE)
    own = _text(templates_uri, endpoint)
    try:
        templates = templates_from_lines(own, templates_uri) if own is not None else None
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return ZeroShotSet(dataset_name(uri), names, images, labels, templates)


def read_retrieval_set(uri: str, endpoint: str = "") -> RetrievalSet:
    """``captions.jsonl`` with image files, or a webdataset ``test`` split with a ``.txt`` per image."""
    root = uri.rstrip("/")
    index = storage.join(root, CAPTIONS_FILE)
    if not storage.exists(index, endpoint):
        if not _shards(root, TEST_SPLIT, endpoint):
            raise UserError(f"retrieval eval set {uri} has no {CAPTIONS_FILE} and no {TEST_SPLIT}/*.tar shards; run "
                            f"`clipflow sample-data` or fix eval.retrieval")
        shard_images, texts = _read_shards(root, TEST_SPLIT, endpoint, "txt")
        images, captions, text_to_image = [], [], []
        for image, text in zip(shard_images, texts):
            for caption in text.decode().splitlines():
                captions.append(caption)
                text_to_image.append(len(images))
            images.append(image)
        return RetrievalSet(dataset_name(uri), images, captions, text_to_image)
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


def read_linear_probe_set(uri: str, endpoint: str = "") -> LinearProbeSet:
    """``train`` and ``test`` splits, each webdataset shards or an ImageFolder (the same class folders)."""
    root = uri.rstrip("/")
    splits = {}
    for split in (TRAIN_SPLIT, TEST_SPLIT):
        split_root = storage.join(root, split)
        if _shards(root, split, endpoint):
            images, labels = _read_wds_labels(root, split, endpoint)
            splits[split] = images, labels, None
        else:
            splits[split] = _read_image_folder(split_root, endpoint)
        if not splits[split][0]:
            raise UserError(f"linear-probe eval set {uri} has no {split} split: {split_root} holds neither tar "
                            f"shards nor <class>/<image> files; fix eval.linear_probe")
    (train, train_labels, train_folders), (test, test_labels, test_folders) = splits[TRAIN_SPLIT], splits[TEST_SPLIT]
    if train_folders is not None and test_folders is not None:
        if sorted(set(test_folders) - set(train_folders)):
            raise UserError(f"{uri}: test classes {sorted(set(test_folders) - set(train_folders))[:3]} have no "
                            f"train folder; both splits need the same class folders")
        index = {folder: i for i, folder in enumerate(train_folders)}
        test_labels = [index[test_folders[label]] for label in test_labels]
    num_classes = len(train_folders) if train_folders is not None else max(train_labels + test_labels) + 1
    return LinearProbeSet(dataset_name(uri), num_classes, train, train_labels, test, test_labels)


# ---- reading and embedding images -------------------------------------------------------------------------

def image_rows(images: list[Image]) -> list[dict]:
    """One row per image for Ray Data (``uri``, ``offset``, ``size``; size -1 = the whole file)."""
    return [{"index": i, "uri": image, "offset": 0, "size": -1} if isinstance(image, str)
            else {"index": i, "uri": image.uri, "offset": image.offset, "size": image.size}
            for i, image in enumerate(images)]


def images_of_rows(batch: dict[str, np.ndarray]) -> list[Image]:
    """``image_rows``' inverse, for a batch of such rows."""
    return [str(uri) if size < 0 else TarMember(str(uri), int(offset), int(size))
            for uri, offset, size in zip(batch["uri"], batch["offset"], batch["size"])]


def read_pixels(images: list[Image], image_size: int, endpoint: str) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded images and an ok-mask: an unreadable eval image is counted, not fatal. Each shard is
    opened once per call and read by byte range."""
    ok = np.ones(len(images), dtype=bool)
    pixels = []
    shards: dict[str, object] = {}
    try:
        for i, image in enumerate(images):
            try:
                if isinstance(image, str):
                    data = storage.read_bytes(image, endpoint)
                else:
                    if image.uri not in shards:
                        shards[image.uri] = storage.open_input(image.uri, endpoint)
                    data = shards[image.uri].read_at(image.size, image.offset)
                pixels.append(images_to_tensor([data], image_size)[0])
            except (OSError, ImageDecodeError):
                ok[i] = False
                pixels.append(torch.zeros(3, image_size, image_size, dtype=torch.uint8))
    finally:
        for shard in shards.values():
            shard.close()
    return torch.stack(pixels), ok


def embed_images_local(model: CLIP, uris: list[Image], cfg: Config, device: str | torch.device = "cpu"):
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
            data = read_zeroshot_set(uri, cfg.storage.s3_endpoint, cfg.eval.classnames)
            features, ok, _ = embed_images_local(model, data.images, cfg, device)
            result = zero_shot_result(model, tokenizer, data, features, ok, data.templates or templates, device)
            out.update({f"{data.name}/{k}": v for k, v in result.metrics.items()
                        if k in ("acc1", "acc5", "mean_per_class_recall")})
    return out
