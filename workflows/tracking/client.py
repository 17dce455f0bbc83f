"""MLflow tracking from rank 0 of the training function (Ray Train V2 rejects Ray's MLflow callback).

One MLflow run per training run, found again by its ``clipflow.run_key`` tag, so a worker group
restarted after a failure continues the same run instead of opening a duplicate. On creation the run
gets the flattened resolved config as params, tags (code version, Ray cluster size, data manifest
hash, tokenizer id) and artifacts (resolved config YAML, data manifest, tokenizer files).

Tracking must never kill training. Every MLflow call goes through ``Tracker._call``: when the server
is unreachable or erroring, metrics stay in a bounded buffer (oldest dropped and counted once full),
checkpoint publications are queued, one warning says so, and later calls retry with exponential
backoff; one line announces the recovery and the flush. HTTP retries and timeouts are short in this
process (unless the user set them) so an outage costs a training step milliseconds, not minutes.
A request the server refuses as invalid (HTTP 400) is dropped and counted (``rejected``) instead of
blocking the queue; metric names are made valid first (``mlflow_key``: ``recall@1`` -> ``recall_at_1``).

Checkpoints are published (``registry.publish_checkpoint``: a model version, eval_status=pending) once
complete: Ray uploads non-final checkpoints asynchronously, so a publication waits in the queue until
every file listed in its ``checkpoint.json`` exists. A background thread then publishes it (logging the
model copies its weights: seconds to minutes for large models), one at a time and in order, so training
never waits for an upload or a registration; only the final checkpoint is published before training ends.

In the MLflow UI the experiment ``mlflow.experiment`` holds one run per training run (named by its run
key): charts of loss, lr, temperature, samples_per_second, mfu, data_wait_fraction, peak_memory_gib
(and ``system/*`` CPU/memory/disk/network/GPU when psutil is installed) against the training step;
the Parameters table is the resolved config (``train.lr``, ``model.name``, ...); tags
``clipflow.code_version``, ``clipflow.ray_nodes/_cpus/_gpus``, ``clipflow.world_size``,
``clipflow.data_manifest_hash``, ``clipflow.tokenizer``; artifacts ``config.yaml``,
``data/manifest.json``, ``tokenizer/`` and the ``clip`` pyfunc model of each published checkpoint.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from workflows.artifacts import CheckpointInfo, DataManifest
from workflows.common import storage
from workflows.common.config import Config, dump_config, flatten_config
from workflows.common.errors import UserError

log = logging.getLogger("clipflow.tracking")

RUN_KEY_TAG = "clipflow.run_key"
SETUP_TAG = "clipflow.setup_complete"  # params + artifacts logged
# What an unreachable, restarting or erroring tracking server raises (MLflow wraps HTTP failures in
# MlflowException; artifact uploads may surface requests/OS errors directly).
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
Publication = tuple[str, int, int, bool]  # checkpoint URI, step, samples seen, final
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]", re.ASCII)
MAX_KEY_CHARS = 250  # MLflow's limit on metric names
MAX_BACKOFF_S = 60.0
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store under ``home``."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_s3(cfg.home):
        raise UserError(f"home {cfg.home!r} is on S3, where no local MLflow store can live: set "
                        f"mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) to your MLflow server")
    db = Path(cfg.home).expanduser().absolute() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts: CLIP_benchmark's ``recall@5`` becomes ``recall_at_5``, and any
    other character outside MLflow's set (alphanumerics, ``_ - . : /`` and space) becomes ``_``."""
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def client_for(cfg: Config) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it (race-safe: a concurrent creator wins, we read theirs)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def code_version() -> str:
    """Package version plus the git commit when running from a checkout (read from files, no git binary)."""
    try:
        version = importlib.metadata.version("clipflow")
    except importlib.metadata.PackageNotFoundError:  # run from source (PYTHONPATH), not installed
        version = "source"
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        commit = (git / head[5:]).read_text().strip() if head.startswith("ref: ") else head
    except OSError:
        return version
    return f"{version}+g{commit[:12]}"


def ray_cluster_tags() -> dict[str, str]:
    """Cluster size as tags; empty outside Ray (a plain script may use the Tracker too)."""
    import ray

    if not ray.is_initialized():
        return {}
    resources = ray.cluster_resources()
    return {"clipflow.ray_nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
            "clipflow.ray_cpus": str(resources.get("CPU", 0)),
            "clipflow.ray_gpus": str(resources.get("GPU", 0))}


@dataclass(frozen=True)
class TrainingTracking:
    """The training run's MLflow run, as ``run_training(cfg, run_log=...)`` takes it: built on the driver,
    where the tracking URI is resolved once (workers must log where the driver and the user will look),
    then called on rank 0 of every worker group to open (or find again) the run."""

    cfg: Config

    @classmethod
    def for_config(cls, cfg: Config) -> "TrainingTracking":
        return cls(replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=tracking_uri(cfg))))

    def __call__(self, setup: Any, world_size: int) -> "Tracker":
        """``setup`` is the training's ``RunSetup`` (run name, data manifest hash)."""
        return Tracker(self.cfg, run_key=setup.run_name, tags={"clipflow.stage": "pretrain",
                                                               "clipflow.data_manifest_hash": setup.manifest_hash,
                                                               "clipflow.world_size": str(world_size)})


def _short_http_settings() -> None:
    """Fail fast on an outage (the buffer covers it) unless the user chose their own settings."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Tracker:
    """Rank 0's window on MLflow: ``log_metrics``, ``log_artifact``, ``publish_checkpoint``, ``close``."""

    def __init__(self, cfg: Config, run_key: str, tags: dict[str, str] | None = None) -> None:
        _short_http_settings()
        self.cfg = cfg
        self.run_key = run_key
        self.tags = dict(tags or {})
        self.client = client_for(cfg)
        self.run_id = ""
        self.dropped = 0  # metric points pushed out of a full buffer
        self.rejected = 0  # requests the server refused as invalid (dropped, not retried)
        self._metrics: collections.deque[Metric] = collections.deque()
        self._publications: list[Publication] = []
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipflow-publish")
        self._in_flight: tuple[Publication, Future] | None = None  # one background publication at a time
        self._published: dict[str, str] = {}  # checkpoint URI -> registered version
        self._artifacts: list[tuple[str, str | None]] = []
        self._failures = 0
        self._retry_at = 0.0
        self._outage_since: float | None = None
        self._system_monitor = None
        self._system_metrics = cfg.mlflow.system_metrics
        self._call(self._open_run)

    # -- public API ------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            name = mlflow_key(key)
            if len(name) > MAX_KEY_CHARS:  # the server would refuse the whole batch
                self.rejected += 1
                log.warning("MLflow: metric name %r is longer than %d characters; not logged", key, MAX_KEY_CHARS)
                continue
            if len(self._metrics) >= self.cfg.mlflow.buffer_size:
                self._metrics.popleft()
                self.dropped += 1
            self._metrics.append(Metric(name, float(value), now, int(step)))
        self._flush()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory (it must stay in place until sent: uploads may be deferred)."""
        if not os.path.exists(local_path):
            self.rejected += 1
            log.warning("MLflow: artifact %s does not exist; not logged", local_path)
            return
        self._artifacts.append((str(local_path), artifact_path))
        self._flush()

    def publish_checkpoint(self, checkpoint_uri: str, step: int, samples_seen: int, final: bool) -> str | None:
        """Register the checkpoint as a model version (eval_status=pending). A non-final one is published in the
        background (None now); the final one before this returns: its version, or None while the server is away."""
        self._publications.append((checkpoint_uri, int(step), int(samples_seen), bool(final)))
        if final:
            self._wait_for_publisher()
        self._flush(background=not final)
        return self._published.get(checkpoint_uri)

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is buffered (one last try) and end the run; report anything that could not be sent."""
        self._retry_at = 0.0
        self._wait_for_publisher()
        self._flush(background=False)
        self._publisher.shutdown(wait=True)
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        if self.run_id and self._outage_since is None:
            self._call(lambda: self.client.set_terminated(self.run_id, status))
        if self._metrics or self._artifacts or self.dropped:
            log.warning("MLflow: run %s closed with %d metric points and %d artifacts not sent and %d points "
                        "dropped (buffer full): the server at %s was unreachable", self.run_id or "(not created)",
                        len(self._metrics), len(self._artifacts), self.dropped, self.client.tracking_uri)
        for uri, step, _, _ in self._publications:
            log.warning("MLflow: checkpoint %s (step %d) was not registered: the server was unreachable or the "
                        "checkpoint never became complete", uri, step)

    @property
    def buffered(self) -> int:
        return len(self._metrics)

    # -- internals -------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], object]) -> bool:
        """Run one MLflow operation: True when done (or refused as invalid: dropped), False in an outage."""
        try:
            fn()
        except MlflowException as exc:
            if exc.get_http_status_code() != 400:
                return self._outage(exc)
            # The server refuses this request itself (an invalid value): retrying cannot help, and keeping
            # it would block everything queued behind it. Drop it, loudly.
            self.rejected += 1
            log.warning("MLflow rejected a request from run %s and it is dropped: %s", self.run_id or "(new)",
                        str(exc).splitlines()[0][:300])
            return True
        except TRACKING_ERRORS as exc:
            return self._outage(exc)
        if self._outage_since is not None:
            log.warning("MLflow is back after %.0f s; flushing %d buffered metric points%s",
                        time.monotonic() - self._outage_since, len(self._metrics),
                        f" ({self.dropped} dropped: buffer full)" if self.dropped else "")
            self._outage_since = None
            self._start_system_metrics()
        self._failures = 0
        return True

    def _outage(self, exc: Exception) -> bool:
        """Enter (or stay in) an outage: warn once, retry later with exponential backoff."""
        self._failures += 1
        self._retry_at = time.monotonic() + min(MAX_BACKOFF_S, 0.5 * 2 ** self._failures)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow at %s is unreachable or failing (%s); training goes on, metrics are buffered "
                        "(up to %d points) and sent when it is back", self.client.tracking_uri,
                        str(exc).splitlines()[0][:200], self.cfg.mlflow.buffer_size)
        return False

    def _flush(self, background: bool = True) -> None:
        self._collect_publication()
        if self._outage_since is not None and time.monotonic() < self._retry_at:
            return
        if not self.run_id and (not self._call(self._open_run) or not self.run_id):
            return
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(METRICS_PER_BATCH, len(self._metrics)))]
            if not self._call(lambda: self.client.log_batch(self.run_id, metrics=batch, synchronous=True)):
                return
            for _ in batch:
                self._metrics.popleft()
        while self._artifacts:
            local_path, artifact_path = self._artifacts[0]
            log_artifacts = self.client.log_artifacts if os.path.isdir(local_path) else self.client.log_artifact
            if not self._call(lambda: log_artifacts(self.run_id, local_path, artifact_path)):
                return
            self._artifacts.pop(0)
        if self._in_flight is not None:
            return  # publications go one at a time, in order
        for publication in list(self._publications):
            uri, final = publication[0], publication[3]
            # Ray uploads non-final checkpoints asynchronously: publish them once they are complete, so
            # training never waits on an upload. The final upload is synchronous (complete by now).
            if not final and not CheckpointInfo.is_complete(uri, self.cfg.storage.s3_endpoint):
                continue
            if background:
                self._in_flight = (publication, self._publisher.submit(self._publish, *publication))
                return
            if not self._call(lambda: self._publish(*publication)):
                return
            self._publications.remove(publication)

    def _collect_publication(self) -> None:
        """Account for a finished background publication (its error, if any, goes through ``_call``)."""
        if self._in_flight is None or not self._in_flight[1].done():
            return
        publication, future = self._in_flight
        self._in_flight = None
        if self._call(future.result):
            self._publications.remove(publication)

    def _wait_for_publisher(self) -> None:
        if self._in_flight is not None:
            self._in_flight[1].exception()  # blocks until done; never raises the publication's error
            self._collect_publication()

    def _publish(self, checkpoint_uri: str, step: int, samples_seen: int, final: bool) -> None:
        from clip_core import load_templates
        from workflows.tracking import registry

        # registry.log_pyfunc logs the model through MLflow's fluent API, which reads the process-wide URI.
        previous_uri = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.client.tracking_uri)
        try:
            mv = registry.publish_checkpoint(
                self.client, name=self.cfg.mlflow.registered_model, run_id=self.run_id,
                checkpoint_uri=checkpoint_uri, step=step, samples_seen=samples_seen,
                templates=load_templates(self.cfg.eval.templates or None), endpoint=self.cfg.storage.s3_endpoint,
                data_manifest=self.tags.get("clipflow.data_manifest_hash", ""))
        except ValueError as exc:  # a CheckpointError or a bad templates file: not an outage, retrying cannot help
            log.warning("MLflow: checkpoint %s (step %d) is not registered: %s", checkpoint_uri, step, exc)
            return
        except OSError:
            if CheckpointInfo.is_complete(checkpoint_uri, self.cfg.storage.s3_endpoint):
                raise  # the checkpoint is there: the store or server is failing (an outage, retried)
            # Not there (any more): drop it, or it would block later ones.
            log.warning("MLflow: checkpoint %s (step %d) is not registered: it is no longer complete at that path "
                        "(Ray Train deletes checkpoints beyond train.keep_checkpoints; raise it to register every "
                        "one)", checkpoint_uri, step)
            return
        finally:
            mlflow.set_tracking_uri(previous_uri)
        self._published[checkpoint_uri] = mv.version
        log.info("MLflow: registered %s version %s (step %d%s)", self.cfg.mlflow.registered_model, mv.version, step,
                 ", final" if final else "")

    def _open_run(self) -> None:
        """Find the run of ``run_key`` (a restarted worker group continues it) or create it; then, once per
        run, log params and artifacts, marked done by a tag so a setup cut short by an outage is redone."""
        experiment_id = get_or_create_experiment(self.client, self.cfg.mlflow.experiment)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        tags = {**ray_cluster_tags(), **self.tags}  # may differ after an elastic restart: refreshed
        if found:
            run_id, set_up = found[0].info.run_id, found[0].data.tags.get(SETUP_TAG) == "true"
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            log.info("MLflow: continuing run %s (%s)", run_id, self.run_key)
        else:
            run_id, set_up = self.client.create_run(experiment_id, run_name=self.run_key,
                                                    tags={RUN_KEY_TAG: self.run_key, **tags}).info.run_id, False
        if not set_up:
            manifest = self._read_manifest()
            setup_tags = {"clipflow.code_version": code_version(),
                          "clipflow.tokenizer": manifest.tokenizer if manifest else "",
                          "clipflow.data_manifest_hash": manifest.content_hash if manifest else ""}
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in setup_tags.items() if v and k not in tags])
            params = [Param(k, str(v)[:6000]) for k, v in flatten_config(self.cfg).items()]
            for i in range(0, len(params), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH])
            self._log_run_artifacts(run_id, manifest)
            self.client.set_tag(run_id, SETUP_TAG, "true")
        self.run_id = run_id
        self._start_system_metrics()

    def _read_manifest(self) -> DataManifest | None:
        try:
            return DataManifest.read(self.cfg.train.data, self.cfg.storage.s3_endpoint)
        except (OSError, UserError) as exc:
            log.warning("MLflow: no data manifest for %s (%s); the run is logged without it", self.cfg.train.data, exc)
            return None

    def _log_run_artifacts(self, run_id: str, manifest: DataManifest | None) -> None:
        with tempfile.TemporaryDirectory(prefix="clipflow-run-") as tmp:
            (Path(tmp) / "config.yaml").write_text(dump_config(self.cfg))
            self.client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
            if manifest is None:
                return
            data = self.cfg.train.data
            manifest_file = storage.local_copy(DataManifest.uri(data), tmp, self.cfg.storage.s3_endpoint)
            self.client.log_artifact(run_id, manifest_file, "data")
            tokenizer_uri = manifest.tokenizer_uri(data)
            files = storage.list_files(tokenizer_uri, self.cfg.storage.s3_endpoint, recursive=True)
            for uri in files:
                self.client.log_artifact(run_id, storage.local_copy(uri, tmp, self.cfg.storage.s3_endpoint), "tokenizer")

    def _start_system_metrics(self) -> None:
        """MLflow's CPU/memory/disk/network (and GPU) monitor, under ``system/`` in the run."""
        if not self._system_metrics or not self.run_id:
            return
        thread = self._system_monitor and self._system_monitor._process
        if thread is not None and thread.is_alive():
            return  # (the thread ends when an outage hides the run from it; then it is restarted here)
        try:
            import psutil  # noqa: F401  (the monitor's dependency)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            self._system_metrics = False
            log.warning("MLflow system metrics need psutil (pip install psutil); set mlflow.system_metrics=false "
                        "to silence this")
            return
        self._system_monitor = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                                    tracking_uri=self.client.tracking_uri)
        self._system_monitor.start()
