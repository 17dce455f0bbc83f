"""Local stand-ins for the cluster's services: a Ray runtime and an MLflow tracking server.

The demo and the test suite use the same code, so what the tests exercise is what a user runs:
``mlflow server`` with a SQLite backend store on loopback (the UI the user opens), and a local Ray
runtime with enough logical CPUs that Train workers never starve Ray Data's tasks on small machines.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from workflows.errors import UserError
from workflows.log import get_logger

log = get_logger("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None

    def ui_command(self) -> str:
        """What a user runs later to look at the same store."""
        return (f"mlflow ui --backend-store-uri {self.backend_store_uri} "
                f"--artifacts-destination {self.root / 'artifacts'}")

    def __enter__(self) -> "LocalMlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_ray() -> None:
    """Attach to a running cluster, else start a private local runtime.

    The cluster is the one in ``$RAY_ADDRESS``, else the head that ``ray start --head`` recorded on this
    machine (what ``ray.init(address="auto")`` finds), so a stage run beside a ``ray start`` cluster
    uses it rather than starting a second runtime. A cluster with token auth needs ``$RAY_AUTH_TOKEN``
    or ``$RAY_AUTH_TOKEN_PATH`` (``ray start`` writes ``~/.ray/auth_token``, which Ray reads itself).

    A local runtime gets at least 4 logical CPUs: on a 2-core machine two Train workers plus Ray
    Data's map tasks otherwise deadlock waiting for CPU slots. It runs the dashboard (on a free
    loopback port; ``ray.init`` logs its URL): Ray Train's placement-group cleaner asks the state
    API behind it whether the run's controller is alive, and without it warns every few seconds.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or _local_head()
    if not address:
        log.info("no running Ray cluster found; starting a local Ray runtime")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), **local_dashboard())
        return
    log.info("attaching to the Ray cluster at %s", address)
    try:
        # "auto" resolves $RAY_ADDRESS or the recorded head, and (unlike an explicit address) makes Ray
        # send the auth token it finds.
        ray.init(address="auto")
    except ConnectionError as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address} ({exc}); if it uses token auth set "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its token, else check that it is up "
                        "(`ray status`) or unset RAY_ADDRESS to run on a local runtime") from None


def _local_head() -> str | None:
    """The GCS address of the head ``ray start`` last recorded on this machine, if it still answers."""
    from ray._private.utils import read_ray_address  # where `ray start` records it (ray_current_cluster)

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        log.warning("the Ray head recorded at %s does not answer (stopped?); starting a local runtime", address)
        return None
    return address


def local_dashboard() -> dict[str, object]:
    """``ray.init`` options for a local runtime's dashboard (see ``ensure_ray``)."""
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}


@contextmanager
def ray_data_context(preserve_order: bool) -> Iterator[None]:
    """Datasets created inside get clipflow's settings: no Ray Data progress bars (clipflow reports its
    own progress, and one dataset per rank and epoch would drown the log), ordered output where the
    result depends on it. A dataset keeps a copy of the context it was created in, so the process-wide
    settings are restored on exit."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = preserve_order, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
