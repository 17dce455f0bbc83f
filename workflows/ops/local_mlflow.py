"""A local stand-in for the cluster's MLflow server: ``mlflow server`` on loopback with a SQLite store.

The demo and the test suite use the same code, so what the tests exercise is what a user runs: the
server whose UI the user opens.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from workflows.common.errors import UserError
from workflows.common.runtime import free_port


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers below 500; fail early if ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:  # answering is enough: e.g. 401 from Ray's token auth
            if exc.code < 500:
                return
            time.sleep(0.25)
        except OSError:
            time.sleep(0.25)
    raise UserError(f"{url} did not answer within {timeout:.0f} s")


def _bin(name: str) -> str:
    """A console script of this environment (works inside a venv that is not activated)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` not found; install clipflow's dependencies (make install)")
    return found


class LocalMlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store under ``root``; restartable on one port."""

    def __init__(self, root: str | Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "LocalMlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", self.backend_store_uri,
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)
        except BaseException:  # a server that never became healthy is not left behind
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def ui_command(self) -> str:
        """What a user runs later to look at the same store."""
        return (f"mlflow ui --backend-store-uri {self.backend_store_uri} "
                f"--artifacts-destination {self.root / 'artifacts'}")

    def __enter__(self) -> "LocalMlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process_group(proc: subprocess.Popen | None) -> None:
    """Stop a server started in a session of its own (``start_new_session``) with all its workers:
    SIGTERM, then SIGKILL after 30 s."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
