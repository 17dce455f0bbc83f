"""The checkpoint publication queue of a training run: each published checkpoint becomes one model version.

A publication (``registry.publish_checkpoint``: a model version, eval_status=pending) waits in the queue
until its checkpoint is complete: Ray uploads non-final checkpoints asynchronously, so it waits until every
file listed in its ``checkpoint.json`` exists. Publications go one at a time and in order, on the caller's
thread (the Tracker's publication thread, the driver ending a run, or `clipflow sync`), so training never
waits for an upload or a registration, and the Tracker's metric points never wait for a publication (a
registration logs the model: tens of seconds on a loaded machine). Publishing twice is harmless: the registry
finds the version of (run, step) it already made, so a publication spooled during an outage and delivered late
still gives exactly one version.

The queue lives in rank 0's memory (and in the spool during an outage only): a worker group torn down (a lost
node, a resize, a killed driver) loses what it had queued. So a group that restores a checkpoint queues every
kept checkpoint that was due again (``workflows.train.loop.publish_kept``); those already registered are
found and skipped, the others get their version now.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, NamedTuple

import mlflow
from mlflow import MlflowClient

from workflows.artifacts import ArtifactError, CheckpointInfo
from workflows.common.config import Config

log = logging.getLogger("clipflow.tracking")

Call = Callable[[Callable[[], object]], bool]  # a resilient MLflow call: True when done, False in an outage


class Publication(NamedTuple):
    checkpoint_uri: str
    step: int
    samples_seen: int
    final: bool


class Publisher:
    """Publications waiting for their checkpoint or for the server; ``published`` maps URI -> version."""

    def __init__(self, cfg: Config, data_manifest: str = "") -> None:
        self.cfg = cfg
        self.data_manifest = data_manifest
        self.published: dict[str, str] = {}
        self._pending: list[Publication] = []
        self._lock = threading.Lock()
        self._sealed = False  # the run has ended: no upload is still running
        self.changes = 0  # how often the queue was added to, restored or sealed: a change is looked at at once

    def add(self, publication: Publication) -> None:
        with self._lock:
            self._pending.append(publication)
            self.changes += 1

    def restore(self, publications: list[Publication]) -> None:
        """Put spooled publications back in front of the queue (they were published first)."""
        with self._lock:
            self._pending[:0] = [p for p in publications if p not in self._pending]
            self.changes += 1

    def pending(self) -> list[Publication]:
        with self._lock:
            return list(self._pending)

    def settled(self, checkpoint_uri: str) -> bool:
        """Registered or dropped: no longer waiting."""
        return all(p.checkpoint_uri != checkpoint_uri for p in self.pending())

    def seal(self) -> None:
        """The run ended, so every upload has too: a checkpoint still incomplete now never will be."""
        with self._lock:
            self._sealed = True
            self.changes += 1

    def publish_ready(self, call: Call, client: MlflowClient, run_id: str) -> bool:
        """Publish every complete checkpoint in order; False when the server failed (the rest stays queued)."""
        endpoint = self.cfg.storage.s3_endpoint
        for publication in self.pending():
            uri, step, final = publication.checkpoint_uri, publication.step, publication.final
            # The final upload is synchronous (complete by now); the others are published once complete.
            if not final and not CheckpointInfo.is_complete(uri, endpoint):
                if self._sealed:
                    log.warning("MLflow: checkpoint %s (step %d) was not registered: it never became complete "
                                "(its upload failed, or Ray Train deleted it beyond train.keep_checkpoints)", uri, step)
                    self._remove(publication)
                continue
            if not call(lambda: self._publish(client, run_id, publication)):
                return False
            self._remove(publication)
        return True

    def _remove(self, publication: Publication) -> None:
        with self._lock:
            self._pending.remove(publication)

    def _publish(self, client: MlflowClient, run_id: str, publication: Publication) -> None:
        from clip_core import load_templates
        from workflows.tracking import registry

        uri, step, samples_seen, final = publication
        endpoint = self.cfg.storage.s3_endpoint
        existing = registry.find_published(client, self.cfg.mlflow.registered_model, run_id, step)
        if existing is not None:  # queued again after a restore (see the module docstring): nothing to do
            self.published[uri] = existing.version
            return
        # registry.log_pyfunc logs the model through MLflow's fluent API, which reads the process-wide URI.
        previous_uri = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(client.tracking_uri)
        try:
            mv = registry.publish_checkpoint(
                client, name=self.cfg.mlflow.registered_model, run_id=run_id, checkpoint_uri=uri, step=step,
                samples_seen=samples_seen, templates=load_templates(self.cfg.eval.templates or None),
                endpoint=endpoint, data_manifest=self.data_manifest)
        except ValueError as exc:  # a CheckpointError or a bad templates file: not an outage, retrying cannot help
            log.warning("MLflow: checkpoint %s (step %d) is not registered: %s", uri, step, exc)
            return
        except (OSError, ArtifactError) as exc:  # ArtifactError: its checkpoint.json is gone or unreadable
            if isinstance(exc, OSError) and CheckpointInfo.is_complete(uri, endpoint):
                raise  # the checkpoint is there: the store or server is failing (an outage, retried)
            # Not there (any more): drop it, or it would block later ones.
            log.warning("MLflow: checkpoint %s (step %d) is not registered: it is no longer complete at that path "
                        "(Ray Train deletes checkpoints beyond train.keep_checkpoints; raise it to register every "
                        "one)", uri, step)
            return
        finally:
            mlflow.set_tracking_uri(previous_uri)
        self.published[uri] = mv.version
        log.info("MLflow: registered %s version %s (step %d%s)", self.cfg.mlflow.registered_model, mv.version, step,
                 ", final" if final else "")
