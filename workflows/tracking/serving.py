"""Inference on a checkpoint: image/text embeddings and zero-shot probabilities, and its MLflow pyfunc.

The eval job and the served model share these functions, so what `mlflow models serve` answers is
what the eval numbers measured. This module imports only clip_core, torch, numpy, PIL, pandas and
mlflow: it is shipped inside the logged model (``code_paths``) so the pyfunc loads without clipflow
installed.

Serving input (``mlflow models serve``, JSON ``dataframe_records``): rows with an ``image`` column
(raw bytes or base64 text) and/or a ``text`` column. Output: one ``embedding`` (L2-normalised) per
row; with ``params={"candidate_labels": [...]}`` image rows also get ``probs`` (one per label, in
order, from the prompt ensemble) and ``label`` (the most probable one). The logged model's
``signature()`` declares exactly this, so serving checks requests against it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from clip_core import build_zero_shot_classifier, load_checkpoint
from clip_core.embed import embed_images, embed_texts, images_to_tensor, model_image_size

CHECKPOINT_ARTIFACT = "checkpoint"


def _as_bytes(value: Any) -> bytes:
    """Serving sends images as base64 text in JSON; Python callers may pass bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"image must be bytes or base64 text: {exc}") from exc
    raise ValueError(f"image must be bytes or base64 text, got {type(value).__name__}")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """A clip_core checkpoint (the ``checkpoint`` artifact) as an MLflow pyfunc, logged as code
    (``serving_model.py``); the zero-shot prompt templates are the ``templates`` of its model config."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.templates = list(context.model_config["templates"])
        checkpoint = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        """Embeddings of the rows, plus zero-shot ``probs``/``label`` of image rows given candidate labels.

        The DataFrame hint is one MLflow accepts without inferring a signature from it: the explicit
        ``signature()`` stays the contract, and MLflow turns any request into a DataFrame by it.
        """
        if not {"image", "text"} & set(model_input.columns):
            raise ValueError("input needs an 'image' (bytes or base64) or a 'text' column")
        labels = list((params or {}).get("candidate_labels") or [])
        n = len(model_input)
        images = model_input["image"].tolist() if "image" in model_input else [None] * n
        texts = model_input["text"].tolist() if "text" in model_input else [None] * n
        image_rows = [i for i in range(n) if _present(images[i])]
        text_rows = [i for i in range(n) if _present(texts[i]) and i not in set(image_rows)]
        embeddings: list[Any] = [None] * n
        probs: list[Any] = [None] * n
        if image_rows:
            pixels = images_to_tensor([_as_bytes(images[i]) for i in image_rows], model_image_size(self.model))
            features = embed_images(self.model, pixels)
            if labels:
                classifier = build_zero_shot_classifier(self.model, self.tokenizer, labels, self.templates)
                scale = self.model.logit_scale.exp().item()
                image_probs = (scale * features @ classifier).softmax(dim=-1)
                for row, p in zip(image_rows, image_probs.tolist()):
                    probs[row] = p
            for row, f in zip(image_rows, features.tolist()):
                embeddings[row] = f
        if text_rows:
            features = embed_texts(self.model, self.tokenizer, [texts[i] for i in text_rows])
            for row, f in zip(text_rows, features.tolist()):
                embeddings[row] = f
        out = pd.DataFrame({"embedding": embeddings})
        if labels:
            out["probs"] = probs
            out["label"] = [labels[int(np.argmax(p))] if p is not None else None for p in probs]
        return out


def signature():
    """Optional ``image``/``text`` columns and a ``candidate_labels`` param, so serving passes them through."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image", required=False),
                       ColSpec(DataType.string, "text", required=False)]),
        params=ParamSchema([ParamSpec("candidate_labels", DataType.string, default=[], shape=(-1,))]),
    )
