"""MLflow tracking of a training run from rank 0 (Ray Train V2 rejects Ray's MLflow callback).

Tracking must never kill or stall training. The training thread only queues: ``Tracker.log_metrics``
and ``publish_checkpoint`` return at once, and two daemon threads send it through one ``Delivery``
(``workflows.tracking.delivery``). The metric thread sends metric points, group starts, artifacts and the
end status; the publication thread registers checkpoints, which takes tens of seconds each (log_model +
create_model_version). So no metric point waits behind a publication in rank 0's memory, where a worker group
torn down meanwhile (a lost node, a resize, a killed driver) would lose it. They share one outage state
(``Resilient``): both back off together, and the outage is announced once. The end status goes only after
every publication is settled.

``close(status)`` keeps trying for ``mlflow.close_timeout_seconds``, then leaves the rest in the spool and
logs one line with the count and the ``clipflow sync <dir>`` command that delivers it; the next attempt of
the same run delivers it too. Runs end FINISHED, FAILED or KILLED: rank 0 ends its run, and the driver
(``TrainingTracking.end``) ends one whose workers died without saying so. Checkpoint publication is
``workflows.tracking.publisher``; its versions stay one per checkpoint however late they are delivered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from mlflow.entities import Metric

from workflows.common.config import Config
from workflows.common.runtime import set_env_defaults
from workflows.tracking.delivery import Delivery
from workflows.tracking.publisher import Publication
from workflows.tracking.run import check_credentials, mlflow_key, tracking_uri
from workflows.tracking.spool import GroupStart, Spool

log = logging.getLogger("clipflow.tracking")

MAX_KEY_CHARS = 250  # MLflow's limit on metric names
PUBLICATION_POLL_S = 2.0  # how often a queued publication looks whether its checkpoint upload is complete


class Tracker:
    """Rank 0's window on MLflow: ``log_metrics``, ``log_group_start``, ``log_artifact``, ``publish_checkpoint``,
    ``close``. Every call returns without waiting on the server (``publish_checkpoint(final=True)`` and ``close``
    wait, for at most ``mlflow.close_timeout_seconds``); two daemon threads deliver (see the module docstring).
    ``attempt``: the driver attempt (see ``open_run``); "" outside training."""

    def __init__(self, cfg: Config, run_key: str, tags: dict[str, str] | None = None, attempt: str = "") -> None:
        set_env_defaults("tracking")
        self.cfg = cfg
        self.run_key = run_key
        self._delivery = Delivery(cfg, run_key, tags or {}, resume=True, create=True,
                                  system_metrics=cfg.mlflow.system_metrics, attempt=attempt)
        self._rejected = 0  # refused before queueing (names too long, missing files)
        self._closing = self._finished = self._abandoned = False
        self._deadline: float | None = None
        self._threads = [threading.Thread(target=self._send, name="clipflow-mlflow", daemon=True),
                         threading.Thread(target=self._publish, name="clipflow-mlflow-publish", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- public API ------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._delivery.run_id

    @property
    def buffered(self) -> int:
        """Metric points the server has not taken yet (in memory, and in the spool once written)."""
        return self._delivery.buffered

    @property
    def dropped(self) -> int:
        return self._delivery.dropped

    @property
    def rejected(self) -> int:
        return self._rejected + self._delivery.calls.rejected

    @property
    def spool(self) -> Spool:
        return self._delivery.spool

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            name = mlflow_key(key)
            if len(name) > MAX_KEY_CHARS:  # the server would refuse the whole batch
                self._rejected += 1
                log.warning("MLflow: metric name %r is longer than %d characters; not logged", key, MAX_KEY_CHARS)
                continue
            self._delivery.add_metric(Metric(name, float(value), now, int(step)))

    def log_group_start(self, world_size: int, step: int, restored: bool) -> None:
        """A worker group starts training at ``step`` (``restored``: from its checkpoint): the points
        ``world_size``, ``group_starts`` and (restored) ``resumed_from_step`` at that step, once the run is open."""
        self._delivery.add_group_start(GroupStart(int(step), int(world_size), bool(restored), int(time.time() * 1000)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory (it must stay in place until sent: uploads may be deferred)."""
        if not os.path.exists(local_path):
            self._rejected += 1
            log.warning("MLflow: artifact %s does not exist; not logged", local_path)
            return
        self._delivery.add_artifact(str(local_path), artifact_path)

    def publish_checkpoint(self, checkpoint_uri: str, step: int, samples_seen: int, final: bool) -> str | None:
        """Register the checkpoint as a model version (eval_status=pending). A non-final one is published in the
        background (None now); the final one before this returns: its version, or None while the server is away."""
        d = self._delivery
        d.publisher.add(Publication(checkpoint_uri, int(step), int(samples_seen), bool(final)))
        with d.changed:
            d.changed.notify_all()
            if final:
                self._deadline = time.monotonic() + self.cfg.mlflow.close_timeout_seconds
                d.changed.wait_for(lambda: d.publisher.settled(checkpoint_uri) or d.calls.in_outage,
                                   timeout=self._deadline - time.monotonic())
        return d.publisher.published.get(checkpoint_uri)

    def close(self, status: str = "FINISHED") -> None:
        """End the run as ``status`` once everything pending is delivered, trying for at most
        ``mlflow.close_timeout_seconds``; then leave the rest in the spool and say how to deliver it."""
        d = self._delivery
        with d.changed:
            d.end = status
            d.publisher.seal()
            d.calls.hurry()
            self._closing = True
            deadline = self._deadline or time.monotonic() + self.cfg.mlflow.close_timeout_seconds
            d.changed.notify_all()
            d.changed.wait_for(lambda: self._finished, timeout=max(0.0, deadline - time.monotonic()))
            self._abandoned = not self._finished
            d.changed.notify_all()
        if self._abandoned:
            why = (f"the server at {d.calls.uri} did not take them within "
                   f"{self.cfg.mlflow.close_timeout_seconds:g} s (mlflow.close_timeout_seconds)")
            if d.save(last=True):
                log.warning(d.pending_line(why))
            else:
                points, registrations, _ = d.counts()
                log.warning("MLflow: %d metric points and %d checkpoint registrations of run %s are lost: %s, and "
                            "the spool %s could not be written", points, registrations, self.run_key, why,
                            d.spool.directory)
        elif d.dropped:
            log.warning("MLflow: run %s closed with %d metric points dropped (buffer full) while the server at %s "
                        "was unreachable; raise mlflow.buffer_size to keep more", self.run_id, d.dropped, d.calls.uri)

    # -- the delivery threads --------------------------------------------------------------------------

    def _send(self) -> None:
        """The metric thread: the run, metric points, group starts, artifacts and, once no publication is
        pending, the end status. It never waits for a publication."""
        d = self._delivery
        d.load_spool(with_end=False)  # before the run opens: the publication thread waits for that
        while True:
            with d.changed:
                wait = self._wait_s()
                if wait is None or wait > 0:
                    d.changed.wait(timeout=wait)
                if self._abandoned:
                    return
                if self._wait_s() != 0.0:  # woken for the other thread, or still backing off
                    continue
            delivered = d.deliver(publications=False)
            if not delivered or d.spooled:
                d.save()
            with d.changed:
                self._finished = delivered and self._closing and d.finished()
                d.changed.notify_all()  # a failed round too: a final publication stops waiting in an outage
                if self._finished:
                    return

    def _wait_s(self) -> float | None:
        """How long the metric thread sleeps (None: until something is queued or a publication settles);
        0 = deliver now."""
        d = self._delivery
        if self._abandoned or (self._closing and d.finished()):
            return 0.0
        return d.calls.wait_s() if d.urgent() else None

    def _publish(self) -> None:
        """The publication thread: each queued checkpoint once its upload is complete, in order, one at a time,
        to the open run (the queue is looked at when it changes, else every ``PUBLICATION_POLL_S``)."""
        d = self._delivery
        seen, poll_at = -1, 0.0  # the queue's changes at the last round; when to look at its incomplete ones
        while True:
            with d.changed:
                wait = self._publication_wait_s(seen, poll_at)
                if wait is None or wait > 0:
                    d.changed.wait(timeout=wait)
                    continue
                if self._abandoned or (self._closing and not d.publisher.pending()):
                    return
                seen = d.publisher.changes
            delivered = d.publish()
            poll_at = time.monotonic() + PUBLICATION_POLL_S
            if not delivered or d.spooled:
                d.save()
            with d.changed:
                d.changed.notify_all()  # the end may be due; a final publication's caller stops waiting

    def _publication_wait_s(self, seen: int, poll_at: float) -> float | None:
        """How long the publication thread sleeps (None: until the run is open and something is queued);
        0 = publish (or, once closing with nothing queued or abandoned, end) now."""
        d = self._delivery
        if self._abandoned:
            return 0.0
        pending = d.publisher.pending()
        if not d.run_id or not (pending or self._closing):
            return None
        if not pending:
            return 0.0
        return max(d.calls.wait_s(), 0.0 if d.publisher.changes != seen else poll_at - time.monotonic(), 0.0)


@dataclass(frozen=True)
class TrainingTracking:
    """The training run's MLflow run, as ``run_training(cfg, run_log=...)`` takes it: built on the driver,
    where the tracking URI is resolved once (workers must log where the driver and the user will look),
    then called on rank 0 of every worker group to open (or find again) the run. ``attempt`` names this
    driver attempt, so a group can tell a restart within it from a new driver of the same run id."""

    cfg: Config
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @classmethod
    def for_config(cls, cfg: Config) -> "TrainingTracking":
        """Resolved on the driver; a server that refuses the credentials is refused here, before any worker."""
        cfg = replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=tracking_uri(cfg)))
        check_credentials(cfg.mlflow.tracking_uri)
        return cls(cfg)

    def __call__(self, setup: Any) -> Tracker:
        """``setup`` is the training's ``RunSetup`` (run name, data manifest hash)."""
        return Tracker(self.cfg, run_key=setup.run_name, tags=self._tags(setup), attempt=self.attempt)

    def end(self, setup: Any, status: str) -> str:
        """On the driver, after the worker groups: end the run as ``status`` unless rank 0 did (its workers
        died, Ctrl-C, SIGTERM), delivering what it left in the spool; returns the run id ("" when unknown).
        Done within ``mlflow.close_timeout_seconds`` whatever the server does (a signal handler calls it inside
        a grace period): a hung request is left behind on a daemon thread, and what it did not deliver stays
        in the spool for the next attempt or `clipflow sync`."""
        set_env_defaults("tracking")
        delivery = Delivery(self.cfg, setup.run_name, self._tags(setup), resume=False, create=False)
        spooled = delivery.load_spool(with_end=True)
        if spooled is not None and spooled.end:
            return spooled.run_id  # rank 0 closed the run and said how to deliver the rest
        delivery.end, delivery.create = status, spooled is not None
        delivery.publisher.seal()
        outcome: list[bool] = []
        sender = threading.Thread(target=lambda: outcome.append(delivery.deliver()), name="clipflow-mlflow-end",
                                  daemon=True)
        sender.start()
        sender.join(timeout=self.cfg.mlflow.close_timeout_seconds)
        if outcome == [True]:
            delivery.save(last=True)
            return delivery.run_id
        why = (f"the server at {delivery.calls.uri} is unreachable" if outcome else
               f"the server at {delivery.calls.uri} did not answer within {self.cfg.mlflow.close_timeout_seconds:g} s "
               f"(mlflow.close_timeout_seconds)")
        if delivery.save(last=True):
            log.warning(delivery.pending_line(why))
        return delivery.run_id or (spooled.run_id if spooled else "")

    @staticmethod
    def _tags(setup: Any) -> dict[str, str]:
        return {"clipflow.stage": "pretrain", "clipflow.data_manifest_hash": setup.manifest_hash}
