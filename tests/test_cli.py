"""`clipflow` itself: help lists every stage, errors are one line with a non-zero exit."""

import subprocess
import sys

import pytest

from workflows.cli import COMMANDS, main

STAGES = ["sample-data", "preprocess", "train", "eval", "demo", "submit", "k8s"]


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "workflows.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for stage in STAGES:
        assert stage in out
    assert set(STAGES) == set(COMMANDS)


def test_unknown_config_key_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample-data", "--set", "sample_data.seeed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "did you mean 'sample_data.seed'" in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
