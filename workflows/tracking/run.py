"""The MLflow run of a training run: where it lives, how it is found again, what it records at its start.

One MLflow run per training run, found again by its ``clipflow.run_key`` tag, so a worker group
restarted after a failure, or a new driver of the same run id, continues the same run instead of opening
a duplicate. On creation the run gets the flattened resolved config as params, tags (code version, Ray
cluster size, data manifest hash, tokenizer id) and artifacts (resolved config YAML, data manifest,
tokenizer files). Credentials in any URI (``https://user:pass@host``) are scrubbed from what is logged
(``scrub_uri``); metric names are made valid (``mlflow_key``: ``recall@1`` -> ``recall_at_1``). A server that
refuses the credentials is one ``UserError`` before any work (``check_credentials``).

Each driver attempt has an id (``TrainingTracking.attempt``); a group of a new attempt counts it in the tag
``clipflow.driver_attempts`` and records how the previous one ended in ``clipflow.previous_attempt_end``: its
status, or ``lost`` when it left the run RUNNING (its driver died without ending it). The group-start metrics
(``GROUP_METRICS``: ``world_size``, ``group_starts``, ``resumed_from_step``) are named here and sent by
``workflows.tracking.delivery``.

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

import dataclasses
import importlib.metadata
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from workflows.artifacts import DataManifest
from workflows.common import storage
from workflows.common.config import Config, dump_config, flatten_config
from workflows.common.errors import UserError
from workflows.common.runtime import set_env_defaults

log = logging.getLogger("clipflow.tracking")

RUN_KEY_TAG = "clipflow.run_key"
SETUP_TAG = "clipflow.setup_complete"  # params + artifacts logged
ATTEMPT_TAG = "clipflow.driver_attempt"  # the id of the driver attempt whose worker groups run it now
ATTEMPTS_TAG = "clipflow.driver_attempts"  # how many driver attempts ran it
PREVIOUS_END_TAG = "clipflow.previous_attempt_end"  # how the previous attempt ended: its status, or LOST
LOST = "lost"  # the previous driver attempt left the run RUNNING: it died without ending it
WORLD_SIZE, GROUP_STARTS, RESUMED_FROM = "world_size", "group_starts", "resumed_from_step"
GROUP_METRICS = frozenset({WORLD_SIZE, GROUP_STARTS, RESUMED_FROM})  # once per worker group, never filtered
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]", re.ASCII)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
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
