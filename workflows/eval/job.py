"""`clipflow eval`: zero-shot classification, image-text retrieval and linear probes of model versions.

What a RayJob or CronJob runs. ``--pending`` evaluates every version whose ``eval_status`` is
pending (or whose claimant's lease expired); ``--version N`` / ``--alias A`` evaluates one. Each
version is claimed atomically first (``workflows.tracking.claims``), so concurrent jobs never evaluate the
same version. ``--checkpoint PATH`` evaluates a checkpoint directory or pretrained weights file without
the registry (no claims, no aliases). Image embeddings are computed through Ray Data (``map_batches`` on
an actor pool, a GPU per actor with ``eval.device=gpu``, or ``auto`` when the cluster has GPUs), so large
eval sets scale out; class prompts and captions are few and are embedded on the driver.

Results: an eval run (experiment ``<mlflow.experiment>-eval``) tagged with the model version, holding
metrics per dataset with CLIP_benchmark's names (``<dataset>/acc1``, ``<dataset>/acc5``,
``<dataset>/mean_per_class_recall``, ``<dataset>/image_retrieval_recall@k``,
``<dataset>/text_retrieval_recall@k``, ``<dataset>/lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall``),
a per-class accuracy table and a confusion-matrix image;
(in MLflow "@" is spelled "_at_": ``image_retrieval_recall_at_1``). The metrics are logged with the
version's ``model_id``, so they are the logged model's metrics too (its page, and the experiment's Models
tab, which ranks checkpoints by them); they are logged only once the result counts (the lease held).
The same metrics as ``eval/<dataset>/<metric>`` at the checkpoint's step in the training run (a
"zero-shot accuracy vs step" chart, skipped with one line when the identity may not write that run);
status done or failed (with the reason) and ``eval_run_id`` on the
version; then the ``latest-evaluated`` and (if the primary metric improved) ``champion`` aliases.

The eval sets' formats and the scoring are ``workflows.data.eval_sets``'s, shared with training; the
linear probe is ``workflows.eval.linear_probe``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clip_core import CheckpointError, Tokenizer, load_checkpoint, load_pretrained, load_templates
from clip_core.embed import embed_images, model_image_size
from workflows.artifacts import DataManifest
from workflows.common import storage
from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.common.log import get_logger
from workflows.data.eval_sets import (Image, RetrievalSet, ZeroShotSet, image_rows, images_of_rows,
                                      read_linear_probe_set, read_pixels, read_retrieval_set, read_zeroshot_set,
                                      retrieval_result, zero_shot_result)
from workflows.data.tokenizer_io import load_tokenizer
from workflows.eval.linear_probe import linear_probe_result
from workflows.eval.plots import log_dataset
from workflows.tracking import claims, registry
from workflows.tracking.run import get_or_create_experiment, mlflow_key, tracking_uri

log = get_logger("eval")


# ---- what a run returns ------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    """One evaluated target: a registered version (``version``) or a checkpoint path (``checkpoint``)."""

    status: str  # done | failed | skipped | refused
    version: str | None = None
    checkpoint: str | None = None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # "<dataset>/<metric>"
    num_classes: int = 0  # of the first zero-shot set
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None  # the training run
    eval_run_id: str | None = None
    images_per_second: float = 0.0


@dataclass
class EvalResult:
    """What `clipflow eval` did: one outcome per version considered (or the one checkpoint)."""

    registered_model: str
    outcomes: list[EvalOutcome] = field(default_factory=list)

    def with_status(self, status: str) -> list[EvalOutcome]:
        return [o for o in self.outcomes if o.status == status]


# ---- image embeddings on a Ray Data actor pool ----------------------------------------------------


class ImageEmbedder:
    """A Ray Data actor: builds the model once from the object store, embeds batches of images."""

    def __init__(self, weights, endpoint: str) -> None:
        import ray

        from clip_core import CLIPConfig, create_model_from_config

        config, state_dict = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = create_model_from_config(CLIPConfig.from_dict(config), device=self.device)
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self.endpoint = endpoint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, ok = read_pixels(images_of_rows(batch), model_image_size(self.model), self.endpoint)
        return {"index": batch["index"], "ok": ok, "embedding": embed_images(self.model, pixels, self.device).numpy()}


def actor_gpus(device: str, cluster_gpus: float) -> int:
    """GPUs each embedding actor asks for. ``gpu`` asks whatever the cluster has now: a GPU group
    autoscaled to zero shows 0 GPUs until a pending actor asks for one."""
    return 1 if device == "gpu" or (device == "auto" and cluster_gpus >= 1) else 0


def embed_images_ray(weights_ref, images: list[Image], cfg: Config) -> tuple[torch.Tensor, np.ndarray, float]:
    """(N, D) embeddings in input order, ok-mask, images/s -- through Ray Data on an actor pool."""
    import ray
    from ray.data import DataContext

    start = time.perf_counter()
    gpus = actor_gpus(cfg.eval.device, ray.cluster_resources().get("GPU", 0))
    context = DataContext.get_current()
    saved_wait = context.wait_for_min_actors_s
    if gpus:  # fail after gpu_wait_seconds rather than wait forever for a GPU that never comes
        context.wait_for_min_actors_s = cfg.eval.gpu_wait_seconds
    try:
        out = ray.data.from_items(image_rows(images)).map_batches(
            ImageEmbedder, fn_constructor_kwargs={"weights": weights_ref, "endpoint": cfg.storage.s3_endpoint},
            compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors), batch_size=cfg.eval.batch_size,
            num_gpus=gpus, batch_format="numpy")
        index, ok, embeddings = [], [], []
        for batch in out.iter_batches(batch_size=4096, batch_format="numpy"):
            index.append(batch["index"])
            ok.append(batch["ok"])
            embeddings.append(batch["embedding"])
    except ray.exceptions.GetTimeoutError as exc:
        raise UserError(f"eval.device={cfg.eval.device}: no GPU for the {cfg.eval.num_actors} embedding actor(s) "
                        f"within eval.gpu_wait_seconds={cfg.eval.gpu_wait_seconds}; check that the cluster's GPU "
                        f"worker group can scale up (max replicas, quota), or set eval.device=cpu") from exc
    finally:
        context.wait_for_min_actors_s = saved_wait
    order = np.argsort(np.concatenate(index))
    features = torch.from_numpy(np.concatenate(embeddings)[order])
    return features, np.concatenate(ok)[order], len(images) / (time.perf_counter() - start)


# ---- the job ---------------------------------------------------------------------------------------


def configured_tokenizer(cfg: Config) -> Tokenizer | None:
    """The tokenizer the config names (``tokenizer.source`` path or openai_bpe); None for ``train``."""
    t = cfg.tokenizer
    if t.source == "path" and t.path:
        return load_tokenizer(t.path, cfg.storage.s3_endpoint)
    try:
        if t.source == "openai_bpe" and t.bpe_path:
            return Tokenizer.from_openai_bpe(t.bpe_path, t.context_length)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer named by the eval config (tokenizer.source={t.source}): "
                        f"{exc}") from exc
    return None


def expected_tokenizer_id(cfg: Config) -> str | None:
    """The tokenizer this eval config means: an explicit one, else the training data's (every data set of a
    mix has the same one: training checks it); None if unknown."""
    tokenizer = configured_tokenizer(cfg)
    if tokenizer is not None:
        return tokenizer.id
    manifest = DataManifest.read_if_present(cfg.train.sources()[0].path, cfg.storage.s3_endpoint)
    return manifest.tokenizer if manifest else None


def run_eval(cfg: Config, pending: bool = False, version: str | int | None = None, alias: str | None = None,
             claimant: str | None = None) -> EvalResult:
    """Evaluate pending versions, or one by number or alias; one outcome per version considered."""
    import mlflow

    from workflows.common.runtime import ensure_ray, set_env_defaults

    if sum([pending, version is not None, alias is not None]) != 1:
        raise UserError("choose exactly one of --pending, --version N, --alias A, --checkpoint PATH")
    from mlflow.exceptions import MlflowException

    set_env_defaults("eval")  # workflows.common.runtime.ENV_DEFAULTS: fail in seconds, not minutes, when down
    uri = tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)  # explicit everywhere: the process-wide tracking URI is left alone
    name = cfg.mlflow.registered_model
    try:
        if pending:
            targets, force = registry.pending_versions(client, name), False
        else:
            targets, force = [registry.resolve_version(client, name, version, alias)], True
    except MlflowException as exc:
        if exc.get_http_status_code() < 500:
            raise
        raise UserError(f"cannot reach the MLflow tracking server at {uri} ({str(exc)[:200]}); start it or set "
                        f"mlflow.tracking_uri / $MLFLOW_TRACKING_URI") from exc
    claimant = claimant or claims.claimant_id()
    expected = expected_tokenizer_id(cfg)
    result = EvalResult(name)
    if targets:
        ensure_ray()
    for mv in targets:
        if expected and mv.tags.get("tokenizer_id") and mv.tags["tokenizer_id"] != expected:
            result.outcomes.append(EvalOutcome("refused", mv.version, run_id=mv.run_id, reason=(
                f"tokenizer mismatch: version {mv.version} was trained with {mv.tags['tokenizer_id']}, the eval "
                f"config's tokenizer is {expected}; evaluate with the training config (same tokenizer settings)")))
            continue
        claim = registry.claim_version(client, name, mv.version, claimant, cfg.eval.lease_seconds, force=force)
        if claim is None:
            result.outcomes.append(EvalOutcome("skipped", mv.version, run_id=mv.run_id,
                                               reason="claimed or finished by another eval job"))
            continue
        log.info("%s v%s: claimed by %s", name, mv.version, claimant)
        result.outcomes.append(_evaluate_claimed(cfg, client, claim, mv))
    return result


def run_eval_checkpoint(cfg: Config, path: str) -> EvalResult:
    """`clipflow eval --checkpoint PATH`: a clipflow checkpoint directory or a pretrained weights file
    (``clip_core.load_pretrained``: ``model.name`` names its architecture, ``tokenizer`` its vocabulary),
    local or ``s3://``. No registry, claims or aliases; an eval run when a tracking server is configured
    (``mlflow.tracking_uri`` or ``$MLFLOW_TRACKING_URI``)."""
    import mlflow

    from workflows.common.runtime import ensure_ray

    model, tokenizer = _load_model(cfg, path)
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    client = mlflow.MlflowClient(uri) if uri else None
    ensure_ray()  # before the run exists: from its creation on, the run ends as what happens
    eval_run = None
    if client is not None:
        experiment = get_or_create_experiment(client, f"{cfg.mlflow.experiment}-eval")
        eval_run = client.create_run(experiment, run_name=f"eval-{storage.basename(path)}", tags={
            "clipflow.stage": "eval", "clipflow.checkpoint": path}).info.run_id
    try:
        metrics, num_classes, rate = _evaluate_model(cfg, model, tokenizer, client, eval_run)
    except BaseException as exc:  # ended as what happened (Ctrl-C: KILLED), then the error goes on
        if eval_run is not None:
            client.set_terminated(eval_run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if eval_run is not None:
        _log_results(client, eval_run, metrics, rate)
        client.set_terminated(eval_run, "FINISHED")
    log.info("%s: done, %s=%s", path, cfg.eval.primary_metric, metrics.get(cfg.eval.primary_metric))
    return EvalResult(cfg.mlflow.registered_model, [EvalOutcome(
        registry.DONE, checkpoint=path, metrics=metrics, num_classes=num_classes, eval_run_id=eval_run,
        images_per_second=rate)])


def _load_model(cfg: Config, path: str):
    """(model, tokenizer) from a checkpoint directory (its own tokenizer) or a weights file (the config's)."""
    endpoint = cfg.storage.s3_endpoint
    with tempfile.TemporaryDirectory(prefix="clipflow-eval-") as tmp:
        try:
            if storage.is_dir(path, endpoint):
                local = storage.download_tree(path, Path(tmp), endpoint) if storage.is_s3(path) else Path(path)
                checkpoint = load_checkpoint(local)
                return checkpoint.model.eval(), checkpoint.tokenizer
            if not storage.exists(path, endpoint):
                raise UserError(f"--checkpoint {path} does not exist")
            tokenizer = configured_tokenizer(cfg)
            if tokenizer is None:
                raise UserError(f"{path} is a weights file, which carries no tokenizer: set tokenizer.source="
                                f"openai_bpe and tokenizer.bpe_path (OpenAI's and OpenCLIP's models), or "
                                f"tokenizer.source=path")
            return load_pretrained(storage.local_copy(path, tmp, endpoint), cfg.model.name), tokenizer
        except (CheckpointError, ValueError, OSError) as exc:
            raise UserError(f"cannot load --checkpoint {path}: {exc}") from exc


def _evaluate_claimed(cfg: Config, client, claim: claims.Claim, mv) -> EvalOutcome:
    """Evaluate one claimed version; any failure ends it ``failed`` with the reason, never blocks others."""

    experiment = get_or_create_experiment(client, f"{cfg.mlflow.experiment}-eval")
    run = client.create_run(experiment, run_name=f"eval-{claim.name}-v{mv.version}", tags={
        "clipflow.stage": "eval", "clipflow.model_name": claim.name, "clipflow.model_version": mv.version,
        "clipflow.train_run_id": mv.run_id or "", "clipflow.step": mv.tags.get("step", ""),
        "clipflow.claimant": claim.claimant})
    eval_run = run.info.run_id
    outcome = EvalOutcome(registry.FAILED, mv.version, run_id=mv.run_id, eval_run_id=eval_run)
    try:
        # The lease is renewed on a timer for as long as this takes (a download and an embedding pass can
        # outlast eval.lease_seconds); a lost lease means another job may have the version now.
        with claims.kept_alive(lambda: registry.renew_version(claim), cfg.eval.lease_seconds / 3) as lost:
            with tempfile.TemporaryDirectory(prefix="clipflow-eval-") as tmp:
                checkpoint = load_checkpoint(registry.download_checkpoint(client, mv, Path(tmp)))
            tag = mv.tags.get("tokenizer_id")
            if tag and checkpoint.tokenizer.id != tag:
                raise CheckpointError(f"the checkpoint's tokenizer {checkpoint.tokenizer.id} differs from the "
                                      f"version's tokenizer_id tag {tag}")
            metrics, num_classes, rate = _evaluate_model(cfg, checkpoint.model.eval(), checkpoint.tokenizer, client,
                                                         eval_run)
    except KeyboardInterrupt:  # stopped: the version goes back to pending for the next job, the run ends KILLED
        client.set_terminated(eval_run, "KILLED")
        registry.finish_version(claim, registry.PENDING, "interrupted", eval_run_id=eval_run)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the version; the others go on
        outcome.reason = f"{type(exc).__name__}: {exc}"
        client.set_tag(eval_run, "clipflow.failure", outcome.reason[:registry.MAX_TAG_CHARS])
        client.set_terminated(eval_run, "FAILED")
        registry.finish_version(claim, registry.FAILED, outcome.reason, eval_run_id=eval_run)
        log.error("%s v%s: FAILED: %s", claim.name, mv.version, outcome.reason)
        return outcome
    if lost.is_set() or not claim.held():
        client.set_terminated(eval_run, "KILLED")
        outcome.status, outcome.reason = "skipped", "lease expired during eval and another job may have the version"
        return outcome
    _log_results(client, eval_run, metrics, rate, model_id=registry.logged_model_id(mv))
    client.set_terminated(eval_run, "FINISHED")
    if mv.run_id and mv.tags.get("step", "").isdigit():
        _chart_on_training_run(client, mv, metrics)
    registry.finish_version(claim, registry.DONE, eval_run_id=eval_run)
    primary = metrics.get(cfg.eval.primary_metric)
    aliases = registry.promote(client, claim.name, mv.version, mlflow_key(cfg.eval.primary_metric), primary)
    log.info("%s v%s: done, %s=%s (aliases: %s)", claim.name, mv.version, cfg.eval.primary_metric, primary,
             ", ".join(aliases) or "none")
    outcome.status, outcome.metrics, outcome.num_classes = registry.DONE, metrics, num_classes
    outcome.aliases, outcome.images_per_second = aliases, rate
    return outcome


def _evaluate_model(cfg: Config, model, tokenizer: Tokenizer, client,
                    eval_run: str | None) -> tuple[dict[str, float], int, float]:
    """All eval images in one Ray Data pass (one actor pool start), then metrics per dataset (their tables and
    figures logged to ``eval_run`` when there is one; the caller logs the metrics)."""
    import ray

    try:
        templates = load_templates(cfg.eval.templates or None)
    except (OSError, ValueError) as exc:
        raise UserError(f"eval.templates={cfg.eval.templates!r}: {exc}") from exc
    endpoint = cfg.storage.s3_endpoint
    sets = ([read_zeroshot_set(uri, endpoint, cfg.eval.classnames) for uri in cfg.eval.zeroshot]
            + [read_retrieval_set(uri, endpoint) for uri in cfg.eval.retrieval]
            + [read_linear_probe_set(uri, endpoint) for uri in cfg.eval.linear_probe])
    if not sets:
        raise UserError("no eval sets configured; set eval.zeroshot, eval.retrieval and/or eval.linear_probe")
    images = [image for data in sets for image in data.images]
    weights = ray.put((model.config.to_dict(), model.state_dict()))
    features, ok, rate = embed_images_ray(weights, images, cfg)
    metrics: dict[str, float] = {}
    num_classes, start = 0, 0
    for data in sets:
        rows = slice(start, start + len(data.images))
        start = rows.stop
        if isinstance(data, ZeroShotSet):
            result = zero_shot_result(model, tokenizer, data, features[rows], ok[rows], data.templates or templates)
            num_classes = num_classes or len(data.classnames)
        elif isinstance(data, RetrievalSet):
            result = retrieval_result(model, tokenizer, data, features[rows], ok[rows])
        else:  # a LinearProbeSet
            result = linear_probe_result(data, features[rows], ok[rows], cfg.eval)
        if eval_run is not None:
            log_dataset(client, eval_run, data.name, result)
        metrics.update({f"{data.name}/{k}": v for k, v in result.metrics.items()})
    return metrics, num_classes, rate


def _log_results(client, eval_run: str, metrics: dict[str, float], rate: float, model_id: str | None = None) -> None:
    """The eval run's metrics: the model's on the version's logged model too (``model_id``), the throughput
    on the run only (it measures the eval job, not the model)."""
    _log_metrics(client, eval_run, metrics, 0, model_id)
    _log_metrics(client, eval_run, {"images_per_second": rate}, 0)


def _chart_on_training_run(client, mv, metrics: dict[str, float]) -> None:
    """``eval/<metric>`` at the checkpoint's step in the training run: a convenience chart, so a server that
    refuses it (the k8s eval identity may read training runs, not write them) costs one line, not the result."""
    from mlflow.exceptions import MlflowException

    try:
        _log_metrics(client, mv.run_id, {f"eval/{k}": v for k, v in metrics.items()}, int(mv.tags["step"]))
    except MlflowException as exc:
        if exc.get_http_status_code() != 403:
            raise
        log.info("%s v%s: the eval/<metric> chart is not added to training run %s (this identity may not write "
                 "it); the results are on the version's logged model and eval run", mv.name, mv.version, mv.run_id)


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int, model_id: str | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, step, model_id=model_id)
                                      for k, v in metrics.items()])
