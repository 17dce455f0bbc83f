"""Hostile raw inputs (tests/hostile_corpus.py): each one a counted reject with its reason, or one clear
UserError before any work, never a crash, a hang, a silent drop or an unbounded read. Readers and filters
are called directly (milliseconds a case); one `run_preprocess` over the whole corpus checks the counts."""

from __future__ import annotations

import json
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_corpus import BIG_MEMBER, CASES, Images, write_case, write_corpus, write_tar

from workflows.common import storage
from workflows.common.config import ConfigError, PreprocessConfig, load_config
from workflows.common.errors import UserError
from workflows.data.filters import clean_caption, process_image
from workflows.data.preprocess import run_preprocess
from workflows.data.readers import ReadLimits, Source, expand_inputs, read_source

pytestmark = pytest.mark.timeout(180)


def _outcome(caption: bytes | None, image: bytes | None, error: str, cfg: PreprocessConfig) -> str:
    """What preprocessing makes of one sample: the reader's reason, else the caption's, else the image's."""
    if error:
        return error
    _, reason = clean_caption(caption, cfg)
    return reason or process_image(image, cfg)[1]


def _outcomes(inputs: list[str], limits: ReadLimits | None = None, endpoint: str = "") -> list[str]:
    cfg = PreprocessConfig()
    return [_outcome(s.caption, s.image, s.error, cfg)
            for source in expand_inputs(inputs, "auto", endpoint, limits) for s in read_source(source, endpoint)]


@pytest.mark.parametrize("case", CASES)
def test_each_hostile_case_is_counted_with_its_reason(case: str, tmp_path: Path) -> None:
    expected = write_case(case, tmp_path)
    assert _outcomes([str(tmp_path)]) == expected


def test_keys_are_unique_per_source(tmp_path: Path) -> None:
    write_case("parquet_without_keys", tmp_path)
    keys = [s.key for src in expand_inputs([str(tmp_path)], "auto") for s in read_source(src)]
    assert keys == ["parquet_without_keys_a.parquet:000000000", "parquet_without_keys_b.parquet:000000000"]


def test_a_glob_reads_compressed_tars_and_skips_img2dataset_sidecars(tmp_path: Path) -> None:
    write_case("tar_gz_in_directory", tmp_path)
    write_case("img2dataset_sidecars", tmp_path)
    found = [storage.basename(s.uri) for s in expand_inputs([f"{tmp_path}/*"], "auto")]
    assert found == ["00000.tar", "tar_gz_in_directory.tar.gz"]


def test_oversized_members_are_rejected_unread(tmp_path: Path) -> None:
    """The header's size decides: a 1 GiB member in a 200-byte .tgz, and a real 64 MiB + 1 one (a few
    KB compressed), are rejected while memory stays far below the member's size."""
    header_only = tarfile.TarInfo("gib.jpg")
    header_only.size = 1 << 30
    write_tar(tmp_path / "gib.tgz", [header_only])
    write_case("huge_member", tmp_path)
    for name, limit in (("gib.tgz", 4 << 20), ("huge_member.tgz", 16 << 20)):
        tracemalloc.start()
        errors = [s.error for s in read_source(Source(str(tmp_path / name), "webdataset", 0, 0))]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert errors[0] == "member_too_large" and peak < limit < BIG_MEMBER, (name, errors, peak)


def test_configured_limits_and_roots(tmp_path: Path) -> None:
    """``preprocess.max_member_bytes`` caps tar members, Parquet cells and listed files alike; widening
    ``allowed_roots`` to / still never reads a device or FIFO."""
    images = Images()
    image = images.jpeg()
    write_tar(tmp_path / "t.tar", [("a.jpg", image), ("a.txt", b"small caption")])
    pq.write_table(pa.table({"jpg": [image], "caption": ["c"]}), tmp_path / "p.parquet")
    (tmp_path / "img.jpg").write_bytes(image)
    (tmp_path / "m.csv").write_text("image,caption\nimg.jpg,c\n")
    small = ReadLimits(max_member_bytes=len(image) - 1)
    assert _outcomes([str(tmp_path)], small) == ["member_too_large"] * 3
    assert _outcomes([str(tmp_path)], ReadLimits(max_member_bytes=len(image))) == [""] * 3
    (tmp_path / "m.csv").write_text("image,caption\n/dev/zero,zeros\n/etc/passwd,text\n")
    anywhere = ReadLimits(allowed_roots=("/",))
    assert [s.error for s in read_source(Source(str(tmp_path / "m.csv"), "csv", 0, 0, anywhere))] == [
        "not_a_regular_file", ""]
    elsewhere = ReadLimits(allowed_roots=(str(tmp_path / "other"),))
    (tmp_path / "m.csv").write_text("image,caption\nimg.jpg,c\n")
    assert [s.error for s in read_source(Source(str(tmp_path / "m.csv"), "csv", 0, 0, elsewhere))] == [
        "outside_allowed_roots"]


def test_a_damaged_row_group_rejects_its_rows_only(tmp_path: Path) -> None:
    images = Images()
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"jpg": [images.jpeg() for _ in range(6)], "caption": [f"c{i}" for i in range(6)]}),
                   path, row_group_size=2, compression="none")
    offset = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    assert _outcomes([str(path)]) == ["", "", "unreadable_shard", "unreadable_shard", "", ""]


def test_input_level_problems_are_one_clear_line(tmp_path: Path) -> None:
    """A Parquet column of the wrong type makes every row unusable: the file is refused, with what to fix."""
    pq.write_table(pa.table({"jpg": [b"x"], "caption": [1]}), tmp_path / "int_caption.parquet")
    with pytest.raises(UserError, match=r"column 'caption' has type int64; it must hold binary or string"):
        expand_inputs([str(tmp_path / "int_caption.parquet")], "auto")
    pq.write_table(pa.table({"image": pa.array([{"path": "a"}], pa.struct([("path", pa.string())])),
                             "caption": ["c"]}), tmp_path / "no_bytes.parquet")
    with pytest.raises(UserError, match="column 'image' has type struct"):
        expand_inputs([str(tmp_path / "no_bytes.parquet")], "auto")
    # The column check looks past a broken first line instead of leaving it to the workers.
    (tmp_path / "cols.jsonl").write_text("{broken\n" + json.dumps({"img": "a.jpg", "caption": "c"}) + "\n")
    with pytest.raises(UserError, match="no image path column"):
        expand_inputs([str(tmp_path / "cols.jsonl")], "auto")


def test_new_preprocess_fields_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BMPX not formats PIL opens") as info:
        load_config(None, ["preprocess.image_formats=[JPEG, BMPX]", "preprocess.max_member_bytes=0"])
    assert "preprocess.max_member_bytes=0 must be >= 1" in str(info.value)
    cfg = load_config(None, [f"home={tmp_path}", "preprocess.allowed_roots=[data/images, s3://b/p]"])
    assert cfg.preprocess.allowed_roots == [str(Path.cwd() / "data" / "images"), "s3://b/p"]
    assert ReadLimits.from_config(cfg.preprocess).allowed_roots == tuple(cfg.preprocess.allowed_roots)


def test_s3_manifest_rows_stay_in_the_manifest_bucket(s3_server, tmp_path: Path) -> None:
    endpoint = s3_server.endpoint
    home, other = s3_server.create_bucket("hostile-home"), s3_server.create_bucket("hostile-other")
    image = Images().jpeg()
    for bucket in (home, other):
        storage.write_bytes(f"s3://{bucket}/img/a.jpg", image, endpoint)
    storage.write_bytes(f"s3://{home}/lists/m.csv", (
        f"image,caption\n../img/a.jpg,up one\ns3://{home}/img/a.jpg,same bucket\ns3://{other}/img/a.jpg,elsewhere\n"
        f"../../{other}/img/a.jpg,dot dot out\n").encode(), endpoint)
    assert _outcomes([f"s3://{home}/lists/m.csv"], endpoint=endpoint) == [
        "", "", "outside_allowed_roots", "outside_allowed_roots"]
    both = ReadLimits(allowed_roots=(f"s3://{home}", f"s3://{other}/img"))
    assert _outcomes([f"s3://{home}/lists/m.csv"], both, endpoint) == ["", "", "", ""]


@pytest.mark.integration
def test_preprocess_over_the_whole_corpus(tmp_path: Path, ray_runtime) -> None:
    """Every case in one directory input: the run ends, and every sample is counted under its reason."""
    raw = tmp_path / "raw"
    raw.mkdir()
    expected = Counter(reason for _, outcomes in write_corpus(raw) for reason in outcomes)
    cfg = load_config(None, [f"home={tmp_path}", f"preprocess.inputs=[{raw}]", "preprocess.image_size=32",
                             "preprocess.min_side=16", "tokenizer.vocab_size=515"])
    counts = run_preprocess(cfg).manifest.counts
    assert counts["input"] == counts["written"] + counts["duplicates"] + sum(counts["rejected"].values())
    assert counts == {"input": sum(expected.values()), "written": expected.pop(""), "duplicates": 0,
                      "rejected": dict(sorted(expected.items()))}
    assert sum(p.stat().st_size for p in raw.rglob("*") if p.is_file()) < 1 << 20  # made on the fly, tiny
