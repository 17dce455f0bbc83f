"""`clipflow preprocess` on real local Ray (and a real S3 server): formats, rejects, counts,
determinism, resume. Inputs are tens of samples so the whole file runs in about a minute."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_core.tokenizer import Tokenizer
from workflows.common import storage
from workflows.common.config import Config, ConfigError, load_config
from workflows.common.errors import UserError
from workflows.data.filters import clean_caption, process_image
from workflows.data.preprocess import run_preprocess
from workflows.data.readers import Source, read_source
from workflows.data.sample_data import generate_sample_data
from workflows.ops.cli import main as cli_main

pytestmark = pytest.mark.timeout(180)
SMALL = ["sample_data.train_samples=40", "sample_data.train_shards=2", "sample_data.image_size=48",
         "sample_data.zeroshot_per_class=1", "sample_data.retrieval_samples=2", "preprocess.image_size=32",
         "preprocess.min_side=16", "preprocess.rows_per_shard=12", "tokenizer.vocab_size=520"]


def _cfg(home: Path, *extra: str) -> Config:
    return load_config(None, [f"home={home}", *SMALL, *extra])


def _jpeg(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def _noisy_jpeg(size: tuple[int, int]) -> bytes:
    """Enough entropy data that cutting the file in half cuts the scan, not the headers."""
    import numpy as np
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _identity(counts: dict) -> bool:
    return counts["input"] == counts["written"] + counts["duplicates"] + sum(counts["rejected"].values())


@pytest.fixture(scope="module")
def sample(work_dir: Path) -> tuple[Path, dict]:
    home = work_dir / "pre-sample"
    summary = generate_sample_data(_cfg(home).sample_data)
    return home, summary


@pytest.fixture(scope="module")
def baseline(sample, ray_runtime) -> dict:
    home, _ = sample
    return run_preprocess(_cfg(home))


# ---- filters and readers without Ray --------------------------------------------------------------------

def test_image_filters_each_reason() -> None:
    cfg = Config().preprocess
    cfg.image_size, cfg.min_side, cfg.max_aspect_ratio, cfg.max_image_pixels = 32, 16, 2.0, 200 * 200
    good = _noisy_jpeg((80, 60))
    cases = {b"": "image_empty", b"\xff\xd8\xff\xe0garbage": "image_corrupt", good[: len(good) // 2]: "image_truncated",
             _jpeg((300, 300)): "image_too_large", _jpeg((10, 40)): "image_too_small",
             _jpeg((100, 30)): "bad_aspect_ratio"}
    for data, reason in cases.items():
        assert process_image(data, cfg) == (b"", reason)
    out, reason = process_image(good, cfg)
    assert reason == "" and Image.open(io.BytesIO(out)).size == (32, 32)
    cfg.resize_mode = "keep_aspect"
    out, _ = process_image(good, cfg)
    assert Image.open(io.BytesIO(out)).size == (32, 24)


def test_draft_decoding_matches_full_decoding() -> None:
    """JPEG draft mode (DCT scaling) + bicubic gives nearly the pixels of full decode + bicubic."""
    import numpy as np
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((512, 384), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.save(buf, format="JPEG", quality=95)
    cfg = Config().preprocess
    cfg.image_size = 64
    drafted = np.asarray(Image.open(io.BytesIO(process_image(buf.getvalue(), cfg)[0])), dtype=np.float32)
    full = smooth.resize((85, 64), Image.BICUBIC).crop((10, 0, 74, 64))
    assert np.abs(drafted - np.asarray(full, dtype=np.float32)).mean() < 4.0


def test_caption_filters_each_reason() -> None:
    cfg = Config().preprocess
    cfg.caption_min_chars, cfg.caption_max_chars = 3, 20
    assert clean_caption(b"  a  red\tcircle\x00 ", cfg) == ("a red circle", "")
    assert clean_caption(b"red \xff circle", cfg) == ("", "invalid_utf8")
    assert clean_caption(b" \n\t ", cfg) == ("", "empty_caption")
    assert clean_caption(b"ab", cfg) == ("", "caption_too_short")
    assert clean_caption(b"x" * 21, cfg) == ("", "caption_too_long")


def test_reading_a_truncated_or_foreign_tar(tmp_path: Path, sample) -> None:
    _, summary = sample
    last = summary["train_shards"][-1]
    samples = list(read_source(Source(last, "webdataset", 0, 0)))
    assert [s.error for s in samples[:-1]] == [""] * (len(samples) - 1)  # readable samples are kept
    assert samples[-1].error == "truncated_tar" and len(samples) == 20
    (tmp_path / "not.tar").write_bytes(b"this is not a tar archive" * 50)
    assert [s.error for s in read_source(Source(str(tmp_path / "not.tar"), "webdataset", 0, 0))] == ["unreadable_shard"]


def test_bad_config_and_missing_inputs_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="matches no files"):
        run_preprocess(_cfg(tmp_path, f"preprocess.inputs={tmp_path}/nothing/*.tar"))
    with pytest.raises(UserError, match="matches no files"):
        run_preprocess(_cfg(tmp_path, f"preprocess.inputs={tmp_path}/missing.parquet"))
    with pytest.raises(ConfigError, match="jpeg_quality"):
        run_preprocess(_cfg(tmp_path, "preprocess.jpeg_quality=0"))
    (tmp_path / "x.dat").write_bytes(b"")
    with pytest.raises(UserError, match="input_format"):
        run_preprocess(_cfg(tmp_path, f"preprocess.inputs={tmp_path}/x.dat"))
    pq.write_table(pa.table({"jpg": [b"x"], "url": ["u"]}), tmp_path / "nocap.parquet")
    with pytest.raises(UserError, match="no caption column"):
        run_preprocess(_cfg(tmp_path, f"preprocess.inputs={tmp_path}/nocap.parquet"))
    with pytest.raises(ConfigError, match="bpe_path"):
        run_preprocess(_cfg(tmp_path, "tokenizer.source=openai_bpe"))
    assert not (tmp_path / "data" / "train").exists()  # nothing was started
    assert cli_main(["preprocess", "--set", f"home={tmp_path}", "--set", f"preprocess.inputs={tmp_path}/no"]) == 2


# ---- the pipeline on Ray ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_sample_data_counts_and_shards(sample, baseline) -> None:
    home, summary = sample
    m = baseline.manifest
    counts = m.counts
    assert counts["input"] == summary["train_samples"]  # every sample written by sample-data is counted
    assert counts["rejected"] == summary["expected_rejects"]
    assert counts["duplicates"] == summary["expected_duplicates"] == 1
    assert counts["written"] == 40 - 1  # the sample cut off by the truncated tar is a reject
    assert _identity(counts)
    out = home / "data" / "train"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m.to_dict()
    assert [s["rows"] for s in m.shards] == [12, 12, 12, 3]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(4)] + ["tokenizer"]
    tok = Tokenizer.load(out / "tokenizer")
    assert tok.id == m.tokenizer and tok.vocab_size == 520
    assert counts["written"] <= m.extra["tokenizer_train_captions"] <= counts["input"]  # every clean caption
    keys = []
    for shard in m.shards:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        table = pq.read_table(out / shard["path"])
        assert table.schema.names == ["key", "image", "caption", "tokens"]
        assert table.schema.field("tokens").type == pa.list_(pa.int32())
        for row in table.to_pylist():
            assert len(row["tokens"]) == 32 and row["tokens"][0] == tok.sot_token_id
            assert tok.eot_token_id in row["tokens"]
            # CLIP's BPE drops the spacing around punctuation; long captions are truncated.
            assert row["caption"].lower().replace(" ", "").startswith(tok.decode(row["tokens"]).replace(" ", ""))
            assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
            keys.append(row["key"])
    assert keys == sorted(keys)  # canonical order: source order, then order inside the source


@pytest.mark.integration
def test_deterministic_and_up_to_date(sample, baseline, tmp_path: Path, capsys) -> None:
    home, _ = sample
    base = baseline.manifest
    again = run_preprocess(_cfg(home, f"preprocess.output={tmp_path}/other")).manifest
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in base.shards]
    assert again.content_hash == base.content_hash and again.tokenizer == base.tokenizer
    rerun = run_preprocess(_cfg(home))
    assert rerun.up_to_date and rerun.manifest.content_hash == base.content_hash
    # The command prints the one-screen summary: counts and every reject reason.
    assert cli_main(["preprocess", *(a for item in SMALL for a in ("--set", item)), "--set", f"home={home}"]) == 0
    out = capsys.readouterr().out
    assert "already up to date" in out and f"input samples   {base.counts['input']:>10,}" in out
    assert all(reason in out for reason in base.counts["rejected"])


@pytest.mark.integration
def test_resume_after_interruption(sample, baseline, tmp_path: Path) -> None:
    """Interrupted after the first committed shard: the shards in flight are cancelled and awaited, no
    manifest and no partial file remain, and the re-run reuses every committed shard unchanged."""
    home, _ = sample
    cfg = _cfg(home, f"preprocess.output={tmp_path}/out")

    class Interrupted(Exception):
        pass

    def stop_after_first(index: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        run_preprocess(cfg, on_shard=stop_after_first)
    out = tmp_path / "out"
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    committed = [name for name in visible if name.startswith("shard-")]
    assert visible == committed + ["tokenizer"] and committed  # no manifest, no partial (.tmp-) file
    expected = {s["path"]: s["sha256"] for s in baseline.manifest.shards}
    for name in committed:  # each committed shard is complete: the bytes of the same shard of the baseline
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == expected[name]
    mtimes = {name: (out / name).stat().st_mtime_ns for name in committed}
    result = run_preprocess(cfg)
    assert result.parts_reused == 2 and result.shards_reused == len(committed)
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == mtimes
    assert result.manifest.content_hash == baseline.manifest.content_hash
    assert not (out / "_work").exists()


@pytest.mark.integration
def test_dedup_and_shards_do_not_depend_on_task_counts(sample, baseline, tmp_path: Path) -> None:
    """The shuffle's map and reduce task counts split the work only: byte-identical shards, same counts."""
    home, _ = sample
    for m, p in [(1, 1), (2, 3), (2, 7)]:
        got = run_preprocess(_cfg(home, f"preprocess.output={tmp_path}/{m}-{p}", f"preprocess.dedup_map_tasks={m}",
                                  f"preprocess.dedup_partitions={p}"))
        assert got.dedup_tasks == (m, p)
        assert got.manifest.counts == baseline.manifest.counts
        assert [s["sha256"] for s in got.manifest.shards] == [s["sha256"] for s in baseline.manifest.shards]


def test_shard_plan_cuts_survivors_in_canonical_order() -> None:
    from workflows.data.shards import Piece, plan

    assert plan([5, 0, 3, 9], 4) == [[Piece(0, 0, 4)], [Piece(0, 4, 5), Piece(2, 0, 3)], [Piece(3, 0, 4)],
                                     [Piece(3, 4, 8)], [Piece(3, 8, 9)]]
    assert plan([0, 0], 4) == [] and plan([], 4) == []
    sizes = [7, 1, 12, 0, 30]
    cut = plan(sizes, 5)
    assert [sum(p.hi - p.lo for p in pieces) for pieces in cut] == [5] * 10
    for part, n in enumerate(sizes):  # every survivor of every part lands in exactly one shard
        covered = sorted(i for pieces in cut for p in pieces if p.part == part for i in range(p.lo, p.hi))
        assert covered == list(range(n))


@pytest.mark.integration
def test_shards_read_by_plain_pyarrow_and_ray_data(sample, baseline, ray_runtime) -> None:
    import pyarrow.dataset as pads
    import ray.data

    home, _ = sample
    out = home / "data" / "train"
    m = baseline.manifest
    table = pads.dataset(out, format="parquet", exclude_invalid_files=True).to_table()
    assert table.num_rows == m.counts["written"] and table.schema.names == ["key", "image", "caption", "tokens"]
    assert ray.data.read_parquet(str(out)).count() == m.counts["written"]
    meta = pq.read_schema(out / m.shards[0]["path"]).metadata
    assert meta[b"clipflow.tokenizer"].decode() == m.tokenizer
    assert set(json.loads(meta[b"clipflow.schema"])["columns"]) == {"key", "image", "caption", "tokens"}


@pytest.mark.integration
def test_tokenizer_trains_on_a_bounded_seeded_sample(sample, ray_runtime, tmp_path: Path) -> None:
    home, _ = sample
    runs = [run_preprocess(_cfg(home, f"preprocess.output={tmp_path}/{name}", "tokenizer.train_captions=10", *extra))
            for name, extra in [("a", ()), ("b", ()), ("c", ("tokenizer.seed=1",))]]
    # 2 sources: 5 captions from each, chosen by the seed
    assert [r.manifest.extra["tokenizer_train_captions"] for r in runs] == [10, 10, 10]
    assert runs[0].manifest.tokenizer == runs[1].manifest.tokenizer != runs[2].manifest.tokenizer


@pytest.mark.integration
def test_output_never_deletes_what_clipflow_did_not_write(sample, ray_runtime, tmp_path: Path) -> None:
    home, summary = sample
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, tar in enumerate(summary["train_shards"]):
        (raw / f"shard-{i:05d}.tar").write_bytes(Path(tar).read_bytes())
    with pytest.raises(UserError, match="holds 2 of the inputs"):  # output == the input folder
        run_preprocess(_cfg(home, f"preprocess.inputs={raw}/*.tar", f"preprocess.output={raw}"))
    assert sorted(p.name for p in raw.iterdir()) == ["shard-00000.tar", "shard-00001.tar"]
    # A user's file that looks like a shard survives a re-run that writes fewer shards; ours do not.
    out = tmp_path / "out"
    run_preprocess(_cfg(home, f"preprocess.output={out}", "preprocess.rows_per_shard=5"))
    (out / "shard-99999.parquet").write_bytes(b"the user's")
    m = run_preprocess(_cfg(home, f"preprocess.output={out}", "preprocess.rows_per_shard=100")).manifest
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet", "shard-99999.parquet"]
    assert len(m.shards) == 1


@pytest.mark.integration
def test_parquet_csv_jsonl_inputs_and_every_reason(tmp_path: Path, ray_runtime) -> None:
    """One run over all three non-tar formats; each reject reason appears exactly as planted."""
    src = tmp_path / "in"
    (src / "img").mkdir(parents=True)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    good = [_jpeg((64, 48), c) for c in colors]
    pq.write_table(pa.table({
        "key": ["p0", "p1", "p2", "p3", "p4", "p5"],
        "jpg": [good[0], good[1], good[0], None, _jpeg((8, 8)), _jpeg((120, 20))],
        "caption": ["red box", "green box", "another red box", "no image", "tiny", "wide"],
    }), src / "a.parquet")
    for i in (2, 3):
        (src / "img" / f"{i}.jpg").write_bytes(good[i])
    (src / "img" / "big.jpg").write_bytes(_jpeg((400, 400)))
    with open(src / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([["img/2.jpg", "blue box"], ["img/missing.jpg", "gone"], ["img/3.jpg", ""],
                     ["img/big.jpg", "huge"], ["img/2.jpg", "x" * 50]])
    with open(src / "c.jsonl", "wb") as f:
        f.write(json.dumps({"image": "img/3.jpg", "caption": "yellow box"}).encode() + b"\n")
        f.write(b'{"image": "img/2.jpg", "caption": "blue \xff box"}\n')
        f.write(b"{not json\n")
        f.write(json.dumps({"image": str(src / "img" / "2.jpg"), "caption": "b"}).encode() + b"\n")
    cfg = _cfg(tmp_path, f"preprocess.inputs=[{src}/a.parquet, {src}/b.csv, {src}]", "preprocess.caption_max_chars=40",
               "preprocess.caption_min_chars=2", "preprocess.max_image_pixels=100000", "preprocess.max_aspect_ratio=3",
               "preprocess.dedup=image_caption", "tokenizer.vocab_size=515", "preprocess.rows_per_shard=100")
    m = run_preprocess(cfg).manifest
    assert m.extra["sources"] == [f"{src}/a.parquet", f"{src}/b.csv", f"{src}/c.jsonl"]
    assert m.counts == {"input": 15, "written": 5, "duplicates": 0, "rejected": {
        "bad_aspect_ratio": 1, "bad_manifest_row": 1, "caption_too_long": 1, "caption_too_short": 1,
        "empty_caption": 1, "image_too_large": 1, "image_too_small": 1, "invalid_utf8": 1, "missing_image": 1,
        "unreadable_image": 1}}
    rows = pq.read_table(tmp_path / "data" / "train" / "shard-00000.parquet").to_pylist()
    # image_caption dedup keeps p2 (same image as p0, other caption); image-only dedup drops it.
    assert [r["caption"] for r in rows] == ["red box", "green box", "another red box", "blue box", "yellow box"]
    # Image-only dedup drops p2; the user-supplied OpenAI BPE file gives OpenAI's token ids.
    bpe = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    m2 = run_preprocess(_cfg(tmp_path, f"preprocess.inputs={src}/a.parquet", "preprocess.dedup=image",
                             f"preprocess.output={tmp_path}/o2", "tokenizer.source=openai_bpe",
                             f"tokenizer.bpe_path={bpe}")).manifest
    assert m2.counts["duplicates"] == 1 and _identity(m2.counts)
    m3 = run_preprocess(_cfg(tmp_path, f"preprocess.inputs={src}/a.parquet", "preprocess.dedup=none",
                             f"preprocess.output={tmp_path}/o3", "tokenizer.vocab_size=515")).manifest
    assert m3.counts["duplicates"] == 0 and m3.counts["written"] == m2.counts["written"] + 1
    first = pq.read_table(tmp_path / "o2" / "shard-00000.parquet").to_pylist()[0]
    assert first["tokens"][:4] == [49406, 736, 2063, 49407]  # "red box" in OpenAI's vocabulary


@pytest.mark.integration
def test_s3_inputs_and_output(s3_server, sample, ray_runtime, tmp_path: Path) -> None:
    home, summary = sample
    bucket = s3_server.create_bucket("preprocess-test")
    endpoint = s3_server.endpoint
    tar = summary["train_shards"][0]
    storage.write_bytes(f"s3://{bucket}/raw/train-00000.tar", Path(tar).read_bytes(), endpoint)
    storage.write_bytes(f"s3://{bucket}/raw/images/img.jpg", _jpeg((64, 64)), endpoint)
    storage.write_bytes(f"s3://{bucket}/raw/list.csv",
                        b"image,caption\nimages/img.jpg,a red square\ns3://" + bucket.encode() + b"/raw/gone.jpg,lost\n", endpoint)
    cfg = _cfg(home, f"preprocess.inputs=s3://{bucket}/raw/*",  # the tar and the CSV, not images/
               f"preprocess.output=s3://{bucket}/train", f"storage.s3_endpoint={endpoint}")
    m = run_preprocess(cfg).manifest
    assert m.counts["input"] == 20 + 8 + 2 and _identity(m.counts)
    assert m.counts["rejected"]["unreadable_image"] == 1  # the CSV's missing S3 object
    manifest = json.loads(storage.read_bytes(f"s3://{bucket}/train/manifest.json", endpoint))
    assert manifest["content_hash"] == m.content_hash
    names = [storage.basename(u) for u in storage.list_files(f"s3://{bucket}/train", endpoint)]
    assert names == ["manifest.json"] + [s["path"] for s in m.shards]
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"s3://{bucket}/train/{m.shards[0]['path']}", endpoint)))
    assert table.num_rows == 12
    assert os.environ.get("AWS_ENDPOINT_URL") is None  # the endpoint came from the config


@pytest.mark.integration
def test_the_dedup_shuffle_keeps_the_first_copy_in_canonical_order(tmp_path: Path, ray_runtime) -> None:
    """Copies across and within parts, several task counts: the drops are exactly "every copy after the
    first, in (part, row) order", and each part's outcome counts add up."""
    import numpy as np

    from workflows.data.dedup import drops_uri, find_duplicates, part_drops, read_drops
    from workflows.data.preprocess import PART_SCHEMA
    from workflows.data.shards import parquet_bytes

    rng = np.random.default_rng(7)
    digests = [bytes([d]) * 16 for d in range(12)]
    parts, expected, seen = [], [], set()
    for index, rows in enumerate([9, 0, 14, 5]):
        status = ["" if rng.random() > 0.2 else "image_corrupt" for _ in range(rows)]
        hashes = [digests[rng.integers(len(digests))] if not s else b"" for s in status]
        drops = []
        for row, (s, h) in enumerate(zip(status, hashes)):
            if not s:
                if h in seen:
                    drops.append(row)
                seen.add(h)
        expected.append(drops)
        uri = str(tmp_path / f"part-{index}.parquet")
        Path(uri).write_bytes(parquet_bytes(pa.table({
            "key": [str(r) for r in range(rows)], "status": status, "image": [b""] * rows, "caption": [""] * rows,
            "tokens": [[0]] * rows, "hash": hashes}, schema=PART_SCHEMA)))
        parts.append((uri, status))
    for m, p in [(1, 1), (2, 2), (3, 5), (4, 16)]:
        work = str(tmp_path / f"work-{m}-{p}")
        outcomes, groups = find_duplicates([u for u, _ in parts], work, "", dedup=True, tasks=(m, p))
        assert len(groups) == min(m, 4)
        for index, ((_, status), want) in enumerate(zip(parts, expected)):
            owner = next(g for g, r in enumerate(groups) if index in r)
            assert part_drops(read_drops(drops_uri(work, owner), ""), index).tolist() == want, (m, p, index)
            o = outcomes[index]
            assert (o.rows, o.duplicates) == (len(status), len(want))
            assert sum(o.rejected.values()) == status.count("image_corrupt")
            assert o.kept == status.count("") - len(want)
