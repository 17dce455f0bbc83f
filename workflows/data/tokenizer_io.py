"""A tokenizer directory (``Tokenizer.save`` layout) on a local path or ``s3://``: one owner for both stages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from clip_core.tokenizer import CONFIG_FILE, Tokenizer
from workflows.common import storage
from workflows.common.errors import UserError


def tokenizer_exists(uri: str, endpoint: str = "") -> bool:
    """Whether ``uri`` holds a saved tokenizer (its config file is there)."""
    return bool(uri) and storage.exists(storage.join(uri, CONFIG_FILE), endpoint)


def load_tokenizer(uri: str, endpoint: str = "") -> Tokenizer:
    """Load the tokenizer saved under ``uri``; a missing or unreadable one is a UserError."""
    try:
        if not storage.is_s3(uri):
            return Tokenizer.load(uri)
        with tempfile.TemporaryDirectory() as tmp:
            return Tokenizer.load(storage.download_tree(uri, Path(tmp), endpoint))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer from {uri}: {exc}") from exc


def save_tokenizer(tok: Tokenizer, uri: str, endpoint: str = "") -> None:
    """Write every file of ``tok`` under ``uri`` (each write atomic)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        for name in sorted(os.listdir(tmp)):
            storage.write_bytes(storage.join(uri, name), Path(tmp, name).read_bytes(), endpoint)
