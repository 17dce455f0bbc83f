"""A real `ray start --head` for tests: free ports, a private temp dir, token auth, stopped by PID.

Used by the submit tests (the Job Submission API on its dashboard) and the demo test (a stage command
run beside a `ray start` cluster attaches to it). `ray stop` would kill every Ray instance on the
machine, the suite's own runtime included, so only the processes under this head's temp dir are stopped.

``ray_cluster`` is a head plus worker nodes, each its own raylet and temp dir, for the multi-node test
(``test_multinode.py``: a node killed and started again, a node drained for preemption).
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
def ray_head(num_cpus: int, env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """A head with the dashboard and token auth; the driver env needs ``RAY_TMPDIR`` and the token. ``env`` goes to
    every process of the head (as a pod's env does), job supervisors and drivers included."""
    missing = _dashboard_missing()
    if missing:
        pytest.skip(missing)
    tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token, dash = secrets.token_hex(32), free_port()
    # Every port Ray would otherwise default (agent 52365, metrics, ...) is a free one: another Ray runtime
    # on this machine (the suite's own) already holds the defaults.
    ports = {flag: free_port() for flag in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    env = {**os.environ, **(env or {}), "RAY_TMPDIR": str(tmp),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
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


def stop_ray_under(tmp: Path, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)) -> list[int]:
    """Stop the Ray processes under this temp dir only; returns their PIDs. ``signals=(SIGKILL,)`` is a node lost at
    once (power, kernel): nothing under it gets to clean up."""
    pids = ray_processes_under(tmp)
    for sig in signals:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)
    return pids


def ray_processes_under(tmp: Path) -> list[int]:
    """The processes whose command line names ``tmp`` (GCS, raylet, dashboard, log monitor) and their descendants:
    the agents and workers a raylet starts rename themselves (``ray::DashboardAgent``, ``ray::TrainWorker``)."""
    children: dict[int, list[int]] = {}
    named = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
        if str(tmp) in cmdline:
            named.append(int(proc.name))
    found, todo = set(named), list(named)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                todo.append(child)
    return sorted(found)


# Ports `ray start` would otherwise take at their defaults, which another Ray runtime on this machine (the suite's
# own) already holds: every node gets free ones.
NODE_PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port")


@dataclass
class RayCluster:
    """Nodes of one cluster on loopback: ``env`` attaches a driver (``RAY_ADDRESS``, the token file); each node
    has its own temp dir, so one can be killed (``kill_node``) and started again (``start_node``) alone."""

    tmp: Path
    port: int  # the head's GCS port
    env: dict[str, str]
    node_args: dict[str, tuple[str, ...]]  # node name -> its `ray start` arguments

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def temp(self, node: str) -> Path:
        return self.tmp / node

    def start_node(self, node: str) -> None:
        """`ray start` one node (the head first): its own temp dir, free ports, token auth."""
        args = self.node_args[node]
        join = ("--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}") if node == "head" \
            else (f"--address={self.address}",)
        done = subprocess.run(
            [str(BIN / "ray"), "start", *join, *args, f"--temp-dir={self.temp(node)}",
             "--disable-usage-stats", *(f"--{flag}={free_port()}" for flag in NODE_PORT_FLAGS)],
            env={**self.env, "RAY_TMPDIR": str(self.temp(node))}, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"ray start {node} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL every process of one node (raylet, its agents, the workers it started): a lost machine."""
        return stop_ray_under(self.temp(node), signals=(signal.SIGKILL,))

    def node_id(self, node: str) -> str | None:
        """The node's Ray id, read from its raylet's command line (no API call); None when its raylet is not running."""
        for pid in ray_processes_under(self.temp(node)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if Path(argv[0]).name == "raylet":
                return next((a.partition("=")[2] for a in argv if a.startswith("--node_id=")), None)
        return None

    def drain_node(self, node: str, deadline_s: int) -> None:
        """What a Train pod's preStop hook (ray_cluster.yaml) or a spot reclaim does: `ray drain-node` for preemption
        with a deadline. Ray keeps the node up (the deadline only says when it will go; it shuts the raylet down
        only once the node is idle); draining it again with a shorter deadline moves the deadline."""
        node_id = self.node_id(node)
        assert node_id, f"{node} is not running"
        done = subprocess.run(
            [str(BIN / "ray"), "drain-node", f"--address={self.address}", f"--node-id={node_id}",
             "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test preemption",
             f"--deadline-remaining-seconds={deadline_s}"], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ray drain-node {node} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    def restore(self) -> list[str]:
        """Start again every node whose raylet is gone (killed, or drained away, by an earlier test), after stopping by
        PID what it left behind; returns their names."""
        lost = [node for node in self.node_args if self.node_id(node) is None]
        for node in lost:
            self.kill_node(node)
            self.start_node(node)
        return lost


@contextmanager
def ray_cluster(head: tuple[str, ...], workers: list[tuple[str, ...]], env: dict[str, str] | None = None
                ) -> Iterator[RayCluster]:
    """A ``ray start`` head (``head``: its extra arguments) and one worker node per entry of ``workers``, with token
    auth from a token file (``RAY_AUTH_TOKEN_PATH``, as a driver on a cluster node finds it); ``env`` goes to every
    node, hence to every Ray process, and to drivers. Stopped by PID, never with ``ray stop``."""
    tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    base = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    base.pop("RAY_AUTH_TOKEN", None)
    port = free_port()
    cluster = RayCluster(tmp, port, {**base, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": str(tmp / "head")},
                         {"head": head, **{f"node{i}": args for i, args in enumerate(workers, 1)}})
    try:
        for node in cluster.node_args:
            cluster.start_node(node)
        yield cluster
    finally:
        stop_ray_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
