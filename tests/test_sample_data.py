"""`clipflow sample-data`: layout, determinism and the deliberately bad samples."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from workflows.common.config import ConfigError, SampleDataConfig
from workflows.data.sample_data import BAD_REASONS, generate_sample_data


def _small(out: Path, **kw) -> SampleDataConfig:
    return SampleDataConfig(output=str(out), train_samples=30, train_shards=2, image_size=48,
                            zeroshot_per_class=2, retrieval_samples=5, **kw)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(tmp_path: Path) -> None:
    summary = generate_sample_data(_small(tmp_path / "a"))
    assert summary["workers"] == 1  # a small set renders in this process
    generate_sample_data(_small(tmp_path / "b", workers=2))
    generate_sample_data(_small(tmp_path / "c", seed=1))
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b  # same seed -> byte-identical files, whichever process renders which sample
    assert a.keys() == c.keys() and a != c  # another seed -> other content, same layout

    root = tmp_path / "a"
    assert sorted(p.name for p in (root / "raw").iterdir()) == ["train-00000.tar", "train-00001.tar"]
    zs = root / "eval" / "zeroshot"
    folders = sorted(p.name for p in zs.iterdir() if p.is_dir())
    assert (zs / "classnames.txt").read_text().splitlines() == [f.replace("_", " ") for f in folders]
    assert len(folders) == 8 and all(len(list((zs / f).glob("*.jpg"))) == 2 for f in folders)
    rows = [json.loads(line) for line in (root / "eval" / "retrieval" / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all((root / "eval" / "retrieval" / r["image"]).is_file() and len(r["captions"]) == 2
                                  for r in rows)
    assert summary["train_samples"] == 30 + len(BAD_REASONS) + 1
    assert summary["expected_rejects"] == {**{r: 1 for r in BAD_REASONS}, "truncated_tar": 1}


def test_captions_name_what_is_drawn(tmp_path: Path) -> None:
    """Each good sample's caption names its colour and shape; the image is the configured size."""
    generate_sample_data(_small(tmp_path, bad_samples=False))
    with tarfile.open(tmp_path / "raw" / "train-00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in files})
    assert len(keys) == 15
    for key in keys:
        meta = json.loads(files[f"{key}.json"])
        caption = files[f"{key}.txt"].decode()
        assert meta["color"] in caption and meta["shape"] in caption
        assert Image.open(io.BytesIO(files[f"{key}.jpg"])).size == (48, 48)


def test_bad_samples_are_there(tmp_path: Path) -> None:
    generate_sample_data(_small(tmp_path))
    with tarfile.open(tmp_path / "raw" / "train-00000.tar") as tar:
        names = tar.getnames()
    for reason in BAD_REASONS:
        assert any(reason in n for n in names), reason
    assert any("duplicate" in n for n in names)
    with pytest.raises(tarfile.ReadError):  # the last shard ends in the middle of a member
        with tarfile.open(tmp_path / "raw" / "train-00001.tar") as tar:
            for member in tar:
                tar.extractfile(member).read()


def test_invalid_config_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_shards"):
        generate_sample_data(SampleDataConfig(output=str(tmp_path), train_samples=2, train_shards=3))
    with pytest.raises(ConfigError, match="workers=-1 must be >= 0"):
        generate_sample_data(SampleDataConfig(output=str(tmp_path), workers=-1))


def test_captions_support_the_default_vocabulary() -> None:
    """The demo trains its BPE on these captions with the default vocab_size: the text must be varied
    enough for that many tokens (a handful of fixed templates supports only ~650)."""
    import numpy as np

    from clip_core.tokenizer import Tokenizer
    from workflows.common.config import Config
    from workflows.data.sample_data import caption, random_scene, render

    rng = np.random.default_rng(0)
    captions = []
    for _ in range(1000):
        scene = random_scene(rng)
        render(scene, 16, rng)  # sets the position words
        captions.append(caption(scene, rng))
        assert scene.color in captions[-1] and scene.shape in captions[-1]
    assert len(set(captions)) > 900
    tokens = Config().tokenizer
    assert Tokenizer.train(captions, tokens.vocab_size, tokens.context_length).vocab_size == tokens.vocab_size
