"""MLflow tracking of a training run from rank 0 (Ray Train V2 rejects Ray's MLflow callback).

One MLflow run per training run, found again by its ``clipflow.run_key`` tag, so a worker group
restarted after a failure, or a new driver of the same run id, continues the same run instead of opening
a duplicate. On creation the run gets the flattened resolved config as params, tags (code version, Ray
cluster size, data manifest hash, tokenizer id) and artifacts (resolved config YAML, data manifest,
tokenizer files). Credentials in any URI (``https://user:pass@host``) are scrubbed from what is logged
(``scrub_uri``).

Tracking must never kill or stall training. The training thread only queues: ``Tracker.log_metrics``
and ``publish_checkpoint`` return at once, and one delivery thread sends everything (``Delivery``). When
the server is unreachable, erroring or hung, metrics stay in a bounded buffer (oldest dropped and counted
once full), one warning says so, later tries back off exponentially, and what is pending is spooled
durably next to the run's checkpoints (``workflows.tracking.spool``); one line announces the recovery.
A request the server refuses as invalid (HTTP 400) is dropped and counted (``rejected``) instead of
blocking the queue; metric names are made valid first (``mlflow_key``: ``recall@1`` -> ``recall_at_1``).

``close(status)`` keeps trying for ``mlflow.close_timeout_seconds``, then leaves the rest in the spool and
logs one line with the count and the ``clipflow sync <dir>`` command that delivers it; the next attempt of
the same run delivers it too. Runs end FINISHED, FAILED or KILLED: rank 0 ends its run, and the driver
(``TrainingTracking.end``) ends one whose workers died without saying so. Checkpoint publication is
``workflows.tracking.publisher``; its versions stay one per checkpoint however late they are delivered.

One history however often the run restarts. A restarted worker group re-trains the steps since its checkpoint:
their points are not sent again, because the delivery drops a point of a metric at or below the highest step
the run already has of that metric (read from the server when the run opens, then advanced by every point it
sends, spooled ones first, as they are older). Exempt are the group-start metrics (``GROUP_METRICS``), one
point each per worker group at the step it starts from: ``world_size``, ``group_starts`` (1 for the run's
first group, +1 for each later one, counted on from what the run has, across drivers) and
``resumed_from_step`` (only when the group restored a checkpoint). Each driver attempt has an id
(``TrainingTracking.attempt``); a group of a new attempt counts it in the tag ``clipflow.driver_attempts``
and records how the previous one ended in ``clipflow.previous_attempt_end``: its status, or ``lost`` when it
left the run RUNNING (its driver died without ending it).

In the MLflow UI the experiment ``mlflow.experiment`` holds one run per training run (named by its run
key): charts of loss, lr, temperature, samples_per_second, mfu, data_wait_fraction, peak_memory_gib
(and ``system/*`` CPU/memory/disk/network/GPU when psutil is installed) against the training step;
charts of ``world_size``, ``group_starts`` and ``resumed_from_step`` show the run's worker groups over time;
the Parameters table is the resolved config (``train.lr``, ``model.name``, ...); tags
``clipflow.code_version``, ``clipflow.ray_nodes/_cpus/_gpus`` (the cluster when the latest group started:
current state, so a tag), ``clipflow.data_manifest_hash``, ``clipflow.tokenizer``, ``clipflow.driver_attempt``,
``clipflow.driver_attempts``, ``clipflow.previous_attempt_end``; artifacts ``config.yaml``,
``data/manifest.json``, ``tokenizer/`` and the ``clip`` pyfunc model of each published checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from workflows.artifacts import DataManifest
from workflows.common import storage
from workflows.common.config import Config, dump_config, flatten_config, load_config
from workflows.common.errors import UserError
from workflows.common.runtime import set_env_defaults
from workflows.tracking.publisher import Publication, Publisher
from workflows.tracking.spool import GroupStart, Spool, SpoolContents

log = logging.getLogger("clipflow.tracking")

RUN_KEY_TAG = "clipflow.run_key"
SETUP_TAG = "clipflow.setup_complete"  # params + artifacts logged
ATTEMPT_TAG = "clipflow.driver_attempt"  # the id of the driver attempt whose worker groups run it now
ATTEMPTS_TAG = "clipflow.driver_attempts"  # how many driver attempts ran it
PREVIOUS_END_TAG = "clipflow.previous_attempt_end"  # how the previous attempt ended: its status, or LOST
LOST = "lost"  # the previous driver attempt left the run RUNNING: it died without ending it
WORLD_SIZE, GROUP_STARTS, RESUMED_FROM = "world_size", "group_starts", "resumed_from_step"
GROUP_METRICS = frozenset({WORLD_SIZE, GROUP_STARTS, RESUMED_FROM})  # once per worker group, never filtered
# What an unreachable, restarting or erroring tracking server raises (MLflow wraps HTTP failures in
# MlflowException; artifact uploads may surface requests/OS errors directly).
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]", re.ASCII)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
MAX_KEY_CHARS = 250  # MLflow's limit on metric names
MAX_BACKOFF_S = 60.0
CLOSING_RETRY_S = 1.0  # while closing, retry every second until mlflow.close_timeout_seconds is spent
PUBLICATION_POLL_S = 2.0  # how often a queued publication looks whether its checkpoint upload is complete
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


def scrub_uri(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced: ``https://user:pass@host`` ->
    ``https://***@host``. What clipflow logs (params, config artifact, spool, messages) goes through it."""
    return _USERINFO.sub(r"\1***@", text)


def public_config(cfg: Config) -> Config:
    """``cfg`` as it may be logged: every string (and list of strings) with its URIs' credentials scrubbed."""
    def scrubbed_fields(node: Any) -> Any:
        changes = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if isinstance(value, list):
                changes[f.name] = [scrubbed(v) for v in value]
            elif dataclasses.is_dataclass(value) or isinstance(value, str):
                changes[f.name] = scrubbed(value)
        return replace(node, **changes)

    def scrubbed(value: Any) -> Any:
        if isinstance(value, str):
            return scrub_uri(value)
        return scrubbed_fields(value) if dataclasses.is_dataclass(value) else value

    return scrubbed_fields(cfg)


def mlflow_key(name: str) -> str:
    """A metric/param name MLflow accepts: CLIP_benchmark's ``recall@5`` becomes ``recall_at_5``, and any
    other character outside MLflow's set (alphanumerics, ``_ - . : /`` and space) becomes ``_``."""
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def client_for(cfg: Config) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


# MLflow 3's experiment kind (the UI's "Experiment type" selector writes the same tag): clipflow's experiments
# hold model-training and eval runs, not GenAI traces.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it as a model-training experiment (race-safe: a concurrent creator wins,
    we read theirs). An existing experiment's kind is left as it is: the user may have chosen another."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
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


# ---- resilient calls ---------------------------------------------------------------------------------


def check_credentials(uri: str) -> None:
    """One ``UserError`` when the server answers but refuses these credentials (HTTP 401/403): an outage
    heals by itself, so training buffers through it, but a wrong or missing password never does. A server
    that does not answer passes (training goes on; the outage is buffered and spooled)."""
    if not uri.startswith(("http://", "https://")):
        return
    set_env_defaults("tracking")  # one short try, not MLflow's minutes of retries
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        code = exc.get_http_status_code()
        if code in (401, 403):
            raise UserError(f"MLflow at {scrub_uri(uri)} refused the credentials (HTTP {code}); set "
                            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on Kubernetes: the "
                            f"clipflow-mlflow-train Secret)") from exc
    except (requests.RequestException, OSError):
        pass


class Resilient:
    """Runs MLflow calls through outages: one warning when the server goes away, exponential backoff between
    tries, one line when it is back (then ``on_recovery``)."""

    def __init__(self, uri: str, buffer_size: int, on_recovery: Callable[[], None]) -> None:
        self.uri = scrub_uri(uri)
        self.buffer_size = buffer_size
        self.on_recovery = on_recovery
        self.rejected = 0  # requests the server refused as invalid (dropped, not retried)
        self.outage_since: float | None = None
        self.retry_at = 0.0
        self.max_backoff = MAX_BACKOFF_S
        self._failures = 0

    @property
    def in_outage(self) -> bool:
        return self.outage_since is not None

    def hurry(self) -> None:
        """Try again now, and then every ``CLOSING_RETRY_S`` (the run is closing)."""
        self.max_backoff, self.retry_at = CLOSING_RETRY_S, 0.0

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
            self.rejected += 1
            log.warning("MLflow at %s rejected a request and it is dropped: %s", self.uri,
                        scrub_uri(str(exc).splitlines()[0][:300]))
            return True
        except TRACKING_ERRORS as exc:
            return self._outage(exc)
        if self.outage_since is not None:
            log.warning("MLflow is back after %.0f s; sending what is pending", time.monotonic() - self.outage_since)
            self.outage_since = None
            self.on_recovery()
        self._failures = 0
        return True

    def _outage(self, exc: Exception) -> bool:
        """Enter (or stay in) an outage: warn once, retry later with exponential backoff."""
        self._failures += 1
        self.retry_at = time.monotonic() + min(self.max_backoff, 0.5 * 2 ** self._failures)
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("MLflow at %s is unreachable or failing (%s); training goes on, metrics are buffered "
                        "(up to %d points), spooled and sent when it is back", self.uri,
                        scrub_uri(str(exc).splitlines()[0][:200]), self.buffer_size)
        return False


# ---- the run: setup and system metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class OpenedRun:
    """The run of a run key as its delivery found or created it ("" run id: absent and not created)."""

    run_id: str = ""
    status: str = ""
    last_steps: dict[str, int] = field(default_factory=dict)  # metric -> the highest step the run has of it
    group_starts: int = 0  # the worker groups it recorded (its highest ``group_starts``)


def open_run(client: MlflowClient, cfg: Config, run_key: str, tags: dict[str, str], *, resume: bool,
             create: bool, attempt: str = "") -> OpenedRun:
    """The run of ``run_key``: found (a restarted worker group continues it: ``resume`` marks it RUNNING again)
    or, if ``create``, created. ``attempt``: the driver attempt of the group opening it (see ``attempt_tags``).
    Once per run, params and artifacts are logged, marked done by a tag so a setup cut short by an outage is
    redone."""
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    tags = {**ray_cluster_tags(), **tags}  # may differ after an elastic restart: refreshed
    if found:
        run = found[0]
        run_id, status, set_up = run.info.run_id, run.info.status, run.data.tags.get(SETUP_TAG) == "true"
        # A run's latest metrics carry the highest step of each metric (MLflow orders them by step first).
        opened = OpenedRun(run_id, status, {m.key: m.step for m in run.data.to_proto().metrics},
                           _group_starts(client, run_id) if GROUP_STARTS in run.data.metrics else 0)
        if resume:
            tags.update(attempt_tags(run.data.tags, status, attempt, run_key))
            client.update_run(run_id, status="RUNNING")
            opened = replace(opened, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
            log.info("MLflow: continuing run %s (%s)", run_id, run_key)
    elif create:
        first = {ATTEMPT_TAG: attempt, ATTEMPTS_TAG: "1"} if attempt else {}
        run_id, set_up = client.create_run(experiment_id, run_name=run_key,
                                           tags={RUN_KEY_TAG: run_key, **tags, **first}).info.run_id, False
        opened = OpenedRun(run_id, "RUNNING")
    else:
        return OpenedRun()
    if not set_up:
        public = public_config(cfg)
        manifest = _read_manifest(cfg)
        setup_tags = {"clipflow.code_version": code_version(),
                      "clipflow.tokenizer": manifest.tokenizer if manifest else "",
                      "clipflow.data_manifest_hash": manifest.content_hash if manifest else ""}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in setup_tags.items() if v and k not in tags])
        params = [Param(k, str(v)[:6000]) for k, v in flatten_config(public).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH])
        _log_run_artifacts(client, cfg, public, run_id, manifest)
        client.set_tag(run_id, SETUP_TAG, "true")
    return opened


def _group_starts(client: MlflowClient, run_id: str) -> int:
    """The run's highest ``group_starts`` (its history is short: a point per worker group)."""
    return int(max((m.value for m in client.get_metric_history(run_id, GROUP_STARTS)), default=0))


def attempt_tags(run_tags: dict[str, str], status: str, attempt: str, run_key: str) -> dict[str, str]:
    """The tags a group of driver attempt ``attempt`` adds to a run it finds with ``run_tags`` and ``status``:
    none when a group of the same attempt ran it before (a restarted group); else the attempt is counted and
    the previous one's end recorded (``LOST`` when it left the run RUNNING: its driver died)."""
    if not attempt or run_tags.get(ATTEMPT_TAG) == attempt:
        return {}
    recorded = run_tags.get(ATTEMPTS_TAG, "")
    count = (int(recorded) if recorded.isdigit() else 1) + 1
    previous = LOST if status == "RUNNING" else status
    log.info("MLflow: run %s: driver attempt %d; the previous attempt ended %s%s", run_key, count, previous,
             " (its driver died without ending the run)" if previous == LOST else "")
    return {ATTEMPT_TAG: attempt, ATTEMPTS_TAG: str(count), PREVIOUS_END_TAG: previous}


def _read_manifest(cfg: Config) -> DataManifest | None:
    """The (first) training data set's manifest: its tokenizer is the model's."""
    data = cfg.train.sources()[0].path
    try:
        return DataManifest.read(data, cfg.storage.s3_endpoint)
    except (OSError, UserError) as exc:
        log.warning("MLflow: no data manifest for %s (%s); the run is logged without it", data, exc)
        return None


def _log_run_artifacts(client: MlflowClient, cfg: Config, public: Config, run_id: str,
                       manifest: DataManifest | None) -> None:
    with tempfile.TemporaryDirectory(prefix="clipflow-run-") as tmp:
        (Path(tmp) / "config.yaml").write_text(dump_config(public))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        if manifest is None:
            return
        data, endpoint = cfg.train.sources()[0].path, cfg.storage.s3_endpoint
        client.log_artifact(run_id, storage.local_copy(DataManifest.uri(data), tmp, endpoint), "data")
        for uri in storage.list_files(manifest.tokenizer_uri(data), endpoint, recursive=True):
            client.log_artifact(run_id, storage.local_copy(uri, tmp, endpoint), "tokenizer")


class SystemMetrics:
    """MLflow's CPU/memory/disk/network (and GPU) monitor, under ``system/`` in the run. Its thread ends for
    good when it cannot reach the server, so it is restarted (a new monitor) after every outage."""

    def __init__(self, enabled: bool, uri: str) -> None:
        self.enabled = enabled
        self.uri = uri
        self._monitor: Any = None

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
        self._finish()
        self._monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.uri)
        self._monitor.start()

    def stop(self) -> None:
        """For good: the run is ending."""
        self.enabled = False
        self._finish()

    def _finish(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


# ---- delivery: what the server has not taken yet ------------------------------------------------------


class Delivery:
    """Everything pending for one run and the one code path that sends it: the Tracker's delivery thread,
    the driver ending a run, and `clipflow sync` all go through ``deliver`` and ``save``.

    ``changed`` guards the pending state (the training thread adds, the delivery thread takes) and is
    notified whenever something was delivered. ``resume``/``create``/``attempt``: see ``open_run``.
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
        """Something to send now (queued publications wait for their upload: polled, not urgent)."""
        with self.changed:
            return bool((not self.run_id and self.create) or self._metrics or self._in_hand or self._artifacts
                        or (self.run_id and self._group_starts) or (self.end and not self.ended))

    def finished(self) -> bool:
        points, registrations, artifacts = self.counts()
        return not (points or registrations or artifacts) and (self.ended or not self.end)

    # -- sending -----------------------------------------------------------------------------------------

    def deliver(self) -> bool:
        """One round: open the run if needed, then send metrics, artifacts, ready publications and the end
        status. True when nothing sendable is left; False when the server failed (everything stays pending)."""
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
                self.calls.rejected += 1
                log.warning("MLflow: artifact %s does not exist (any more); not logged", local_path)
            else:
                send = self.client.log_artifacts if os.path.isdir(local_path) else self.client.log_artifact
                if not self.calls.call(lambda: send(self.run_id, local_path, artifact_path)):
                    return False
            with self.changed:
                self._artifacts.pop(0)
        if not self.publisher.publish_ready(self.calls.call, self.client, self.run_id):
            return False
        if self.end and not self.ended and not self.publisher.pending():
            self.system.stop()
            if not self.calls.call(lambda: self.client.set_terminated(self.run_id, self.end)):
                return False
            self.ended = True
        with self.changed:
            self.changed.notify_all()
        return True

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


# ---- the rank-0 tracker ------------------------------------------------------------------------------


class Tracker:
    """Rank 0's window on MLflow: ``log_metrics``, ``log_group_start``, ``log_artifact``, ``publish_checkpoint``,
    ``close``. Every call returns without waiting on the server (``publish_checkpoint(final=True)`` and ``close``
    wait, for at most ``mlflow.close_timeout_seconds``); a daemon thread delivers. ``attempt``: the driver attempt
    (see ``open_run``); "" outside training."""

    def __init__(self, cfg: Config, run_key: str, tags: dict[str, str] | None = None, attempt: str = "") -> None:
        set_env_defaults("tracking")
        self.cfg = cfg
        self.run_key = run_key
        self._delivery = Delivery(cfg, run_key, tags or {}, resume=True, create=True,
                                  system_metrics=cfg.mlflow.system_metrics, attempt=attempt)
        self._rejected = 0  # refused before queueing (names too long, missing files)
        self._closing = self._finished = self._abandoned = False
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="clipflow-mlflow", daemon=True)
        self._thread.start()

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

    # -- the delivery thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        d = self._delivery
        d.load_spool(with_end=False)
        while True:
            with d.changed:
                wait = self._wait_s()
                if wait is None or wait > 0:
                    d.changed.wait(timeout=wait)
                if self._abandoned:
                    return
                if d.calls.in_outage and time.monotonic() < d.calls.retry_at:
                    continue
            delivered = d.deliver()
            if not delivered or d.spooled:
                d.save()
            with d.changed:
                self._finished = delivered and self._closing and d.finished()
                d.changed.notify_all()  # a failed round too: a final publication stops waiting in an outage
                if self._finished:
                    return

    def _wait_s(self) -> float | None:
        """How long the delivery thread sleeps (None: until something is queued); 0 = deliver now."""
        d = self._delivery
        if self._abandoned:
            return 0.0
        if d.calls.in_outage:
            return max(0.0, d.calls.retry_at - time.monotonic())
        if d.urgent() or (self._closing and d.finished()):
            return 0.0
        return PUBLICATION_POLL_S if d.publisher.pending() else None


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


# ---- `clipflow sync` -----------------------------------------------------------------------------------


@dataclass
class SyncResult:
    spool: str
    run_id: str = ""
    metric_points: int = 0
    versions: dict[int, str] = dataclasses.field(default_factory=dict)  # step -> registered version
    status: str = ""  # the end status delivered ("" when the spool recorded none)


def sync(path: str, cfg: Config) -> SyncResult:
    """Deliver the spool at ``path`` (a run directory or its spool) to the run's tracking server (see
    ``_sync_uri``). UserError when nothing can be delivered now; what is left stays in the spool."""
    set_env_defaults("tracking")
    spool = Spool.find(path, cfg.storage.s3_endpoint)
    contents = spool.read()
    if contents is None:
        return SyncResult(spool.directory)
    with tempfile.TemporaryDirectory(prefix="clipflow-sync-") as tmp:
        run_cfg = load_config(storage.local_copy(spool.config_uri, tmp, spool.endpoint), resolve_paths=False)
    uri = _sync_uri(cfg, contents.tracking_uri)
    run_cfg = replace(run_cfg, mlflow=replace(run_cfg.mlflow, tracking_uri=uri), storage=replace(
        run_cfg.storage, s3_endpoint=cfg.storage.s3_endpoint or run_cfg.storage.s3_endpoint))
    delivery = Delivery(run_cfg, contents.run_key, contents.tags, resume=False, create=True)
    delivery.spool = spool  # where it was found (the run directory may have moved since)
    delivery.recorded_uri = contents.tracking_uri  # a sync elsewhere that fails does not move the run
    delivery.restore(contents, with_end=True)
    delivery.publisher.seal()
    points = delivery.buffered
    log.info("MLflow: delivering the spool %s to %s", spool.directory, delivery.calls.uri)
    if not delivery.deliver():
        delivery.save(last=True)
        raise UserError(delivery.pending_line(f"the server at {delivery.calls.uri} is unreachable or failing")
                        + " again once it is up (or pass --set mlflow.tracking_uri=URL)")
    delivery.save(last=True)
    return SyncResult(spool.directory, delivery.run_id, points,
                      {p.step: delivery.publisher.published[p.checkpoint_uri] for p in contents.publications
                       if p.checkpoint_uri in delivery.publisher.published}, delivery.end)


def _sync_uri(cfg: Config, spooled: str) -> str:
    """Where the spooled run lives: ``--set mlflow.tracking_uri`` if given (the server moved), else the URI the
    run used. The spool keeps it without credentials: then ``$MLFLOW_TRACKING_URI`` (the same server with
    them) if set, else the bare URI, and MLflow's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` supply them."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if "***@" not in spooled:
        return spooled
    return os.environ.get("MLFLOW_TRACKING_URI") or spooled.replace("***@", "")
