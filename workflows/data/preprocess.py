"""`clipflow preprocess`: raw image-text shards -> training shards (Parquet) + ``manifest.json``.

    inputs ──► [tokenizer pass] ──► per-source parts (Ray Data) ──► dedup + shard (driver) ──► manifest
              captions only,        read, validate, filter,          canonical order,         written
              trains the BPE        decode + resize, re-encode,      exact dedup, fixed       last
              (source=train)        hash, tokenize                   rows per shard

Why this shape:
- The CPU-heavy work (decode + resize + JPEG encode + tokenize) runs in Ray Data tasks, one per input
  source (img2dataset shards hold ~10k samples, so sources are the natural unit of parallelism and of
  resume). Each task writes its rows -- accepted ones with their small re-encoded JPEG and tokens,
  rejected ones with only their reason -- to ``_work/<run>/part-NNNNN.parquet``. Nothing streams
  through the driver at this stage and memory per task is one source's output.
- Dedup and sharding run on the driver over the parts in canonical order (source order, then order
  within the source): the first occurrence of each content hash is kept, so the result does not depend
  on which task finished first. The driver holds one 16-byte hash per accepted sample (~1.6 GB per
  100M samples in a Python set); beyond that scale, replace it by a hash-partitioned groupby.
  Duplicates are still decoded and resized once in stage 1 (which copy is "first" depends on the
  canonical order, known only here); exact duplicates are a small fraction of web data.
- Part files live under the output directory, so on a multi-node cluster the output must be
  ``s3://`` or a shared filesystem (a warning says so otherwise).
- Exact accounting: every sample gets one outcome (written, duplicate or a reject reason), so
  ``input = written + duplicates + sum(rejected)`` holds by construction and is checked by tests.
- Deterministic + resumable: the run fingerprint (inputs' names/sizes/mtimes + config) names the work
  directory; parts and shards already finished for the same fingerprint are reused (shards verified by
  sha256 from the progress file). Every file is written atomically; ``manifest.json`` comes last,
  so a directory with a manifest is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.tokenizer import Tokenizer
from workflows.artifacts import DATA_TOKENIZER_DIR, ROW_GROUP_ROWS, DataManifest
from workflows.common import storage
from workflows.common.config import Config, ConfigError, PreprocessConfig
from workflows.common.errors import UserError
from workflows.common.log import Progress
from workflows.common.runtime import ensure_ray, ray_data_context
from workflows.data.filters import clean_caption, content_hash, process_image
from workflows.data.readers import Source, expand_inputs, read_source
from workflows.data.tokenizer_io import load_tokenizer, save_tokenizer, tokenizer_exists

VERSION = 1  # of this algorithm: part of the run fingerprint, so a change redoes finished outputs
WORK_DIR = "_work"
PROGRESS = "progress.json"
SHARD_NAME = "shard-{:05d}.parquet"
PART_NAME = "part-{:05d}.parquet"

PART_SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("image", pa.binary()),
                         ("caption", pa.string()), ("tokens", pa.list_(pa.int32())), ("hash", pa.binary())])
SHARD_COLUMNS = ["key", "image", "caption", "tokens"]


# ---- the run ----------------------------------------------------------------------------------------

def run_preprocess(cfg: Config, *, force: bool = False,
                   on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) preprocessing; returns the manifest plus a ``run`` entry with timings.

    ``on_shard(i)`` is called after shard ``i`` is committed (progress reporting; tests use it to
    interrupt a run between shards).
    """
    start = time.monotonic()
    pre = cfg.preprocess
    pre.validate()
    endpoint = storage.s3_endpoint(cfg.storage.s3_endpoint)
    _check_tokenizer_config(cfg, endpoint)
    sources = expand_inputs(pre.inputs, pre.input_format, endpoint)
    input_fp = _digest([dataclasses.asdict(s) for s in sources])
    run_fp = _digest({"version": VERSION, "inputs": input_fp, "preprocess": _config_for_hash(pre),
                      "tokenizer": dataclasses.asdict(cfg.tokenizer)})
    out = pre.output
    work = storage.join(out, WORK_DIR, run_fp[:16])
    manifest_uri = DataManifest.uri(out)

    if not force:
        done = _finished_manifest(manifest_uri, run_fp, endpoint)
        if done is not None:
            return {**done, "run": {"up_to_date": True, "output": out,
                                    "wall_seconds": round(time.monotonic() - start, 2)}}
    storage.delete(manifest_uri, endpoint)  # a stale manifest must not describe the shards we rewrite
    if force:
        storage.delete(storage.join(out, WORK_DIR), endpoint)
    progress = _read_json(storage.join(work, PROGRESS), endpoint) or {"shards": {}}

    ensure_ray()
    _check_output_reachable(out)
    tokenizer = _prepare_tokenizer(cfg, sources, endpoint, progress, work)
    process_start = time.monotonic()
    parts_reused = _build_parts(cfg, sources, tokenizer, endpoint, work)
    process_seconds = time.monotonic() - process_start
    counts, shards, shards_reused = _write_shards(cfg, sources, endpoint, work, progress, on_shard)

    for uri in storage.list_files(out, endpoint):  # shards of an earlier, larger run
        name = storage.basename(uri)
        if name.startswith("shard-") and name not in {s["path"] for s in shards}:
            storage.delete(uri, endpoint)
    manifest = DataManifest(
        counts=counts, shards=shards, tokenizer=tokenizer.id, context_length=cfg.tokenizer.context_length,
        image_size=pre.image_size, tokenizer_path=DATA_TOKENIZER_DIR, content_hash=_digest([s["sha256"] for s in shards]),
        extra={"vocab_size": tokenizer.vocab_size, "resize_mode": pre.resize_mode, "sources": [s.uri for s in sources],
               "input_fingerprint": input_fp, "run_fingerprint": run_fp, "config": dataclasses.asdict(pre),
               "tokenizer_config": dataclasses.asdict(cfg.tokenizer), "bytes": sum(s["bytes"] for s in shards)})
    manifest.write(out, endpoint)
    storage.delete(storage.join(out, WORK_DIR), endpoint)
    wall = time.monotonic() - start
    run = {"up_to_date": False, "wall_seconds": round(wall, 2), "process_seconds": round(process_seconds, 2),
           "samples_per_second": round(counts["input"] / max(process_seconds, 1e-9), 1),
           "parts_reused": parts_reused, "shards_reused": shards_reused, "output": out}
    return {**manifest.to_dict(), "run": run}


def _check_output_reachable(output: str) -> None:
    """Ray tasks write the part files under ``output``: on a multi-node cluster a local path only works
    when it is a shared filesystem (the driver reads what every node wrote); ``s3://`` always works."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if not storage.is_s3(output) and nodes > 1:
        warnings.warn(f"preprocess.output={output} is a local path on a {nodes}-node Ray cluster: it must be a "
                      "filesystem shared by all nodes; otherwise use an s3:// URI", stacklevel=2)


def _config_for_hash(pre: PreprocessConfig) -> dict[str, Any]:
    """Everything that changes the output; ``inputs`` are covered by the source fingerprint."""
    d = dataclasses.asdict(pre)
    d.pop("inputs")
    d.pop("output")
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


def _finished_manifest(uri: str, run_fp: str, endpoint: str) -> dict[str, Any] | None:
    """The existing manifest when it was written by this exact run and all its shards verify."""
    manifest = _read_json(uri, endpoint)
    if not manifest or manifest.get("run_fingerprint") != run_fp:
        return None
    base = storage.dirname(uri)
    for shard in manifest["shards"]:
        if not _verify(storage.join(base, shard["path"]), shard["sha256"], endpoint):
            return None
    return manifest


# ---- tokenizer --------------------------------------------------------------------------------------

def _prepare_tokenizer(cfg: Config, sources: list[Source], endpoint: str, progress: dict[str, Any],
                       work: str) -> Tokenizer:
    """Build (or reuse from an interrupted run) the tokenizer and save it under ``<output>/tokenizer``."""
    tcfg = cfg.tokenizer
    target = storage.join(cfg.preprocess.output, DATA_TOKENIZER_DIR)
    if progress.get("tokenizer") and tokenizer_exists(target, endpoint):
        tok = load_tokenizer(target, endpoint)
        if tok.id == progress["tokenizer"]:
            return tok
    if tcfg.source == "openai_bpe":
        with tempfile.TemporaryDirectory() as tmp:
            tok = Tokenizer.from_openai_bpe(storage.local_copy(tcfg.bpe_path, tmp, endpoint),
                                            context_length=tcfg.context_length)
    elif tcfg.source == "path":
        tok = load_tokenizer(tcfg.path, endpoint)
    else:
        tok = _train_tokenizer(cfg, sources, endpoint)
    save_tokenizer(tok, target, endpoint)
    progress["tokenizer"] = tok.id
    storage.write_bytes(storage.join(work, PROGRESS), _dumps(progress), endpoint)
    return tok


def _train_tokenizer(cfg: Config, sources: list[Source], endpoint: str) -> Tokenizer:
    """A separate pass over the captions only (caption filters applied; images are not decoded)."""
    with ray_data_context(preserve_order=True):  # a dataset keeps the context it was created in
        ds = _source_dataset(sources).map_batches(
            _caption_batch, batch_size=1, fn_kwargs={"sources": sources, "cfg": cfg.preprocess, "endpoint": endpoint},
            **_remote_args(sources, cfg.preprocess.output))
        with Progress(None, "tokenizer: reading captions", "captions") as bar:
            def captions() -> Iterator[str]:
                for row in ds.iter_rows():
                    bar.update(1)
                    yield row["caption"]

            try:
                tok = Tokenizer.train(captions(), cfg.tokenizer.vocab_size, cfg.tokenizer.context_length)
            except ValueError as e:
                raise UserError(f"cannot train the tokenizer on these captions: {e}") from e
    return tok


def _caption_batch(batch: dict[str, np.ndarray], sources: list[Source], cfg: PreprocessConfig,
                   endpoint: str) -> dict[str, list[str]]:
    captions = []
    for index in batch["index"]:
        for sample in read_source(sources[int(index)], endpoint):
            if not sample.error:
                caption, reason = clean_caption(sample.caption, cfg)
                if not reason:
                    captions.append(caption)
    return {"caption": captions}


# ---- stage 1: per-source parts on Ray Data ------------------------------------------------------------

def _build_parts(cfg: Config, sources: list[Source], tokenizer: Tokenizer, endpoint: str, work: str) -> int:
    """Process every source not already done into its part file; returns how many were reused."""
    reused = samples = 0
    with ray_data_context(preserve_order=False), \
            Progress(len(sources), "preprocess: decode/resize/encode", "sources") as bar:
        ds = _source_dataset(sources).map_batches(
            _part_batch, batch_size=1,
            fn_kwargs={"sources": sources, "cfg": cfg.preprocess, "tokenizer": tokenizer,
                       "context_length": cfg.tokenizer.context_length, "endpoint": endpoint, "work": work},
            **_remote_args(sources, cfg.preprocess.output))
        for row in ds.iter_rows():
            reused += int(row["reused"])
            samples += int(row["samples"])
            bar.update(1, samples=samples)
    return reused


def _part_batch(batch: dict[str, np.ndarray], sources: list[Source], cfg: PreprocessConfig,
                tokenizer: Tokenizer, context_length: int, endpoint: str, work: str) -> dict[str, list]:
    out: dict[str, list] = {"index": [], "samples": [], "reused": []}
    for index in batch["index"]:
        uri = storage.join(work, PART_NAME.format(int(index)))
        if storage.exists(uri, endpoint):
            rows, reused = pq.read_metadata(storage.open_input(uri, endpoint)).num_rows, True
        else:
            table = process_source(sources[int(index)], cfg, tokenizer, context_length, endpoint)
            storage.write_bytes(uri, _parquet_bytes(table), endpoint)
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


def _remote_args(sources: list[Source], output: str) -> dict[str, Any]:
    """Forward the driver's AWS settings to the tasks when S3 is involved (a local Ray runtime started
    before they were set would not pass them on)."""
    if not any(storage.is_s3(u) for u in [output] + [s.uri for s in sources]):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"runtime_env": {"env_vars": env}} if env else {}


# ---- stage 2: dedup + shards on the driver -------------------------------------------------------------

def _write_shards(cfg: Config, sources: list[Source], endpoint: str, work: str, progress: dict[str, Any],
                  on_shard: Callable[[int], None] | None) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Walk the parts in canonical order: count outcomes, drop duplicates (first occurrence wins), and
    cut fixed-size shards; shards already committed by an interrupted run are verified and kept."""
    pre = cfg.preprocess
    out = pre.output
    seen: set[bytes] = set()
    rejected: Counter[str] = Counter()
    total = duplicates = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    shards: list[dict[str, Any]] = []
    reused = 0

    def commit(table: pa.Table) -> None:
        nonlocal reused
        index = len(shards)
        name = SHARD_NAME.format(index)
        uri = storage.join(out, name)
        entry = progress["shards"].get(name)
        if entry is not None and entry["rows"] == table.num_rows and _verify(uri, entry["sha256"], endpoint):
            reused += 1
        else:
            data = _parquet_bytes(table)
            entry = {"path": name, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            storage.write_bytes(uri, data, endpoint)
            progress["shards"][name] = entry
            storage.write_bytes(storage.join(work, PROGRESS), _dumps(progress), endpoint)
        shards.append(entry)
        if on_shard is not None:
            on_shard(index)

    with Progress(len(sources), "preprocess: dedup + write shards", "sources") as bar:
        for index in range(len(sources)):
            part = pq.ParquetFile(storage.open_input(storage.join(work, PART_NAME.format(index)), endpoint))
            for batch in part.iter_batches(batch_size=1024):
                keep = []
                for status, digest in zip(batch.column("status").to_pylist(), batch.column("hash").to_pylist()):
                    total += 1
                    if status:
                        rejected[status] += 1
                        keep.append(False)
                    elif pre.dedup != "none" and digest in seen:
                        duplicates += 1
                        keep.append(False)
                    else:
                        if pre.dedup != "none":
                            seen.add(digest)
                        keep.append(True)
                kept = pa.Table.from_batches([batch]).filter(pa.array(keep, pa.bool_())).select(SHARD_COLUMNS)
                if kept.num_rows:
                    pending.append(kept)
                    pending_rows += kept.num_rows
                while pending_rows >= pre.rows_per_shard:
                    table = pa.concat_tables(pending)
                    commit(table.slice(0, pre.rows_per_shard).combine_chunks())
                    rest = table.slice(pre.rows_per_shard)
                    pending, pending_rows = [rest] if rest.num_rows else [], rest.num_rows
            bar.update(1)
    if pending_rows:
        commit(pa.concat_tables(pending).combine_chunks())
    written = sum(s["rows"] for s in shards)
    counts = {"input": total, "written": written, "duplicates": duplicates, "rejected": dict(sorted(rejected.items()))}
    if total != written + duplicates + sum(rejected.values()):  # cannot happen: each row has one outcome
        raise AssertionError(f"count identity broken: {counts}")
    return counts, shards, reused


def _parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes (fixed row groups and codec; no timestamps in the file)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    return sink.getvalue().to_pybytes()


def _verify(uri: str, sha256: str, endpoint: str) -> bool:
    try:
        return hashlib.sha256(storage.read_bytes(uri, endpoint)).hexdigest() == sha256
    except FileNotFoundError:
        return False


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


# ---- summary ---------------------------------------------------------------------------------------------

