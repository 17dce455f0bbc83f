"""Local paths and ``s3://`` URIs behind one small API (the only module that builds filesystems).

Every stage reads and writes through these helpers, so the same config runs on a laptop (local
paths) and on a cluster (``s3://bucket/prefix``, AWS or any S3-compatible store). The S3 endpoint
comes from the caller (``cfg.storage.s3_endpoint``) or ``$AWS_ENDPOINT_URL``; credentials and region
come from the standard AWS environment / config chain.

Writes are atomic: a reader never sees half a file. Locally the bytes go to a temp name in the same
directory and are renamed; on S3 a single PUT only becomes visible once complete. A killed writer can
leave its temp file behind: the first write into a directory in a process removes those older than
``STALE_TEMP_S`` (a writer holds its temp file for one buffered write, seconds at most).

Storage errors that no retry can fix (a full, read-only or forbidden store, a missing bucket) become a
``StorageError``, one line naming the path and what to do: ``check_writable`` before work starts,
``storage_error`` for an error that surfaced elsewhere (a Ray Train worker's checkpoint upload).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
import re
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs

from workflows.common.errors import UserError

S3 = "s3://"
_WILDCARDS = "*?["
TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 30 * 60  # margin for clocks that differ between hosts sharing a file system
_swept: set[str] = set()  # directories whose stale temp files this process removed
COPY_CHUNK_BYTES = 8 << 20  # a download streams through memory in pieces this big

# errno -> what to do; pyarrow's OSErrors carry the errno too
NON_TRANSIENT_ERRNOS = {
    errno.ENOSPC: "free space there or set storage.path to a store with room",
    errno.EDQUOT: "raise the quota or set storage.path to a store with room",
    errno.EROFS: "set storage.path to a writable location",
    errno.EACCES: "give this user write access there or set storage.path to a writable location",
    errno.EPERM: "give this user write access there or set storage.path to a writable location",
}
# pyarrow's S3 errors carry no errno: these are the answers that another try gets again
_S3_NON_TRANSIENT = re.compile(r"AWS Error (ACCESS_DENIED|NO_SUCH_BUCKET)|Bucket '[^']*' not found")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3)


def s3_endpoint(configured: str | None = None) -> str:
    """The endpoint to use: the configured one, else ``$AWS_ENDPOINT_URL``, else "" (AWS)."""
    return configured or os.environ.get("AWS_ENDPOINT_URL", "")


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str, region: str) -> pafs.S3FileSystem:
    if not endpoint:
        return pafs.S3FileSystem(region=region or None)
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region or "us-east-1")


def resolve(uri: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path inside it). ``s3://b/k`` -> (S3FileSystem, "b/k")."""
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
        return _s3_filesystem(s3_endpoint(endpoint), region), uri[len(S3):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """Path join that keeps ``s3://`` URIs as URIs (``posixpath`` for them, ``os.path`` locally)."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    return posixpath.dirname(uri) if is_s3(uri) else os.path.dirname(uri)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def to_uri(uri_like: str, path: str) -> str:
    """A path inside the storage filesystem (as ``resolve`` returns it), written the way ``uri_like`` is."""
    return S3 + path if is_s3(uri_like) else path


def info(uri: str, endpoint: str | None = None) -> pafs.FileInfo:
    fs, path = resolve(uri, endpoint)
    return fs.get_file_info(path)


def exists(uri: str, endpoint: str | None = None) -> bool:
    return info(uri, endpoint).type != pafs.FileType.NotFound


def is_dir(uri: str, endpoint: str | None = None) -> bool:
    return info(uri, endpoint).type == pafs.FileType.Directory


def list_files(uri: str, endpoint: str | None = None, recursive: bool = False) -> list[str]:
    """Files (not directories) under directory ``uri``, sorted; [] when it does not exist."""
    fs, path = resolve(uri, endpoint)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    return sorted(to_uri(uri, i.path) for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


def glob(pattern: str, endpoint: str | None = None) -> list[str]:
    """Files matching ``pattern`` (``*``, ``?``, ``[..]``; ``**`` spans directories), sorted.

    Lists from the longest wildcard-free directory prefix, so a pattern over a large bucket only
    lists below its fixed part.
    """
    if not any(c in pattern for c in _WILDCARDS):
        return [pattern] if info(pattern, endpoint).type == pafs.FileType.File else []
    fs, path = resolve(pattern, endpoint)
    first = min(path.index(c) for c in _WILDCARDS if c in path)
    base = path[:first].rsplit("/", 1)[0] if "/" in path[:first] else ""
    deep = "**" in path
    selector = pafs.FileSelector(base, allow_not_found=True, recursive=deep or "/" in path[first:])
    matches = []
    for item in fs.get_file_info(selector):
        # fnmatch's "*" also matches "/": outside "**" patterns a match must be as deep as the pattern.
        if (item.type == pafs.FileType.File and fnmatch.fnmatchcase(item.path, path)
                and (deep or item.path.count("/") == path.count("/"))):
            matches.append(to_uri(pattern, item.path))
    return sorted(matches)


def read_bytes(uri: str, endpoint: str | None = None) -> bytes:
    fs, path = resolve(uri, endpoint)
    with fs.open_input_stream(path) as f:
        return f.read()


def download_tree(uri: str, local_dir: Path, endpoint: str | None = None, names: Iterable[str] | None = None) -> Path:
    """Copy every file under directory ``uri`` (or only ``names``, paths relative to it) into ``local_dir``,
    keeping relative paths; returns ``local_dir``. Files are streamed: a multi-GB file never sits in memory."""
    base = uri.rstrip("/")
    relative = (file_uri[len(base) + 1:] for file_uri in list_files(uri, endpoint, recursive=True))
    for name in relative if names is None else names:
        local = local_dir / name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs, path = resolve(join(base, name), endpoint)
        with fs.open_input_stream(path) as source, open(local, "wb") as target:
            shutil.copyfileobj(source, target, COPY_CHUNK_BYTES)
    return local_dir


def local_copy(uri: str, directory: str | Path, endpoint: str | None = None) -> str:
    """A local path holding the file ``uri``: the path itself when local, else a download into ``directory``
    (named by its basename: callers give each download its own directory when names may clash)."""
    if not is_s3(uri):
        return uri
    local = Path(directory) / basename(uri)
    local.write_bytes(read_bytes(uri, endpoint))
    return str(local)


def open_input(uri: str, endpoint: str | None = None):
    """A seekable pyarrow input file (what ``pyarrow.parquet`` and ``tarfile`` need)."""
    fs, path = resolve(uri, endpoint)
    return fs.open_input_file(path)


def makedirs(uri: str, endpoint: str | None = None) -> None:
    if not is_s3(uri):  # S3 has no directories; keys imply them
        fs, path = resolve(uri, endpoint)
        fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes, endpoint: str | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (temp name + rename locally; one PUT on S3)."""
    fs, path = resolve(uri, endpoint)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if directory not in _swept:
        remove_stale_temps(directory)
        _swept.add(directory)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def delete(uri: str, endpoint: str | None = None) -> None:
    """Remove a file or a directory tree; nothing to do when absent."""
    fs, path = resolve(uri, endpoint)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


class StorageError(UserError):
    """A store that refuses writes for a reason no retry fixes; the message names the path and what to do."""


def storage_error(exc: BaseException, uri: str) -> StorageError | None:
    """``exc`` (or an error in its cause chain) as a StorageError when no retry can fix it, else None.
    ``uri`` is named when the error itself names no file (pyarrow's write errors do not)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, StorageError):
            return error
        if isinstance(error, OSError) and error.errno in NON_TRANSIENT_ERRNOS:
            code = error.errno
            return StorageError(f"cannot write {error.filename or uri}: {os.strerror(code)} "
                                f"({errno.errorcode[code]}); {NON_TRANSIENT_ERRNOS[code]}")
        found = _S3_NON_TRANSIENT.search(str(error)) if isinstance(error, OSError) else None
        if found:
            return StorageError(f"cannot write {uri}: {found.group(0)}; check the bucket in storage.path and "
                                f"that these credentials may write and delete objects there")
        error = error.__cause__ or error.__context__
    return None


def check_writable(uri: str, endpoint: str | None = None) -> None:
    """Write and delete a small probe file in directory ``uri``: a StorageError now, not after startup."""
    probe = join(uri, f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"clipflow storage probe\n", endpoint)
        delete(probe, endpoint)
    except OSError as exc:
        raise storage_error(exc, uri) or StorageError(
            f"cannot write {uri} ({exc}); check storage.path (and storage.s3_endpoint, credentials)") from exc


def remove_stale_temps(directory: str, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the temp files that killed writers left in a local ``directory``; returns how many."""
    removed, cutoff = 0, time.time() - older_than_s
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.remove(entry.path)
                        removed += 1
                except OSError:  # removed by another process first, or not ours to remove: the write goes on
                    continue
    return removed
