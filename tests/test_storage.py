"""workflows.common.storage on local paths and on a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workflows.common import storage


def test_local_roundtrip_glob_and_delete(tmp_path: Path) -> None:
    base = str(tmp_path / "d")
    for name in ("a.tar", "b.tar", "c.txt", "sub/d.tar"):
        storage.write_bytes(storage.join(base, name), name.encode())
    assert storage.read_bytes(storage.join(base, "a.tar")) == b"a.tar"
    assert storage.glob(f"{base}/*.tar") == [f"{base}/a.tar", f"{base}/b.tar"]  # not sub/d.tar
    assert storage.glob(f"{base}/**/*.tar") == [f"{base}/sub/d.tar"]
    assert storage.glob(f"{base}/a.tar") == [f"{base}/a.tar"]
    assert storage.glob(f"{base}/missing*.tar") == []
    assert storage.list_files(base) == [f"{base}/{n}" for n in ("a.tar", "b.tar", "c.txt")]
    assert storage.is_dir(base) and storage.exists(f"{base}/c.txt") and not storage.exists(f"{base}/zzz")
    storage.delete(f"{base}/a.tar")
    storage.delete(f"{base}/sub")
    storage.delete(f"{base}/never-existed")
    assert storage.list_files(base, recursive=True) == [f"{base}/b.tar", f"{base}/c.txt"]


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write leaves the previous file intact and no temp file behind."""
    target = str(tmp_path / "f.bin")
    storage.write_bytes(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_bytes(target, b"new")
    monkeypatch.undo()
    assert Path(target).read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_join_and_names_keep_s3_uris() -> None:
    assert storage.join("s3://bucket/a", "b", "c.tar") == "s3://bucket/a/b/c.tar"
    assert storage.dirname("s3://bucket/a/b.tar") == "s3://bucket/a"
    assert storage.basename("s3://bucket/a/b.tar") == "b.tar"
    fs, path = storage.resolve("s3://bucket/a/", endpoint="http://127.0.0.1:9")
    assert path == "bucket/a" and fs.type_name == "s3"


@pytest.mark.integration
def test_s3_roundtrip(s3_server) -> None:
    bucket = s3_server.create_bucket("storage-test")
    endpoint = s3_server.endpoint
    base = f"s3://{bucket}/x"
    storage.write_bytes(f"{base}/one.tar", b"1", endpoint)
    storage.write_bytes(f"{base}/two.tar", b"22", endpoint)
    storage.write_bytes(f"{base}/deep/three.tar", b"333", endpoint)
    assert storage.read_bytes(f"{base}/two.tar", endpoint) == b"22"
    assert storage.glob(f"{base}/*.tar", endpoint) == [f"{base}/one.tar", f"{base}/two.tar"]
    assert storage.list_files(base, endpoint, recursive=True) == [
        f"{base}/deep/three.tar", f"{base}/one.tar", f"{base}/two.tar"]
    assert storage.exists(f"{base}/one.tar", endpoint) and not storage.exists(f"{base}/nope", endpoint)
    assert storage.info(f"{base}/deep/three.tar", endpoint).size == 3
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{base}/nope", endpoint)
    storage.delete(f"{base}/deep", endpoint)
    assert storage.glob(f"{base}/**/*.tar", endpoint) == []
    # The endpoint can also come from the standard environment variable.
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        assert storage.read_bytes(f"{base}/one.tar") == b"1"
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
