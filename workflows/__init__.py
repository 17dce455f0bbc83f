"""clipflow's orchestration: Ray Data preprocessing, Ray Train pretraining, MLflow tracking and eval.

Subpackages, each importing only those above it: ``common`` (config, errors, storage, runtime, log) and
``artifacts`` (the files stages hand over), ``data``, ``train``, ``tracking``, ``eval``, ``ops`` (the CLI).
``from workflows import DataOrder, Shard`` is the training order (``workflows.train.feed``), loaded on first
use so that importing any module here stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataOrder", "Shard"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from workflows.train import feed

        return getattr(feed, name)
    raise AttributeError(f"module 'workflows' has no attribute {name!r}")
