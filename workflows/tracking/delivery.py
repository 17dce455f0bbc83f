"""What the tracking server has not taken yet for one run, and the one code path that sends it.

Tracking must never kill or stall training. When the server is unreachable, erroring or hung, metrics stay
in a bounded buffer (oldest dropped and counted once full), one warning says so, later tries back off
exponentially, and what is pending is spooled durably next to the run's checkpoints
(``workflows.tracking.spool``); one line announces the recovery. A request the server refuses as invalid
(HTTP 400) is dropped and counted (``rejected``) instead of blocking the queue.

One history however often the run restarts. A restarted worker group re-trains the steps since its checkpoint:
their points are not sent again, because the delivery drops a point of a metric at or below the highest step
the run already has of that metric (read from the server when the run opens, then advanced by every point it
sends, spooled ones first, as they are older). Exempt are the group-start metrics (``GROUP_METRICS``), one
point each per worker group at the step it starts from: ``world_size``, ``group_starts`` (1 for the run's
first group, +1 for each later one, counted on from what the run has, across drivers) and
``resumed_from_step`` (only when the group restored a checkpoint).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable

import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from workflows.common.config import Config, dump_config
from workflows.common.errors import UserError
from workflows.tracking.publisher import Publisher
from workflows.tracking.run import (GROUP_METRICS, GROUP_STARTS, RESUMED_FROM, WORLD_SIZE, client_for, open_run,
                                    public_config, scrub_uri)
from workflows.tracking.spool import GroupStart, Spool, SpoolContents

log = logging.getLogger("clipflow.tracking")

# What an unreachable, restarting or erroring tracking server raises (MLflow wraps HTTP failures in
# MlflowException; artifact uploads may surface requests/OS errors directly).
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
MAX_BACKOFF_S = 60.0
CLOSING_RETRY_S = 1.0  # while closing, retry every second until mlflow.close_timeout_seconds is spent
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class Resilient:
    """Runs MLflow calls through outages: one warning when the server goes away, exponential backoff between
    tries, one line when it is back (then ``on_recovery``). One per run, shared by the Tracker's two threads, so
    an outage either of them meets holds both back and is announced, and its end, once: its state changes under
    a lock; the calls themselves run unlocked, side by side."""

    def __init__(self, uri: str, buffer_size: int, on_recovery: Callable[[], None]) -> None:
        self.uri = scrub_uri(uri)
        self.buffer_size = buffer_size
        self.on_recovery = on_recovery
        self.rejected = 0  # requests the server refused as invalid (dropped, not retried)
        self.outage_since: float | None = None
        self.retry_at = 0.0
        self.max_backoff = MAX_BACKOFF_S
        self._failures = 0
        self._lock = threading.Lock()

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def wait_s(self) -> float:
        """Seconds until the next try is due: 0 outside an outage."""
        with self._lock:
            return 0.0 if self.outage_since is None else max(0.0, self.retry_at - time.monotonic())

    def hurry(self) -> None:
        """Try again now, and then every ``CLOSING_RETRY_S`` (the run is closing)."""
        with self._lock:
            self.max_backoff, self.retry_at = CLOSING_RETRY_S, 0.0

    def reject(self) -> None:
        """Count a request dropped as invalid."""
        with self._lock:
            self.rejected += 1

    def call(self, fn: Callable[[], object], droppable: bool = True) -> bool:
        """Run one MLflow operation: True when done (or, if ``droppable``, refused as invalid: dropped),
        False in an outage."""
        try:
            fn()
        except MlflowException as exc:
            if exc.get_http_status_code() != 400 or not droppable:
                return self._outage(exc)
            # The server refuses this request itself (an invalid value): retrying cannot help, and keeping
            # it would block everything queued behind it. Drop it, loudly.
            self.reject()
            log.warning("MLflow at %s rejected a request and it is dropped: %s", self.uri,
                        scrub_uri(str(exc).splitlines()[0][:300]))
            return True
        except TRACKING_ERRORS as exc:
            return self._outage(exc)
        with self._lock:
            since, self.outage_since, self._failures = self.outage_since, None, 0
        if since is not None:
            log.warning("MLflow is back after %.0f s; sending what is pending", time.monotonic() - since)
            self.on_recovery()
        return True

    def _outage(self, exc: Exception) -> bool:
        """Enter (or stay in) an outage: warn once, retry later with exponential backoff. A failure before the
        retry already scheduled (the other thread's call, sent before it) does not back off further."""
        with self._lock:
            now = time.monotonic()
            if now >= self.retry_at:
                self._failures += 1
                self.retry_at = now + min(self.max_backoff, 0.5 * 2 ** self._failures)
            began = self.outage_since is None
            if began:
                self.outage_since = now
        if began:
            log.warning("MLflow at %s is unreachable or failing (%s); training goes on, metrics are buffered "
                        "(up to %d points), spooled and sent when it is back", self.uri,
                        scrub_uri(str(exc).splitlines()[0][:200]), self.buffer_size)
        return False


class SystemMetrics:
    """MLflow's CPU/memory/disk/network (and GPU) monitor, under ``system/`` in the run. Its thread ends for
    good when it cannot reach the server, so it is restarted (a new monitor) after every outage, by whichever
    of the Tracker's threads sees the recovery: hence the lock (a restart racing the run's end would outlive it)."""

    def __init__(self, enabled: bool, uri: str) -> None:
        self.enabled = enabled
        self.uri = uri
        self._monitor: Any = None
        self._lock = threading.Lock()

    def start(self, run_id: str) -> None:
        if not self.enabled:
            return
        try:
            import psutil  # noqa: F401  (the monitor's dependency)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            self.enabled = False
            log.warning("MLflow system metrics need psutil (pip install psutil); set mlflow.system_metrics=false "
                        "to silence this")
            return
        with self._lock:
            if not self.enabled:  # stopped for good meanwhile
                return
            self._finish()
            self._monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()

    def stop(self) -> None:
        """For good: the run is ending."""
        with self._lock:
            self.enabled = False
            self._finish()

    def _finish(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


class Delivery:
    """Everything pending for one run and the one code path that sends it: the Tracker's two threads, the
    driver ending a run, and `clipflow sync` all go through ``deliver`` (the Tracker's publication thread through
    the part of it that publishes, ``publish``) and ``save``.

    ``changed`` guards the pending state (the training thread adds, the Tracker's threads take) and is
    notified whenever something was delivered. A publication leaves the queue only once the server has it (or
    it is dropped for good), so a spool written at any moment holds every publication the server lacks.
    ``resume``/``create``/``attempt``: see ``open_run``.
    """

    def __init__(self, cfg: Config, run_key: str, tags: dict[str, str], *, resume: bool, create: bool,
                 system_metrics: bool = False, attempt: str = "") -> None:
        self.cfg = cfg
        self.run_key = run_key
        self.tags = dict(tags)
        self.resume, self.create, self.attempt = resume, create, attempt
        self.client = client_for(cfg)
        self.spool = Spool.for_run(cfg.storage.path, run_key, cfg.storage.s3_endpoint)
        self.system = SystemMetrics(system_metrics, self.client.tracking_uri)
        self.calls = Resilient(self.client.tracking_uri, cfg.mlflow.buffer_size, self._recovered)
        self.recorded_uri = scrub_uri(self.client.tracking_uri)  # the run's server, as the spool names it
        self.publisher = Publisher(cfg, self.tags.get("clipflow.data_manifest_hash", ""))
        self.changed = threading.Condition()
        self.run_id = ""
        self.run_status = ""
        self.dropped = 0  # metric points pushed out of a full buffer
        self.relogged = 0  # points not sent: the run already has that metric at that step or later
        self.end = ""  # the status to end the run with, once set
        self.ended = False
        self._metrics: collections.deque[Metric] = collections.deque()
        self._in_hand: list[Metric] = []  # the batch being sent (still pending until the server took it)
        self._last_steps: dict[str, int] = {}  # metric -> highest step the run has or is sent (once open)
        self._group_starts: list[GroupStart] = []  # not numbered yet: the run is not open
        self._starts_counted = 0  # the run's group starts, this delivery's numbered ones included
        self._artifacts: list[tuple[str, str | None]] = []
        self._spool_lock = threading.Lock()
        self._spooled = False  # a spool exists that this delivery wrote or read
        self._frozen = False  # the spool was written for the last time (closing gave up)

    # -- adding ------------------------------------------------------------------------------------------

    def add_metric(self, metric: Metric) -> None:
        with self.changed:
            if len(self._metrics) + len(self._in_hand) >= self.cfg.mlflow.buffer_size:
                if not self._metrics:
                    self.dropped += 1
                    return
                self._metrics.popleft()
                self.dropped += 1
            self._metrics.append(metric)
            self.changed.notify_all()

    def add_group_start(self, start: GroupStart) -> None:
        with self.changed:
            self._group_starts.append(start)
            self.changed.notify_all()

    def add_artifact(self, local_path: str, artifact_path: str | None) -> None:
        with self.changed:
            self._artifacts.append((local_path, artifact_path))
            self.changed.notify_all()

    def load_spool(self, with_end: bool) -> SpoolContents | None:
        """Take over what an earlier attempt (or process) spooled; a live run ignores the end it recorded."""
        try:
            contents = self.spool.read()
        except (OSError, UserError) as exc:
            log.warning("MLflow: cannot read the spool %s (%s); what it holds is not delivered", self.spool.directory,
                        exc)
            return None
        if contents is not None:
            self.restore(contents, with_end)
        return contents

    def restore(self, contents: SpoolContents, with_end: bool) -> None:
        """Put spooled records in front of what is queued (they are older)."""
        with self.changed:
            self._spooled = True
            self._metrics.extendleft(reversed(contents.metrics))
            self._group_starts[:0] = contents.group_starts
            self._artifacts[:0] = contents.artifacts
            self.publisher.restore(contents.publications)
            if with_end and contents.end:
                self.end = contents.end
            self.changed.notify_all()
        log.info("MLflow: delivering %d metric points and %d checkpoint registrations spooled in %s",
                 len(contents.metrics), len(contents.publications), self.spool.directory)

    # -- state -------------------------------------------------------------------------------------------

    @property
    def spooled(self) -> bool:
        return self._spooled

    @property
    def buffered(self) -> int:
        with self.changed:
            return self._points()

    def counts(self) -> tuple[int, int, int]:
        """Pending (metric points, checkpoint registrations, artifacts)."""
        with self.changed:
            return self._points(), len(self.publisher.pending()), len(self._artifacts)

    def _points(self) -> int:
        return (len(self._metrics) + len(self._in_hand)
                + sum(len(_group_metrics(start, 0)) for start in self._group_starts))

    def urgent(self) -> bool:
        """Something but publications to send now (the end waits until no publication is pending)."""
        with self.changed:
            return bool((not self.run_id and self.create) or self._metrics or self._in_hand or self._artifacts
                        or (self.run_id and self._group_starts)
                        or (self.end and not self.ended and not self.publisher.pending()))

    def finished(self) -> bool:
        points, registrations, artifacts = self.counts()
        return not (points or registrations or artifacts) and (self.ended or not self.end)

    # -- sending -----------------------------------------------------------------------------------------

    def deliver(self, publications: bool = True) -> bool:
        """One round: open the run if needed, then send metrics, artifacts, ready publications (``publish``;
        unless ``publications`` is False: the Tracker publishes on a thread of its own) and, once no publication
        is pending, the end status. True when nothing sendable is left; False when the server failed
        (everything stays pending)."""
        if not self.run_id:
            if not self.calls.call(self._open, droppable=False):
                return False
            if not self.run_id:  # absent and not to be created: nothing here to deliver to
                return True
        self._number_group_starts()
        while batch := self._take_batch():
            if not self.calls.call(lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=True)):
                return False
            with self.changed:
                self._in_hand = []
                self.changed.notify_all()
        while self._artifacts:
            local_path, artifact_path = self._artifacts[0]
            if not os.path.exists(local_path):
                self.calls.reject()
                log.warning("MLflow: artifact %s does not exist (any more); not logged", local_path)
            else:
                send = self.client.log_artifacts if os.path.isdir(local_path) else self.client.log_artifact
                if not self.calls.call(lambda: send(self.run_id, local_path, artifact_path)):
                    return False
            with self.changed:
                self._artifacts.pop(0)
        if publications and not self.publish():
            return False
        if self.end and not self.ended and not self.publisher.pending():
            self.system.stop()
            if not self.calls.call(lambda: self.client.set_terminated(self.run_id, self.end)):
                return False
            self.ended = True
        with self.changed:
            self.changed.notify_all()
        return True

    def publish(self) -> bool:
        """Publish every complete checkpoint, in order, one at a time, to the open run; False when the server
        failed (the rest stays queued)."""
        return self.publisher.publish_ready(self.calls.call, self.client, self.run_id)

    def _take_batch(self) -> list[Metric]:
        """The next batch to send, without the points the run already has (see the module docstring)."""
        with self.changed:
            while not self._in_hand and self._metrics:
                for _ in range(min(METRICS_PER_BATCH, len(self._metrics))):
                    metric = self._metrics.popleft()
                    last = self._last_steps.get(metric.key)
                    if metric.key in GROUP_METRICS or last is None or metric.step > last:
                        self._last_steps[metric.key] = metric.step if last is None else max(last, metric.step)
                        self._in_hand.append(metric)
                        continue
                    if not self.relogged:
                        log.info("MLflow: run %s already has %s up to step %d: points at or below the steps it has "
                                 "(re-trained after a restart) are not logged again", self.run_key, metric.key, last)
                    self.relogged += 1
            return list(self._in_hand)

    def _number_group_starts(self) -> None:
        """Pending group starts become points, numbered on from the run's group starts (those on the server,
        and those already numbered but still pending, from a spool)."""
        with self.changed:
            if not self._group_starts:
                return
            queued = [m.value for m in (*self._in_hand, *self._metrics) if m.key == GROUP_STARTS]
            count = int(max([self._starts_counted, *queued]))
            for start in self._group_starts:
                count += 1
                self._metrics.extend(_group_metrics(start, count))
                log.info("MLflow: run %s: worker group %d, %d workers, from step %d%s", self.run_key, count,
                         start.world_size, start.step, " (restored)" if start.restored else "")
            self._starts_counted, self._group_starts = count, []

    def _open(self) -> None:
        opened = open_run(self.client, self.cfg, self.run_key, self.tags, resume=self.resume, create=self.create,
                          attempt=self.attempt)
        with self.changed:
            self.run_id, self.run_status = opened.run_id, opened.status
            self._last_steps, self._starts_counted = dict(opened.last_steps), opened.group_starts
        if self.run_id:
            self.system.start(self.run_id)

    def _recovered(self) -> None:
        if self.run_id:
            self.system.start(self.run_id)

    # -- the spool ---------------------------------------------------------------------------------------

    def save(self, last: bool = False) -> bool:
        """Make the spool match what is pending (deleted when nothing is); ``last``: no write after this one.
        False when the spool could not be written (the storage is failing too)."""
        with self._spool_lock:
            if self._frozen:
                return False
            self._frozen = last
            with self.changed:
                contents = SpoolContents(
                    run_key=self.run_key, tracking_uri=self.recorded_uri, run_id=self.run_id,
                    tags=self.tags, metrics=[*self._in_hand, *self._metrics], group_starts=list(self._group_starts),
                    artifacts=list(self._artifacts), publications=self.publisher.pending(),
                    end="" if self.ended else self.end)
            empty = not (contents.metrics or contents.group_starts or contents.artifacts or contents.publications
                         or contents.end)
            if empty and not self._spooled:
                return True
            try:
                if empty:
                    self.spool.delete()
                else:
                    self.spool.write(contents, dump_config(public_config(self.cfg)))
            except OSError as exc:
                log.warning("MLflow: cannot write the spool %s (%s)", self.spool.directory, exc)
                return False
            self._spooled = not empty
            return True

    def pending_line(self, why: str) -> str:
        """The one line that says what is pending and how to deliver it."""
        points, registrations, artifacts = self.counts()
        parts = [f"{points} metric points", f"{registrations} checkpoint registrations"]
        if artifacts:
            parts.append(f"{artifacts} artifacts")
        if self.end and not self.ended:
            parts.append(f"the run's end ({self.end})")
        dropped = f" ({self.dropped} points dropped: buffer full)" if self.dropped else ""
        return (f"MLflow: {', '.join(parts)} of run {self.run_key} are pending in {self.spool.directory}{dropped}: "
                f"{why}; deliver them with `clipflow sync {self.spool.directory}`")


def _group_metrics(start: GroupStart, number: int) -> list[Metric]:
    """The points of the ``number``-th worker group's start."""
    points = {WORLD_SIZE: start.world_size, GROUP_STARTS: number}
    if start.restored:
        points[RESUMED_FROM] = start.step
    return [Metric(key, float(value), start.timestamp, start.step) for key, value in points.items()]
