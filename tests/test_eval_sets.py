"""Benchmark-grade eval inputs: OpenAI's ImageNet names and prompts, CLIP_benchmark's webdataset sets, and
what a broken set is told. Real files on disk, a tiny model; one Ray run (the GPU that never comes)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_core import create_model
from clip_core.embed import images_to_tensor
from clip_core.zero_shot import BUILTIN_CLASSNAMES, BUILTIN_TEMPLATES, load_templates
from clip_core.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from workflows.common.config import CLASSNAME_SETS, TEMPLATE_SETS, ConfigError, load_config
from workflows.common.errors import UserError
from workflows.data.eval_sets import (TarMember, read_linear_probe_set, read_pixels, read_retrieval_set,
                                      read_zeroshot_set, zero_shot_in_process)
from workflows.eval.job import actor_gpus, embed_images_ray

from mlflow_helpers import make_config, make_eval_sets, train_tokenizer


def write_wds_split(root: Path, split: str, samples: list[tuple[bytes, str, bytes]], shards: int = 2,
                    nshards: bool = True) -> None:
    """CLIP_benchmark's export layout: ``<root>/<split>/{i}.tar`` (+ ``nshards.txt``), samples ``s%07d``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(samples) // shards)
    for shard in range(shards):
        with tarfile.open(root / split / f"{shard}.tar", "w") as tar:
            for index in range(shard * per_shard, min(len(samples), (shard + 1) * per_shard)):
                image, ext, label = samples[index]
                for suffix, data in ((ext, image), ("cls" if label.strip().isdigit() else "txt", label)):
                    info = tarfile.TarInfo(f"s{index:07d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if nshards:
        (root / split / "nshards.txt").write_text(f"{shards}\n")


def image_folder_to_wds(folder: Path, root: Path, split: str = "test") -> Path:
    """The same images as a webdataset split: class i = the i-th class folder (sorted), classnames copied."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    samples = [(image.read_bytes(), "jpg", str(label).encode())
               for label, cls in enumerate(classes) for image in sorted(cls.iterdir())]
    write_wds_split(root, split, samples)
    if (folder / "classnames.txt").exists():
        (root / "classnames.txt").write_text((folder / "classnames.txt").read_text())
    return root


def test_shipped_imagenet_names_and_templates_are_openclips() -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (make install adds it)")
    # the metadata module alone: the package __init__ needs torchvision
    path = Path(spec.origin).parent / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
    reference = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(reference)
    assert IMAGENET_CLASSNAMES == tuple(reference.IMAGENET_CLASSNAMES) and len(IMAGENET_CLASSNAMES) == 1000
    assert OPENAI_IMAGENET_TEMPLATES == tuple(t("{}") for t in reference.OPENAI_IMAGENET_TEMPLATES)
    assert load_templates("openai_imagenet_simple") == [t("{}") for t in reference.SIMPLE_IMAGENET_TEMPLATES]
    assert len(load_templates("openai_imagenet")) == 80


def test_config_names_built_in_sets_and_resolves_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(TEMPLATE_SETS) == set(BUILTIN_TEMPLATES) and set(CLASSNAME_SETS) == set(BUILTIN_CLASSNAMES)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["eval.templates=openai_imagenet", "eval.classnames=openai_imagenet",
                             "eval.linear_probe=[sets/pets]", "eval.retrieval=[]", "eval.zeroshot=[]"])
    assert (cfg.eval.templates, cfg.eval.classnames) == ("openai_imagenet", "openai_imagenet")  # names, not paths
    assert cfg.eval.linear_probe == [str(tmp_path / "sets/pets")]
    assert cfg.eval.primary_metric == "pets/lp_acc1"  # no zero-shot or retrieval set: the probe's top-1
    assert load_config(None, ["eval.templates=t.yaml"]).eval.templates == str(tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="linear_probe_val_proportion.*num_actors|num_actors.*val_proportion"):
        load_config(None, ["eval.linear_probe_val_proportion=1", "eval.num_actors=0"])
    with pytest.raises(ConfigError, match="eval.device: 'tpu' is not one of"):
        load_config(None, ["eval.device=tpu"])


def test_clip_benchmark_templates_file_uses_c_placeholder(tmp_path: Path) -> None:
    path = tmp_path / "zeroshot_classification_templates.txt"
    path.write_text("a photo of a {c}.\n\nitap of a {c}.\n")
    assert load_templates(str(path)) == ["a photo of a {}.", "itap of a {}."]
    path.write_text("a photo of {c} and {c}.\n")
    with pytest.raises(ValueError, match="one '{}'"):
        load_templates(str(path))


def test_webdataset_set_reads_like_the_same_image_folder(tmp_path: Path) -> None:
    folder, _ = make_eval_sets(tmp_path / "files")
    wds = image_folder_to_wds(folder, tmp_path / "wds" / "colours")
    (wds / "zeroshot_classification_templates.txt").write_text("a {c} square.\na {c} photo.\n")
    data = read_zeroshot_set(str(wds))
    reference = read_zeroshot_set(str(folder))
    assert data.name == "colours" and data.classnames == reference.classnames == ["red", "green", "blue"]
    assert data.labels == reference.labels and data.templates == ["a {} square.", "a {} photo."]
    assert all(isinstance(image, TarMember) for image in data.images) and reference.templates is None
    pixels, ok = read_pixels(data.images, 24, "")  # byte ranges of the shards, decoded
    expected = images_to_tensor([Path(p).read_bytes() for p in reference.images], 24)
    assert ok.all() and torch.equal(pixels, expected)

    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16).eval()
    cfg = make_config(tmp_path, "unused", "unused", zeroshot=folder)
    (wds / "zeroshot_classification_templates.txt").unlink()  # same prompts for both
    cfg_wds = make_config(tmp_path, "unused", "unused", zeroshot=wds)
    assert zero_shot_in_process(model, tokenizer, cfg_wds) == {
        k.replace("zeroshot/", "colours/"): v for k, v in zero_shot_in_process(model, tokenizer, cfg).items()}


def test_webdataset_retrieval_and_linear_probe_sets(tmp_path: Path) -> None:
    folder, retrieval = make_eval_sets(tmp_path / "files")
    rows = [json.loads(line) for line in (retrieval / "captions.jsonl").read_text().splitlines()]
    samples = [((retrieval / r["image"]).read_bytes(), "jpg", "\n".join(r["captions"]).encode()) for r in rows]
    write_wds_split(tmp_path / "rt", "test", samples, shards=3, nshards=False)  # no nshards.txt: every *.tar
    data, reference = read_retrieval_set(str(tmp_path / "rt")), read_retrieval_set(str(retrieval))
    assert (data.captions, data.text_to_image) == (reference.captions, reference.text_to_image)

    probe = tmp_path / "probe"
    image_folder_to_wds(folder, probe, "train")
    image_folder_to_wds(folder, probe, "test")
    lp = read_linear_probe_set(str(probe))
    labels = [0] * 4 + [1] * 4 + [2] * 4
    assert (lp.num_classes, lp.train_labels, lp.test_labels) == (3, labels, labels)
    files = tmp_path / "probe-files"  # ImageFolder splits; test lacks a class and must still map by name
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    for split in ("train", "test"):
        for cls in classes[1:] if split == "test" else classes:
            (files / split / cls.name).mkdir(parents=True)
            for image in cls.iterdir():
                (files / split / cls.name / image.name).write_bytes(image.read_bytes())
    lp = read_linear_probe_set(str(files))
    assert lp.num_classes == 3 and lp.test_labels == [1] * 4 + [2] * 4 and len(lp.images) == 20


def test_broken_webdataset_sets_are_one_clear_line(tmp_path: Path) -> None:
    folder, _ = make_eval_sets(tmp_path / "files")
    wds = image_folder_to_wds(folder, tmp_path / "wds")
    (wds / "classnames.txt").unlink()
    with pytest.raises(UserError, match="has no classnames.txt; add one .* or set eval.classnames"):
        read_zeroshot_set(str(wds))
    assert len(read_zeroshot_set(str(wds), classnames="openai_imagenet").classnames) == 1000
    (wds / "classnames.txt").write_text("red\ngreen\n")
    with pytest.raises(UserError, match="names 2 classes but .* labels go up to 2"):
        read_zeroshot_set(str(wds))
    (wds / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(UserError, match="says 3 shards but 1 are missing"):
        read_zeroshot_set(str(wds))
    (wds / "test" / "nshards.txt").unlink()
    shard = wds / "test" / "1.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(UserError, match="1.tar is not a readable uncompressed tar"):
        read_zeroshot_set(str(wds))
    write_wds_split(tmp_path / "nolabel", "test", [(b"img", "jpg", b"caption, not a class")], shards=1)
    with pytest.raises(UserError, match="1 sample.* lack an image or a cls member"):
        read_zeroshot_set(str(tmp_path / "nolabel"))
    with pytest.raises(UserError, match="has no train split"):
        read_linear_probe_set(str(tmp_path / "nolabel"))


def test_gpu_actors_ask_for_a_gpu_whatever_the_cluster_has_now() -> None:
    assert [actor_gpus("gpu", n) for n in (0, 8)] == [1, 1]  # an autoscaled-to-zero group shows 0
    assert [actor_gpus("auto", n) for n in (0, 8)] == [0, 1]
    assert [actor_gpus("cpu", n) for n in (0, 8)] == [0, 0]


@pytest.mark.timeout(180)
def test_a_gpu_that_never_comes_is_a_clear_error(ray_runtime, tmp_path: Path) -> None:
    import ray

    folder, _ = make_eval_sets(tmp_path)
    cfg = load_config(None, ["eval.device=gpu", "eval.gpu_wait_seconds=2"])
    model = create_model("tiny-vit", vocab_size=540, context_length=16)
    images = read_zeroshot_set(str(folder)).images
    with pytest.raises(UserError, match="no GPU for the 1 embedding actor.*eval.gpu_wait_seconds=2"):
        embed_images_ray(ray.put((model.config.to_dict(), model.state_dict())), images, cfg)
    cfg.eval.device = "auto"  # what a CPU cluster runs with: no GPU asked, the same pipeline works
    features, ok, _ = embed_images_ray(ray.put((model.config.to_dict(), model.state_dict())), images, cfg)
    assert features.shape == (12, model.config.embed_dim) and np.all(ok)
