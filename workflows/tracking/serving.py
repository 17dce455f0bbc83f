"""Inference on a checkpoint: image/text embeddings and zero-shot probabilities, and its MLflow pyfunc.

The eval job and the served model share these functions, so what `mlflow models serve` answers is
what the eval numbers measured. This module imports only clip_core, torch, numpy, PIL, pandas and
mlflow: it is shipped inside the logged model (``code_paths``) so the pyfunc loads without clipflow
installed.

Serving input (``mlflow models serve``, JSON ``dataframe_records`` or ``dataframe_split``): rows with an
``image`` (base64 text of an image file; Python callers may pass bytes) and/or a ``text`` (a string); a
missing or null value means the row has none (``inputs``/``instances`` work for rows without nulls only:
MLflow turns a null there into the text "None"). Output, one row per input row:
``image_embedding`` and ``text_embedding`` (L2-normalised, null where the row has no such input) and
``similarity`` (their cosine, for rows with both); with ``params={"candidate_labels": [...]}`` also
``probs`` (one per label, in order, from the prompt ensemble) and ``label`` (the most probable one),
null for rows without an image. The logged model's ``signature()`` declares exactly this.

``image`` is declared as a string column, not MLflow's ``binary``: the scoring server base64-decodes a
binary column value by value before the model sees it, and fails the whole request with HTTP 400 on
the first null, so rows without an image could not be sent next to rows with one.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from clip_core import build_zero_shot_classifier, load_checkpoint
from clip_core.embed import embed_images, embed_texts, images_to_tensor, model_image_size

CHECKPOINT_ARTIFACT = "checkpoint"
CLASSIFIER_CACHE_SIZE = 64  # label sets whose zero-shot classifier a loaded model keeps (least recently used out)
IMAGE_BATCH = 64  # images per forward pass, so a large request does not hold all activations at once
# Labels one request may name: ImageNet's 1000 classes fit. Each label is encoded in every template (1000 x 80
# texts with the paper's ImageNet templates) before the answer, and its classifier stays cached, so an unbounded list
# would let one request hold the server's CPU and memory.
MAX_CANDIDATE_LABELS = 1000
MAX_LISTED_PROBLEMS = 5  # rows a rejection names one by one


def _image_bytes(value: Any) -> bytes:
    """JSON carries images as base64 text (line breaks allowed, as ``base64`` wraps it); Python may pass bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"image must be base64 text, got {type(value).__name__}")
    if value == "None":
        raise ValueError("image is the text 'None', which MLflow's 'inputs' and 'instances' formats make of a "
                         "JSON null: send rows without an image as dataframe_records or dataframe_split")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"image is not base64 text ({exc})") from exc


def _present(value: Any) -> bool:
    """JSON null, a key missing from a record (NaN once in a DataFrame) and pandas' NA all mean 'none'."""
    return value is not None and value is not pd.NA and not (isinstance(value, float) and np.isnan(value))


def _column(frame: pd.DataFrame, name: str) -> list[Any]:
    return frame[name].tolist() if name in frame else [None] * len(frame)


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """A clip_core checkpoint (the ``checkpoint`` artifact) as an MLflow pyfunc, logged as code
    (``serving_model.py``); the zero-shot prompt templates are the ``templates`` of its model config.

    Building a classifier encodes every label in every template (8 labels x 16 templates = 128 texts),
    far more than embedding one image, so classifiers are cached per label tuple (the templates are
    fixed for a loaded model).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.templates = tuple(context.model_config["templates"])
        checkpoint = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer
        self.logit_scale = self.model.logit_scale.exp().item()
        self.classifier = functools.lru_cache(maxsize=CLASSIFIER_CACHE_SIZE)(self._build_classifier)

    def _build_classifier(self, labels: tuple[str, ...]) -> torch.Tensor:
        return build_zero_shot_classifier(self.model, self.tokenizer, labels, self.templates)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        """Embeddings of the rows' images and texts, their similarity, and zero-shot ``probs``/``label``.

        The DataFrame hint is one MLflow accepts without inferring a signature from it: the explicit
        ``signature()`` stays the contract, and MLflow turns any request into a DataFrame by it.
        Unusable rows fail the whole request with one message naming them, before any model work.
        """
        if not {"image", "text"} & set(model_input.columns):
            raise MlflowException.invalid_parameter_value(
                "input needs an 'image' column (base64 text of an image file) and/or a 'text' column "
                "(MLflow drops any other column before the model sees it)")
        labels = _checked_labels((params or {}).get("candidate_labels") or ())
        images, texts = _column(model_input, "image"), _column(model_input, "text")
        pixels, image_rows, text_rows = self._checked_rows(images, texts)
        n = len(model_input)
        image_embeddings: list[Any] = [None] * n
        text_embeddings: list[Any] = [None] * n
        similarity: list[Any] = [None] * n
        probs: list[Any] = [None] * n
        if image_rows:
            features = torch.cat([embed_images(self.model, torch.cat(pixels[i:i + IMAGE_BATCH]))
                                  for i in range(0, len(pixels), IMAGE_BATCH)])
            _scatter(image_embeddings, image_rows, features)
            if labels:
                _scatter(probs, image_rows, (self.logit_scale * features @ self.classifier(labels)).softmax(dim=-1))
        if text_rows:
            features = embed_texts(self.model, self.tokenizer, [texts[i] for i in text_rows])
            _scatter(text_embeddings, text_rows, features)
        for row in set(image_rows) & set(text_rows):
            similarity[row] = float(np.dot(image_embeddings[row], text_embeddings[row]))
        out = pd.DataFrame({"image_embedding": pd.Series(image_embeddings, dtype=object),
                            "text_embedding": pd.Series(text_embeddings, dtype=object),
                            "similarity": pd.Series(similarity, dtype=object)})
        if labels:
            out["probs"] = pd.Series(probs, dtype=object)
            out["label"] = pd.Series([labels[int(np.argmax(p))] if p is not None else None for p in probs],
                                     dtype=object)
        return out

    def _checked_rows(self, images: list[Any], texts: list[Any]) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """Decoded pixels of the image rows, the image rows and the text rows; a MlflowException names bad rows."""
        size = model_image_size(self.model)
        pixels, image_rows, text_rows, problems = [], [], [], []
        for row, (image, text) in enumerate(zip(images, texts)):
            if not _present(image) and not _present(text):
                problems.append(f"row {row}: neither an image nor a text")
            if _present(text):
                if isinstance(text, str):
                    text_rows.append(row)
                else:
                    problems.append(f"row {row}: text must be a string, got {type(text).__name__}")
            if _present(image):
                try:
                    pixels.append(images_to_tensor([_image_bytes(image)], size))
                    image_rows.append(row)
                except ValueError as exc:  # not base64, or not a readable image (ImageDecodeError)
                    problems.append(f"row {row}: {exc}")
        if problems:
            more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
            raise MlflowException.invalid_parameter_value(
                f"{len(problems)} problem(s) in {len(images)} rows: {'; '.join(problems[:MAX_LISTED_PROBLEMS])}{more}. "
                f"Send each image as base64 text of an image file and each text as a string; null means none")
        return pixels, image_rows, text_rows


def _checked_labels(given: Any) -> tuple[str, ...]:
    """The request's candidate labels; a MlflowException (HTTP 400) when they cannot name classes."""
    labels = tuple(given)
    problems = []
    if len(labels) > MAX_CANDIDATE_LABELS:
        problems.append(f"{len(labels)} candidate_labels, more than the {MAX_CANDIDATE_LABELS} one request may "
                        "name: send fewer, or score a larger label set offline as an eval set (`clipflow eval`)")
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        problems.append("every candidate label must be a non-empty string")
    if len(set(labels)) < len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})[:MAX_LISTED_PROBLEMS]
        problems.append(f"candidate_labels repeat {', '.join(map(repr, repeated))}: each label must be given once, "
                        "else its probability is split between its copies")
    if problems:
        raise MlflowException.invalid_parameter_value("; ".join(problems))
    return labels


def _scatter(column: list[Any], rows: list[int], values: torch.Tensor) -> None:
    """Write ``values`` (one per entry of ``rows``) into ``column`` at those rows, as plain lists for JSON."""
    for row, value in zip(rows, values.tolist()):
        column[row] = value


def signature():
    """Optional ``image``/``text`` columns and a ``candidate_labels`` param, so serving passes them through;
    the outputs are declared too, so the MLflow UI shows the response's shape."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image", required=False),
                       ColSpec(DataType.string, "text", required=False)]),
        outputs=Schema([ColSpec(Array(DataType.double), "image_embedding", required=False),
                        ColSpec(Array(DataType.double), "text_embedding", required=False),
                        ColSpec(DataType.double, "similarity", required=False),
                        ColSpec(Array(DataType.double), "probs", required=False),
                        ColSpec(DataType.string, "label", required=False)]),
        params=ParamSchema([ParamSpec("candidate_labels", DataType.string, default=[], shape=(-1,))]),
    )
