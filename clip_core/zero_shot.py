"""Zero-shot classification and image-text retrieval, as in the CLIP paper and CLIP_benchmark.

A classifier is built from text alone: each class name is put into every prompt template, the
normalised text embeddings are averaged (a prompt ensemble, paper sec. 3.1.4) and re-normalised.
Metric names and semantics follow CLIP_benchmark so numbers are comparable with published tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources

import torch
import torch.nn.functional as F
import yaml

from clip_core.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

# Built-in prompt sets ``load_templates`` (and ``eval.templates``) accept by name.
BUILTIN_TEMPLATES = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "openai_imagenet_simple": SIMPLE_IMAGENET_TEMPLATES}
# Built-in class name lists (``eval.classnames``): OpenAI's names of the 1000 ImageNet classes, in class-index
# order (the sorted WordNet ids of an ImageNet ImageFolder).
BUILTIN_CLASSNAMES = {"openai_imagenet": IMAGENET_CLASSNAMES}


def load_templates(source: str | None = None) -> list[str]:
    """Prompt templates, each with a "{}" for the class name: None or "" = the default set shipped in
    clip_core/assets/templates.yaml; a ``BUILTIN_TEMPLATES`` name (``openai_imagenet``: the paper's 80);
    a YAML list of strings; or a ``.txt`` file with one template per line (CLIP_benchmark's
    ``zeroshot_classification_templates.txt``, whose ``{c}`` means the same as "{}")."""
    if source in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[source])
    if source and source.endswith(".txt"):
        with open(source, encoding="utf-8") as f:
            return templates_from_lines(f.read(), source)
    if source:
        with open(source, encoding="utf-8") as f:
            templates = yaml.safe_load(f)
    else:
        templates = yaml.safe_load(resources.files("clip_core").joinpath("assets/templates.yaml").read_text())
        source = "clip_core/assets/templates.yaml"
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{source}: expected a non-empty YAML list of prompt templates like 'a photo of a {{}}.' "
                         f"(or one of the built-in sets {sorted(BUILTIN_TEMPLATES)})")
    return _checked(templates, source)


def templates_from_lines(text: str, source: str) -> list[str]:
    """One template per non-empty line, CLIP_benchmark's ``{c}`` placeholder turned into "{}"."""
    templates = [line.strip().replace("{c}", "{}") for line in text.splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"{source}: no templates; write one per line, like 'a photo of a {{c}}.'")
    return _checked(templates, source)


def _checked(templates: list, source: str) -> list[str]:
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"{source}: every template must be a string containing one '{{}}' for the class name; "
                         f"fix {bad[:3]}")
    return templates


@torch.no_grad()
def build_zero_shot_classifier(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                               classnames: Sequence[str], templates: Sequence[str], device: str | torch.device = "cpu",
                               batch_size: int = 256) -> torch.Tensor:
    """Class weights (D, C): per class, the re-normalised mean of its normalised prompt embeddings.

    ``batch_size`` caps the prompts per ``encode_text`` call; whole classes go in each call
    (at least one), so a class's templates are averaged without crossing batches.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    classes_per_batch = max(1, batch_size // len(templates))
    weights = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start:start + classes_per_batch]
        tokens = tokenizer([template.format(name) for name in names for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        embeddings = embeddings.view(len(names), len(templates), -1).mean(dim=1)
        weights.append(F.normalize(embeddings, dim=-1))
    return torch.cat(weights).T


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1, top-5 (top-C when there are fewer than 5 classes), per-class recall and its mean over
    the classes that have samples (balanced accuracy, CLIP_benchmark's mean_per_class_recall), and the
    confusion matrix (rows: true class, columns: top-1 prediction). Classes without samples get
    recall None."""
    n, num_classes = logits.shape
    if n == 0 or targets.shape != (n,):
        raise ValueError(f"need logits (N, C) with N > 0 and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    targets = targets.to(logits.device).long()
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{targets.min().item()}, "
                         f"{targets.max().item()}]")
    top = logits.topk(min(5, num_classes), dim=1).indices
    hits = top == targets[:, None]
    predictions = top[:, 0]
    confusion = torch.bincount(targets * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    support = confusion.sum(dim=1)
    recall = [confusion[c, c].item() / support[c].item() if support[c] > 0 else None for c in range(num_classes)]
    present = [r for r in recall if r is not None]
    return {
        "acc1": hits[:, 0].float().mean().item(),
        "acc5": hits.any(dim=1).float().mean().item(),
        "mean_per_class_recall": sum(present) / len(present),
        "per_class_recall": recall,
        "confusion_matrix": confusion.tolist(),
    }


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), batch_size: int = 1024,
                      image_ok: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k with CLIP_benchmark's names, on cosine similarity (features are L2-normalised here):

    - ``image_retrieval_recall@k``: per text, is its image among the k most similar images;
    - ``text_retrieval_recall@k``: per image, is ANY of its texts among the k most similar texts.
    ``text_to_image[t]`` is the index of text t's image. k larger than the candidate set counts as
    the whole set. Queries are scored ``batch_size`` at a time, so memory stays O(batch x candidates).

    ``image_ok`` (bool per image, default all True) marks the images that could be read. The others
    are never retrieved (similarity -inf, whatever their features) and count as misses where they
    are the answer or the query, so an unreadable image can only lower the recalls.
    """
    if text_to_image.shape != (text_features.shape[0],) or not (
            0 <= text_to_image.min() and text_to_image.max() < image_features.shape[0]):
        raise ValueError(f"text_to_image must hold one image index in [0, {image_features.shape[0]}) per text "
                         f"({text_features.shape[0]} texts), got shape {tuple(text_to_image.shape)}")
    if image_ok is not None and image_ok.shape != (image_features.shape[0],):
        raise ValueError(f"image_ok must hold one bool per image ({image_features.shape[0]}), "
                         f"got shape {tuple(image_ok.shape)}")
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    text_to_image = text_to_image.to(images.device).long()
    image_ids = torch.arange(images.shape[0], device=images.device)
    ok = (torch.ones(images.shape[0], dtype=torch.bool, device=images.device) if image_ok is None
          else image_ok.to(images.device, torch.bool))

    def hit_ranks(queries: torch.Tensor, candidates: torch.Tensor, candidate_ok: torch.Tensor | None,
                  is_positive: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
        """(Q, max_k) bool: is the r-th best candidate of each query a positive."""
        max_k = min(max(ks), candidates.shape[0])
        out = []
        for start in range(0, queries.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            scores = queries[rows] @ candidates.T
            if candidate_ok is not None:
                scores = scores.masked_fill(~candidate_ok, float("-inf"))
            out.append(is_positive(scores.topk(max_k, dim=1).indices, rows))
        return torch.cat(out)

    text_hits = hit_ranks(texts, images, ok, lambda ranked, rows: (ranked == text_to_image[rows, None]) & ok[ranked])
    image_hits = hit_ranks(images, texts, None,
                           lambda ranked, rows: (text_to_image[ranked] == image_ids[rows, None]) & ok[rows, None])
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
    return metrics
