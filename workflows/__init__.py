"""clipflow's orchestration: Ray Data preprocessing, Ray Train pretraining, MLflow tracking and eval.

Subpackages, each importing only those above it: ``common`` (config, errors, storage, runtime, log) and
``artifacts`` (the files stages hand over), ``data``, ``train``, ``tracking``, ``eval``, ``ops`` (the CLI).
``from workflows import DataOrder`` is the training order (``workflows.train.feed``), loaded on first use
so that importing any module here stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataOrder"]


def __getattr__(name: str) -> Any:
    if name == "DataOrder":
        from workflows.train.feed import DataOrder

        return DataOrder
    raise AttributeError(f"module 'workflows' has no attribute {name!r}")
