"""`clipflow train`: contrastive pretraining on the training shards with Ray Train (elastic DDP).

The driver checks everything a user can get wrong before any worker starts (data manifest, the
data's tokenizer vs its manifest and vs the config's ``tokenizer`` section, batch arithmetic for every
allowed world size, a resume checkpoint that fits and verifies, a writable ``storage.path``), and raises
``UserError`` saying what to change; then runs ``TorchTrainer(train_loop_per_worker)`` with
``ScalingConfig(num_workers=(min, max))``, ``FailureConfig(max_failures)`` and checkpoints kept in
``RunConfig(storage_path)`` (local or ``s3://``). A failed or resized worker group restarts from the
latest checkpoint; the data position and its exact-resume guarantee are described in
``workflows.train.feed``. A store that refuses writes (full, read-only, forbidden) is not retried: the
run ends at the first such error, as a ``StorageError``, without the partial checkpoints it left.

A run with ``train.run_id`` keeps that name: its checkpoints live in ``storage.path/<run_id>/`` and its
MLflow run is keyed by it. A new driver of the same run id (a re-submit, a RayJob retry) continues it:
Ray Train restores the latest checkpoint it registered in that directory (its checkpoint-manager snapshot)
into the new worker group, after the driver checked that checkpoint against the config; a run that already
trained its steps is reported as finished without starting workers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clip_core import Tokenizer, create_model
from clip_core.checkpoint import CheckpointError, verify_checkpoint
from workflows.artifacts import ArtifactError, CheckpointInfo, DataManifest, TrainerState
from workflows.common import storage
from workflows.common.config import REGISTERED_MODEL_URI, Config, DataSource
from workflows.common.errors import UserError
from workflows.common.log import current_level, get_logger
from workflows.common.runtime import ensure_ray, set_env_defaults
from workflows.data.eval_sets import read_zeroshot_set
from workflows.data.tokenizer_io import load_tokenizer
from workflows.train.accumulation import check_world_sizes
from workflows.train.feed import DataOrder
from workflows.train.loop import (RunLogFactory, RunSetup, TrainDebug, build_model, checkpoint_names, read_pretrained,
                                  train_loop_per_worker)
from workflows.train.preemption import DriverStop

log = get_logger("train")


@dataclass
class TrainResult:
    checkpoint_uri: str
    steps: int
    samples_seen: int
    final_loss: float
    samples_per_second: float  # of the last worker-group attempt, after its first (warm-up) log window
    mlflow_run_id: str
    run_name: str
    world_size: int
    wall_seconds: float
    already_finished: bool = False  # the run id's run had trained its steps before: nothing was trained now


def run_training(cfg: Config, debug: TrainDebug | None = None, run_log: RunLogFactory | None = None,
                 pretrained: str | None = None) -> TrainResult:
    """Validate, then train to the end, reporting to ``run_log`` (clipflow passes its MLflow run:
    ``workflows.tracking.tracker.TrainingTracking``); raises UserError for configs that cannot run.
    ``pretrained``: model.pretrained as the user gave it, when ``cfg`` holds its resolution (see ``prepare_run``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.monotonic()
    setup = replace(prepare_run(cfg, debug or TrainDebug(), pretrained), run_log=run_log)
    if setup.finished_checkpoint:
        return _finished_result(cfg, setup, time.monotonic() - start)
    set_env_defaults("train")  # before Ray starts the workers, which get the driver's variables
    ensure_ray()
    scaling = cfg.scaling
    fs, storage_path = storage.resolve(cfg.storage.path, cfg.storage.s3_endpoint)
    driver_stop = DriverStop()  # SIGTERM: the workers checkpoint at their next check, then fit() returns
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "setup": setup, "stop": driver_stop.handle},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.min_workers if scaling.min_workers == scaling.max_workers
            else (scaling.min_workers, scaling.max_workers),
            **({"elastic_resize_monitor_interval_s": scaling.resize_interval_s}
               if scaling.min_workers < scaling.max_workers else {}),
            use_gpu=scaling.use_gpu, resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=setup.run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[_stop_on_storage_errors(setup.checkpoint_root)]),
    )
    try:
        with driver_stop:
            result = trainer.fit()
        driver_stop.raise_if_stopped(int(result.metrics["step"]), setup.total_steps,
                                     storage.to_uri(cfg.storage.path, result.checkpoint.path))
    except BaseException as exc:  # the run log ends the run as this failure, then it propagates
        if run_log is not None:
            run_log.end(setup, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        fatal = _storage_failure(exc, setup.checkpoint_root, cfg.storage.s3_endpoint)
        if fatal is not None:
            raise fatal from exc
        raise
    run_id = run_log.end(setup, "FINISHED") if run_log is not None else ""
    metrics = result.metrics
    return TrainResult(
        checkpoint_uri=storage.to_uri(cfg.storage.path, result.checkpoint.path),
        steps=int(metrics["step"]), samples_seen=int(metrics["samples_seen"]), final_loss=float(metrics["loss"]),
        samples_per_second=float(metrics["samples_per_second"]), mlflow_run_id=run_id or str(metrics["mlflow_run_id"]),
        run_name=setup.run_name, world_size=int(metrics["world_size"]), wall_seconds=time.monotonic() - start)


def prepare_run(cfg: Config, debug: TrainDebug, pretrained: str | None = None) -> RunSetup:
    """Everything that can be checked on the driver, so a bad config fails in seconds, not after startup.
    ``pretrained``: model.pretrained as given, when ``cfg.model.pretrained`` is its resolution (a models:/ URI
    resolved to a checkpoint by `clipflow train`): checkpoints record, and a continued run compares, the former."""
    t, endpoint = cfg.train, cfg.storage.s3_endpoint
    sources = t.sources()
    manifests = read_manifests(sources, endpoint)
    data, manifest = sources[0].path, manifests[0]
    tokenizer = load_tokenizer(manifest.tokenizer_uri(data), endpoint)
    if tokenizer.id != manifest.tokenizer:
        raise UserError(f"{DataManifest.uri(data)} records tokenizer {manifest.tokenizer!r} but its tokenizer "
                        f"directory holds {tokenizer.id!r}; re-run `clipflow preprocess`")
    check_tokenizer_config(cfg, tokenizer)
    context_length, image_size = int(manifest.context_length), int(manifest.image_size)
    if context_length != cfg.tokenizer.context_length:
        raise UserError(f"the training data was tokenized with context_length {context_length} but "
                        f"tokenizer.context_length is {cfg.tokenizer.context_length}; re-run `clipflow preprocess` "
                        f"with this config or set tokenizer.context_length={context_length}")
    try:
        create_model(cfg.model.name, device="meta", vocab_size=tokenizer.vocab_size, context_length=context_length,
                     image_size=image_size, patch_dropout=cfg.model.patch_dropout)
    except ValueError as exc:
        raise UserError(f"model.name {cfg.model.name!r} cannot train on this data "
                        f"({image_size} px, context {context_length}): {exc}") from exc
    if t.zero_shot_every:
        if not cfg.eval.zeroshot:
            raise UserError("train.zero_shot_every needs eval.zeroshot (ImageFolder sets); set them or set it to 0")
        for uri in cfg.eval.zeroshot:  # fail now, not on rank 0 after the first N steps
            read_zeroshot_set(uri, cfg.storage.s3_endpoint, cfg.eval.classnames)
    s = cfg.scaling
    check_world_sizes(t.global_batch_size, s.min_workers, s.max_workers, t.micro_batch_size)
    order = DataOrder.mixed([(m.shard_uris(s.path), s.weight) for s, m in zip(sources, manifests)], t.seed,
                            t.global_batch_size)
    if order.steps_per_epoch < 1:
        raise UserError(f"{', '.join(s.path for s in sources)} holds {order.epoch_rows} samples an epoch, fewer than "
                        f"one global batch ({t.global_batch_size}); lower train.global_batch_size or add data")
    manifest_hash = data_hash(sources, manifests)
    total_steps = t.max_steps or t.epochs * order.steps_per_epoch
    storage.check_writable(cfg.storage.path, endpoint)  # Ray would fail its controller on it, after startup
    init = cfg.model.pretrained if pretrained is None else pretrained
    run_name = t.run_id or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    root = storage.join(cfg.storage.path, run_name)
    found = latest_run_checkpoint(root, endpoint) if t.run_id else None
    resume, finished = t.resume_from, ""
    if found is None:
        if t.resume_from:
            _check_resume(t.resume_from, cfg, tokenizer, manifest_hash, total_steps, init)
        log.info(f"run {run_name}: new" + (f", from checkpoint {t.resume_from}" if t.resume_from else ""))
    else:
        uri, restored_by_ray = found
        state = _continued_state(uri, cfg, run_name)
        if state.step >= total_steps:
            finished = uri
            log.info(f"run {run_name} already finished at step {state.step} (checkpoint {uri})")
        else:
            _check_resume(uri, cfg, tokenizer, manifest_hash, total_steps, init, what=f"run {run_name}'s checkpoint")
            resume = "" if restored_by_ray else uri  # Ray Train hands its latest checkpoint to the new group
            log.info(f"run {run_name}: continuing from step {state.step} (checkpoint {uri})")
    setup = RunSetup(run_name=run_name, order=order, tokenizer=tokenizer, image_size=image_size,
                     context_length=context_length, total_steps=total_steps, checkpoint_root=root,
                     manifest_hash=manifest_hash, log_level=current_level(), debug=debug, resume_checkpoint=resume,
                     pretrained=init, finished_checkpoint=finished)
    if not finished:
        check_init(cfg, setup)
    return setup


def _continued_state(uri: str, cfg: Config, run_name: str) -> TrainerState:
    """The trainer state of the run's latest checkpoint, once it is clear the config asks to continue it."""
    t = cfg.train
    if t.resume == "never":
        raise UserError(f"run {run_name} already has checkpoints (latest {uri}) and train.resume=never; choose "
                        f"another train.run_id (--run-id) for a new run, or set train.resume=auto to continue it")
    try:
        state = CheckpointInfo.read(uri, cfg.storage.s3_endpoint).trainer_state
    except ArtifactError as exc:
        raise UserError(f"run {run_name}'s checkpoint {uri} cannot be read ({exc}); restore it, or choose another "
                        f"train.run_id for a new run") from exc
    if state is None:
        raise UserError(f"run {run_name}'s checkpoint {uri} has no trainer state; choose another train.run_id")
    if t.resume_from and t.resume_from != state.resume_from:
        raise UserError(f"run {run_name} already has checkpoints (latest {uri}, step {state.step}), so "
                        f"train.resume_from {t.resume_from} is ambiguous: drop --resume-from to continue the run, "
                        f"or choose another train.run_id to start a new run from that checkpoint")
    return state


def latest_run_checkpoint(root: str, endpoint: str) -> tuple[str, bool] | None:
    """The checkpoint a new driver of the run under ``root`` continues, and whether Ray Train restores it
    itself: the latest one its checkpoint-manager snapshot names (checkpoints are registered there once
    uploaded), else, without a snapshot (a copied run directory), the newest whole checkpoint directory.
    None when there is none. Newer directories (saves cut short) are skipped, with a line."""
    names = checkpoint_names(root, endpoint)
    if not names:
        return None
    recorded = _snapshot_latest(root, endpoint, names)
    if recorded is not None:
        newer = [n for n in names if n > recorded]
        if newer:
            log.info(f"{root}: skipping {', '.join(newer)}, newer than Ray Train's latest registered checkpoint "
                     f"(a save cut short; it is written again)")
        return storage.join(root, recorded), True
    for name in reversed(names):
        uri = storage.join(root, name)
        if _is_whole(uri, endpoint):
            return uri, False
        log.info(f"{uri} is not a whole checkpoint (a save cut short): skipped")
    return None


def _snapshot_latest(root: str, endpoint: str, names: list[str]) -> str | None:
    """The latest checkpoint Ray Train's snapshot under ``root`` names (None: no snapshot, or none in it).
    A snapshot Ray would refuse (another Ray version, a checkpoint it lists is gone) is refused here, in one line."""
    import ray
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    uri = storage.join(root, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    if not storage.exists(uri, endpoint):
        return None
    fix = (f"delete {uri} to continue from the newest whole checkpoint directory instead, or choose another "
           f"train.run_id for a new run")
    try:
        snapshot = json.loads(storage.read_bytes(uri, endpoint))
        latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        listed = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"Ray Train's record of the run's checkpoints {uri} does not parse ({exc}); {fix}") from exc
    if snapshot.get("ray_version") != ray.__version__:
        raise UserError(f"{uri} was written by Ray {snapshot.get('ray_version')}, this is Ray {ray.__version__}, "
                        f"which refuses it; {fix}")
    gone = [n for n in {*listed, *([latest] if latest else [])} if n not in names]
    if gone:
        raise UserError(f"{uri} lists checkpoint(s) {', '.join(sorted(gone))} that no longer exist; {fix}")
    return latest


def _finished_result(cfg: Config, setup: RunSetup, seconds: float) -> TrainResult:
    """A run that trained its steps before: its final checkpoint's figures, nothing trained now."""
    state = CheckpointInfo.read(setup.finished_checkpoint, cfg.storage.s3_endpoint).trainer_state or TrainerState()
    return TrainResult(checkpoint_uri=setup.finished_checkpoint, steps=state.step, samples_seen=state.samples_seen,
                       final_loss=state.loss, samples_per_second=state.samples_per_second,
                       mlflow_run_id=state.mlflow_run_id, run_name=setup.run_name, world_size=state.world_size,
                       wall_seconds=seconds, already_finished=True)


def check_init(cfg: Config, setup: RunSetup) -> None:
    """The towers' locking fits model.name, and ``model.pretrained`` is this run's model: same parameter names
    and shapes (architecture, and the data's image size, context length and vocabulary)."""
    m = cfg.model
    try:
        expected = build_model(cfg, setup, device="meta").state_dict()
    except ValueError as exc:
        raise UserError(f"model.lock_*_unlocked_groups do not fit {m.name}: {exc}") from exc
    if not m.pretrained:
        return
    if m.pretrained.startswith(REGISTERED_MODEL_URI):
        raise UserError(f"model.pretrained {m.pretrained} is a registered version, which training cannot read: "
                        f"run `clipflow train` (it resolves models:/ URIs to the version's checkpoint) or set "
                        f"model.pretrained to the checkpoint directory")
    if not storage.exists(m.pretrained, cfg.storage.s3_endpoint):
        raise UserError(f"model.pretrained {m.pretrained} does not exist; point it at a clipflow checkpoint "
                        f"directory or an OpenAI/OpenCLIP weights file (local or s3://)")
    try:
        weights = read_pretrained(cfg)
    except (ValueError, OSError) as exc:
        raise UserError(f"model.pretrained {m.pretrained} cannot initialise {m.name}: "
                        f"{str(exc).splitlines()[0]}") from exc
    found = weights.state_dict()
    differences = [f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in found and found[k].shape != v.shape]
    differences += [f"{k} missing" for k in expected if k not in found]
    differences += [f"{k} unexpected" for k in found if k not in expected]
    if differences:
        w = weights.config
        raise UserError(
            f"model.pretrained {m.pretrained} holds a {w.name} model ({w.vision.image_size} px, context "
            f"{w.text.context_length}, vocab {w.text.vocab_size}) but this run trains {m.name} on data of "
            f"{setup.image_size} px, context {setup.context_length}, vocab {setup.tokenizer.vocab_size} "
            f"(train.loss={cfg.train.loss}): {'; '.join(differences[:3])}"
            f"{f' and {len(differences) - 3} more' if len(differences) > 3 else ''}; set model.name to the "
            f"weights' architecture and preprocess the data with their image size and tokenizer")


def read_manifests(sources: list[DataSource], endpoint: str) -> list[DataManifest]:
    """Each data set's manifest, refused when it lists no shards or its data does not train with the first's
    (another tokenizer, context length or image size: one model cannot take both)."""
    manifests = [DataManifest.read(s.path, endpoint) for s in sources]
    for source, manifest in zip(sources, manifests):
        if not manifest.shards:
            raise UserError(f"{DataManifest.uri(source.path)} lists no shards (every input was rejected?); check "
                            f"its counts and re-run preprocess")
    for source, manifest in zip(sources[1:], manifests[1:]):
        if _data_format(manifest) != _data_format(manifests[0]):
            raise UserError(f"train.data mixes data sets preprocessed differently: {source.path} has "
                            f"{_data_format(manifest)}, {sources[0].path} has {_data_format(manifests[0])}; "
                            f"preprocess them with the same tokenizer and preprocess.image_size")
    return manifests


def _data_format(manifest: DataManifest) -> str:
    return (f"tokenizer {manifest.tokenizer}, context_length {manifest.context_length}, "
            f"image_size {manifest.image_size}")


def data_hash(sources: list[DataSource], manifests: list[DataManifest]) -> str:
    """What a checkpoint's data position is valid for: the manifest's content hash for one data set of
    weight 1 (as before mixes existed), else a hash of every data set's content hash and weight, in order."""
    if len(sources) == 1 and sources[0].weight == 1.0:
        return manifests[0].content_hash
    mix = json.dumps([[m.content_hash, s.weight] for s, m in zip(sources, manifests)])
    return "mix-" + hashlib.sha256(mix.encode()).hexdigest()[:16]


# tokenizer.source -> Tokenizer.source of what preprocess builds from it
TOKENIZER_KINDS = {"train": "trained", "openai_bpe": "openai"}


def check_tokenizer_config(cfg: Config, data_tokenizer: Tokenizer) -> None:
    """The data was tokenized with the tokenizer this config describes (the model's vocabulary and the
    checkpoint's tokenizer come from the data, so a mismatch would silently train another setup)."""
    t, data = cfg.tokenizer, cfg.train.sources()[0].path
    if t.source == "path":
        configured = load_tokenizer(t.path, cfg.storage.s3_endpoint)
        if configured.id != data_tokenizer.id:
            raise UserError(f"tokenizer.path {t.path} holds tokenizer {configured.id!r} but {data} was "
                            f"tokenized with {data_tokenizer.id!r}; re-run `clipflow preprocess` with this config "
                            f"or point tokenizer.path at the data's tokenizer")
    elif data_tokenizer.source != TOKENIZER_KINDS[t.source]:
        raise UserError(f"tokenizer.source is {t.source!r} but {data} was tokenized with a "
                        f"{data_tokenizer.source!r} tokenizer ({data_tokenizer.id}); re-run `clipflow preprocess` "
                        f"with this config or set tokenizer.source to match the data")


def _check_resume(uri: str, cfg: Config, tokenizer: Tokenizer, manifest_hash: str, total_steps: int,
                  pretrained: str, what: str = "train.resume_from") -> None:
    """The checkpoint to continue (``what``: which one, for the messages) verifies and fits this config: same
    model, init, tokenizer, global batch and data, and steps left to train."""
    _verify_resume(uri, cfg.storage.s3_endpoint, what)
    try:
        info = CheckpointInfo.read(uri, cfg.storage.s3_endpoint)
    except ArtifactError as exc:
        raise UserError(f"{what} {uri} is not a training checkpoint ({exc})") from exc
    state = info.trainer_state
    if state is None:
        raise UserError(f"{what} {uri} is not a training checkpoint (it has no trainer state)")
    if info.model_name != cfg.model.name:
        raise UserError(f"checkpoint {uri} is a {info.model_name!r} model; set model.name={info.model_name} "
                        f"to continue it")
    # The checkpoint's weights win (the init is not read again); another init would mislabel the run's lineage.
    if state.pretrained != pretrained:
        raise UserError(f"checkpoint {uri} continues a run initialised from "
                        f"{repr(state.pretrained) if state.pretrained else 'random weights'} but model.pretrained is "
                        f"{repr(pretrained) if pretrained else 'unset'}; run with "
                        f"--set model.pretrained={state.pretrained} to continue it (its weights replace the init)")
    if state.step >= total_steps:
        raise UserError(f"checkpoint {uri} is at step {state.step}, already at or past this run's "
                        f"{total_steps} steps; raise train.max_steps (or train.epochs) to train further")
    if info.tokenizer_id != tokenizer.id:
        raise UserError(f"checkpoint {uri} was trained with tokenizer {info.tokenizer_id!r}, the data uses "
                        f"{tokenizer.id!r}; resume on the data it was trained on")
    if state.global_batch_size != cfg.train.global_batch_size:
        raise UserError(f"checkpoint {uri} was trained with global batch {state.global_batch_size}; the data "
                        f"position is counted in those batches: set train.global_batch_size to match")
    if state.data_manifest_hash != manifest_hash:
        raise UserError(f"checkpoint {uri} was trained on other data (manifest hash "
                        f"{state.data_manifest_hash!r} != {manifest_hash!r}); set train.data to that data")


def _verify_resume(uri: str, endpoint: str, what: str) -> None:
    """Every hash, the weights' header and both states of the checkpoint to resume, checked before any worker
    starts: on the workers a bad one fails each of Ray's retries the same way. An s3:// one is downloaded."""
    try:
        if not storage.is_s3(uri):
            verify_checkpoint(uri)
            return
        with tempfile.TemporaryDirectory(prefix="clipflow-resume-") as tmp:
            try:
                verify_checkpoint(storage.download_tree(uri, Path(tmp), endpoint))
            except CheckpointError as exc:  # name the checkpoint's files, not the download's
                raise CheckpointError(str(exc).replace(tmp, uri.rstrip("/"))) from exc
    except CheckpointError as exc:
        raise UserError(f"{what} {uri} cannot be resumed: {exc}") from exc


def _stop_on_storage_errors(root: str) -> Any:
    """A Ray Train callback that ends the run at the first worker error no retry can fix (a full, read-only or
    forbidden store; ``storage.storage_error``). Ray retries any worker error ``max_failures`` times, and each
    attempt would fail the same way; an error raised here is the controller's, which Ray does not retry."""
    from ray.train import UserCallback

    class StopOnStorageErrors(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for error in worker_exceptions.values():
                fatal = storage.storage_error(error, root)
                if fatal is not None:
                    raise fatal

    return StopOnStorageErrors()


def _storage_failure(exc: BaseException, root: str, endpoint: str) -> storage.StorageError | None:
    """The StorageError behind a failed ``fit()`` (raised by the callback above, or every attempt's error once
    the retries ran out), after removing the checkpoint directories its failed saves left half-written."""
    causes = [exc, getattr(exc, "controller_failure", None), *getattr(exc, "worker_failures", {}).values()]
    fatal = next((e for e in (storage.storage_error(c, root) for c in causes if c is not None) if e), None)
    if fatal is None:
        return None
    try:
        removed, latest = _remove_partial_checkpoints(root, endpoint)
    except OSError as tidy:  # a store that refuses writes may refuse listing and deleting too
        return storage.StorageError(f"{fatal}; the partial checkpoints under {root} are left there "
                                    f"({str(tidy).splitlines()[0]})")
    return storage.StorageError(
        str(fatal) + (f"; removed the partial checkpoint(s) {', '.join(removed)}" if removed else "")
        + (f"; then continue from {latest} with --resume-from" if latest else ""))


def _remove_partial_checkpoints(root: str, endpoint: str) -> tuple[list[str], str | None]:
    """Delete the run's checkpoint directories that are not whole; returns their names and the latest whole one.
    Locally an upload writes files in place, so a directory is whole when it verifies; an S3 object only appears
    once complete, so there it is whole when every file it lists is there."""
    removed, latest = [], None
    for name in checkpoint_names(root, endpoint):
        uri = storage.join(root, name)
        if _is_whole(uri, endpoint):
            latest = uri
        else:
            storage.delete(uri, endpoint)
            removed.append(name)
    return removed, latest


def _is_whole(uri: str, endpoint: str) -> bool:
    if storage.is_s3(uri):
        return CheckpointInfo.is_complete(uri, endpoint)
    try:
        verify_checkpoint(uri)
    except CheckpointError:
        return False
    return True

