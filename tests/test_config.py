"""The run config: validated on load, unknown keys rejected with a suggestion, overrides typed."""

from pathlib import Path

import pytest

from workflows.accumulation import check_world_sizes
from workflows.config import ConfigError, dump_config, flatten_config, load_config

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
    # every world size the elastic range allows must divide the global batch (else prepare_run refuses it)
    check_world_sizes(cfg.train.global_batch_size, cfg.scaling.min_workers, cfg.scaling.max_workers)


def test_demo_config_is_the_builtin_default() -> None:
    assert load_config(REPO / "configs" / "demo.yaml") == load_config()
