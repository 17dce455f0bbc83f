"""Input formats -> one stream of raw (key, image bytes, caption bytes) samples per source file.

Supported (``preprocess.input_format``, or ``auto`` by file extension):
- ``webdataset``: tar shards (``.tar``, ``.tgz``, ``.tar.gz|bz2|xz``) as img2dataset writes them:
  ``{key}.jpg|jpeg|png|webp`` + ``{key}.txt`` (+ ``{key}.json``, ignored), members of one sample adjacent.
  Keys follow webdataset's rule: the member path up to the first dot of its file name, so ``a.b.jpg`` is
  field ``b.jpg`` of sample ``a`` (its type is the last part, ``jpg``); names with no key (``.hidden``,
  no dot) are not sample members, as in webdataset.
- ``parquet``: img2dataset-style Parquet: image bytes in ``jpg``/``png``/``webp``/``image`` (binary, or a
  ``{bytes, path}`` struct as Hugging Face writes it) and the caption in ``caption``/``txt``/``text``.
  Keys come from a ``key`` column, else ``<file name>:<row>``.
- ``csv`` / ``jsonl``: a manifest of (image path or ``s3://`` URI, caption); relative paths are relative
  to the manifest's directory, and every path must lie under ``preprocess.allowed_roots`` (default: the
  manifest's own directory tree, or its bucket).

Readers never drop a sample and never raise on one: a damaged one comes out with ``error`` set to its
reject reason. Problems with a whole input (no such file, no caption column, a column of the wrong type)
are a UserError on the driver before any work starts (``expand_inputs``). Captions stay raw bytes so the
UTF-8 check happens in one place (filters). Reads are bounded: a member or file over
``max_member_bytes`` is rejected from its size, unread, and only regular files are opened.

Reasons: ``missing_image``, ``missing_caption``, ``truncated_tar``, ``unreadable_shard``,
``unreadable_image``, ``bad_manifest_row``, ``invalid_utf8_name``, ``not_a_regular_file``,
``member_too_large``, ``duplicate_member``, ``duplicate_key``, ``outside_allowed_roots``,
``unsupported_uri``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workflows.common import storage
from workflows.common.config import PreprocessConfig
from workflows.common.errors import UserError
from workflows.common.log import get_logger

log = get_logger("preprocess")

TAR_EXTENSIONS = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")  # what tarfile's "r|*" decompresses
EXTENSIONS = {**{e: "webdataset" for e in TAR_EXTENSIONS}, ".parquet": "parquet", ".csv": "csv",
              ".jsonl": "jsonl", ".json": "jsonl"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes")
CAPTION_COLUMNS = ("caption", "txt", "text")
PATH_COLUMNS = ("image", "image_path", "path", "filepath", "file", "url")
KEY_COLUMN = "key"
READ_BATCH_ROWS = 256
# webdataset's split (webdataset.tariterators.base_plus_ext): key = path up to the first dot of the file name
WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# img2dataset writes, beside each output shard, a {shard}_stats.json (and for tar output a {shard}.parquet
# of metadata without images): neither is input data.
STATS_SIDECAR = re.compile(r"_stats\.json$")


@dataclass(frozen=True)
class ReadLimits:
    """What readers may read: ``PreprocessConfig``'s bounds, carried by every Source to the workers."""

    max_member_bytes: int = PreprocessConfig.max_member_bytes
    allowed_roots: tuple[str, ...] = ()  # () = the manifest's own directory tree (or its bucket)

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> ReadLimits:
        return cls(cfg.max_member_bytes, tuple(cfg.allowed_roots))


@dataclass(frozen=True)
class Source:
    """One input file; ``size``/``mtime_ns`` go into the input fingerprint."""

    uri: str
    format: str
    size: int
    mtime_ns: int
    limits: ReadLimits = field(default_factory=ReadLimits)


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    caption: bytes | None = None
    error: str = ""  # reject reason found while reading; "" = readable


# ---- finding inputs (driver side; every problem here is a UserError before any work starts) ----------

def expand_inputs(inputs: list[str], input_format: str, endpoint: str = "",
                  limits: ReadLimits | None = None) -> list[Source]:
    """Paths, directories, globs or ``s3://`` URIs -> sorted, de-duplicated sources with their format.

    A file named explicitly is always read; directories and globs skip img2dataset's sidecar files and
    (directories) files with no input extension, each with a debug line.
    """
    if not inputs:
        raise UserError("preprocess.inputs is empty; set it to input files, directories or globs")
    uris: set[str] = set()
    for entry in inputs:
        try:
            if any(c in entry for c in "*?["):
                found = _without_sidecars(storage.glob(entry, endpoint))
            elif storage.is_dir(entry, endpoint):
                found = _without_sidecars(_known_extension(storage.list_files(entry, endpoint)))
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
            raise UserError(f"cannot tell the format of {uri} from its extension ({', '.join(EXTENSIONS)}); set "
                            "preprocess.input_format (one of webdataset, parquet, csv, jsonl)")
        item = storage.info(uri, endpoint)
        sources.append(Source(uri, fmt, int(item.size or 0), int(item.mtime_ns or 0), limits or ReadLimits()))
    for source in sources:
        check_columns(source, endpoint)
    return sources


def _known_extension(uris: list[str]) -> list[str]:
    kept = [u for u in uris if _extension(u) in EXTENSIONS]
    for uri in sorted(set(uris) - set(kept)):
        log.debug("skipping %s: not an input format (%s)", uri, ", ".join(EXTENSIONS))
    return kept


def _without_sidecars(uris: list[str]) -> list[str]:
    """Drop img2dataset's ``*_stats.json`` and the metadata ``{shard}.parquet`` beside a ``{shard}.tar``."""
    tars = {u[: -len(_extension(u))] for u in uris if _extension(u) in TAR_EXTENSIONS}
    kept = []
    for uri in uris:
        if STATS_SIDECAR.search(storage.basename(uri)):
            log.debug("skipping %s: img2dataset's stats file, not data", uri)
        elif _extension(uri) == ".parquet" and uri[: -len(".parquet")] in tars:
            log.debug("skipping %s: img2dataset's metadata beside its tar shard, not data", uri)
        else:
            kept.append(uri)
    return kept


def check_columns(source: Source, endpoint: str = "") -> None:
    """Parquet and manifest sources must have an image and a caption column (of a usable type for
    Parquet): say so before any work. A Parquet column of the wrong type makes every row unusable, so
    it is the file's problem, refused here, rather than one reject per row."""
    if source.format == "parquet":
        try:
            schema = pq.read_schema(storage.open_input(source.uri, endpoint))
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{source.uri}: not a readable Parquet file ({e})") from e
        image_col = _pick(schema.names, IMAGE_COLUMNS, source.uri, "image bytes")
        caption_col = _pick(schema.names, CAPTION_COLUMNS, source.uri, "caption")
        image_type = schema.field(image_col).type
        if pa.types.is_struct(image_type):
            image_type = image_type.field("bytes").type if image_type.get_field_index("bytes") >= 0 else image_type
        for col, kind in ((image_col, image_type), (caption_col, schema.field(caption_col).type)):
            if not _bytes_like(kind):
                raise UserError(f"{source.uri}: column {col!r} has type {schema.field(col).type}; it must hold "
                                "binary or string values (an image column may be a struct with binary 'bytes')")
    elif source.format in ("csv", "jsonl"):
        first = next((row for row in _manifest_rows(source, endpoint) if row is not None), None)
        if first is not None:
            _pick(list(first), PATH_COLUMNS, source.uri, "image path")
            _pick(list(first), CAPTION_COLUMNS, source.uri, "caption")


def _bytes_like(kind: pa.DataType) -> bool:
    """Types ``pc.cast(..., pa.binary())`` takes (an all-null column just means every row is missing)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind))


def _pick(names: list, candidates: tuple[str, ...], uri: str, what: str) -> str:
    for name in candidates:
        if name in names:
            return name
    found = ", ".join(str(n) for n in names)
    raise UserError(f"{uri}: no {what} column (looked for {', '.join(candidates)}; found {found})")


def _extension(uri: str) -> str:
    """``.tar.gz``-style double extensions for compressed tars, else the last one; "" for none."""
    name = storage.basename(uri).lower()
    for ext in TAR_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return name[name.rfind("."):] if "." in name else ""


# ---- reading (worker side) --------------------------------------------------------------------------

def read_source(source: Source, endpoint: str = "") -> Iterator[RawSample]:
    reader = {"webdataset": _read_tar, "parquet": _read_parquet, "csv": _read_manifest, "jsonl": _read_manifest}
    return reader[source.format](source, endpoint)


def _printable(text: str) -> str:
    """A name as valid UTF-8 text for keys: bytes that ``surrogateescape`` kept come out as ``\\xNN``, a lone
    surrogate from a JSON escape as ``\\udNNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _missing(image: bytes | None, caption: bytes | None) -> str:
    return "missing_image" if image is None else "missing_caption" if caption is None else ""


@dataclass
class _TarSample:
    """The members of one key read so far; the first problem found is the sample's reason."""

    key: str
    error: str = ""
    image: bytes | None = None
    caption: bytes | None = None

    def take(self, kind: str, member: tarfile.TarInfo, max_bytes: int) -> bool:
        """Whether to read this image or caption member, decided from its header before a byte of it."""
        if self.error:
            return False
        if not member.isfile():  # a symlink, hardlink, device or FIFO: never followed
            self.error = "not_a_regular_file"
        elif member.size > max_bytes:
            self.error = "member_too_large"
        elif (self.image if kind == "image" else self.caption) is not None:
            self.error = "duplicate_member"  # e.g. a.b.jpg + a.c.jpg: webdataset's one sample "a"
        return not self.error

    def result(self) -> RawSample:
        if self.error:
            return RawSample(self.key, error=self.error)
        return RawSample(self.key, self.image, self.caption, _missing(self.image, self.caption))


def _member_kind(ext: str) -> str:
    """"image", "caption" or "" (other fields, never read) from a webdataset field name like ``b.jpg``."""
    kind = ext.rsplit(".", 1)[-1].lower()
    return "image" if kind in IMAGE_EXTENSIONS else "caption" if kind == CAPTION_EXTENSION else ""


def _skip(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
    """Read past a member's data in 64 KiB chunks; False when the data ends first. (tarfile's own skip
    would spin through EOF for every block a lying header claims: a PAX size of 10**18 never ends.)"""
    data = tar.extractfile(member)  # None for members without data (links, devices, directories)
    left = member.size if data is not None else 0
    while left > 0:
        chunk = data.read(min(left, 1 << 16))
        if not chunk:
            return False
        left -= len(chunk)
    return True


def _read_tar(source: Source, endpoint: str) -> Iterator[RawSample]:
    """Stream a tar shard; on truncation keep what was read and reject the sample cut in half.

    A key seen again after other keys (members not adjacent, or a repeated sample) is ``duplicate_key``:
    reading on would silently merge or split samples. Memory is bounded by two members of at most
    ``max_member_bytes`` (one image, one caption); everything else is skipped unread.
    """
    fs, path = storage.resolve(source.uri, endpoint)
    max_bytes = source.limits.max_member_bytes
    current: _TarSample | None = None
    current_raw = ""
    seen: set[str] = set()
    skipped = 0
    try:
        with fs.open_input_stream(path) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
            for member in tar:
                match = WEBDATASET_KEY.match(member.name)
                if member.isdir() or match is None:
                    skipped += 1
                    if not _skip(tar, member):
                        break
                    continue
                raw_key, ext = match.groups()
                if current is None or raw_key != current_raw:
                    if current is not None:
                        yield current.result()
                    current, current_raw = _TarSample(_printable(raw_key)), raw_key
                    if not _is_utf8(raw_key):
                        current.error = "invalid_utf8_name"
                    elif raw_key in seen:
                        current.error = "duplicate_key"
                    seen.add(raw_key)
                kind = _member_kind(ext)
                if kind and current.take(kind, member, max_bytes):
                    data = tar.extractfile(member).read(member.size)
                    if len(data) < member.size:
                        current.error = "truncated_tar"
                        break
                    setattr(current, kind, data)
                elif not _skip(tar, member):
                    current.error = current.error or "truncated_tar"
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        # The sample being read when the data ended is lost (one already rejected for what its header
        # said keeps that reason); a shard with no sample at all is not a tar (or not readable) at all.
        if current is None:
            yield RawSample(storage.basename(source.uri), error="unreadable_shard")
            return
        current.error = current.error or "truncated_tar"
    if current is not None:
        yield current.result()
    if skipped:
        log.debug("%s: %d members are directories or have no webdataset key (no dot, or a hidden name)",
                  source.uri, skipped)


def _read_parquet(source: Source, endpoint: str) -> Iterator[RawSample]:
    """Rows in file order, one row group at a time: a damaged row group rejects each of its rows not yet
    read (counted from the footer) and reading goes on with the next, so the input count stays the
    file's row count."""
    name = storage.basename(source.uri)
    try:
        pf = pq.ParquetFile(storage.open_input(source.uri, endpoint))
        names = pf.schema_arrow.names
        image_col = _pick(names, IMAGE_COLUMNS, source.uri, "image bytes")
        caption_col = _pick(names, CAPTION_COLUMNS, source.uri, "caption")
    except (OSError, pa.ArrowException, UserError):  # UserError: the file changed since check_columns
        yield RawSample(name, error="unreadable_shard")
        return
    columns = [image_col, caption_col] + ([KEY_COLUMN] if KEY_COLUMN in names else [])
    seen: set[str] = set()
    row = 0
    for group in range(pf.num_row_groups):
        end = row + pf.metadata.row_group(group).num_rows
        try:
            for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=columns):
                for sample in _parquet_rows(batch, image_col, caption_col, name, row, source.limits.max_member_bytes):
                    if sample.key in seen:
                        sample = RawSample(sample.key, error="duplicate_key")
                    seen.add(sample.key)
                    yield sample
                    row += 1
        except (OSError, pa.ArrowException):
            for n in range(row, end):
                yield RawSample(f"{name}:{n:09d}", error="unreadable_shard")
            row = end


def _parquet_rows(batch: pa.RecordBatch, image_col: str, caption_col: str, name: str, first_row: int,
                  max_bytes: int) -> list[RawSample]:
    """One batch as samples; keys from the ``key`` column, else ``<file name>:<row>`` (unique per source)."""
    images = batch.column(image_col)
    if pa.types.is_struct(images.type):  # Hugging Face's Image feature: {bytes, path}
        images = pc.struct_field(images, "bytes")
    images = pc.cast(images, pa.binary()).to_pylist()
    captions = pc.cast(batch.column(caption_col), pa.binary()).to_pylist()
    keys = batch.column(KEY_COLUMN).to_pylist() if KEY_COLUMN in batch.schema.names else [None] * len(images)
    samples = []
    for n, (image, caption, key) in enumerate(zip(images, captions, keys)):
        key = str(key) if key is not None else f"{name}:{first_row + n:09d}"
        if max(len(image or b""), len(caption or b"")) > max_bytes:
            samples.append(RawSample(key, error="member_too_large"))
        else:
            samples.append(RawSample(key, image, caption, _missing(image, caption)))
    return samples


def _manifest_rows(source: Source, endpoint: str) -> Iterator[dict | None]:
    """Rows of a CSV/JSONL manifest as dicts (None for a row that cannot be parsed or is not an object).

    The file is streamed, so a manifest of any length holds one row in memory. Bytes are decoded with
    ``surrogateescape`` so text that is not UTF-8 survives to the checks as its original bytes instead of
    failing the whole file; a leading BOM (Excel's CSVs) is dropped. JSONL rows end at a newline only (a
    U+2028 inside a JSON string is text, as JSON says).
    """
    fs, path = storage.resolve(source.uri, endpoint)
    with fs.open_input_stream(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                                             newline="") as text:
        if source.format == "csv":
            rows = csv.DictReader(text)
            while True:
                try:
                    yield next(rows)
                except StopIteration:
                    return
                except csv.Error:  # e.g. a field over csv.field_size_limit(); the reader goes on at the next line
                    yield None
        for line in text:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, a 5000-digit int, [[[[... nested too deep
                row = None
            yield row if isinstance(row, dict) else None


def _caption_bytes(caption: object) -> bytes | None:
    """A manifest caption as its bytes: surrogate-escaped bytes go back to what the file held; a lone
    surrogate (JSON's ``"\\ud800"``) is kept as its (invalid) UTF-8 form so filters count it invalid_utf8."""
    if not isinstance(caption, str):
        return None
    try:
        return caption.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return caption.encode("utf-8", "surrogatepass")


def _read_manifest(source: Source, endpoint: str) -> Iterator[RawSample]:
    name = storage.basename(source.uri)
    base = storage.dirname(source.uri)
    roots = _Roots(source, endpoint)
    path_col = caption_col = ""
    for n, row in enumerate(_manifest_rows(source, endpoint)):
        if row is None:
            yield RawSample(f"{name}:{n}", error="bad_manifest_row")
            continue
        if not path_col:
            path_col = _pick(list(row), PATH_COLUMNS, source.uri, "image path")
            caption_col = _pick(list(row), CAPTION_COLUMNS, source.uri, "caption")
        ref = row.get(path_col)
        if not isinstance(ref, str) or not ref:
            yield RawSample(f"{name}:{n}", error="missing_image")
            continue
        sample = RawSample(_printable(ref), caption=_caption_bytes(row.get(caption_col)))
        if not _is_utf8(ref):
            sample.error = "invalid_utf8_name"
        else:
            uri = ref if "://" in ref or ref.startswith("/") else storage.join(base, ref)
            sample.image, sample.error = roots.read(uri, source.limits.max_member_bytes)
        if not sample.error:
            sample.error = "missing_caption" if sample.caption is None else ""
        yield sample


class _Roots:
    """Where a manifest's rows may point, and the bounded read of what they name.

    Local paths are resolved (``..`` and symlinks) before the check and opened without following a
    link swapped in afterwards; only regular files are read (a FIFO would hang, ``/dev/zero`` never end).
    """

    def __init__(self, source: Source, endpoint: str) -> None:
        configured = source.limits.allowed_roots or (_default_root(source.uri),)
        self.local = [os.path.realpath(r) for r in configured if not storage.is_s3(r)]
        self.s3 = [_s3_prefix(r) for r in configured if storage.is_s3(r)]
        self.endpoint = endpoint

    def read(self, uri: str, max_bytes: int) -> tuple[bytes | None, str]:
        """(bytes, "") or (None, reason)."""
        if storage.is_s3(uri):
            return self._read_s3(uri, max_bytes)
        if "://" in uri:
            return None, "unsupported_uri"  # http(s)://, file://, ...: clipflow never downloads
        try:
            real = os.path.realpath(uri)
            if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.local):
                return None, "outside_allowed_roots"
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):  # missing, unreadable, a NUL in the name
            return None, "unreadable_image"
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return None, "not_a_regular_file"
            if info.st_size > max_bytes:
                return None, "member_too_large"
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)  # the file may have grown since fstat
        except OSError:
            return None, "unreadable_image"
        finally:
            os.close(fd)
        return (None, "member_too_large") if len(data) > max_bytes else (data, "")

    def _read_s3(self, uri: str, max_bytes: int) -> tuple[bytes | None, str]:
        key = posixpath.normpath(uri[len(storage.S3):])
        if not any((key + "/").startswith(prefix) for prefix in self.s3):
            return None, "outside_allowed_roots"
        try:
            fs, path = storage.resolve(storage.S3 + key, self.endpoint)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return None, "unreadable_image"
            if info.type != pafs.FileType.File:
                return None, "not_a_regular_file"
            if (info.size or 0) > max_bytes:
                return None, "member_too_large"
            with fs.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
        except (OSError, ValueError, pa.ArrowException):
            return None, "unreadable_image"
        return (None, "member_too_large") if len(data) > max_bytes else (data, "")


def _default_root(manifest_uri: str) -> str:
    """A manifest may point into its own directory tree, or, on S3, anywhere in its bucket."""
    if storage.is_s3(manifest_uri):
        return storage.S3 + manifest_uri[len(storage.S3):].split("/", 1)[0]
    return storage.dirname(os.path.abspath(manifest_uri))


def _s3_prefix(root: str) -> str:
    """``s3://bucket/a/`` -> ``bucket/a/``: keys under it, compared with a trailing slash."""
    return posixpath.normpath(root[len(storage.S3):]).rstrip("/") + "/"
