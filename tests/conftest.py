"""Shared fixtures: real local services, started once per test session.

- ``ray_runtime``: one local Ray runtime for the whole suite (each ``ray.init`` costs seconds, and a
  2-worker Train run ~20 s of fixed overhead). 4 logical CPUs on the 2-core CI machine, so Train
  workers never starve Ray Data's map tasks.
- ``mlflow_server``: a real ``mlflow server`` (SQLite backend store, local artifact root) on
  loopback; it can be stopped and restarted on the same port by tests that check buffering.
- ``s3_server``: a real S3-compatible server (moto) on loopback, with throwaway credentials.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from workflows.common.runtime import free_port, local_dashboard
from workflows.ops.local_mlflow import LocalMlflowServer, wait_http

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Short work folder for Ray's sockets (AF_UNIX paths are limited to ~107 bytes) and temp files.
WORK = Path(tempfile.mkdtemp(prefix="cf-", dir=os.environ.get("CLIPFLOW_TEST_TMP", "/tmp")))
os.environ["RAY_TMPDIR"] = str(WORK / "ray")
os.environ["TMPDIR"] = str(WORK / "tmp")
(WORK / "tmp").mkdir(parents=True, exist_ok=True)
tempfile.tempdir = str(WORK / "tmp")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train V2 is the default in the pinned Ray; make it explicit for the suite.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Throwaway credentials for the loopback S3 server, set before any Ray runtime starts: workers get them
# from their environment (as pods do from a Secret), never through runtime_env.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
# Ray workers import the project from source; make sure they find it.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def work_dir() -> Path:
    return WORK


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny training shards, manifest and tokenizer (``tiny_data``), shared by the training tests."""
    from tiny_data import write_train_data

    return write_train_data(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[None]:
    import ray

    ray.init(num_cpus=4, **local_dashboard(), log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    try:
        yield None
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[LocalMlflowServer]:
    """Tests may ``stop()`` and ``start()`` it (same port, same store) but must leave it running."""
    server = LocalMlflowServer(WORK / "mlflow")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_http(f"{self.endpoint}/moto-api/", timeout=30, proc=self.proc)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(WORK, ignore_errors=True)
