"""The MLflow Model Registry side of clipflow: publishing checkpoints, claiming versions for eval, aliases.

**A version is self-contained.** Publishing logs the checkpoint directory as an MLflow ``pyfunc``
model (``workflows.serving.ClipPyfunc``, logged as code through ``serving_model.py``, never pickled;
the checkpoint is its ``checkpoint`` artifact, clip_core is shipped in its ``code_paths``) and
registers that logged model (``models:/m-<id>``) as the version's source. So
``mlflow models serve -m models:/<name>/<version>`` serves it, and the eval job loads the checkpoint
from the source alone (``download_checkpoint``) even after Ray Train has rotated the
original checkpoint away (``train.keep_checkpoints``) -- a version pointing at the training
checkpoint directory would dangle, and the tracking server refuses local-path sources anyway.
The original location is kept in the ``checkpoint_uri`` tag.

**Version tags**: ``run_id``, ``step``, ``samples_seen``, ``checkpoint_uri``, ``data_manifest``,
``tokenizer_id``, ``eval_status`` (pending -> running -> done | failed), ``eval_claimant``,
``eval_lease_expiry``, ``eval_reason`` (why it failed), ``eval_run_id`` and ``eval.<dataset>/<metric>``.

**Atomic claims.** The registry has no compare-and-swap, but it has one atomic, ordered primitive:
``create_model_version`` gives each new version of a registered model the number max+1, and
(name, version) is the primary key, so two concurrent creations never get the same number (the
loser's insert fails and retries with the next one). A number k is only handed out once k-1 is
committed, hence *when my claim k is visible, every claim numbered below k is visible too*.
A claim is therefore a new version of the lock model ``<name>-eval-claims`` (source
``models:/<name>/<v>``) tagged ``target_version``, ``claimant``, ``lease_expiry``. After creating it,
the claimant lists the claims on the same target and ignores those that are expired or marked
``outcome=lost|released``; the lowest remaining number wins. Every participant computes the same
winner: a later claimant sees the winner's claim (lower number, already visible), and the winner
cannot be overtaken by a claim created after its own. Losers mark their claim ``lost`` and move on.
A claimant that dies stops renewing its lease; once ``lease_expiry`` has passed its claim is
ignored and the next claimant wins (leases assume clocks agree to well within ``eval.lease_seconds``).
Because a finished job marks the version ``done`` *before* releasing its claim, a winner re-reads the
version's status after winning and skips it if another job has meanwhile finished it.
The lock model doubles as an audit log of who evaluated what, visible in the MLflow UI.
Alias moves take the same kind of lock (target ``promote``), so two jobs finishing together never
interleave their read-compare-write of ``champion``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

import clip_core
from clip_core import CheckpointError, load_checkpoint
from workflows import storage
from workflows.errors import UserError

# Published models carry an explicit signature but no input example on purpose: MLflow validates an
# example by loading the saved model and predicting, a second copy of a (possibly multi-GB) model at
# every publish. Its advice to add one is silenced here, once: publishing runs on a background thread,
# where a ``catch_warnings`` block would race with the training thread's warning filters.
warnings.filterwarnings("ignore", message=r".*An input example was not provided when logging the model",
                        category=UserWarning)

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
STATUS, CLAIMANT, LEASE, REASON = "eval_status", "eval_claimant", "eval_lease_expiry", "eval_reason"
EVAL_RUN, SUMMARY_PREFIX = "eval_run_id", "eval."
CLAIMS_SUFFIX = "-eval-claims"
LATEST_ALIAS, CHAMPION_ALIAS = "latest-evaluated", "champion"
PYFUNC_NAME = "clip"
CHECKPOINT_WAIT_S = 60.0  # how long publishing waits for a listed checkpoint to verify (the Tracker waits for
# the upload itself before publishing, so this only covers stores that show new files late)
MAX_TAG_CHARS = 5000


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def lease_until(seconds: float) -> str:
    return (now_utc() + datetime.timedelta(seconds=seconds)).isoformat(timespec="seconds")


def lease_expired(value: str | None) -> bool:
    """Unparseable or absent leases count as expired: nobody can be holding them."""
    try:
        return datetime.datetime.fromisoformat(value or "") <= now_utc()
    except ValueError:
        return True


def claimant_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def ensure_registered_model(client: MlflowClient, name: str, description: str = "") -> None:
    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


# ---- publishing ------------------------------------------------------------------------------------


def stage_checkpoint(uri: str, endpoint: str, dest: Path, wait_s: float = CHECKPOINT_WAIT_S) -> Path:
    """A verified local copy of the checkpoint at ``uri`` in ``dest/checkpoint``.

    Training uploads checkpoints asynchronously, so the directory may still be filling up when it is
    published: retry until every file matches ``checkpoint.json`` (clip_core verifies the hashes).
    """
    target = dest / "checkpoint"
    deadline = time.monotonic() + wait_s
    while True:
        if not storage.exists(storage.join(uri, "checkpoint.json"), endpoint):
            raise FileNotFoundError(f"checkpoint {uri} does not exist (deleted, or never written)")
        shutil.rmtree(target, ignore_errors=True)
        storage.download_tree(uri, target, endpoint)
        try:
            load_checkpoint(target)
            return target
        except CheckpointError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _pip_requirements() -> list[str]:
    out = []
    for package in ("torch", "numpy", "pillow", "pyyaml", "regex", "ftfy", "tokenizers", "mlflow", "pandas"):
        try:
            out.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _serving_code(tmp: Path) -> list[str]:
    """``clip_core`` and a ``workflows`` package holding only ``serving.py``: all the pyfunc imports."""
    from workflows import serving

    package = tmp / "code" / "workflows"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(serving.__file__, package / "serving.py")
    core = tmp / "code" / "clip_core"
    shutil.copytree(Path(clip_core.__file__).parent, core, ignore=shutil.ignore_patterns("__pycache__"))
    return [str(core), str(package)]


def log_pyfunc(checkpoint_dir: Path, run_id: str, templates: list[str]):
    """Log a checkpoint directory as the ``clip`` pyfunc model of ``run_id``; returns mlflow's ModelInfo."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from workflows import serving

    with tempfile.TemporaryDirectory(prefix="clipflow-pyfunc-") as tmp:
        return Model.log(
            artifact_path=None, name=PYFUNC_NAME, flavor=mlflow.pyfunc, run_id=run_id,
            python_model=str(Path(serving.__file__).with_name("serving_model.py")),
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
    """Register the checkpoint at ``checkpoint_uri`` as a new version of ``name``, eval_status pending."""
    existing = find_published(client, name, run_id, step)
    if existing is not None:
        return existing
    ensure_registered_model(client, name, "CLIP checkpoints published by `clipflow train`; "
                                          "evaluated by `clipflow eval --pending`.")
    with tempfile.TemporaryDirectory(prefix="clipflow-publish-") as tmp:
        local = stage_checkpoint(checkpoint_uri, endpoint, Path(tmp))
        meta = load_checkpoint(local)
        info = log_pyfunc(local, run_id, templates)
    tags = {
        "run_id": run_id, "step": str(step), "samples_seen": str(samples_seen), "checkpoint_uri": checkpoint_uri,
        "data_manifest": data_manifest or str(meta.trainer_state.get("data_manifest_hash", "")),
        "tokenizer_id": meta.tokenizer.id, "model_name": meta.model.config.name, STATUS: PENDING,
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

    from workflows.serving import CHECKPOINT_ARTIFACT

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


# ---- claims ----------------------------------------------------------------------------------------


@dataclass
class Claim:
    """A won claim: ``number`` is the claim's version in the lock model."""

    client: MlflowClient
    name: str
    target: str
    number: str
    claimant: str
    lease_seconds: float

    @property
    def lock_model(self) -> str:
        return self.name + CLAIMS_SUFFIX

    def renew(self) -> str:
        expiry = lease_until(self.lease_seconds)
        self.client.set_model_version_tag(self.lock_model, self.number, "lease_expiry", expiry)
        return expiry

    def held(self) -> bool:
        """Still the lowest live claim on the target (false if it expired and someone reclaimed)."""
        return _winner(self.client, self.lock_model, self.target) == self.number

    def release(self, outcome: str = "released") -> None:
        """End the claim; ``outcome`` says how (``released`` after work, ``skipped`` when there was none)."""
        self.client.set_model_version_tag(self.lock_model, self.number, "outcome", outcome)


def _winner(client: MlflowClient, lock_model: str, target: str) -> str | None:
    """The lowest-numbered live claim on ``target`` (None when there is none)."""
    live = [int(mv.version)
            for mv in client.search_model_versions(f"name='{lock_model}' and tags.target_version='{target}'")
            if mv.tags.get("outcome") not in ("lost", "released", "skipped") and not lease_expired(mv.tags.get("lease_expiry"))]
    return str(min(live)) if live else None


def try_claim(client: MlflowClient, name: str, target: str, source_version: str, claimant: str,
              lease_seconds: float) -> Claim | None:
    """Create a claim on ``target`` and return it if it is the lowest live one, else mark it lost."""
    lock_model = name + CLAIMS_SUFFIX
    ensure_registered_model(client, lock_model, f"Claim records of `clipflow eval` jobs on {name!r} versions "
                                                f"(one version per attempt; see workflows/registry.py).")
    mv = client.create_model_version(
        lock_model, source=f"models:/{name}/{source_version}",
        tags={"target_version": target, "claimant": claimant, "lease_expiry": lease_until(lease_seconds)},
        description=f"claim on {target} by {claimant}", await_creation_for=0)
    if _winner(client, lock_model, target) != mv.version:
        client.set_model_version_tag(lock_model, mv.version, "outcome", "lost")
        return None
    client.set_model_version_tag(lock_model, mv.version, "outcome", "won")
    return Claim(client, name, target, mv.version, claimant, lease_seconds)


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


def renew(claim: Claim) -> None:
    """Extend the lease on the claim and on the version (called between datasets)."""
    claim.client.set_model_version_tag(claim.name, claim.target, LEASE, claim.renew())


def finish_version(claim: Claim, status: str, reason: str = "", summary: dict[str, Any] | None = None,
                   eval_run_id: str = "") -> None:
    """Write the outcome on the version, then release the claim (in that order: see the docstring)."""
    client, name, version = claim.client, claim.name, claim.target
    for key, value in (summary or {}).items():
        client.set_model_version_tag(name, version, SUMMARY_PREFIX + key, f"{value:.6g}" if isinstance(value, float)
                                     else str(value))
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


def _beats_champion(client: MlflowClient, name: str, version: str, metric: str, value: float) -> bool:
    if CHAMPION_ALIAS not in client.get_registered_model(name).aliases:
        return True
    champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    if champion.version == version:
        return False
    current = champion.tags.get(SUMMARY_PREFIX + metric)
    try:
        return current is None or value > float(current)
    except ValueError:  # a champion without a usable number loses to one with a number
        return True
