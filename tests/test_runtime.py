"""Finding a running Ray head: what `ray start --head` recorded on this machine, if it still answers.

The end-to-end case (a real `ray start` head that `clipflow demo` attaches to) is in test_demo.py.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from workflows.common.runtime import _local_head


@pytest.fixture
def ray_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where Ray (and so `ray start`) keeps ``ray_current_cluster`` for this test."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray"


def test_no_recorded_head_means_start_a_local_runtime(ray_tmp: Path) -> None:
    assert _local_head() is None


def test_a_recorded_head_that_answers_is_used(ray_tmp: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        (ray_tmp / "ray_current_cluster").write_text(address + "\n")
        assert _local_head() == address


def test_a_stale_recorded_head_is_ignored_with_a_warning(ray_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refuses connections
        (ray_tmp / "ray_current_cluster").write_text(address)
        with caplog.at_level(logging.WARNING, logger="clipflow.ray"):
            assert _local_head() is None
    assert "does not answer" in caplog.text and address in caplog.text
