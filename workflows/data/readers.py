"""Input formats -> one stream of raw (key, image bytes, caption bytes) samples per source file.

Supported (``preprocess.input_format``, or ``auto`` by file extension):
- ``webdataset``: tar shards as img2dataset writes them: ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt``
  (+ ``{key}.json``, ignored), members of one sample adjacent.
- ``parquet``: img2dataset-style Parquet: image bytes in ``jpg``/``png``/``webp``/``image`` (binary, or a
  ``{bytes, path}`` struct as Hugging Face writes it) and the caption in ``caption``/``txt``/``text``.
- ``csv`` / ``jsonl``: a manifest of (image path or URI, caption); relative paths are relative to the
  manifest's directory.

Readers never drop a sample: a damaged one comes out with ``error`` set to its reject reason
(``missing_image``, ``missing_caption``, ``truncated_tar``, ``unreadable_image``, ``bad_manifest_row``,
``unreadable_shard``). Captions stay raw bytes so the UTF-8 check happens in one place (filters).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows.common import storage
from workflows.common.errors import UserError

EXTENSIONS = {".tar": "webdataset", ".tgz": "webdataset", ".parquet": "parquet", ".csv": "csv",
              ".jsonl": "jsonl", ".json": "jsonl"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes")
CAPTION_COLUMNS = ("caption", "txt", "text")
PATH_COLUMNS = ("image", "image_path", "path", "filepath", "file", "url")
KEY_COLUMN = "key"
READ_BATCH_ROWS = 256


@dataclass(frozen=True)
class Source:
    """One input file; ``size``/``mtime_ns`` go into the input fingerprint."""

    uri: str
    format: str
    size: int
    mtime_ns: int


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    caption: bytes | None = None
    error: str = ""  # reject reason found while reading; "" = readable


# ---- finding inputs (driver side; every problem here is a UserError before any work starts) ----------

def expand_inputs(inputs: list[str], input_format: str, endpoint: str = "") -> list[Source]:
    """Paths, directories, globs or ``s3://`` URIs -> sorted, de-duplicated sources with their format."""
    if not inputs:
        raise UserError("preprocess.inputs is empty; set it to input files, directories or globs")
    uris: set[str] = set()
    for entry in inputs:
        try:
            if any(c in entry for c in "*?["):
                found = storage.glob(entry, endpoint)
            elif storage.is_dir(entry, endpoint):
                found = [u for u in storage.list_files(entry, endpoint) if _extension(u) in EXTENSIONS]
            else:
                found = [entry] if storage.exists(entry, endpoint) else []
        except OSError as e:
            raise UserError(f"input {entry} is not reachable ({e}); check the URI, credentials and "
                            "storage.s3_endpoint") from e
        if not found:
            raise UserError(f"input {entry} matches no files (run `clipflow sample-data` for the demo data, "
                            "or fix preprocess.inputs)")
        uris.update(found)
    sources = []
    for uri in sorted(uris):
        fmt = input_format if input_format != "auto" else EXTENSIONS.get(_extension(uri))
        if fmt is None:
            raise UserError(f"cannot tell the format of {uri} from its extension; set preprocess.input_format "
                            f"(one of webdataset, parquet, csv, jsonl)")
        item = storage.info(uri, endpoint)
        sources.append(Source(uri, fmt, int(item.size or 0), int(item.mtime_ns or 0)))
    for source in sources:
        check_columns(source, endpoint)
    return sources


def check_columns(source: Source, endpoint: str = "") -> None:
    """Parquet and manifest sources must have an image and a caption column: say so before any work."""
    if source.format == "parquet":
        try:
            names = pq.read_schema(storage.open_input(source.uri, endpoint)).names
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{source.uri}: not a readable Parquet file ({e})") from e
        _pick(names, IMAGE_COLUMNS, source.uri, "image bytes")
        _pick(names, CAPTION_COLUMNS, source.uri, "caption")
    elif source.format in ("csv", "jsonl"):
        rows = _manifest_rows(source, endpoint)
        first = next(rows, None)
        if first is not None and isinstance(first, dict):
            _pick(list(first), PATH_COLUMNS, source.uri, "image path")
            _pick(list(first), CAPTION_COLUMNS, source.uri, "caption")


def _pick(names: list[str], candidates: tuple[str, ...], uri: str, what: str) -> str:
    for name in candidates:
        if name in names:
            return name
    raise UserError(f"{uri}: no {what} column (looked for {', '.join(candidates)}; found {', '.join(names)})")


def _extension(uri: str) -> str:
    name = storage.basename(uri)
    return name[name.rfind("."):].lower() if "." in name else ""


# ---- reading (worker side) --------------------------------------------------------------------------

def read_source(source: Source, endpoint: str = "") -> Iterator[RawSample]:
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "csv": _read_manifest, "jsonl": _read_manifest}
    return reader[source.format](source, endpoint)


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _missing(image: bytes | None, caption: bytes | None) -> str:
    return "missing_image" if image is None else "missing_caption" if caption is None else ""


def _pair(key: str, files: dict[str, bytes]) -> RawSample:
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    caption = files.get("txt")
    return RawSample(key, image, caption, _missing(image, caption))


def _read_tar(source: Source, endpoint: str) -> Iterator[RawSample]:
    """Stream a tar shard; on truncation keep what was read and reject the sample cut in half."""
    fs, path = storage.resolve(source.uri, endpoint)
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield _pair(key, files)
                    key, files = member_key, {}
                data = tar.extractfile(member)
                files[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        # The sample being read when the data ended is lost; one with no sample at all is a shard
        # that is not a tar (or not readable) at all.
        yield RawSample(key if key is not None else storage.basename(source.uri),
                        error="truncated_tar" if key is not None else "unreadable_shard")
        return
    if key is not None:
        yield _pair(key, files)


def _read_parquet(source: Source, endpoint: str) -> Iterator[RawSample]:
    row = 0
    try:
        pf = pq.ParquetFile(storage.open_input(source.uri, endpoint))
        names = pf.schema_arrow.names
        image_col = _pick(names, IMAGE_COLUMNS, source.uri, "image bytes")
        caption_col = _pick(names, CAPTION_COLUMNS, source.uri, "caption")
        columns = [image_col, caption_col] + ([KEY_COLUMN] if KEY_COLUMN in names else [])
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            images = batch.column(image_col)
            if pa.types.is_struct(images.type):  # Hugging Face's Image feature: {bytes, path}
                images = pc.struct_field(images, "bytes")
            images = pc.cast(images, pa.binary()).to_pylist()
            captions = pc.cast(batch.column(caption_col), pa.binary()).to_pylist()
            keys = batch.column(KEY_COLUMN).to_pylist() if KEY_COLUMN in names else [None] * len(images)
            for image, caption, key in zip(images, captions, keys):
                yield RawSample(str(key) if key is not None else f"{row:09d}", image, caption, _missing(image, caption))
                row += 1
    except (OSError, pa.ArrowException):
        yield RawSample(f"{storage.basename(source.uri)}:{row}", error="unreadable_shard")


def _manifest_rows(source: Source, endpoint: str) -> Iterator[dict | None]:
    """Rows of a CSV/JSONL manifest as dicts (None for a JSONL line that is not an object).

    Bytes are decoded with ``surrogateescape`` so a caption that is not UTF-8 survives to the
    UTF-8 check as its original bytes instead of failing the whole file.
    """
    text = storage.read_bytes(source.uri, endpoint).decode("utf-8", errors="surrogateescape")
    if source.format == "csv":
        yield from csv.DictReader(io.StringIO(text))
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        yield row if isinstance(row, dict) else None


def _read_manifest(source: Source, endpoint: str) -> Iterator[RawSample]:
    base = storage.dirname(source.uri)
    path_col = caption_col = ""
    for n, row in enumerate(_manifest_rows(source, endpoint)):
        if row is None:
            yield RawSample(f"{storage.basename(source.uri)}:{n}", error="bad_manifest_row")
            continue
        if not path_col:
            path_col = _pick(list(row), PATH_COLUMNS, source.uri, "image path")
            caption_col = _pick(list(row), CAPTION_COLUMNS, source.uri, "caption")
        ref, caption = row.get(path_col), row.get(caption_col)
        if not isinstance(ref, str) or not ref:
            yield RawSample(f"{storage.basename(source.uri)}:{n}", error="missing_image")
            continue
        sample = RawSample(ref, caption=caption.encode("utf-8", "surrogateescape") if isinstance(caption, str) else None)
        uri = ref if "://" in ref or ref.startswith("/") else storage.join(base, ref)
        try:
            sample.image = storage.read_bytes(uri, endpoint)
        except (OSError, ValueError, pa.ArrowException):
            sample.error = "unreadable_image"
            yield sample
            continue
        sample.error = "missing_caption" if sample.caption is None else ""
        yield sample

