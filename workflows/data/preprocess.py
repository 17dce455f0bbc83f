"""`clipflow preprocess`: raw image-text shards -> training shards (Parquet) + ``manifest.json``.

    inputs ──► [tokenizer pass] ──► per-source parts ──► dedup (shuffle) ──► shards ──► manifest
              a bounded, seeded     read, validate,      hash-partitioned,   one task    written
              caption sample        filter, decode +     first occurrence    per shard   last
              (source=train)        resize, hash, tokenize  wins

Every stage runs in Ray tasks; the driver handles per-source and per-shard metadata only (counts,
object references, a few integers a shard), so its memory and I/O do not grow with the samples.

Why this shape:
- The CPU-heavy work (decode + resize + JPEG encode + tokenize) runs in Ray Data tasks, one per input
  source (img2dataset shards hold ~10k samples, so sources are the natural unit of parallelism and of
  resume). Each task writes its rows -- accepted ones with their small re-encoded JPEG and tokens,
  rejected ones with only their reason -- to ``_work/<run>/part-NNNNN.parquet``.
- Exact dedup is a shuffle of 24 bytes a sample (``data.dedup``): the first occurrence of each content
  hash in canonical order (source order, then order within the source) is kept, whatever the task
  counts or timing. Duplicates are still decoded and resized once in stage 1 (which copy is "first"
  is known only after the shuffle); exact duplicates are a small fraction of web data.
- Shards are cut from the survivors in canonical order, ``rows_per_shard`` each, and written by one
  task per shard (``data.shards``), so their bytes depend on the data and config only.
- Part files live under the output directory, so on a multi-node cluster the output must be
  ``s3://`` or a shared filesystem (a warning says so otherwise).
- Exact accounting: every sample gets one outcome (written, duplicate or a reject reason), so
  ``input = written + duplicates + sum(rejected)`` holds by construction and is checked.
- Deterministic + resumable: the run fingerprint (inputs' names/sizes/mtimes + config) names the work
  directory; parts and shards already finished for the same fingerprint are reused (shards verified by
  sha256). Every file is written atomically; ``manifest.json`` comes last, so a directory with a
  manifest is complete. The output directory only ever loses files clipflow wrote there (shards an
  earlier manifest or run listed), and it may not hold any of the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.tokenizer import Tokenizer
from workflows.artifacts import DATA_TOKENIZER_DIR, DataManifest
from workflows.common import storage
from workflows.common.config import Config, ConfigError, PreprocessConfig
from workflows.common.errors import UserError
from workflows.common.log import Progress
from workflows.common.runtime import ensure_ray, ray_data_context
from workflows.data import dedup, shards
from workflows.data.filters import clean_caption, content_hash, process_image
from workflows.data.readers import ReadLimits, Source, expand_inputs, read_source
from workflows.data.tokenizer_io import load_tokenizer, save_tokenizer, tokenizer_exists

VERSION = 2  # of this algorithm: part of the run fingerprint, so a change redoes finished outputs
WORK_DIR = "_work"
PROGRESS = "progress.json"
PART_NAME = "part-{:05d}.parquet"

PART_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("image", pa.binary()),
                         ("caption", pa.string()), ("tokens", pa.list_(pa.int32())), ("hash", pa.binary())])


@dataclass
class PreprocessResult:
    """What `clipflow preprocess` made (``manifest``) and how the run went."""

    manifest: DataManifest
    output: str
    up_to_date: bool
    wall_seconds: float
    process_seconds: float = 0.0
    samples_per_second: float = 0.0
    parts_reused: int = 0
    shards_reused: int = 0
    dedup_tasks: tuple[int, int] = (0, 0)  # (map tasks, partitions) of the dedup shuffle
    stage_seconds: dict[str, float] = field(default_factory=dict)  # tokenizer, parts, dedup, shards


# ---- the run ----------------------------------------------------------------------------------------

def run_preprocess(cfg: Config, *, force: bool = False,
                   on_shard: Callable[[int], None] | None = None) -> PreprocessResult:
    """Run (or resume) preprocessing.

    ``on_shard(i)`` is called on the driver after shard ``i`` is committed, in completion order
    (progress reporting; tests use it to interrupt a run).
    """
    start = time.monotonic()
    pre = cfg.preprocess
    pre.validate()
    endpoint = storage.s3_endpoint(cfg.storage.s3_endpoint)
    _check_tokenizer_config(cfg, endpoint)
    sources = expand_inputs(pre.inputs, pre.input_format, endpoint, ReadLimits.from_config(pre))
    out = pre.output
    _check_output_holds_no_input(out, sources)
    input_fp = _digest([dataclasses.asdict(s) for s in sources])
    run_fp = _digest({"version": VERSION, "inputs": input_fp, "preprocess": _config_for_hash(pre),
                      "tokenizer": dataclasses.asdict(cfg.tokenizer)})
    work = storage.join(out, WORK_DIR, run_fp[:16])

    if not force:
        done = _finished_manifest(out, run_fp, endpoint)
        if done is not None:
            return PreprocessResult(done, out, up_to_date=True, wall_seconds=round(time.monotonic() - start, 2))
    ours = _shards_clipflow_wrote(out, endpoint)
    storage.delete(DataManifest.uri(out), endpoint)  # a stale manifest must not describe the shards we rewrite
    if force:
        storage.delete(storage.join(out, WORK_DIR), endpoint)
    progress = _read_json(storage.join(work, PROGRESS), endpoint) or {}

    ensure_ray()
    _check_output_reachable(out)
    clock = _StageClock()
    tokenizer, tokenizer_captions = _prepare_tokenizer(cfg, sources, endpoint, progress, work)
    clock.done("tokenizer")
    parts_reused, part_rows = _build_parts(cfg, sources, tokenizer, endpoint, work)
    process_seconds = clock.done("parts")
    part_uris = [storage.join(work, PART_NAME.format(i)) for i in range(len(sources))]
    dedup_tasks = dedup.task_counts(len(sources), sum(part_rows), pre.dedup_map_tasks, pre.dedup_partitions)
    outcomes, groups = dedup.find_duplicates(part_uris, work, endpoint, dedup=pre.dedup != "none", tasks=dedup_tasks)
    clock.done("dedup")
    metadata = {"clipflow.tokenizer": tokenizer.id, "clipflow.image_size": str(pre.image_size),
                "clipflow.context_length": str(cfg.tokenizer.context_length)}
    entries, shards_reused = shards.write_all(
        shards.plan([o.kept for o in outcomes], pre.rows_per_shard), part_uris, groups,
        out=out, work=work, endpoint=endpoint, metadata=metadata, on_shard=on_shard)
    clock.done("shards")
    counts = _counts(outcomes, entries)

    for name in ours - {e["path"] for e in entries}:  # shards of an earlier, larger run
        storage.delete(storage.join(out, name), endpoint)
    manifest = DataManifest(
        counts=counts, shards=entries, tokenizer=tokenizer.id, context_length=cfg.tokenizer.context_length,
        image_size=pre.image_size, tokenizer_path=DATA_TOKENIZER_DIR,
        content_hash=_digest([e["sha256"] for e in entries]),
        extra={"vocab_size": tokenizer.vocab_size, "resize_mode": pre.resize_mode, "sources": [s.uri for s in sources],
               "input_fingerprint": input_fp, "run_fingerprint": run_fp, "config": dataclasses.asdict(pre),
               "tokenizer_config": dataclasses.asdict(cfg.tokenizer), "tokenizer_train_captions": tokenizer_captions,
               "bytes": sum(e["bytes"] for e in entries)})
    manifest.write(out, endpoint)
    storage.delete(storage.join(out, WORK_DIR), endpoint)
    return PreprocessResult(
        manifest, out, up_to_date=False, wall_seconds=round(time.monotonic() - start, 2),
        process_seconds=process_seconds,
        samples_per_second=round(counts["input"] / max(process_seconds, 1e-9), 1),
        parts_reused=parts_reused, shards_reused=shards_reused,
        dedup_tasks=dedup_tasks,
        stage_seconds=clock.seconds)


class _StageClock:
    """Seconds per stage, each measured from the end of the one before."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def done(self, stage: str) -> float:
        now = time.monotonic()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now
        return self.seconds[stage]


def _counts(outcomes: list[dedup.PartOutcome], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """input = written + duplicates + rejected by reason; each sample had exactly one outcome."""
    rejected: Counter[str] = Counter()
    for o in outcomes:
        rejected.update(o.rejected)
    counts = {"input": sum(o.rows for o in outcomes), "written": sum(e["rows"] for e in entries),
              "duplicates": sum(o.duplicates for o in outcomes), "rejected": dict(sorted(rejected.items()))}
    if counts["input"] != counts["written"] + counts["duplicates"] + sum(rejected.values()):
        raise AssertionError(f"count identity broken: {counts}")  # cannot happen: a bug, not bad input
    return counts


def _check_output_holds_no_input(output: str, sources: list[Source]) -> None:
    """The output directory is clipflow's: refuse one that holds an input (its clean-up must never
    touch what clipflow did not write)."""
    root = output.rstrip("/") + "/"
    inside = [s.uri for s in sources if s.uri.startswith(root)]
    if inside:
        raise UserError(f"preprocess.output={output} holds {len(inside)} of the inputs (e.g. {inside[0]}); "
                        "write the training shards to a directory of their own")


def _shards_clipflow_wrote(output: str, endpoint: str) -> set[str]:
    """Shard files in ``output`` that an earlier manifest or an earlier run's work directory lists."""
    names: set[str] = set()
    earlier = _read_json(DataManifest.uri(output), endpoint)
    if earlier and isinstance(earlier.get("shards"), list):
        names.update(str(e.get("path", "")) for e in earlier["shards"] if isinstance(e, dict))
    return {n for n in names if shards.SHARD_PATTERN.fullmatch(n)} | shards.marked(storage.join(output, WORK_DIR),
                                                                                 endpoint)


def _check_output_reachable(output: str) -> None:
    """Ray tasks write the part files under ``output``: on a multi-node cluster a local path only works
    when it is a shared filesystem (the driver reads what every node wrote); ``s3://`` always works."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if not storage.is_s3(output) and nodes > 1:
        warnings.warn(f"preprocess.output={output} is a local path on a {nodes}-node Ray cluster: it must be a "
                      "filesystem shared by all nodes; otherwise use an s3:// URI", stacklevel=2)


def _config_for_hash(pre: PreprocessConfig) -> dict[str, Any]:
    """Everything that changes the output; ``inputs`` are covered by the source fingerprint, and the
    dedup task counts only split the work."""
    d = dataclasses.asdict(pre)
    for name in ("inputs", "output", "dedup_map_tasks", "dedup_partitions"):
        d.pop(name)
    return d


def _check_tokenizer_config(cfg: Config, endpoint: str) -> None:
    tok = cfg.tokenizer
    tok.validate()
    if tok.source == "openai_bpe" and not (tok.bpe_path and storage.exists(tok.bpe_path, endpoint)):
        raise ConfigError(f"tokenizer.source=openai_bpe needs tokenizer.bpe_path to point at "
                          f"bpe_simple_vocab_16e6.txt.gz (got {tok.bpe_path!r})")
    if tok.source == "path" and not tokenizer_exists(tok.path, endpoint):
        raise ConfigError(f"tokenizer.source=path needs tokenizer.path to be a directory written by "
                          f"Tokenizer.save (got {tok.path!r})")


def _finished_manifest(output: str, run_fp: str, endpoint: str) -> DataManifest | None:
    """The existing manifest when it was written by this exact run and all its shards verify."""
    raw = _read_json(DataManifest.uri(output), endpoint)
    if not raw or raw.get("run_fingerprint") != run_fp:
        return None
    manifest = DataManifest.from_dict(raw)
    for uri, entry in zip((u for u, _ in manifest.shard_uris(output)), manifest.shards):
        if not shards.verify(uri, entry["sha256"], endpoint):
            return None
    return manifest


# ---- tokenizer --------------------------------------------------------------------------------------

def _prepare_tokenizer(cfg: Config, sources: list[Source], endpoint: str, progress: dict[str, Any],
                       work: str) -> tuple[Tokenizer, int]:
    """Build (or reuse from an interrupted run) the tokenizer and save it under ``<output>/tokenizer``;
    also returns how many captions it was trained on (0 when it was not trained here)."""
    tcfg = cfg.tokenizer
    target = storage.join(cfg.preprocess.output, DATA_TOKENIZER_DIR)
    if progress.get("tokenizer") and tokenizer_exists(target, endpoint):
        tok = load_tokenizer(target, endpoint)
        if tok.id == progress["tokenizer"]:
            return tok, int(progress.get("tokenizer_captions", 0))
    captions = 0
    if tcfg.source == "openai_bpe":
        with tempfile.TemporaryDirectory() as tmp:
            tok = Tokenizer.from_openai_bpe(storage.local_copy(tcfg.bpe_path, tmp, endpoint),
                                            context_length=tcfg.context_length)
    elif tcfg.source == "path":
        tok = load_tokenizer(tcfg.path, endpoint)
    else:
        tok, captions = _train_tokenizer(cfg, sources, endpoint)
    save_tokenizer(tok, target, endpoint)
    progress.update(tokenizer=tok.id, tokenizer_captions=captions)
    storage.write_bytes(storage.join(work, PROGRESS), _dumps(progress), endpoint)
    return tok, captions


def _train_tokenizer(cfg: Config, sources: list[Source], endpoint: str) -> tuple[Tokenizer, int]:
    """Train the BPE on a bounded, seeded sample of the captions (caption filters applied; images are
    not decoded): each source's task sends at most ``ceil(train_captions / sources)`` of its captions,
    so the driver holds at most ``train_captions + sources`` of them, whatever the data size."""
    quota = -(-cfg.tokenizer.train_captions // len(sources))
    with ray_data_context(preserve_order=True):  # a dataset keeps the context it was created in
        ds = _source_dataset(sources).map_batches(
            _caption_batch, batch_size=1,
            fn_kwargs={"sources": sources, "cfg": cfg.preprocess, "endpoint": endpoint, "quota": quota,
                       "seed": cfg.tokenizer.seed})
        seen = 0
        with Progress(None, "tokenizer: sampling captions", "captions") as bar:
            def captions() -> Iterator[str]:
                nonlocal seen
                for row in ds.iter_rows():
                    bar.update(1)
                    seen += 1
                    yield row["caption"]

            try:
                tok = Tokenizer.train(captions(), cfg.tokenizer.vocab_size, cfg.tokenizer.context_length)
            except ValueError as e:
                raise UserError(f"cannot train the tokenizer on these captions: {e}") from e
    return tok, seen


def _caption_batch(batch: dict[str, np.ndarray], sources: list[Source], cfg: PreprocessConfig,
                   endpoint: str, quota: int, seed: int) -> dict[str, list[str]]:
    """A source's clean captions, or a seeded sample of ``quota`` of them (kept in their order)."""
    captions = []
    for index in batch["index"]:
        found = []
        for sample in read_source(sources[int(index)], endpoint):
            if not sample.error:
                caption, reason = clean_caption(sample.caption, cfg)
                if not reason:
                    found.append(caption)
        if len(found) > quota:
            chosen = np.random.default_rng([seed, int(index)]).choice(len(found), quota, replace=False)
            found = [found[i] for i in np.sort(chosen)]
        captions.extend(found)
    return {"caption": captions}


# ---- stage 1: per-source parts on Ray Data ------------------------------------------------------------

def _build_parts(cfg: Config, sources: list[Source], tokenizer: Tokenizer, endpoint: str,
                 work: str) -> tuple[int, list[int]]:
    """Process every source not already done into its part file; returns how many were reused, and
    each part's rows."""
    reused = samples = 0
    rows = [0] * len(sources)
    with ray_data_context(preserve_order=False), \
            Progress(len(sources), "preprocess: decode/resize/encode", "sources") as bar:
        ds = _source_dataset(sources).map_batches(
            _part_batch, batch_size=1,
            fn_kwargs={"sources": sources, "cfg": cfg.preprocess, "tokenizer": tokenizer,
                       "context_length": cfg.tokenizer.context_length, "endpoint": endpoint, "work": work})
        for row in ds.iter_rows():
            reused += int(row["reused"])
            samples += int(row["samples"])
            rows[int(row["index"])] = int(row["samples"])
            bar.update(1, samples=samples)
    return reused, rows


def _part_batch(batch: dict[str, np.ndarray], sources: list[Source], cfg: PreprocessConfig,
                tokenizer: Tokenizer, context_length: int, endpoint: str, work: str) -> dict[str, list]:
    out: dict[str, list] = {"index": [], "samples": [], "reused": []}
    for index in batch["index"]:
        uri = storage.join(work, PART_NAME.format(int(index)))
        if storage.exists(uri, endpoint):
            rows, reused = pq.read_metadata(storage.open_input(uri, endpoint)).num_rows, True
        else:
            table = process_source(sources[int(index)], cfg, tokenizer, context_length, endpoint)
            storage.write_bytes(uri, shards.parquet_bytes(table), endpoint)
            rows, reused = table.num_rows, False
        out["index"].append(int(index))
        out["samples"].append(rows)
        out["reused"].append(reused)
    return out


def process_source(source: Source, cfg: PreprocessConfig, tokenizer: Tokenizer, context_length: int,
                   endpoint: str = "") -> pa.Table:
    """Every sample of one source, in order, as a row: accepted ones with re-encoded JPEG, cleaned
    caption, tokens and content hash; rejected ones with their ``status`` (reject reason) only."""
    keys, statuses, images, captions, hashes = [], [], [], [], []
    for sample in read_source(source, endpoint):
        caption, image, digest, status = "", b"", b"", sample.error
        if not status:
            caption, status = clean_caption(sample.caption, cfg)
        if not status:
            image, status = process_image(sample.image, cfg)
        if not status:
            digest = content_hash(sample.image, caption if cfg.dedup == "image_caption" else None)
        keys.append(sample.key)
        statuses.append(status)
        images.append(image)
        captions.append(caption)
        hashes.append(digest)
    accepted = [i for i, s in enumerate(statuses) if not s]
    tokens: list[list[int]] = [[] for _ in keys]
    if accepted:
        ids = tokenizer([captions[i] for i in accepted], context_length=context_length).numpy().astype(np.int32)
        for row, i in enumerate(accepted):
            tokens[i] = ids[row].tolist()
    return pa.table({"key": keys, "status": statuses, "image": images, "caption": captions,
                     "tokens": tokens, "hash": hashes}, schema=PART_SCHEMA)


def _source_dataset(sources: list[Source]):
    import ray.data

    return ray.data.from_items([{"index": i} for i in range(len(sources))], override_num_blocks=len(sources))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _read_json(uri: str, endpoint: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(uri, endpoint))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a damaged progress/manifest file only means the work is redone
