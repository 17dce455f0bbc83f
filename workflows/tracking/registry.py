"""The MLflow Model Registry side of clipflow: publishing checkpoints, claiming versions for eval, aliases.

**A version is self-contained and lean.** Publishing logs the checkpoint's weights-only export
(``clip_core.checkpoint.export_weights``: weights, config, tokenizer; no optimizer or trainer state, which
stay in storage for resuming) as an MLflow ``pyfunc`` model (``workflows.tracking.serving.ClipPyfunc``,
logged as code through ``serving_model.py``, never pickled; the export is its ``checkpoint`` artifact,
clip_core is shipped in its ``code_paths``) and registers that logged model (``models:/m-<id>``) as the
version's source. So ``mlflow models serve -m models:/<name>/<version>`` serves it, and the eval job loads
the checkpoint from the source alone (``download_checkpoint``) even after Ray Train has rotated the
original checkpoint away (``train.keep_checkpoints``) -- a version pointing at the training
checkpoint directory would dangle, and the tracking server refuses local-path sources anyway.
The original location is kept in the ``checkpoint_uri`` tag. The logged model belongs to the training
run's experiment (its Models tab; the run page's "Logged models").

**Version tags**: ``run_id``, ``step``, ``samples_seen``, ``checkpoint_uri``, ``data_manifest``,
``tokenizer_id``, ``model_name``, ``eval_status`` (pending -> running -> done | failed), ``eval_claimant``,
``eval_lease_expiry``, ``eval_reason`` (why it failed) and ``eval_run_id``. Eval results are not tags: they
are the eval run's metrics, logged with the version's ``model_id``, so they are also the logged model's
metrics (the experiment's Models tab ranks checkpoints by them; ``evaluated_metric`` reads one back).

**Claims** (``workflows.tracking.claims``): an eval job claims a version before evaluating it, so
concurrent jobs never evaluate the same one. Because a finished job marks the version ``done`` *before*
releasing its claim, a winner re-reads the version's status after winning and skips it if another job
has meanwhile finished it. Alias moves take the same kind of lock (target ``promote``), so two jobs
finishing together never interleave their read-compare-write of ``champion``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

import clip_core
from clip_core import CheckpointError
from clip_core.checkpoint import MANIFEST, export_weights, weights_only
from workflows.artifacts import ArtifactError, CheckpointInfo, TrainerState
from workflows.common import storage
from workflows.common.errors import UserError
from workflows.tracking.claims import (CLAIMS_SUFFIX, Claim, claimant_id, ensure_registered_model, lease_expired,
                                       try_claim)

# Published models carry an explicit signature but no input example on purpose: MLflow validates an
# example by loading the saved model and predicting, a second copy of a (possibly multi-GB) model at
# every publish. Its advice to add one is silenced here, once: publishing runs on a background thread,
# where a ``catch_warnings`` block would race with the training thread's warning filters.
warnings.filterwarnings("ignore", message=r".*An input example was not provided when logging the model",
                        category=UserWarning)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATUS, CLAIMANT, LEASE, REASON = "eval_status", "eval_claimant", "eval_lease_expiry", "eval_reason"
EVAL_RUN = "eval_run_id"
LEGACY_RESULT_PREFIX = "eval."  # results were version tags before they were the logged model's metrics
LATEST_ALIAS, CHAMPION_ALIAS = "latest-evaluated", "champion"
PYFUNC_NAME = "clip"
CHECKPOINT_WAIT_S = 60.0  # how long publishing waits for a listed checkpoint to verify (the Tracker waits for
# the upload itself before publishing, so this only covers stores that show new files late)
MAX_TAG_CHARS = 5000


# ---- publishing ------------------------------------------------------------------------------------


def stage_weights(uri: str, endpoint: str, dest: Path, wait_s: float = CHECKPOINT_WAIT_S) -> Path:
    """The weights-only export (``export_weights``) of the checkpoint at ``uri``, verified, in
    ``dest/<CHECKPOINT_ARTIFACT>`` (the artifact is named after its directory).

    Only checkpoint.json and the files the export keeps are downloaded: a training checkpoint is about three
    times its weights (AdamW's two moments), and that state stays in storage for resuming. Training uploads
    checkpoints asynchronously, so the directory may still be filling up when it is published: retry until the
    files match their file list (clip_core verifies the hashes and shapes).
    """
    from workflows.tracking.serving import CHECKPOINT_ARTIFACT

    staged, target = dest / "staged", dest / "export" / CHECKPOINT_ARTIFACT
    deadline = time.monotonic() + wait_s
    while True:
        if not CheckpointInfo.has_file_list(uri, endpoint):
            raise FileNotFoundError(f"checkpoint {uri} does not exist (deleted, or never written)")
        shutil.rmtree(staged, ignore_errors=True)
        try:
            names = [name for name in CheckpointInfo.read(uri, endpoint).files if weights_only(name)]
            storage.download_tree(uri, staged, endpoint, names=[MANIFEST, *names])
            return export_weights(staged, target)
        except (CheckpointError, ArtifactError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _pip_requirements() -> list[str]:
    out = []
    for package in ("torch", "numpy", "pillow", "pyyaml", "regex", "ftfy", "tokenizers", "safetensors", "mlflow",
                    "pandas"):
        try:
            out.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _serving_code(tmp: Path) -> list[str]:
    """``clip_core`` and a ``workflows`` package holding only ``tracking/serving.py``: all the pyfunc imports."""
    from workflows.tracking import serving

    package = tmp / "code" / "workflows"
    (package / "tracking").mkdir(parents=True)
    for init in (package / "__init__.py", package / "tracking" / "__init__.py"):
        init.write_text("")
    shutil.copy(serving.__file__, package / "tracking" / "serving.py")
    core = tmp / "code" / "clip_core"
    shutil.copytree(Path(clip_core.__file__).parent, core, ignore=shutil.ignore_patterns("__pycache__"))
    return [str(core), str(package)]


def log_pyfunc(client: MlflowClient, checkpoint_dir: Path, run_id: str, step: int, templates: list[str]):
    """Log a checkpoint directory as the ``clip`` pyfunc model of ``run_id`` (its output at ``step``), in the
    run's experiment; returns mlflow's ModelInfo.

    The logged model is created here, in the run's experiment, and handed to ``Model.log``: left to itself,
    MLflow 3.17 puts a model logged with ``run_id`` but no active run into the process's current experiment
    (the Default one, 0), so the run page would show "Logged models (0)".
    """
    import mlflow.pyfunc
    from mlflow.models import Model

    from workflows.tracking import serving

    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=PYFUNC_NAME, source_run_id=run_id,
                                       params=run.data.params)
    with tempfile.TemporaryDirectory(prefix="clipflow-pyfunc-") as tmp:
        return Model.log(
            artifact_path=None, name=PYFUNC_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
            step=step, python_model=str(Path(serving.__file__).with_name("serving_model.py")),
            model_config={"templates": templates}, artifacts={serving.CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
            code_paths=_serving_code(Path(tmp)), pip_requirements=_pip_requirements(),
            signature=serving.signature(),
        )


def find_published(client: MlflowClient, name: str, run_id: str, step: int) -> ModelVersion | None:
    """The version already registered for (run, step): publishing is retried after timeouts."""
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}' and tags.step='{step}'"):
        return mv
    return None


def publish_checkpoint(client: MlflowClient, *, name: str, run_id: str, checkpoint_uri: str, step: int,
                       samples_seen: int, templates: list[str], endpoint: str = "",
                       data_manifest: str = "") -> ModelVersion:
    """Register the weights of the checkpoint at ``checkpoint_uri`` as a new version of ``name``, eval_status
    pending."""
    existing = find_published(client, name, run_id, step)
    if existing is not None:
        return existing
    ensure_registered_model(client, name, "CLIP checkpoints published by `clipflow train`; "
                                          "evaluated by `clipflow eval --pending`.")
    with tempfile.TemporaryDirectory(prefix="clipflow-publish-") as tmp:
        lean = stage_weights(checkpoint_uri, endpoint, Path(tmp))
        meta = CheckpointInfo.read(checkpoint_uri, endpoint)  # the trainer state, which the export leaves out
        info = log_pyfunc(client, lean, run_id, step, templates)
    tags = {
        "run_id": run_id, "step": str(step), "samples_seen": str(samples_seen), "checkpoint_uri": checkpoint_uri,
        "data_manifest": data_manifest or (meta.trainer_state or TrainerState()).data_manifest_hash,
        "tokenizer_id": meta.tokenizer_id, "model_name": meta.model_name, STATUS: PENDING,
    }
    return client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                       tags=tags, description=f"step {step}, {samples_seen} samples seen",
                                       await_creation_for=0)


# ---- finding versions ------------------------------------------------------------------------------


def registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        known = sorted(m.name for m in client.search_registered_models() if not m.name.endswith(CLAIMS_SUFFIX))
        raise UserError(f"registered model {name!r} does not exist (known: {', '.join(known) or 'none'}); "
                        f"set mlflow.registered_model, or train and publish a checkpoint first") from exc


def resolve_version(client: MlflowClient, name: str, version: str | int | None = None,
                    alias: str | None = None) -> ModelVersion:
    """One version by number or alias; unknown names, versions and aliases are UserErrors."""
    model = registered_model(client, name)
    aliases = ", ".join(sorted(model.aliases)) or "none"
    if alias is not None:
        if alias not in model.aliases:
            raise UserError(f"registered model {name!r} has no alias {alias!r} (aliases: {aliases}); "
                            f"evaluate a version with --version N or use --pending")
        return client.get_model_version_by_alias(name, alias)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), "INVALID_PARAMETER_VALUE"):
            raise
        raise UserError(f"registered model {name!r} has no version {version} (aliases: {aliases}); "
                        f"list versions in the MLflow UI or use --pending") from exc


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def claimable(mv: ModelVersion) -> bool:
    """Pending, or running under a lease that has expired (its claimant died)."""
    status = mv.tags.get(STATUS)
    return status == PENDING or (status == RUNNING and lease_expired(mv.tags.get(LEASE)))


def pending_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    registered_model(client, name)
    return [mv for mv in all_versions(client, name) if claimable(mv)]


def download_checkpoint(client: MlflowClient, mv: ModelVersion, dest: Path) -> Path:
    """The version's checkpoint from its source alone (the logged pyfunc model's artifact).

    The source is resolved through ``client``: MLflow resolves a ``models:/`` URI against the
    process-wide tracking URI, which the eval job leaves alone.
    """
    import mlflow.artifacts

    from workflows.tracking.serving import CHECKPOINT_ARTIFACT

    try:
        location = client.get_model_version_download_uri(mv.name, mv.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest),
                                                         tracking_uri=client.tracking_uri))
    except MlflowException as exc:
        raise CheckpointError(f"cannot download version {mv.version}'s source {mv.source}: {exc}") from exc
    checkpoint = local / "artifacts" / CHECKPOINT_ARTIFACT
    if not checkpoint.is_dir():
        raise CheckpointError(f"version {mv.version}'s source {mv.source} holds no {CHECKPOINT_ARTIFACT}/ "
                              f"artifact; it was not published by clipflow")
    return checkpoint


# ---- claiming versions for eval ----------------------------------------------------------------


def claim_version(client: MlflowClient, name: str, version: str, claimant: str, lease_seconds: float,
                  force: bool = False) -> Claim | None:
    """Claim a version for evaluation, marking it running; None when another job has it or it is done.

    ``force`` (an explicit ``--version``/``--alias``) re-evaluates done or failed versions too, but
    never one whose live claim belongs to another job.
    """
    claim = try_claim(client, name, version, version, claimant, lease_seconds)
    if claim is None:
        return None
    mv = client.get_model_version(name, version)
    if not force and not claimable(mv):  # another job finished it between our look and our claim
        claim.release("skipped")
        return None
    expiry = claim.renew()
    for key, value in {STATUS: RUNNING, CLAIMANT: claimant, LEASE: expiry, REASON: ""}.items():
        client.set_model_version_tag(name, version, key, value)
    return claim


def renew_version(claim: Claim) -> None:
    """Extend the lease of the claim and the one shown on the version (called between datasets)."""
    claim.client.set_model_version_tag(claim.name, claim.target, LEASE, claim.renew())


def finish_version(claim: Claim, status: str, reason: str = "", eval_run_id: str = "") -> None:
    """Write the outcome on the version, then release the claim (in that order: see the docstring). The results
    are the metrics of ``eval_run_id`` on the version's logged model (see the docstring), not tags."""
    client, name, version = claim.client, claim.name, claim.target
    if eval_run_id:
        client.set_model_version_tag(name, version, EVAL_RUN, eval_run_id)
    client.set_model_version_tag(name, version, REASON, reason[:MAX_TAG_CHARS])
    client.set_model_version_tag(name, version, STATUS, status)
    claim.release()


# ---- promotion -------------------------------------------------------------------------------------


def promote(client: MlflowClient, name: str, version: str, primary_metric: str, value: float | None,
            wait_s: float = 120.0) -> list[str]:
    """Move ``latest-evaluated`` to ``version``; move ``champion`` if ``value`` beats the champion's.

    Returns the aliases ``version`` now carries. Runs under the ``promote`` lock.
    """
    deadline = time.monotonic() + wait_s
    claimant = claimant_id()
    while (lock := try_claim(client, name, "promote", version, claimant, lease_seconds=60)) is None:
        if time.monotonic() > deadline:
            raise UserError(f"could not take the alias lock on {name!r} within {wait_s:.0f} s; "
                            f"another eval job holds it (see {name + CLAIMS_SUFFIX} in the MLflow UI)")
        time.sleep(0.5 + uuid.uuid4().int % 500 / 1000)
    try:
        client.set_registered_model_alias(name, LATEST_ALIAS, version)
        if value is not None and _beats_champion(client, name, version, primary_metric, value):
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    finally:
        lock.release()
    return sorted(client.get_model_version(name, version).aliases)


def logged_model_id(mv: ModelVersion) -> str | None:
    """The id of the version's logged model. The registry's SQL store does not keep the ``model_id`` a version
    is created with (3.17 returns None), but a published version's source is ``models:/<model id>``."""
    if mv.model_id:
        return mv.model_id
    rest = (mv.source or "").removeprefix("models:/")
    return rest if rest != mv.source and rest.startswith("m-") and "/" not in rest else None


def evaluated_metric(client: MlflowClient, mv: ModelVersion, key: str) -> float | None:
    """``key`` (an MLflow metric name) as the version's last finished eval (its ``eval_run_id``) logged it on
    the version's logged model; None when there is no such value."""
    model_id, eval_run = logged_model_id(mv), mv.tags.get(EVAL_RUN)
    points = [m for m in (client.get_logged_model(model_id).metrics or [] if model_id and eval_run else [])
              if m.key == key and m.run_id == eval_run]
    if points:
        return max(points, key=lambda m: (m.timestamp, m.step)).value
    try:  # a version evaluated before results were metrics carries them as eval.<key> tags
        return float(mv.tags[LEGACY_RESULT_PREFIX + key])
    except (KeyError, ValueError):
        return None


def _beats_champion(client: MlflowClient, name: str, version: str, metric: str, value: float) -> bool:
    if CHAMPION_ALIAS not in client.get_registered_model(name).aliases:
        return True
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    if champion.version == version:
        return False
    current = evaluated_metric(client, champion, metric)
    return current is None or value > current  # a champion without the number loses to one with it
