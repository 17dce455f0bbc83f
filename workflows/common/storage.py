"""Local paths and ``s3://`` URIs behind one small API (the only module that builds filesystems).

Every stage reads and writes through these helpers, so the same config runs on a laptop (local
paths) and on a cluster (``s3://bucket/prefix``, AWS or any S3-compatible store). The S3 endpoint
comes from the caller (``cfg.storage.s3_endpoint``) or ``$AWS_ENDPOINT_URL``; credentials and region
come from the standard AWS environment / config chain.

Writes are atomic: a reader never sees half a file. Locally the bytes go to a temp name in the same
directory and are renamed; on S3 a single PUT only becomes visible once complete.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3 = "s3://"
_WILDCARDS = "*?["
TEMP_PREFIX = ".tmp-"


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


def download_tree(uri: str, local_dir: Path, endpoint: str | None = None) -> Path:
    """Copy every file under directory ``uri`` into ``local_dir``, keeping relative paths; returns ``local_dir``."""
    for file_uri in list_files(uri, endpoint, recursive=True):
        local = local_dir / file_uri[len(uri.rstrip("/")) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(read_bytes(file_uri, endpoint))
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
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

