"""`clipflow` itself: help lists every stage, errors are one line with a non-zero exit."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from workflows.ops.cli import COMMANDS, build_parser, main

STAGES = ["sample-data", "preprocess", "train", "eval", "demo", "submit", "k8s", "sync"]


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "workflows.ops.cli", "--help"],
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


SAMPLE = ["--set", "sample_data.train_samples=40", "--set", "sample_data.train_shards=1",
          "--set", "sample_data.zeroshot_per_class=1", "--set", "sample_data.retrieval_samples=4"]


def _sample_data(tmp_path, env: dict[str, str], stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.ops.cli", "sample-data", "--set", f"home={tmp_path}", *SAMPLE],
                          env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120)


def test_progress_is_one_line_logs_off_a_terminal_and_log_level_filters_it(tmp_path) -> None:
    done = _sample_data(tmp_path, {})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # no carriage-return bars in Kubernetes / Ray job logs
    assert "INFO clipflow.progress: sample-data: rendering: " in done.stderr
    quiet = _sample_data(tmp_path / "quiet", {"CLIPFLOW_LOG_LEVEL": "warning"})
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr
    assert "sample data: " in quiet.stdout  # the summary is the output, whatever the log level


def test_progress_is_a_bar_on_a_terminal(tmp_path) -> None:
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm sizes its bar to it
    try:
        done = _sample_data(tmp_path, {}, stderr=secondary)
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the writer side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    assert done.returncode == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "sample-data: rendering" in text and "INFO clipflow.progress" not in text


def test_log_level_flag_is_on_every_command() -> None:
    for command in COMMANDS:
        args = build_parser(command).parse_args([command, "--log-level", "debug", *_required(command)])
        assert args.log_level == "debug"


def _required(command: str) -> list[str]:
    return {"k8s": ["render"], "eval": ["--pending"], "sync": ["DIR"]}.get(command, [])


def test_readme_documents_every_exit_code() -> None:
    from pathlib import Path

    from workflows.common import errors

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    codes = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert codes == {0, 1, 2, 130}
    for code in codes:
        assert f"\n| {code} | " in readme, f"README's exit-code table lacks {code}"
