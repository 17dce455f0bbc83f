"""A corpus of hostile raw inputs, each case written on the fly into a directory (kilobytes on disk).

Every case writes its own files (named after the case) into one directory and returns the outcome
preprocessing must give each of its samples, in reading order: "" for written, else the reject reason.
``write_corpus`` writes them all into one directory, which then is one valid preprocess input.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BIG_MEMBER = (64 << 20) + 1  # one byte over preprocess.max_member_bytes' default


class Images:
    """Distinct small JPEGs (so image dedup keeps each) and captions."""

    def __init__(self) -> None:
        self.count = 0

    def jpeg(self, fmt: str = "JPEG") -> bytes:
        self.count += 1
        colour = (self.count * 37 % 256, self.count * 91 % 256, self.count * 53 % 256)
        out = io.BytesIO()
        Image.new("RGB", (64, 48), colour).save(out, format=fmt)
        return out.getvalue()

    def caption(self) -> bytes:
        return f"a photo numbered {self.count}".encode()


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as read: a 64 MiB member without 64 MiB in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


Member = tuple[str, bytes] | tarfile.TarInfo  # (name, data), or a header written as it is (links, lying sizes)


def write_tar(path: Path, members: list[Member]) -> None:
    mode = "w:gz" if path.name.endswith((".tgz", ".tar.gz")) else "w"
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def _pair(images: Images, key: str) -> list[Member]:
    return [(f"{key}.jpg", images.jpeg()), (f"{key}.txt", images.caption())]


def _write_manifest(path: Path, rows: list[tuple[str | bytes, bytes]]) -> None:
    """CSV rows of (image ref, caption) as raw bytes (a ref may be bytes that are not UTF-8)."""
    lines = [b"image,caption"]
    for ref, caption in rows:
        ref_bytes = ref if isinstance(ref, bytes) else ref.encode()
        lines.append(b'"' + ref_bytes + b'","' + caption + b'"')
    path.write_bytes(b"\n".join(lines) + b"\n")


def _image_file(root: Path, name: str, images: Images) -> str:
    (root / "img").mkdir(exist_ok=True)
    (root / "img" / name).write_bytes(images.jpeg())
    return f"img/{name}"


# ---- the cases --------------------------------------------------------------------------------------

def non_utf8_tar_name(root: Path, images: Images) -> list[str]:
    """Crashed the run (pyarrow refused the key)."""
    write_tar(root / "non_utf8_tar_name.tar", _pair(images, "good") + _pair(images, "bad\udcff"))
    return ["", "invalid_utf8_name"]


def non_utf8_csv_path(root: Path, images: Images) -> list[str]:
    ok = _image_file(root, "csv_ok.jpg", images)
    _write_manifest(root / "non_utf8_csv_path.csv", [(ok, images.caption()), (b"img/\xff.jpg", b"bad name")])
    return ["", "invalid_utf8_name"]


def lone_surrogate_caption(root: Path, images: Images) -> list[str]:
    """``"\\ud800"`` is a valid JSON escape but no UTF-8 text; it crashed the run."""
    ref = _image_file(root, "surrogate.jpg", images)
    (root / "lone_surrogate_caption.jsonl").write_text(json.dumps({"image": ref, "caption": "\ud800"}) + "\n")
    return ["invalid_utf8"]


def broken_first_jsonl_line(root: Path, images: Images) -> list[str]:
    """The column check skipped a broken first line and the worker raised the UserError instead."""
    ref = _image_file(root, "after_broken.jpg", images)
    caption = images.caption().decode()
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
    huge_int = '{"image": "x", "caption": ' + "1" * 5000 + "}"  # ValueError: over int's digit limit
    text = "{broken\n" + json.dumps({"image": ref, "caption": caption}) + "\n" + deep + "\n" + huge_int + "\n"
    (root / "broken_first_jsonl_line.jsonl").write_text(text)
    return ["bad_manifest_row", "", "bad_manifest_row", "bad_manifest_row"]


def line_separators_in_jsonl_caption(root: Path, images: Images) -> list[str]:
    """JSON strings may hold U+2028, NEL and form feeds unescaped; splitting the file with ``str.splitlines``
    cut such a row into broken pieces. A JSONL row ends at a newline only."""
    ref = _image_file(root, "separators.jpg", images)
    words = images.caption().decode().split(" ")
    caption = "\u2028".join(words[:2]) + "\x85" + "\x0c".join(words[2:])
    (root / "line_separators_in_jsonl_caption.jsonl").write_text(
        json.dumps({"image": ref, "caption": caption}, ensure_ascii=False) + "\n", encoding="utf-8")
    return [""]


def oversized_csv_field(root: Path, images: Images) -> list[str]:
    """A field over csv.field_size_limit() raised out of the reader."""
    ref = _image_file(root, "csv_big_field.jpg", images)
    _write_manifest(root / "oversized_csv_field.csv", [("x", b"y" * 200_000), (ref, images.caption())])
    return ["bad_manifest_row", ""]


def link_members(root: Path, images: Images) -> list[str]:
    """A sample of symlink/hardlink members vanished uncounted."""
    members = _pair(images, "real") + [_header("linked.jpg", tarfile.SYMTYPE, link="/etc/passwd"),
                                       _header("linked.txt", tarfile.LNKTYPE, link="real.txt")]
    write_tar(root / "link_members.tar", members)
    return ["", "not_a_regular_file"]


def tar_gz_in_directory(root: Path, images: Images) -> list[str]:
    """Skipped without a word in a directory, refused by a glob."""
    write_tar(root / "tar_gz_in_directory.tar.gz", _pair(images, "gz"))
    return [""]


def img2dataset_sidecars(root: Path, images: Images) -> list[str]:
    """img2dataset's {shard}_stats.json and metadata {shard}.parquet were read as inputs (phantom rejects)."""
    write_tar(root / "00000.tar", _pair(images, "000000000"))
    (root / "00000_stats.json").write_text(json.dumps({"count": 1, "successes": 1, "failed_to_download": 0}))
    pq.write_table(pa.table({"key": ["000000000"], "url": ["http://x/1.jpg"], "caption": ["c"],
                             "status": ["success"]}), root / "00000.parquet")
    return [""]


def dotted_keys(root: Path, images: Images) -> list[str]:
    """webdataset splits at the first dot: ``d.v1.jpg`` is field ``v1.jpg`` of key ``d`` (it was missing_image),
    and ``m.a.*`` + ``m.b.*`` are one sample ``m`` with two images (they merged silently)."""
    members = [("d.v1.jpg", images.jpeg()), ("d.v1.txt", images.caption())]
    members += [("m.a.jpg", images.jpeg()), ("m.a.txt", b"first"), ("m.b.jpg", images.jpeg()), ("m.b.txt", b"two")]
    write_tar(root / "dotted_keys.tar", members)
    return ["", "duplicate_member"]


def split_sample(root: Path, images: Images) -> list[str]:
    """Members of one key that are not adjacent: the key seen again is a reject, never a merge."""
    p_image, p_caption = images.jpeg(), images.caption()
    write_tar(root / "split_sample.tar", [("p.jpg", p_image)] + _pair(images, "q") + [("p.txt", p_caption)])
    return ["missing_caption", "", "duplicate_key"]


def parquet_without_keys(root: Path, images: Images) -> list[str]:
    """Two files without a key column both gave keys 000000000, ...; now prefixed by the file name."""
    for name in ("parquet_without_keys_a.parquet", "parquet_without_keys_b.parquet"):
        pq.write_table(pa.table({"jpg": [images.jpeg()], "caption": [images.caption().decode()]}), root / name)
    return ["", ""]


def parquet_repeated_key(root: Path, images: Images) -> list[str]:
    rows = [images.jpeg(), images.jpeg()]
    pq.write_table(pa.table({"key": ["k", "k"], "jpg": rows, "caption": ["one", "two"]}),
                   root / "parquet_repeated_key.parquet")
    return ["", "duplicate_key"]


def sixteen_bit_png(root: Path, images: Images) -> list[str]:
    """Came out pure white (PIL clips I;16 to 255); now scaled to 8 bits (checked on pixels in test_transforms)."""
    grey = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(grey).save(out, format="PNG")
    write_tar(root / "sixteen_bit_png.tar", [("g.png", out.getvalue()), ("g.txt", b"a grey ramp")])
    return [""]


def foreign_image_formats(root: Path, images: Images) -> list[str]:
    """PIL parsed any format it knows; BMP and TIFF are outside the default allow-list (JPEG, PNG, WEBP)."""
    write_tar(root / "foreign_image_formats.tar", [("bmp.jpg", images.jpeg("BMP")), ("bmp.txt", b"a bitmap"),
                                                   ("tif.png", images.jpeg("TIFF")), ("tif.txt", b"a tiff")])
    return ["image_format_not_allowed", "image_format_not_allowed"]


def huge_member(root: Path, images: Images) -> list[str]:
    """A member one byte over the cap, compressed to a few KB: it was read whole into memory."""
    big = tarfile.TarInfo("huge.jpg")
    big.size = BIG_MEMBER
    with tarfile.open(root / "huge_member.tgz", "w:gz", compresslevel=1) as tar:
        tar.addfile(big, io.BufferedReader(_Zeros(BIG_MEMBER)))
        for name, data in [("huge.txt", b"zeros")] + _pair(images, "after"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ["member_too_large", ""]


def lying_header(root: Path, images: Images) -> list[str]:
    """A PAX header claiming 10**18 bytes with no data after it: bounded, not a 10**14-block skip."""
    write_tar(root / "lying_header.tar", _pair(images, "before") + [_header("liar.jpg", size=10**18)])
    return ["", "member_too_large"]


def manifest_escapes(root: Path, images: Images) -> list[str]:
    """Manifest rows naming files outside the manifest's tree (``/etc/passwd`` went into training shards),
    devices and FIFOs (out of memory, a hang), directories, URLs clipflow would have to download."""
    inside = _image_file(root, "inside.jpg", images)
    (root / "img" / "escape_link.jpg").symlink_to("/etc/hostname")
    os.mkfifo(root / "img" / "fifo.jpg")
    rows = [(inside, images.caption()), ("/etc/passwd", b"passwords"), ("/dev/zero", b"endless"),
            ("../" * 12 + "etc/passwd", b"dot dot"), ("img/escape_link.jpg", b"a link out"),
            ("img/fifo.jpg", b"a pipe"), ("img", b"a directory"), ("img/missing.jpg", b"gone"),
            ("https://example.com/cat.jpg", b"a url")]
    _write_manifest(root / "manifest_escapes.csv", rows)
    return ["", "outside_allowed_roots", "outside_allowed_roots", "outside_allowed_roots", "outside_allowed_roots",
            "not_a_regular_file", "not_a_regular_file", "unreadable_image", "unsupported_uri"]


CASES: dict[str, Callable[[Path, Images], list[str]]] = {f.__name__: f for f in (
    non_utf8_tar_name, non_utf8_csv_path, lone_surrogate_caption, broken_first_jsonl_line,
    line_separators_in_jsonl_caption, oversized_csv_field, link_members, tar_gz_in_directory, img2dataset_sidecars,
    dotted_keys, split_sample, parquet_without_keys, parquet_repeated_key, sixteen_bit_png, foreign_image_formats,
    huge_member, lying_header, manifest_escapes)}


def write_case(name: str, root: Path, images: Images | None = None) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return CASES[name](root, images or Images())


def write_corpus(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Every case into ``root`` (one Images, so no two good images are equal): (case, outcomes)."""
    images = Images()
    for name in CASES:
        yield name, write_case(name, root, images)

