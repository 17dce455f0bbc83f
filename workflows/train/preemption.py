"""Stop and preemption: a checkpoint at the next step boundary before the process or the node goes away.

Two notices reach a training run before it is killed:

- **the driver gets SIGTERM**: ``ray job stop`` (SIGTERM to the entrypoint's processes, SIGKILL
  ``RAY_JOB_STOP_WAIT_TIME_S`` later, 3 s by default), a pod deletion, a CI timeout. ``DriverStop``
  (around ``trainer.fit()``) turns it into a stop request in a ``StopFlag`` actor next to the driver; at the
  next check every rank agrees to stop, rank 0 saves a checkpoint at that step (synchronous upload), the
  workers return, and the driver ends the MLflow run KILLED and exits 130 (``DriverStopped``). A second
  SIGTERM, or ``STOP_WAIT_S`` without the workers returning, stops at once, without that checkpoint.
- **a node is drained for preemption**: a spot reclaim, an eviction with the ``preStop`` hook of
  ``ray_cluster.yaml`` (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``), the autoscaler. Ray
  Train's PreemptionWatcher sees the drain (it polls every 5 s) and ``ray.train.get_preemption_info()`` says so
  on every rank; the group saves a checkpoint at the next check and trains on, as Ray recommends. Ray 2.60's
  controller waits for the drain's deadline (120 s without one), then stops the group, whether or not the node
  is still up, and restarts it on the nodes left from that checkpoint (a ``PreemptionError``, counted against
  ``FailureConfig.max_preemption_failures``, unlimited, not ``max_failures``). A drained node is never given new
  work, but until it is gone (the pod ends when its hook returns; a drained raylet exits by itself only once the
  node is idle) an elastic restart still counts it, trying the old size for
  ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` at a time (``tests/test_multinode.py`` drains a node).
  The head pod, where the driver runs, instead stops its jobs with SIGTERM first (``workflows.ops.stop_jobs``).

Checks run every ``STOP_CHECK_EVERY`` steps, at the same steps on every rank (each is a collective: a
time-based check would let ranks disagree on which step has one). The driver's flag is read by rank 0 with
a zero-CPU actor call and agreed by one all-reduce of a byte.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from workflows.common.log import get_logger

log = get_logger("train")

# Steps between two checks. A check is two tiny collectives plus one actor call on rank 0: measured in a 2-worker
# gloo group on the 2-core CI machine, 1.9 ms for the flag all-reduce, 12.7 ms for Ray's preemption broadcast
# (one round trip per rank through its synchronisation actor, so it grows with the world size) and 1.1 ms for
# the flag read; against a 1.6 s demo step that is 0.1% at every 10 steps. The stop checkpoint then comes at
# most 10 steps after the notice (a few seconds for the paper configs), inside ray_cluster.yaml's grace periods.
STOP_CHECK_EVERY = 10
# How long the driver waits after a SIGTERM for the workers to checkpoint and return, before it stops anyway.
# The head pod's stop hook waits at least this long (100 s in ray_cluster.yaml, inside its 120 s grace period;
# k8s_checks), leaving time to end the MLflow run.
STOP_WAIT_S = 90.0
FLAG_TIMEOUT_S = 10.0  # rank 0's wait for the driver's flag at a check

STOP = "stop"  # the driver asked (SIGTERM): checkpoint, then the run ends
PREEMPTION = "preemption"  # a node of the group is draining: checkpoint, then train on until Ray restarts the group


class StopFlag:
    """The driver's stop request, kept in a zero-CPU actor on the driver's node: every rank 0 reaches it,
    whatever node it runs on, and it dies with the driver, so no stale request outlives a run."""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def is_requested(self) -> bool:
        return self.requested


class DriverStopped(KeyboardInterrupt):
    """The driver was stopped by SIGTERM. A KeyboardInterrupt, so it ends like a Ctrl-C: the MLflow run KILLED,
    exit code 130 (``EXIT_INTERRUPTED``)."""


class DriverStop:
    """Around ``trainer.fit()`` on the driver: the SIGTERM handler and the flag the workers poll (``handle``).

    Installed only in the main thread (Python delivers signals there); elsewhere ``handle`` still works for a
    caller that requests the stop itself."""

    def __init__(self, wait_s: float = STOP_WAIT_S) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.handle = ray.remote(num_cpus=0, scheduling_strategy=here)(StopFlag).remote()
        self.wait_s = wait_s
        self.signalled_at: float | None = None
        self._timer: threading.Timer | None = None
        self._previous: Any = None

    def __enter__(self) -> "DriverStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._timer is not None:
            self._timer.cancel()
        ray.kill(self.handle)

    def request(self) -> None:
        """Ask the workers to checkpoint at their next check and return; after ``wait_s``, SIGTERM again."""
        self.signalled_at = time.monotonic()
        self.handle.request.remote()
        self._timer = threading.Timer(self.wait_s, os.kill, (os.getpid(), signal.SIGTERM))
        self._timer.daemon = True
        self._timer.start()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.signalled_at is not None:
            raise _stopped(f"stopped {time.monotonic() - self.signalled_at:.0f} s after SIGTERM, without a stop "
                           f"checkpoint; the same command with this run's id continues from its latest checkpoint")
        log.warning("SIGTERM: the workers checkpoint at their next check (every %d steps) and stop; waiting up to "
                    "%.0f s (a second SIGTERM stops now)", STOP_CHECK_EVERY, self.wait_s)
        self.request()

    def raise_if_stopped(self, step: int, total_steps: int, checkpoint: str) -> None:
        """After ``fit()`` returned: if it returned early because of the stop request, end as an interrupted
        run (a SIGTERM that came after the last step leaves a finished run)."""
        if self.signalled_at is not None and step < total_steps:
            raise _stopped(f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}; the same command with "
                           f"this run's id (or --resume-from it) continues from there")


def _stopped(message: str) -> DriverStopped:
    log.warning(message)  # the CLI prints "interrupted" only
    return DriverStopped(message)


def agree(flag: bool, group: Any = None) -> bool:
    """True on every rank if it is True on any rank: one all-reduce (MAX) of a byte, on the CPU. (torch is imported
    where it runs, in the workers: `clipflow submit` and the head's preStop hook read this module's numbers.)"""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.uint8)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def cpu_group() -> Any:
    """A process group for CPU tensors: the default one under gloo, else (NCCL) a gloo group made now, which
    every rank must call in the same order (at the loop's start). The flag all-reduce stays off the device's
    stream, so a check never waits for the GPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


class StopCheck:
    """Worker side: ``poll(step)`` on every rank after each step; STOP, PREEMPTION or None, the same on every
    rank. ``flag`` is the driver's ``StopFlag`` handle (None: no driver stop, e.g. a benchmark)."""

    def __init__(self, flag: Any, rank: int, every: int = STOP_CHECK_EVERY) -> None:
        self.flag, self.rank, self.every = flag, rank, every
        self.group = cpu_group()
        self.preemption_saved = False  # one checkpoint per worker group: Ray restarts the group anyway

    def poll(self, step: int) -> str | None:
        import ray.train

        if step % self.every:
            return None
        preempted = ray.train.get_preemption_info()  # a broadcast from rank 0: the same on every rank
        if agree(self.rank == 0 and self._driver_asked(), self.group):
            return STOP
        if preempted is not None and not self.preemption_saved:
            self.preemption_saved = True
            log.warning("preemption notice for ranks %s (deadline %s): checkpointing at step %d",
                        preempted.preempted_ranks, _clock(preempted.deadline_ms), step)
            return PREEMPTION
        return None

    def _driver_asked(self) -> bool:
        """Whether the driver asked to stop: one actor call (about a millisecond), bounded by
        ``FLAG_TIMEOUT_S`` so an unreachable driver cannot hold the group."""
        import ray

        if self.flag is None:
            return False
        try:
            return bool(ray.get(self.flag.is_requested.remote(), timeout=FLAG_TIMEOUT_S))
        except ray.exceptions.GetTimeoutError:
            log.warning("the driver's stop flag did not answer within %.0f s; asking again at the next check",
                        FLAG_TIMEOUT_S)
            return False
        except ray.exceptions.RayActorError:  # the driver is gone; so is this group, soon
            log.warning("the driver's stop flag is gone (driver exited?); no longer checking it")
            self.flag = None
            return False


def _clock(deadline_ms: int | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(deadline_ms / 1000)) if deadline_ms else "none"
