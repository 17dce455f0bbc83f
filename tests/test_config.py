"""The run config: validated on load, unknown keys rejected with a suggestion, overrides typed."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from workflows.common.config import (RETRIEVAL_METRICS, ZEROSHOT_METRICS, ConfigError, dump_config, eval_metric_names,
                                     flatten_config, load_config)
from workflows.train.accumulation import check_world_sizes

REPO = Path(__file__).resolve().parent.parent


def test_defaults_expand_home() -> None:
    cfg = load_config(overrides=["home=/data/x"])
    assert cfg.preprocess.output == "/data/x/data/train"
    assert cfg.preprocess.inputs == ["/data/x/data/raw/*.tar"]
    assert cfg.home == "/data/x"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\nmodel:\n  name: RN50\n")
    cfg = load_config(path, ["train.epochs=3", "scaling.use_gpu=true", "eval.zeroshot=/a"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 3
    assert cfg.model.name == "RN50"
    assert cfg.scaling.use_gpu is True
    assert cfg.eval.zeroshot == ["/a"]


def test_float_written_without_dot_is_accepted() -> None:
    # YAML 1.1 reads `5e-4` as a string; a user writing it must still get a float.
    assert load_config(overrides=["train.lr=5e-4"]).train.lr == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.precision=fp16", "not one of ['auto', 'fp32', 'bf16']"),
        ("train.augment_on=gpu", "not one of ['cpu', 'device']"),
        ("train.gpu_decode=true", "unknown config key 'train.gpu_decode'"),  # the old placeholder: now augment_on
        ("scaling.use_gpu=1", "expected true or false"),
        ("train=3", "train: expected a mapping"),
        ("noequals", "expects key=value"),
    ],
)
def test_bad_values_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_missing_file_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_and_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.lr=0.01"])
    flat = flatten_config(cfg)
    assert flat["train.lr"] == 0.01 and flat["model.name"] == cfg.model.name
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    # every world size the elastic range allows must be able to train the global batch, with the config's
    # micro-batch cap, as prepare_run checks it (else it refuses the config before any worker starts)
    check_world_sizes(cfg.train.global_batch_size, cfg.scaling.min_workers, cfg.scaling.max_workers,
                      cfg.train.micro_batch_size)


def test_demo_config_is_the_builtin_default() -> None:
    assert load_config(REPO / "configs" / "demo.yaml") == load_config()


def test_relative_paths_are_made_absolute_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers run in folders of their own: nothing relative may leave the driver."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["home=h", "tokenizer.bpe_path=vocab/bpe.txt.gz", "train.resume_from=ck/step",
                                 "eval.templates=t.yaml", "eval.retrieval=[s3://bucket/rt, rel/rt]",
                                 "mlflow.tracking_uri=sqlite:///store/m.db"])
    assert cfg.home == str(tmp_path / "h")
    for key, value in _path_fields(cfg).items():
        for item in value if isinstance(value, list) else [value]:
            assert item == "" or item.startswith(("/", "s3://")), (key, item)
    assert cfg.preprocess.inputs == [str(tmp_path / "h/data/raw/*.tar")]  # globs survive
    assert cfg.train.resume_from == str(tmp_path / "ck/step")
    assert cfg.eval.retrieval == ["s3://bucket/rt", str(tmp_path / "rel/rt")]
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/store/m.db"
    assert load_config(overrides=["mlflow.tracking_uri=http://mlflow:5000"]).mlflow.tracking_uri == "http://mlflow:5000"
    # commands that only pass the config on to a cluster keep the cluster's meaning
    assert load_config(overrides=["home=h"], resolve_paths=False).train.data == "h/data/train"


def _path_fields(node: Any, where: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` of every field marked as a path."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_path_fields(value, f"{where}{f.name}."))
        elif f.metadata.get("path"):
            out[where + f.name] = value
    return out


def test_every_field_under_home_is_marked_as_a_path() -> None:
    """A new field whose default lives under ``{home}`` but lacks the PATH mark would stay relative."""
    cfg = load_config(overrides=["home=h"], resolve_paths=False)
    marked = _path_fields(cfg)
    under_home = {key for key, value in flatten_config(cfg).items()
                  if any(str(v).startswith("h/") for v in (value if isinstance(value, list) else [value]))}
    assert under_home and under_home <= set(marked)
    assert {"tokenizer.bpe_path", "tokenizer.path", "train.resume_from", "eval.templates"} <= set(marked)


def test_primary_metric_defaults_to_the_first_eval_sets_acc1() -> None:
    assert load_config().eval.primary_metric == "zeroshot/acc1"
    cfg = load_config(overrides=["eval.zeroshot=[]", "eval.retrieval=[/x/coco]"])
    assert cfg.eval.primary_metric == "coco/image_retrieval_recall@1"


@pytest.mark.parametrize(("metric", "message"), [
    ("zeroshot/acc_1", "did you mean 'zeroshot/acc1'"),
    ("imagenet/acc1", "is not a metric eval logs"),
])
def test_a_primary_metric_eval_cannot_log_is_refused(metric: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"eval.primary_metric={metric}"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_can_crown_a_champion(path: Path) -> None:
    """eval logs ``<set>/<metric>`` per eval set; `champion` moves only on the primary one."""
    cfg = load_config(path)
    assert cfg.eval.primary_metric in eval_metric_names(cfg.eval)


def test_metric_names_are_the_ones_clip_core_computes() -> None:
    import torch

    from clip_core import classification_metrics, retrieval_metrics

    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    features = torch.randn(4, 8)
    assert set(ZEROSHOT_METRICS) <= set(classification_metrics(logits, targets))
    assert set(RETRIEVAL_METRICS) == set(retrieval_metrics(features, features, torch.arange(4)))


@pytest.mark.parametrize(("override", "message"), [
    ("preprocess.jpeg_quality=0", "preprocess.jpeg_quality=0 must be in 1..100"),
    ("sample_data.workers=-1", "sample_data.workers=-1 must be >= 0"),
    ("tokenizer.context_length=1", "tokenizer.context_length=1 must be >= 2"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("scaling.min_workers=3", "1 <= min_workers <= max_workers, got 3..2"),
    ("mlflow.publish_every=0", "mlflow.publish_every must be >= 1"),
])
def test_each_section_validates_itself_on_load(override: str, message: str) -> None:
    """A value no run can use fails when the config loads, before any stage or service starts."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides=[override])
