"""Exact dedup over the whole data set in Ray tasks: a hash-partitioned shuffle of 24 bytes a sample.

    parts ─map (M tasks)─► P buckets ─reduce (P tasks)─► duplicates ─gather (M tasks)─► drops per part group
    count outcomes,         by digest  sort; all but the first       back to the group
    bucket the digests                 copy are duplicates           that read them

"First occurrence in canonical order wins" (part order, then row order inside the part, i.e. the
input's own order): a reduce task sees every copy of a digest, because all of them land in the same
bucket, and keeps the smallest (part, row). The winner therefore depends on the data only, never on
M, P or which task finished first, and the shards cut from the survivors are byte-identical for any
task counts (a test runs several).

The shuffle goes through files in the run's work directory (beside the part files, so local on one
machine, shared or ``s3://`` on a cluster), never through the driver or its object store: a small
task result is stored in the memory of the process that submitted the task, so buckets returned as
task results would land in the driver's heap. Each file is a header of ``int64`` offsets followed by
fixed-size records, and a reader fetches only its byte range. The driver gets back per-part counts
only, so its memory and I/O do not grow with the samples. The map tasks read only the ``status`` and
``hash`` columns of the parts (about 1% of their bytes); a reduce task holds its bucket, 24 bytes a
sample (400M samples / 256 buckets: 38 MB).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.common import storage

MAX_TASKS = 256  # cap on M and P: bounds the shuffle's file count and the reads a reduce task makes
SAMPLES_PER_BUCKET = 1_000_000  # auto P: about this many accepted samples per reduce task
SHUFFLE_DIR = "dedup"
MAP_FILE, DUPS_FILE, DROPS_FILE = "map-{:05d}.bin", "dups-{:05d}.bin", "drops-{:05d}.bin"
# One record of the shuffle: the 16-byte digest as two integers, and where the sample is.
ENTRY = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("part", "<i4"), ("row", "<i4")])
DROP = np.dtype([("part", "<i4"), ("row", "<i4")])
OFFSET = np.dtype("<i8")


@dataclass
class PartOutcome:
    """One part's outcome counts."""

    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0

    @property
    def kept(self) -> int:
        return self.accepted - self.duplicates


def task_counts(parts: int, samples: int, map_tasks: int = 0, partitions: int = 0) -> tuple[int, int]:
    """(M, P): the configured counts, or ones sized from the data (0 = auto)."""
    m = map_tasks or min(MAX_TASKS, parts)
    p = partitions or min(MAX_TASKS, max(1, math.ceil(samples / SAMPLES_PER_BUCKET)))
    return max(1, min(m, parts)), p


def groups(parts: int, m: int) -> list[range]:
    """``parts`` split into ``m`` contiguous, near-equal groups (a map task each)."""
    bounds = np.linspace(0, parts, m + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def find_duplicates(part_uris: list[str], work: str, endpoint: str, *, dedup: bool,
                    tasks: tuple[int, int]) -> tuple[list[PartOutcome], list[range]]:
    """Every part's outcome counts, and the part groups whose drop lists (``drops_uri``) the shuffle wrote.

    ``tasks`` is (M, P), as ``task_counts`` sizes them; with ``dedup=False`` only the counts are
    gathered and no file is written.
    """
    import ray

    m, p = tasks
    part_groups = groups(len(part_uris), m)
    shuffle = storage.join(work, SHUFFLE_DIR)
    mapped = [ray.remote(_bucket_digests).remote(i, g, [part_uris[j] for j in g], shuffle, endpoint,
                                                 p if dedup else 0) for i, g in enumerate(part_groups)]
    outcomes = [stats for group in ray.get(mapped) for stats in group]
    if not dedup:
        return outcomes, part_groups
    starts = np.array([g.start for g in part_groups])
    ray.get([ray.remote(_duplicates_in_bucket).remote(b, p, len(part_groups), starts, shuffle, endpoint)
             for b in range(p)])
    counts = ray.get([ray.remote(_gather_drops).remote(i, g, len(part_groups), p, shuffle, endpoint)
                      for i, g in enumerate(part_groups)])
    for group, per_part in zip(part_groups, counts):
        for offset, count in enumerate(per_part):
            outcomes[group.start + offset].duplicates = count
    return outcomes, part_groups


def drops_uri(work: str, group: int) -> str:
    return storage.join(work, SHUFFLE_DIR, DROPS_FILE.format(group))


def read_drops(uri: str, endpoint: str) -> np.ndarray:
    """A part group's duplicates, sorted by (part, row); none when dedup was off (no file)."""
    try:
        return np.frombuffer(storage.read_bytes(uri, endpoint), DROP)
    except FileNotFoundError:
        return np.zeros(0, DROP)


def part_drops(drops: np.ndarray, part: int) -> np.ndarray:
    """Rows of ``part`` that are duplicates (``drops`` is its group's sorted list)."""
    lo, hi = np.searchsorted(drops["part"], [part, part + 1])
    return drops["row"][lo:hi]


# ---- the tasks ------------------------------------------------------------------------------------------

def _bucket_digests(index: int, group: range, uris: list[str], shuffle: str, endpoint: str,
                    p: int) -> list[PartOutcome]:
    """Map: count each part's outcomes; with ``p`` buckets, write its accepted samples' digests by bucket."""
    stats, entries = [], []
    for part, uri in zip(group, uris):
        table = pq.read_table(storage.open_input(uri, endpoint), columns=["status", "hash"])
        status = table.column("status").to_numpy(zero_copy_only=False)
        accepted = np.flatnonzero(status == "")
        stats.append(PartOutcome(rows=table.num_rows, accepted=len(accepted),
                                 rejected=Counter(status[status != ""].tolist())))
        if p and len(accepted):
            digests = pc.take(table.column("hash"), accepted).combine_chunks().cast(pa.binary(16))
            raw = np.frombuffer(digests.buffers()[1], dtype="<u8", count=2 * len(accepted)).reshape(-1, 2)
            e = np.empty(len(accepted), ENTRY)
            e["hi"], e["lo"], e["part"], e["row"] = raw[:, 0], raw[:, 1], part, accepted
            entries.append(e)
    if p:
        records = np.concatenate(entries) if entries else np.zeros(0, ENTRY)
        bucket = records["hi"] % np.uint64(p)
        order = np.argsort(bucket, kind="stable")
        _write_sections(storage.join(shuffle, MAP_FILE.format(index)), records[order],
                        np.bincount(bucket, minlength=p), endpoint)
    return stats


def _duplicates_in_bucket(bucket: int, buckets: int, maps: int, starts: np.ndarray, shuffle: str,
                          endpoint: str) -> None:
    """Reduce: every copy of a digest is in this bucket; all but the smallest (part, row) are duplicates.
    Written split by part group, so each group's gather reads only its own rows."""
    rows = np.concatenate([_read_section(storage.join(shuffle, MAP_FILE.format(m)), bucket, buckets, ENTRY, endpoint)
                           for m in range(maps)])
    rows = rows[np.lexsort((rows["row"], rows["part"], rows["lo"], rows["hi"]))]
    repeat = np.zeros(len(rows), bool)
    repeat[1:] = (rows["hi"][1:] == rows["hi"][:-1]) & (rows["lo"][1:] == rows["lo"][:-1])
    dup = np.empty(int(repeat.sum()), DROP)
    dup["part"], dup["row"] = rows["part"][repeat], rows["row"][repeat]
    dup = dup[np.lexsort((dup["row"], dup["part"]))]
    owner = np.searchsorted(starts, dup["part"], side="right") - 1
    _write_sections(storage.join(shuffle, DUPS_FILE.format(bucket)), dup, np.bincount(owner, minlength=maps),
                    endpoint)


def _gather_drops(index: int, group: range, maps: int, buckets: int, shuffle: str, endpoint: str) -> list[int]:
    """One part group's duplicates from every bucket, sorted by (part, row); returns each part's count."""
    rows = np.concatenate([_read_section(storage.join(shuffle, DUPS_FILE.format(b)), index, maps, DROP, endpoint)
                           for b in range(buckets)])
    rows = rows[np.lexsort((rows["row"], rows["part"]))]
    storage.write_bytes(storage.join(shuffle, DROPS_FILE.format(index)), rows.tobytes(), endpoint)
    return np.bincount(rows["part"] - group.start, minlength=len(group)).tolist()


def _write_sections(uri: str, records: np.ndarray, sizes: np.ndarray, endpoint: str) -> None:
    """``records`` (already in section order) after a header of section offsets, in records."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(OFFSET)
    storage.write_bytes(uri, offsets.tobytes() + records.tobytes(), endpoint)


def _read_section(uri: str, section: int, sections: int, dtype: np.dtype, endpoint: str) -> np.ndarray:
    """Section ``section`` of a file of ``sections`` that ``_write_sections`` wrote: two header entries and
    that section's byte range are all it reads (ranged GETs on S3)."""
    fs, path = storage.resolve(uri, endpoint)
    with fs.open_input_file(path) as f:
        lo, hi = np.frombuffer(f.read_at(2 * OFFSET.itemsize, section * OFFSET.itemsize), OFFSET).tolist()
        start = (sections + 1) * OFFSET.itemsize + lo * dtype.itemsize
        return np.frombuffer(f.read_at((hi - lo) * dtype.itemsize, start), dtype)
