"""One training run on a real multi-node Ray cluster, and one run id over several drivers.

The cluster is ``ray start`` nodes on loopback (``ray_head.ray_cluster``): a head with 1 CPU, which no Train
worker fits, and two worker nodes of 3 CPUs, each of which fits exactly one (``scaling.cpus_per_worker=2``),
so the group is 2 workers on 2 nodes. The drivers are real ``clipflow train`` processes reporting to the
suite's MLflow server; a thread stamps each line they print with its arrival time, which gives the timeline.

1. Node loss: the node of rank 0 is SIGKILLed (raylet, agents, workers) mid-run. The group shrinks to 1 worker
   and continues from the last checkpoint, grows back to 2 when the node is started again, and finishes with
   ``steps x global batch`` samples; every checkpoint has exactly one model version, and no metric step is
   logged twice.
2. Driver loss: ``clipflow train --set train.run_id=ID`` is stopped (SIGTERM) after a checkpoint; the same
   command continues the run in the same MLflow run, and once more after it finished trains nothing.
3. Preemption: the node of rank 0 is drained (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``, what a
   Train pod's preStop hook runs). The group checkpoints at its next stop check, off the checkpoint grid, and
   trains on; at the drain's deadline Ray Train restarts it (a preemption, not a failure) on the node left, from
   that checkpoint; then the node goes, as the pod or the VM does at its deadline. Last in the file, so that no
   test after it pays for starting the node again (``cluster`` does, for any test that finds a node gone).

``pytest -s`` prints the timeline (README, Troubleshooting, has the figures and the Ray waits behind them).
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from mlflow import MlflowClient

from clip_core import load_checkpoint
from workflows.train.driver import latest_run_checkpoint
from workflows.train.loop import CHECKPOINT_PREFIX
from workflows.train.preemption import STOP_CHECK_EVERY

from ray_head import BIN, RayCluster, ray_cluster, ray_processes_under
from tiny_data import CONTEXT

pytestmark = pytest.mark.integration

# 3 steps an epoch of the tiny data (96 rows): each epoch starts a Ray Data dataset, so a step costs what Ray's
# process and RPC work costs (as starting a node does), not only compute, whatever the machine's speed or load.
GLOBAL_BATCH = 32
CHECKPOINT_EVERY = 5
# After the shrink, the group of 1 must still be training when the returned node has started and Ray Train's
# next resize check comes; the node is started after the group's first step, and this many steps remain.
STEPS_AFTER_SHRINK = 120  # an idle 2-core machine trained 43 of them while the node started and was seen
# The nodes' environment, which every Ray process inherits. Ray Train's controller reads the start timeout: a group
# that cannot start (its placement group waits for a node that is gone but not yet marked dead) gives up after 15 s
# instead of 60. Ray's memory monitor is off: on a shared machine it kills this test's workers for what other
# processes use (the kernel's OOM killer still guards the machine).
# Ray Train's controller also reads how often its PreemptionWatcher polls for drains (default 5 s).
NODE_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15", "RAY_memory_monitor_refresh_ms": "0", "RAY_DEDUP_LOGS": "0",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
RESIZE_INTERVAL_S = 2  # scaling.resize_interval_s: how often Ray Train looks for room to grow (default 60)

GROUP_START = re.compile(r": world (\d+),.* steps (\d+)->(\d+)")  # rank 0, as each worker group starts
STEP = re.compile(r"\bstep (\d+)/(\d+) loss (\d+\.\d+)")  # rank 0, every train.log_every steps
WORKER_PID = re.compile(r"\((?:\w+) pid=(\d+)")  # Ray's prefix on a worker's forwarded line
NOTICE = re.compile(r"preemption notice for ranks .*: checkpointing at step (\d+)")  # every rank, at the check


class Driver:
    """A ``clipflow train`` process; a thread keeps each line it prints with its arrival time (monotonic)."""

    def __init__(self, cluster: RayCluster, overrides: list[str], log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [str(BIN / "clipflow"), "train", *[arg for value in overrides for arg in ("--set", value)]],
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "a") as out:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                out.write(f"{time.monotonic() - self.started:8.1f} {line}")
                out.flush()

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def find(self, pattern: re.Pattern[str], after: float = 0.0) -> list[tuple[float, re.Match[str], str]]:
        """Matching lines printed after ``after`` by a worker that printed nothing before it. Ray replays what a
        lost worker printed once its node is gone, so an old line can arrive late."""
        lines = list(self.lines)
        old = {_pid(line) for t, line in lines if t < after} - {None}
        return [(t, m, line) for t, line in lines
                if t >= after and _pid(line) not in old and (m := pattern.search(line))]

    def wait_for(self, pattern: re.Pattern[str], timeout: float, after: float = 0.0,
                 accept=lambda m: True) -> tuple[float, re.Match[str], str]:
        """The first line that ``find`` finds and that ``accept`` takes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [hit for hit in self.find(pattern, after) if accept(hit[1])]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                found = [hit for hit in self.find(pattern, after) if accept(hit[1])]
                if found:
                    return found[0]
                pytest.fail(f"clipflow train exited ({self.proc.returncode}) before {pattern.pattern!r}:\n"
                            f"{self.tail()}")
            time.sleep(0.2)
        pytest.fail(f"no {pattern.pattern!r} within {timeout:.0f} s:\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"clipflow train did not end within {timeout:.0f} s:\n{self.tail()}")
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def nodes() -> Iterator[RayCluster]:
    worker_node = ("--num-cpus=3",)
    with ray_cluster(("--num-cpus=1",), [worker_node, worker_node], env=NODE_ENV) as running:
        yield running


@pytest.fixture
def cluster(nodes: RayCluster) -> RayCluster:
    """The module's cluster with every node up: one that an earlier test drained away is started again."""
    nodes.restore()
    return nodes


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    started: list[Driver] = []
    try:
        yield started
    finally:
        for driver in started:
            driver.stop()


def _overrides(train_data: Path, home: Path, tracking: str, model: str, run_id: str, steps: int,
               checkpoint_every: int = CHECKPOINT_EVERY) -> list[str]:
    return [f"home={home}", f"train.data={train_data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
            f"train.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={steps}", "train.warmup_steps=2",
            "train.log_every=1", f"train.checkpoint_every={checkpoint_every}",
            "train.keep_checkpoints=100",  # every checkpoint stays, so every one must have a version
            "scaling.min_workers=1", "scaling.max_workers=2", "scaling.cpus_per_worker=2",
            f"scaling.resize_interval_s={RESIZE_INTERVAL_S}", "scaling.max_failures=4",
            f"storage.path={home / 'runs'}", f"mlflow.tracking_uri={tracking}", "mlflow.experiment=clipflow-multinode",
            f"mlflow.registered_model={model}", "mlflow.system_metrics=false", f"train.run_id={run_id}"]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the run's checkpoint directories (Ray Train keeps its own state files beside them)."""
    named = (re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name) for p in run_dir.iterdir() if p.is_dir())
    return sorted(int(m[1]) for m in named if m)


def _mlflow_run(client: MlflowClient, run_id: str):
    experiment = client.get_experiment_by_name("clipflow-multinode")
    runs = client.search_runs([experiment.experiment_id], f"tags.`clipflow.run_key` = '{run_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run, whatever happened to the drivers
    return runs[0]


def _assert_checkpoint_position(run_dir: Path, step: int, world_size: int) -> None:
    """The checkpoint at ``step`` has seen exactly ``step`` global batches, saved by a group of ``world_size``."""
    state = load_checkpoint(run_dir / f"{CHECKPOINT_PREFIX}{step:08d}").trainer_state
    assert (state["step"], state["samples_seen"], state["world_size"]) == (step, step * GLOBAL_BATCH, world_size)


def _history(client: MlflowClient, mlflow_run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((p.step, p.value) for p in client.get_metric_history(mlflow_run_id, metric))


def _assert_clean_history(client: MlflowClient, mlflow_run_id: str, steps: int, complete_from: int = 1) -> None:
    """No training metric has a step twice (none logged again after a rollback), and each has every step from
    ``complete_from`` on. Points rank 0 had not delivered when its group was torn down are gone with it, unless the
    next group trains their steps again: those up to the checkpoint it restores may be missing."""
    for metric in ("loss", "lr", "samples_seen"):
        logged = collections.Counter(step for step, _ in _history(client, mlflow_run_id, metric))
        assert not [s for s, n in logged.items() if n > 1], (metric, sorted(s for s, n in logged.items() if n > 1))
        assert set(range(complete_from, steps + 1)) <= set(logged) <= set(range(1, steps + 1)), (metric, sorted(logged))


def _finished_groups(client: MlflowClient, run_id: str, steps: int, complete_from: int):
    """The run ended FINISHED with one clean history; its worker groups over time, at the step each started from:
    (the MLflow run, [(step, world size)], [(step, resumed_from_step)]). The first group has 2 workers, the
    groups are numbered 1, 2, ... (``group_starts``), and every resumed group resumed from its start step."""
    run = _mlflow_run(client, run_id)
    assert run.info.status == "FINISHED"
    _assert_clean_history(client, run.info.run_id, steps, complete_from=complete_from)
    world_sizes, starts, resumes = (_history(client, run.info.run_id, m)
                                    for m in ("world_size", "group_starts", "resumed_from_step"))
    assert world_sizes[0] == (0, 2), world_sizes
    assert [v for _, v in starts] == list(range(1, len(world_sizes) + 1)), starts
    assert [s for s, _ in starts] == [s for s, _ in world_sizes], (starts, world_sizes)
    assert all(s == v for s, v in resumes), resumes
    return run, world_sizes, resumes


def _assert_every_checkpoint_registered(client: MlflowClient, model: str, mlflow_run_id: str,
                                        run_dir: Path) -> list[int]:
    versions = client.search_model_versions(f"name = '{model}' and run_id = '{mlflow_run_id}'")
    registered = collections.Counter(int(v.tags["step"]) for v in versions)
    assert all(v.tags["run_id"] == mlflow_run_id for v in versions)
    assert sorted(registered) == _checkpoint_steps(run_dir) and set(registered.values()) == {1}, registered
    return sorted(registered)


def _pid(line: str) -> int | None:
    found = WORKER_PID.search(line)
    return int(found[1]) if found else None


def _rank0_pid(driver: Driver) -> int | None:
    """The process of the worker that prints rank 0's step lines (the latest group's)."""
    _, _, line = driver.find(STEP)[-1]
    return _pid(line)


def _rank0_node(cluster: RayCluster, driver: Driver) -> str:
    """The worker node whose processes include the worker that prints rank 0's step lines."""
    rank0 = _rank0_pid(driver)
    (node,) = [n for n in ("node1", "node2") if rank0 in ray_processes_under(cluster.temp(n))]
    return node


@pytest.mark.timeout(1200)
def test_a_lost_node_shrinks_the_group_resumes_exactly_and_grows_back(
        cluster: RayCluster, drivers: list[Driver], mlflow_server, train_data: Path, tmp_path: Path) -> None:
    steps = 2 * CHECKPOINT_EVERY + STEPS_AFTER_SHRINK
    run_id, model = f"multinode-{uuid.uuid4().hex[:6]}", f"multinode-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / run_id
    driver = Driver(cluster, _overrides(train_data, tmp_path, mlflow_server.uri, model, run_id, steps),
                    tmp_path / "driver.log")
    drivers.append(driver)
    _, first, _ = driver.wait_for(GROUP_START, timeout=300)
    assert (int(first[1]), int(first[2]), int(first[3])) == (2, 0, steps), driver.tail()

    # Kill rank 0's node a few steps after the second checkpoint (its publication may still be under way), before
    # the third: the group of 1 continues from step 2 * CHECKPOINT_EVERY.
    driver.wait_for(STEP, timeout=300, accept=lambda m: int(m[1]) >= 2 * CHECKPOINT_EVERY + 2)
    victim = _rank0_node(cluster, driver)
    killed_at = time.monotonic()
    assert cluster.kill_node(victim)

    # The group shrinks to 1 worker and continues from the last checkpoint Ray Train had registered.
    shrink_t, shrink, _ = driver.wait_for(GROUP_START, timeout=300, after=killed_at)
    kill_step = max(int(m[1]) for t, m, _ in driver.find(STEP) if t < shrink_t)  # the lost group's last step
    world, resumed = int(shrink[1]), int(shrink[2])
    assert world == 1 and resumed % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed <= kill_step, driver.tail()
    again_t, again, _ = driver.wait_for(STEP, timeout=120, after=killed_at)
    assert int(again[1]) == resumed + 1
    node_back = time.monotonic()
    cluster.start_node(victim)
    node_started = time.monotonic()

    # Back to 2 workers once Ray Train sees the room (scaling.resize_interval_s), again from a checkpoint.
    grow_t, grow, _ = driver.wait_for(GROUP_START, timeout=300, after=node_started)
    regrown = int(grow[2])
    # The latest checkpoint: the group of 1's own, or (a loaded machine, a resize before it saved one) the same one.
    assert int(grow[1]) == 2 and regrown % CHECKPOINT_EVERY == 0 and regrown >= resumed, driver.tail()
    regrown_t, _, _ = driver.wait_for(STEP, timeout=120, after=node_started)
    assert driver.wait(timeout=600) == 0, driver.tail()

    # Exact resume: every step trained from the same state on the same samples. A step trained by both the lost
    # group and the next one has the same loss (to the 4 decimals rank 0 prints), though the world size changed.
    losses: dict[int, list[str]] = collections.defaultdict(list)
    for _, m, _ in driver.find(STEP):
        losses[int(m[1])].append(m[3])
    retrained = {s: v for s, v in losses.items() if len(v) > 1}
    assert resumed + 1 in retrained and all(len(set(v)) == 1 for v in retrained.values()), retrained
    _assert_checkpoint_position(run_dir, steps, world_size=2)

    client = MlflowClient(mlflow_server.uri)
    # A torn-down group (the lost node, then the resize) takes the points its rank 0 had not delivered with it;
    # the steps it trained after the checkpoint the next group restores are trained and logged again. A busy
    # machine may lose a worker before the kill too: those restarts come first.
    run, world_sizes, resumes = _finished_groups(client, run_id, steps, complete_from=regrown + 1)
    assert world_sizes[-2:] == [(resumed, 1), (regrown, 2)], world_sizes
    assert resumes[-2:] == [(resumed, resumed), (regrown, regrown)], resumes
    registered = _assert_every_checkpoint_registered(client, model, run.info.run_id, run_dir)
    assert registered == list(range(CHECKPOINT_EVERY, steps + 1, CHECKPOINT_EVERY))

    print(f"\n[multinode] killed {victim} (rank 0) at step {kill_step}: group of 1 from step {resumed} "
          f"{shrink_t - killed_at:.1f} s later, training again after {again_t - killed_at:.1f} s; node started "
          f"in {node_started - node_back:.1f} s, group of 2 from step {regrown} {grow_t - node_started:.1f} s "
          f"after, training again after {regrown_t - node_started:.1f} s; run done in "
          f"{driver.lines[-1][0] - driver.started:.0f} s; registered steps {registered}")


@pytest.mark.timeout(900)
def test_a_stopped_driver_is_continued_by_the_same_command(
        cluster: RayCluster, drivers: list[Driver], mlflow_server, train_data: Path, tmp_path: Path) -> None:
    # 40 steps: Ray streams a worker's lines to the driver in batches, so the SIGTERM may come some steps after
    # the step seen; the stop check it waits for (every STOP_CHECK_EVERY steps) must still come before the end.
    steps, run_id, model = 40, f"resubmit-{uuid.uuid4().hex[:6]}", f"resubmit-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / run_id
    overrides = _overrides(train_data, tmp_path, mlflow_server.uri, model, run_id, steps)
    first = Driver(cluster, overrides, tmp_path / "driver-1.log")
    drivers.append(first)
    first.wait_for(STEP, timeout=300, accept=lambda m: int(m[1]) >= CHECKPOINT_EVERY + 2)
    stopped_at = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)  # what `ray job stop`, a pod eviction or a spot reclaim sends
    first.wait(timeout=120)
    exited_at = time.monotonic()
    _, last_first, _ = first.find(STEP)[-1]
    kept = _checkpoint_steps(run_dir)
    assert kept and kept[-1] <= int(last_first[1]) and kept[-1] < steps, (kept, first.tail())

    second = Driver(cluster, overrides, tmp_path / "driver-2.log")
    drivers.append(second)
    start_t, start, _ = second.wait_for(GROUP_START, timeout=420)  # Ray may hold the last driver's request 180 s
    assert (int(start[2]), int(start[3])) == (kept[-1], steps), second.tail()  # "steps N->M": continuing
    again_t, again, _ = second.wait_for(STEP, timeout=120)
    assert int(again[1]) == kept[-1] + 1
    assert second.wait(timeout=300) == 0, second.tail()

    client = MlflowClient(mlflow_server.uri)
    run = _mlflow_run(client, run_id)  # the same MLflow run for both drivers
    assert run.info.status == "FINISHED"
    assert f"mlflow run  {run.info.run_id}" in "\n".join(line for _, line in second.lines)
    _assert_clean_history(client, run.info.run_id, steps)
    assert [v for _, v in _history(client, run.info.run_id, "group_starts")] == [1, 2]
    assert _history(client, run.info.run_id, "resumed_from_step") == [(kept[-1], kept[-1])]
    registered = _assert_every_checkpoint_registered(client, model, run.info.run_id, run_dir)

    # Once more, after it finished: nothing to train, exit 0, the run and its checkpoints as they were.
    third = Driver(cluster, overrides, tmp_path / "driver-3.log")
    drivers.append(third)
    assert third.wait(timeout=300) == 0, third.tail()
    assert not third.find(GROUP_START) and not third.find(STEP), third.tail()
    assert "had already finished" in "\n".join(line for _, line in third.lines), third.tail()
    assert _checkpoint_steps(run_dir) == registered and _mlflow_run(client, run_id).info.status == "FINISHED"
    _assert_clean_history(client, run.info.run_id, steps)

    print(f"\n[multinode] driver stopped at step {last_first[1]} (SIGTERM), exited {exited_at - stopped_at:.1f} s "
          f"later; the same command continued from step {kept[-1]}: group started {start_t - second.started:.1f} s, "
          f"training again {again_t - second.started:.1f} s after it was started; the finished run's re-run took "
          f"{third.lines[-1][0] - third.started:.1f} s; registered steps {registered}")


@pytest.mark.timeout(900)
def test_a_drained_node_checkpoints_then_the_group_restarts_from_that_checkpoint(
        cluster: RayCluster, drivers: list[Driver], mlflow_server, train_data: Path, tmp_path: Path) -> None:
    # No checkpoint_every grid inside the run: its checkpoints are the preemption's and the final one, so the
    # restart can only come from the former. 60 steps leave the group of 1 some 40 to train after it.
    steps, run_id, model = 60, f"drain-{uuid.uuid4().hex[:6]}", f"drain-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "runs" / run_id
    driver = Driver(cluster, _overrides(train_data, tmp_path, mlflow_server.uri, model, run_id, steps,
                                        checkpoint_every=10 * steps), tmp_path / "driver.log")
    drivers.append(driver)
    _, first, _ = driver.wait_for(GROUP_START, timeout=300)
    assert (int(first[1]), int(first[2])) == (2, 0), driver.tail()
    driver.wait_for(STEP, timeout=300, accept=lambda m: int(m[1]) >= 2)
    victim, rank0_pid = _rank0_node(cluster, driver), _rank0_pid(driver)
    drained_at = time.monotonic()
    cluster.drain_node(victim, deadline_s=600)  # a deadline far off: the test brings it forward below

    # Every rank sees the notice at its next stop check; rank 0 saves (and uploads) a checkpoint there and the
    # group trains on. Once Ray Train registered it, the node's deadline comes: Ray Train restarts the group.
    notice_t, notice, _ = driver.wait_for(NOTICE, timeout=300)
    saved = int(notice[1])
    assert saved % STOP_CHECK_EVERY == 0 and saved > 2, driver.tail()
    _wait_until(lambda: latest_run_checkpoint(str(run_dir), "") == (str(run_dir / f"{CHECKPOINT_PREFIX}{saved:08d}"),
                                                                     True), 120, driver)
    driver.wait_for(STEP, timeout=120, accept=lambda m: int(m[1]) > saved)  # trained on past the checkpoint
    deadline_at = time.monotonic()
    cluster.drain_node(victim, deadline_s=1)

    # At the deadline Ray Train stops the group (rank 0's worker exits), and then the machine goes: the pod's hook
    # returns and its grace period ends, or the spot VM is reclaimed. Ray shuts a drained raylet down by itself only
    # once the node is idle, which what the run's data pipeline still keeps there can put off for minutes (a CI run
    # waited 300 s); until the node is gone Ray Train's elastic restart counts it and tries a group of 2.
    _wait_until(lambda: not Path(f"/proc/{rank0_pid}").exists(), 120, driver)
    stopped = "had stopped by itself" if cluster.node_id(victim) is None else "stopped by the test"
    cluster.kill_node(victim)
    gone_t = time.monotonic()

    restart_t, restart, _ = driver.wait_for(GROUP_START, timeout=300, after=deadline_at)
    assert (int(restart[1]), int(restart[2]), int(restart[3])) == (1, saved, steps), driver.tail()
    again_t, again, _ = driver.wait_for(STEP, timeout=120, after=deadline_at)
    assert int(again[1]) == saved + 1
    assert driver.wait(timeout=600) == 0, driver.tail()
    output = "\n".join(line for _, line in driver.lines)
    assert "Source: preemption" in output, output[-6000:]  # Ray Train's failure policy: not scaling.max_failures

    # Exact resume: step saved + 1 trained by both groups, with the same loss; the right samples at the end.
    losses = {m[3] for _, m, _ in driver.find(STEP) if int(m[1]) == saved + 1}
    assert len(losses) == 1, losses
    _assert_checkpoint_position(run_dir, saved, world_size=2)
    _assert_checkpoint_position(run_dir, steps, world_size=1)

    client = MlflowClient(mlflow_server.uri)
    run, world_sizes, resumes = _finished_groups(client, run_id, steps, complete_from=saved + 1)
    assert world_sizes[-1] == (saved, 1), world_sizes
    assert resumes[-1] == (saved, saved), resumes
    registered = _assert_every_checkpoint_registered(client, model, run.info.run_id, run_dir)
    assert registered == [saved, steps]

    print(f"\n[multinode] drained {victim} (rank 0): preemption checkpoint at step {saved} "
          f"{notice_t - drained_at:.1f} s later; deadline moved to now -> group of 1 from step {saved} "
          f"{restart_t - deadline_at:.1f} s, training again {again_t - deadline_at:.1f} s, rank 0's worker gone "
          f"{gone_t - deadline_at:.1f} s after (the node {stopped}); "
          f"run done in {driver.lines[-1][0] - driver.started:.0f} s; registered steps {registered}")


def _wait_until(done: Callable[[], bool], timeout: float, driver: Driver) -> None:
    """Poll ``done`` until it holds; fail after ``timeout``, with the driver's last lines."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:.0f} s (driver exit {driver.proc.poll()}):\n{driver.tail()}")
        time.sleep(0.5)
