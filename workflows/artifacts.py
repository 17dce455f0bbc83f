"""The files one stage hands to another, each with one typed reader and writer.

Stages talk through files and the registry only. Each file here has exactly one owner, which is the
only code that spells its name or its keys:

- ``DataManifest``: ``manifest.json`` beside the training shards. `clipflow preprocess` writes it last
  (so its presence means the shards are complete); training, tracking and eval read it.
- ``TrainerState``: ``trainer_state.json`` of a checkpoint: where training stands (step, samples seen,
  data position) and what it was trained on. The training loop writes it; resume, the registry and
  the driver's resume checks read it.
- ``CheckpointInfo``: a checkpoint's metadata read straight from storage (local or ``s3://``) without
  downloading the weights: its file list (``checkpoint.json``), model name, tokenizer and trainer state.
  The file names themselves belong to ``clip_core.checkpoint``, which writes and verifies checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from clip_core.checkpoint import CONFIG_FILE, MANIFEST, TRAINER_STATE_FILE
from workflows.common import storage
from workflows.common.errors import UserError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
DATA_TOKENIZER_DIR = "tokenizer"  # the data's tokenizer, beside the shards
# Rows per Parquet row group of a training shard: the unit the training feed reads and shuffles.
ROW_GROUP_ROWS = 256


class ArtifactError(UserError):
    """A stage's input file that is missing or was not written by the stage that owns it."""


@dataclass
class DataManifest:
    """``manifest.json``: counts (input = written + duplicates + rejected by reason), the shards, the tokenizer.

    ``shards`` entries are ``{"path", "rows", "bytes", "sha256"}`` (paths relative to the data directory);
    ``extra`` keeps the rest of what preprocess records (sources, fingerprints, its config, ...).
    """

    shards: list[dict[str, Any]]
    tokenizer: str
    context_length: int
    image_size: int
    counts: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: str = DATA_TOKENIZER_DIR
    content_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("shards", "tokenizer", "context_length", "image_size")

    @staticmethod
    def uri(data: str) -> str:
        return storage.join(data, MANIFEST_FILE)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DataManifest":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in names},
                   extra={k: v for k, v in raw.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {"version": MANIFEST_VERSION, **self.extra}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return out

    @classmethod
    def read(cls, data: str, endpoint: str = "") -> "DataManifest":
        """The manifest of the training data at ``data``; a clear error when it is absent or foreign."""
        uri = cls.uri(data)
        if not storage.exists(uri, endpoint):
            raise ArtifactError(f"no training data manifest at {uri}; run `clipflow preprocess` first or set train.data")
        try:
            raw = json.loads(storage.read_bytes(uri, endpoint))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{uri} is not valid JSON ({exc}); re-run `clipflow preprocess`") from exc
        missing = [k for k in cls.REQUIRED if not isinstance(raw, dict) or k not in raw]
        if missing:
            raise ArtifactError(f"{uri} lacks {missing}; it was not written by `clipflow preprocess`")
        return cls.from_dict(raw)

    @classmethod
    def read_if_present(cls, data: str, endpoint: str = "") -> "DataManifest | None":
        """The manifest, or None when there is none (a damaged one is a clear error)."""
        return cls.read(data, endpoint) if storage.exists(cls.uri(data), endpoint) else None

    def write(self, data: str, endpoint: str = "") -> str:
        """Atomically, as the last file of a preprocess run; returns its URI."""
        uri = self.uri(data)
        storage.write_bytes(uri, (json.dumps(self.to_dict(), indent=2) + "\n").encode(), endpoint)
        return uri

    def tokenizer_uri(self, data: str) -> str:
        return storage.join(data, self.tokenizer_path)

    def shard_uris(self, data: str) -> list[tuple[str, int]]:
        """(URI, rows) of every shard, in order."""
        return [(storage.join(data, s["path"]), int(s["rows"])) for s in self.shards]


@dataclass(frozen=True)
class TrainerState:
    """``trainer_state.json``: a checkpoint's place in the run. ``step`` global batches of
    ``global_batch_size`` are done, so the data position is (epoch, steps_done_in_epoch) of the
    order with ``data_seed``; see ``workflows.train.feed`` for why that resumes exactly."""

    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    steps_done_in_epoch: int = 0
    global_batch_size: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    data_seed: int = 0
    data_manifest_hash: str = ""
    run_name: str = ""
    loss: float = 0.0
    samples_per_second: float = 0.0
    mlflow_run_id: str = ""
    world_size: int = 0
    # How the run began (a checkpoint that predates these fields reads as ""): the model.pretrained it was
    # initialised from, as given (a models:/ URI before resolution), and the train.resume_from it started at.
    # A new driver continues the run only with the same two values (``train.driver``).
    pretrained: str = ""
    resume_from: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainerState":
        """From a checkpoint's trainer state (``{}`` for a fresh run); keys it does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory (local or ``s3://``) says about itself, read without its weights."""

    uri: str
    files: dict[str, str]  # name -> sha256, from checkpoint.json
    tokenizer_id: str
    model_name: str
    trainer_state: TrainerState | None  # None: saved without one (not a training checkpoint)

    @classmethod
    def read(cls, uri: str, endpoint: str = "") -> "CheckpointInfo":
        try:
            meta = _read_json(storage.join(uri, MANIFEST), endpoint)
            model = _read_json(storage.join(uri, CONFIG_FILE), endpoint)
            state = (_read_json(storage.join(uri, TRAINER_STATE_FILE), endpoint)
                     if TRAINER_STATE_FILE in meta.get("files", {}) else None)
        except (OSError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{uri} is not a clipflow checkpoint ({exc})") from exc
        return cls(uri, dict(meta.get("files", {})), str(meta.get("tokenizer_id", "")), str(model.get("name", "")),
                   None if state is None else TrainerState.from_dict(state))

    @staticmethod
    def is_complete(uri: str, endpoint: str = "") -> bool:
        """Every file its checkpoint.json lists exists (cheap: no hashing; clip_core verifies on load).
        False while an asynchronous upload is still under way, or after Ray deleted the checkpoint."""
        try:
            files = _read_json(storage.join(uri, MANIFEST), endpoint)["files"]
            return all(storage.exists(storage.join(uri, name), endpoint) for name in files)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @staticmethod
    def has_file_list(uri: str, endpoint: str = "") -> bool:
        """Its checkpoint.json exists (the file list that clip_core verifies the rest against)."""
        return storage.exists(storage.join(uri, MANIFEST), endpoint)


def _read_json(uri: str, endpoint: str) -> Any:
    return json.loads(storage.read_bytes(uri, endpoint))
