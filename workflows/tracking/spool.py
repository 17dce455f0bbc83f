"""The durable spool of a training run's MLflow records that the server has not taken yet.

While the tracking server is down (or when a run ends before it came back), what is still pending --
metric points, artifacts to upload, checkpoint publications and the run's end status -- is written to
``<storage.path>/<run name>/mlflow-spool/``, next to the run's checkpoints (local or ``s3://``):
``pending.jsonl`` (one JSON object a line: a ``run`` header first, then ``metric``, ``group_start``,
``artifact``, ``publication`` and ``end`` records; no pickles) and ``config.yaml`` (the run's resolved config,
credentials scrubbed, for a run that must still be created). Each write replaces ``pending.jsonl`` whole and atomically
(``storage.write_bytes``), so a reader never sees half a spool; it is deleted once everything is delivered.
The next attempt of the same run (same run name), the driver ending the run, or ``clipflow sync <dir>``
delivers it. This module is the only one that spells these file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mlflow.entities import Metric

from workflows.common import storage
from workflows.common.errors import UserError
from workflows.tracking.publisher import Publication

SPOOL_DIR = "mlflow-spool"
PENDING_FILE = "pending.jsonl"
CONFIG_FILE = "config.yaml"
SPOOL_VERSION = 1


class GroupStart(NamedTuple):
    """A worker group started at ``step`` with ``world_size`` workers (``restored``: from a checkpoint at that step).
    Pending until the run is open: its number among the run's group starts is only known from the server."""

    step: int
    world_size: int
    restored: bool
    timestamp: int  # ms, when the group started


@dataclass
class SpoolContents:
    """What a spool holds: the run it belongs to and what that run's server has not taken yet."""

    run_key: str
    tracking_uri: str  # credentials scrubbed: `clipflow sync` takes the real one from the config or environment
    run_id: str = ""  # "" while the run could not be created
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    group_starts: list[GroupStart] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    publications: list[Publication] = field(default_factory=list)
    end: str = ""  # the status the run ended with ("" while it runs)

    def to_lines(self) -> bytes:
        header = {"kind": "run", "version": SPOOL_VERSION, "run_key": self.run_key, "run_id": self.run_id,
                  "tracking_uri": self.tracking_uri, "tags": self.tags}
        records = [header]
        records += [{"kind": "metric", "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                    for m in self.metrics]
        records += [{"kind": "group_start", **g._asdict()} for g in self.group_starts]
        records += [{"kind": "artifact", "local_path": p, "artifact_path": a} for p, a in self.artifacts]
        records += [{"kind": "publication", **p._asdict()} for p in self.publications]
        if self.end:
            records.append({"kind": "end", "status": self.end})
        return "".join(json.dumps(r) + "\n" for r in records).encode()

    @classmethod
    def from_lines(cls, data: bytes, where: str) -> "SpoolContents":
        """Parse a spool; anything that is not one is refused whole, naming the line (nothing half-delivered)."""
        lines = data.decode("utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
            if header.get("kind") != "run" or header.get("version") != SPOOL_VERSION:
                raise ValueError(f"its first line is not a version-{SPOOL_VERSION} run header")
            out = cls(run_key=str(header["run_key"]), tracking_uri=str(header["tracking_uri"]),
                      run_id=str(header.get("run_id", "")), tags={str(k): str(v) for k, v in header["tags"].items()})
            for number, line in enumerate(lines[1:], start=2):
                out._add(json.loads(line), number)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{where} is not a clipflow MLflow spool ({exc}); it was not written by clipflow, "
                            f"or was edited: restore it or delete it") from None
        return out

    def _add(self, record: dict[str, Any], number: int) -> None:
        kind = record.get("kind")
        if kind == "metric":
            self.metrics.append(Metric(str(record["key"]), float(record["value"]), int(record["timestamp"]),
                                       int(record["step"])))
        elif kind == "group_start":
            self.group_starts.append(GroupStart(int(record["step"]), int(record["world_size"]),
                                                bool(record["restored"]), int(record["timestamp"])))
        elif kind == "artifact":
            self.artifacts.append((str(record["local_path"]), record["artifact_path"]))
        elif kind == "publication":
            self.publications.append(Publication(str(record["checkpoint_uri"]), int(record["step"]),
                                                 int(record["samples_seen"]), bool(record["final"])))
        elif kind == "end":
            self.end = str(record["status"])
        else:
            raise ValueError(f"line {number}: unknown record kind {kind!r}")


class Spool:
    """The spool directory of one run (it need not exist yet)."""

    def __init__(self, directory: str, endpoint: str = "") -> None:
        self.directory = directory
        self.endpoint = endpoint

    @classmethod
    def for_run(cls, storage_path: str, run_key: str, endpoint: str = "") -> "Spool":
        """Next to the run's checkpoints (Ray Train's run directory is ``storage.path/<run name>``)."""
        return cls(storage.join(storage_path, run_key, SPOOL_DIR), endpoint)

    @classmethod
    def find(cls, path: str, endpoint: str = "") -> "Spool":
        """The spool at ``path``: a spool directory, or a run directory holding one."""
        if not storage.exists(path, endpoint):
            raise UserError(f"{path} does not exist; give the run's directory (storage.path/<run name>) or its "
                            f"{SPOOL_DIR}/ directory, as the message that asked for `clipflow sync` named it")
        if storage.basename(path) == SPOOL_DIR or storage.exists(storage.join(path, PENDING_FILE), endpoint):
            return cls(path, endpoint)
        return cls(storage.join(path, SPOOL_DIR), endpoint)

    @property
    def pending_uri(self) -> str:
        return storage.join(self.directory, PENDING_FILE)

    @property
    def config_uri(self) -> str:
        return storage.join(self.directory, CONFIG_FILE)

    def read(self) -> SpoolContents | None:
        """The spool's contents; None when there is none (nothing pending)."""
        if not storage.exists(self.pending_uri, self.endpoint):
            return None
        return SpoolContents.from_lines(storage.read_bytes(self.pending_uri, self.endpoint), self.pending_uri)

    def write(self, contents: SpoolContents, config_yaml: str) -> None:
        """Config first, then the records: the records' presence means the spool is whole."""
        storage.write_bytes(self.config_uri, config_yaml.encode(), self.endpoint)
        storage.write_bytes(self.pending_uri, contents.to_lines(), self.endpoint)

    def delete(self) -> None:
        """Everything was delivered: the records go first (a spool without them holds nothing)."""
        storage.delete(self.pending_uri, self.endpoint)
        storage.delete(self.directory, self.endpoint)
