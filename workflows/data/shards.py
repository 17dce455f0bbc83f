"""Training shards: their schema, how the surviving samples are cut into them, and the tasks that write them.

Shard ``k`` holds survivors ``[k*R, (k+1)*R)`` of the canonical order (part order, then row order; R =
``preprocess.rows_per_shard``), so what a shard holds depends on the data only. The driver turns the
per-part survivor counts into that plan (a few integers per shard) and one Ray task per shard reads
the slices of the one or two parts it needs, drops their rejects and duplicates, and writes the
shard: no sample passes through the driver. A finished shard leaves a small marker in the work
directory; an interrupted run verifies it (sha256) and reuses the shard.

Schema (also in each file's key-value metadata under ``clipflow.schema``):

    key      string          the sample's key in its input (webdataset key, Parquet key/row, manifest path)
    image    binary          JPEG, ``image_size`` px (centre-cropped square, or the short side with keep_aspect)
    caption  string          the cleaned caption (UTF-8, control characters dropped, whitespace collapsed)
    tokens   list<int32>     the caption's BPE ids, ``context_length`` long (SOT ... EOT, zero padded)

Row groups hold ``ROW_GROUP_ROWS`` rows: the unit the training feed reads. Any Parquet reader reads the
shards: ``ray.data.read_parquet(dir)`` as is, pyarrow with ``pyarrow.dataset.dataset(dir, format="parquet",
exclude_invalid_files=True)`` (the directory also holds ``manifest.json`` and the tokenizer) or the
shard paths the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflows.artifacts import ROW_GROUP_ROWS
from workflows.common import storage
from workflows.common.log import Progress
from workflows.data.dedup import drops_uri, part_drops, read_drops

SHARD_NAME = "shard-{:05d}.parquet"
SHARD_PATTERN = re.compile(r"shard-\d{5,}\.parquet")
MARKER_SUFFIX = ".json"  # a finished shard's marker: its name + this, in the run's work directory
COLUMNS = ["key", "image", "caption", "tokens"]
IN_FLIGHT_PER_CPU = 2  # shard tasks submitted ahead per cluster CPU: keeps every CPU busy, bounds the driver
SCHEMA_DOC = {
    "version": 1,
    "columns": {
        "key": "string: the sample's key in its input",
        "image": "binary: JPEG at the manifest's image_size",
        "caption": "string: the cleaned caption",
        "tokens": "list<int32>: BPE ids of the caption, context_length long",
    },
    "row_group_rows": ROW_GROUP_ROWS,
}


@dataclass(frozen=True)
class Piece:
    """Survivors ``[lo, hi)`` of part ``part`` (indices among that part's survivors)."""

    part: int
    lo: int
    hi: int


def plan(kept: list[int], rows_per_shard: int) -> list[list[Piece]]:
    """Cut the survivors of the parts, in order, into shards of ``rows_per_shard`` (the last may be short)."""
    ends = np.cumsum(kept)
    total = int(ends[-1]) if len(kept) else 0
    shards = []
    for start in range(0, total, rows_per_shard):
        stop = min(start + rows_per_shard, total)
        first = int(np.searchsorted(ends, start, side="right"))
        pieces = []
        for part in range(first, len(kept)):
            begin = int(ends[part]) - kept[part]
            if begin >= stop:
                break
            lo, hi = max(start, begin) - begin, min(stop, int(ends[part])) - begin
            if hi > lo:
                pieces.append(Piece(part, lo, hi))
        shards.append(pieces)
    return shards


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes (fixed row groups and codec; no timestamps in the file)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    return sink.getvalue().to_pybytes()


def verify(uri: str, sha256: str, endpoint: str) -> bool:
    try:
        return hashlib.sha256(storage.read_bytes(uri, endpoint)).hexdigest() == sha256
    except FileNotFoundError:
        return False


def write_all(shards: list[list[Piece]], part_uris: list[str], groups: list[range], *,
              out: str, work: str, endpoint: str, metadata: dict[str, str],
              on_shard: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Write every shard in a Ray task (reusing verified ones); returns the manifest entries and the reuse count.

    At most ``IN_FLIGHT_PER_CPU`` tasks per cluster CPU are submitted at a time, so the driver holds a
    bounded number of task specs whatever the shard count. If the caller's ``on_shard`` (or anything
    else) interrupts, the tasks in flight are cancelled and awaited: when this returns or raises, no
    task of it is still writing.
    """
    import ray

    starts = [g.start for g in groups]
    task = ray.remote(_write_shard)
    window = max(4, int(IN_FLIGHT_PER_CPU * ray.cluster_resources().get("CPU", 1)))
    todo = iter(enumerate(shards))
    pending: dict[Any, int] = {}

    def submit() -> None:
        for index, pieces in todo:
            drops = [drops_uri(work, int(np.searchsorted(starts, p.part, side="right")) - 1) for p in pieces]
            pending[task.remote(index, pieces, [part_uris[p.part] for p in pieces], drops, out, work, endpoint,
                                metadata)] = index
            if len(pending) >= window:
                return

    entries: list[dict[str, Any] | None] = [None] * len(shards)
    reused = 0
    try:
        with Progress(len(shards), "preprocess: write shards", "shards") as bar:
            submit()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                entries[index], was_reused = ray.get(done[0])
                reused += was_reused
                bar.update(1)
                if on_shard is not None:
                    on_shard(index)
                submit()
    finally:
        if pending:
            for ref in pending:
                ray.cancel(ref)
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
    return [e for e in entries if e is not None], reused


def _write_shard(index: int, pieces: list[Piece], uris: list[str], drops: list[str], out: str, work: str,
                 endpoint: str, metadata: dict[str, str]) -> tuple[dict[str, Any], bool]:
    """One shard: ``pieces[i]`` is cut from the part at ``uris[i]``, whose group's drop list is at ``drops[i]``."""
    name = SHARD_NAME.format(index)
    uri, marker = storage.join(out, name), storage.join(work, name + MARKER_SUFFIX)
    rows = sum(p.hi - p.lo for p in pieces)
    try:
        entry = json.loads(storage.read_bytes(marker, endpoint))
        if entry["rows"] == rows and verify(uri, entry["sha256"], endpoint):
            return entry, True
    except FileNotFoundError:
        pass
    tables = []
    for piece, part_uri, drop_uri in zip(pieces, uris, drops):
        part = pq.read_table(storage.open_input(part_uri, endpoint), columns=["status", *COLUMNS])
        keep = part.column("status").to_numpy(zero_copy_only=False) == ""
        keep[part_drops(read_drops(drop_uri, endpoint), piece.part)] = False
        survivors = np.flatnonzero(keep)[piece.lo:piece.hi]
        tables.append(part.select(COLUMNS).take(pa.array(survivors)))
    table = pa.concat_tables(tables).combine_chunks()
    table = table.replace_schema_metadata({**metadata, "clipflow.schema": json.dumps(SCHEMA_DOC, sort_keys=True)})
    data = parquet_bytes(table)
    entry = {"path": name, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes(uri, data, endpoint)
    storage.write_bytes(marker, json.dumps(entry).encode(), endpoint)
    return entry, False



def marked(work_root: str, endpoint: str) -> set[str]:
    """Names of the shards whose markers lie under ``work_root`` (this and earlier runs' work directories)."""
    names = {storage.basename(u).removesuffix(MARKER_SUFFIX)
             for u in storage.list_files(work_root, endpoint, recursive=True)}
    return {n for n in names if SHARD_PATTERN.fullmatch(n)}
