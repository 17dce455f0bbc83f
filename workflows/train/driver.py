"""`clipflow train`: contrastive pretraining on the training shards with Ray Train (elastic DDP).

The driver checks everything a user can get wrong before any worker starts (data manifest, the
data's tokenizer vs its manifest and vs the config's ``tokenizer`` section, batch arithmetic for every
allowed world size, a resume checkpoint that fits), and raises ``UserError`` saying what to change;
then runs ``TorchTrainer(train_loop_per_worker)`` with ``ScalingConfig(num_workers=(min, max))``,
``FailureConfig(max_failures)`` and checkpoints kept in ``RunConfig(storage_path)`` (local or
``s3://``). A failed or resized worker group restarts from the latest checkpoint; the data
position and its exact-resume guarantee are described in ``workflows.train.feed``.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace

from clip_core import Tokenizer, create_model
from workflows.artifacts import ArtifactError, CheckpointInfo, DataManifest
from workflows.common import storage
from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.common.log import current_level
from workflows.common.runtime import ensure_ray
from workflows.data.eval_sets import read_zeroshot_set
from workflows.data.tokenizer_io import load_tokenizer
from workflows.train.accumulation import check_world_sizes
from workflows.train.feed import DataOrder, Shard
from workflows.train.loop import RunLogFactory, RunSetup, TrainDebug, train_loop_per_worker


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


def run_training(cfg: Config, debug: TrainDebug | None = None, run_log: RunLogFactory | None = None) -> TrainResult:
    """Validate, then train to the end, reporting to ``run_log`` (clipflow passes its MLflow run:
    ``workflows.tracking.client.TrainingTracking``); raises UserError for configs that cannot run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.monotonic()
    setup = replace(prepare_run(cfg, debug or TrainDebug()), run_log=run_log)
    # Ray 2.60's Train workers show every print() twice: its print patch logs the line AND tees it to
    # stdout, which Ray's workers always wrap. Unpatched, a print reaches the driver once, through
    # Ray's log monitor. Propagated to the workers by Ray Train; an explicit setting wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ensure_ray()
    scaling = cfg.scaling
    fs, storage_path = storage.resolve(cfg.storage.path, cfg.storage.s3_endpoint)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "setup": setup},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.min_workers if scaling.min_workers == scaling.max_workers
            else (scaling.min_workers, scaling.max_workers),
            use_gpu=scaling.use_gpu, resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=setup.run_name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )
    result = trainer.fit()
    metrics = result.metrics
    return TrainResult(
        checkpoint_uri=storage.to_uri(cfg.storage.path, result.checkpoint.path),
        steps=int(metrics["step"]), samples_seen=int(metrics["samples_seen"]), final_loss=float(metrics["loss"]),
        samples_per_second=float(metrics["samples_per_second"]), mlflow_run_id=str(metrics["mlflow_run_id"]),
        run_name=setup.run_name, world_size=int(metrics["world_size"]), wall_seconds=time.monotonic() - start)


def prepare_run(cfg: Config, debug: TrainDebug) -> RunSetup:
    """Everything that can be checked on the driver, so a bad config fails in seconds, not after startup."""
    t, endpoint = cfg.train, cfg.storage.s3_endpoint
    manifest = DataManifest.read(t.data, endpoint)
    if not manifest.shards:
        raise UserError(f"{DataManifest.uri(t.data)} lists no shards (every input was rejected?); check its counts "
                        f"and re-run preprocess")
    tokenizer = load_tokenizer(manifest.tokenizer_uri(t.data), endpoint)
    if tokenizer.id != manifest.tokenizer:
        raise UserError(f"{DataManifest.uri(t.data)} records tokenizer {manifest.tokenizer!r} but its tokenizer "
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
            read_zeroshot_set(uri, cfg.storage.s3_endpoint)
    s = cfg.scaling
    check_world_sizes(t.global_batch_size, s.min_workers, s.max_workers)
    shards = tuple(Shard(uri, rows) for uri, rows in manifest.shard_uris(t.data))
    order = DataOrder(shards, t.seed, t.global_batch_size)
    if order.steps_per_epoch < 1:
        raise UserError(f"{t.data} holds {order.rows} samples, fewer than one global batch "
                        f"({t.global_batch_size}); lower train.global_batch_size or add data")
    manifest_hash = manifest.content_hash
    total_steps = t.max_steps or t.epochs * order.steps_per_epoch
    if t.resume_from:
        _check_resume(t.resume_from, cfg, tokenizer, manifest_hash, total_steps)
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return RunSetup(run_name=run_name, order=order, tokenizer=tokenizer, image_size=image_size,
                    context_length=context_length, total_steps=total_steps,
                    checkpoint_root=storage.join(cfg.storage.path, run_name), manifest_hash=manifest_hash,
                    log_level=current_level(), debug=debug)


# tokenizer.source -> Tokenizer.source of what preprocess builds from it
TOKENIZER_KINDS = {"train": "trained", "openai_bpe": "openai"}


def check_tokenizer_config(cfg: Config, data_tokenizer: Tokenizer) -> None:
    """The data was tokenized with the tokenizer this config describes (the model's vocabulary and the
    checkpoint's tokenizer come from the data, so a mismatch would silently train another setup)."""
    t = cfg.tokenizer
    if t.source == "path":
        configured = load_tokenizer(t.path, cfg.storage.s3_endpoint)
        if configured.id != data_tokenizer.id:
            raise UserError(f"tokenizer.path {t.path} holds tokenizer {configured.id!r} but {cfg.train.data} was "
                            f"tokenized with {data_tokenizer.id!r}; re-run `clipflow preprocess` with this config "
                            f"or point tokenizer.path at the data's tokenizer")
    elif data_tokenizer.source != TOKENIZER_KINDS[t.source]:
        raise UserError(f"tokenizer.source is {t.source!r} but {cfg.train.data} was tokenized with a "
                        f"{data_tokenizer.source!r} tokenizer ({data_tokenizer.id}); re-run `clipflow preprocess` "
                        f"with this config or set tokenizer.source to match the data")


def _check_resume(uri: str, cfg: Config, tokenizer: Tokenizer, manifest_hash: str, total_steps: int) -> None:
    try:
        info = CheckpointInfo.read(uri, cfg.storage.s3_endpoint)
    except ArtifactError as exc:
        raise UserError(f"train.resume_from {uri} is not a training checkpoint ({exc})") from exc
    state = info.trainer_state
    if state is None:
        raise UserError(f"train.resume_from {uri} is not a training checkpoint (it has no trainer state)")
    if info.model_name != cfg.model.name:
        raise UserError(f"checkpoint {uri} is a {info.model_name!r} model; set model.name={info.model_name} "
                        f"to continue it")
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

