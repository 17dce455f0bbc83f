"""A real `ray start --head` for tests: free ports, a private temp dir, token auth, stopped by PID.

Used by the submit tests (the Job Submission API on its dashboard) and the demo test (a stage command
run beside a `ray start` cluster attaches to it). `ray stop` would kill every Ray instance on the
machine, the suite's own runtime included, so only the processes under this head's temp dir are stopped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.ops.local_mlflow import wait_http

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT: the Job Submission API
    token: str
    tmp: Path  # RAY_TMPDIR: `ray start` records the head's address under it, where ray.init("auto") looks

    def sessions(self) -> list[Path]:
        """Ray session folders under this temp dir: one per runtime started with it."""
        return sorted((self.tmp / "ray").glob("session_2*"))


def _dashboard_missing() -> str | None:
    import ray._private.utils

    error = ray._private.utils.get_dashboard_dependency_error()
    return f"the Ray job server needs ray[default] ({error})" if error else None


@contextmanager
def ray_head(num_cpus: int) -> Iterator[RayHead]:
    """A head with the dashboard and token auth; the driver env needs ``RAY_TMPDIR`` and the token."""
    missing = _dashboard_missing()
    if missing:
        pytest.skip(missing)
    tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token, dash = secrets.token_hex(32), free_port()
    # Every port Ray would otherwise default (agent 52365, metrics, ...) is a free one: another Ray runtime
    # on this machine (the suite's own) already holds the defaults.
    ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", *(f"--{flag}={p}" for flag, p in ports.items()),
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--num-cpus={num_cpus}",
         "--include-dashboard=true", "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = f"http://127.0.0.1:{dash}"
        try:
            wait_http(f"{address}/api/version", timeout=120)
        except UserError:
            logs = sorted(tmp.glob("ray/session_latest/logs/dashboard*.log")) + sorted(
                tmp.glob("ray/session_latest/logs/raylet.out"))
            raise AssertionError("the Ray dashboard did not come up; its logs end with:\n" + "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in logs))
        yield RayHead(address, token, tmp)
    finally:
        stop_ray_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def stop_ray_under(tmp: Path) -> None:
    """Stop the Ray processes of this head only: those whose command line names its temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(tmp) in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)
