"""`clipflow eval`: zero-shot classification and image-text retrieval of registered model versions.

What a RayJob or CronJob runs. ``--pending`` evaluates every version whose ``eval_status`` is
pending (or whose claimant's lease expired); ``--version N`` / ``--alias A`` evaluates one. Each
version is claimed atomically first (``workflows.tracking.claims``), so concurrent jobs never evaluate the
same version. Image embeddings are computed through Ray Data (``map_batches`` on an actor pool, a GPU
per actor when the cluster has them), so large eval sets scale out; class prompts and captions are
few and are embedded on the driver.

Results: an eval run (experiment ``<mlflow.experiment>-eval``) tagged with the model version, holding
metrics per dataset with CLIP_benchmark's names (``<dataset>/acc1``, ``<dataset>/acc5``,
``<dataset>/mean_per_class_recall``, ``<dataset>/image_retrieval_recall@k``,
``<dataset>/text_retrieval_recall@k``), a per-class accuracy table and a confusion-matrix image;
(in MLflow "@" is spelled "_at_": ``image_retrieval_recall_at_1``);
the same metrics as ``eval/<dataset>/<metric>`` at the checkpoint's step in the training run (a
"zero-shot accuracy vs step" chart); summary tags on the version; status done or failed (with the
reason); then the ``latest-evaluated`` and (if the primary metric improved) ``champion`` aliases.

The eval sets' formats and the scoring are ``workflows.data.eval_sets``'s, shared with training.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_core import CheckpointError, Tokenizer, load_checkpoint, load_templates
from clip_core.embed import embed_images, model_image_size
from workflows.artifacts import DataManifest
from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.common.log import get_logger
from workflows.data.eval_sets import (ZeroShotSet, read_pixels, read_retrieval_set, read_zeroshot_set, retrieval_result,
                                      zero_shot_result)
from workflows.data.tokenizer_io import load_tokenizer
from workflows.eval.plots import log_dataset
from workflows.tracking import claims, registry
from workflows.tracking.client import get_or_create_experiment, mlflow_key, tracking_uri

log = get_logger("eval")


# ---- image embeddings on a Ray Data actor pool ----------------------------------------------------


class ImageEmbedder:
    """A Ray Data actor: builds the model once from the object store, embeds batches of image URIs."""

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
        pixels, ok = read_pixels(list(batch["uri"]), model_image_size(self.model), self.endpoint)
        return {"index": batch["index"], "ok": ok, "embedding": embed_images(self.model, pixels, self.device).numpy()}


def embed_images_ray(weights_ref, uris: list[str], cfg: Config) -> tuple[torch.Tensor, np.ndarray, float]:
    """(N, D) embeddings in input order, ok-mask, images/s -- through Ray Data on an actor pool."""
    import ray

    start = time.perf_counter()
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    ds = ray.data.from_items([{"index": i, "uri": u} for i, u in enumerate(uris)])
    out = ds.map_batches(ImageEmbedder, fn_constructor_kwargs={"weights": weights_ref,
                                                                "endpoint": cfg.storage.s3_endpoint},
                         compute=ray.data.ActorPoolStrategy(size=cfg.eval.num_actors),
                         batch_size=cfg.eval.batch_size, num_gpus=gpus, batch_format="numpy")
    index, ok, embeddings = [], [], []
    for batch in out.iter_batches(batch_size=4096, batch_format="numpy"):
        index.append(batch["index"])
        ok.append(batch["ok"])
        embeddings.append(batch["embedding"])
    order = np.argsort(np.concatenate(index))
    features = torch.from_numpy(np.concatenate(embeddings)[order])
    return features, np.concatenate(ok)[order], len(uris) / (time.perf_counter() - start)


# ---- the job ---------------------------------------------------------------------------------------


def expected_tokenizer_id(cfg: Config) -> str | None:
    """The tokenizer this eval config means: an explicit one, else the training data's; None if unknown."""
    t = cfg.tokenizer
    if t.source == "path" and t.path:
        return load_tokenizer(t.path, cfg.storage.s3_endpoint).id
    try:
        if t.source == "openai_bpe" and t.bpe_path:
            return Tokenizer.from_openai_bpe(t.bpe_path, t.context_length).id
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer named by the eval config (tokenizer.source={t.source}): "
                        f"{exc}") from exc
    manifest = DataManifest.read_if_present(cfg.train.data, cfg.storage.s3_endpoint)
    return manifest.tokenizer if manifest else None


def run_eval(cfg: Config, pending: bool = False, version: str | int | None = None, alias: str | None = None,
             claimant: str | None = None) -> list[dict[str, Any]]:
    """Evaluate pending versions, or one by number or alias; one result dict per version considered.

    Result keys: ``version``, ``status`` (done | failed | skipped | refused), ``reason``, ``metrics``
    (``<dataset>/<metric>``), ``num_classes``, ``aliases``, ``run_id`` (the training run),
    ``eval_run_id``, ``images_per_second``.
    """
    import mlflow

    from workflows.common.runtime import ensure_ray

    if sum([pending, version is not None, alias is not None]) != 1:
        raise UserError("choose exactly one of --pending, --version N, --alias A")
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # fail in seconds, not minutes, when down
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
    results = []
    if targets:
        ensure_ray()
    for mv in targets:
        result = {"version": mv.version, "run_id": mv.run_id, "metrics": {}, "aliases": [], "reason": ""}
        if expected and mv.tags.get("tokenizer_id") and mv.tags["tokenizer_id"] != expected:
            results.append({**result, "status": "refused", "reason": (
                f"tokenizer mismatch: version {mv.version} was trained with {mv.tags['tokenizer_id']}, the eval "
                f"config's tokenizer is {expected}; evaluate with the training config (same tokenizer settings)")})
            continue
        claim = registry.claim_version(client, name, mv.version, claimant, cfg.eval.lease_seconds, force=force)
        if claim is None:
            results.append({**result, "status": "skipped", "reason": "claimed or finished by another eval job"})
            continue
        log.info("%s v%s: claimed by %s", name, mv.version, claimant)
        results.append({**result, **_evaluate_claimed(cfg, client, claim, mv)})
    return results


def _evaluate_claimed(cfg: Config, client, claim: claims.Claim, mv) -> dict[str, Any]:
    """Evaluate one claimed version; any failure ends it ``failed`` with the reason, never blocks others."""

    experiment = get_or_create_experiment(client, f"{cfg.mlflow.experiment}-eval")
    run = client.create_run(experiment, run_name=f"eval-{claim.name}-v{mv.version}", tags={
        "clipflow.stage": "eval", "clipflow.model_name": claim.name, "clipflow.model_version": mv.version,
        "clipflow.train_run_id": mv.run_id or "", "clipflow.step": mv.tags.get("step", ""),
        "clipflow.claimant": claim.claimant})
    eval_run = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="clipflow-eval-") as tmp:
            checkpoint = load_checkpoint(registry.download_checkpoint(client, mv, Path(tmp)))
        tag = mv.tags.get("tokenizer_id")
        if tag and checkpoint.tokenizer.id != tag:
            raise CheckpointError(f"the checkpoint's tokenizer {checkpoint.tokenizer.id} differs from the version's "
                                  f"tokenizer_id tag {tag}")
        metrics, num_classes, rate = _evaluate_model(cfg, client, claim, checkpoint, eval_run)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded on the version; the others go on
        reason = f"{type(exc).__name__}: {exc}"
        client.set_tag(eval_run, "clipflow.failure", reason[:registry.MAX_TAG_CHARS])
        client.set_terminated(eval_run, "FAILED")
        registry.finish_version(claim, registry.FAILED, reason, eval_run_id=eval_run)
        log.error("%s v%s: FAILED: %s", claim.name, mv.version, reason)
        return {"status": registry.FAILED, "reason": reason, "eval_run_id": eval_run}
    if not claim.held():
        client.set_terminated(eval_run, "KILLED")
        return {"status": "skipped", "reason": "lease expired during eval and another job reclaimed the version",
                "eval_run_id": eval_run}
    client.set_terminated(eval_run, "FINISHED")
    if mv.run_id and mv.tags.get("step", "").isdigit():
        _log_metrics(client, mv.run_id, {f"eval/{k}": v for k, v in metrics.items()}, int(mv.tags["step"]))
    registry.finish_version(claim, registry.DONE, summary={mlflow_key(k): v for k, v in metrics.items()},
                            eval_run_id=eval_run)
    primary = metrics.get(cfg.eval.primary_metric)
    aliases = registry.promote(client, claim.name, mv.version, mlflow_key(cfg.eval.primary_metric), primary)
    log.info("%s v%s: done, %s=%s (aliases: %s)", claim.name, mv.version, cfg.eval.primary_metric, primary,
             ", ".join(aliases) or "none")
    return {"status": registry.DONE, "metrics": metrics, "num_classes": num_classes, "aliases": aliases,
            "eval_run_id": eval_run, "images_per_second": rate}


def _evaluate_model(cfg: Config, client, claim: claims.Claim, checkpoint, eval_run: str):
    """All eval images in one Ray Data pass (one actor pool start), then metrics per dataset."""
    import ray

    model, tokenizer = checkpoint.model.eval(), checkpoint.tokenizer
    templates = load_templates(cfg.eval.templates or None)
    endpoint = cfg.storage.s3_endpoint
    sets = ([read_zeroshot_set(uri, endpoint) for uri in cfg.eval.zeroshot]
            + [read_retrieval_set(uri, endpoint) for uri in cfg.eval.retrieval])
    if not sets:
        raise UserError("no eval sets configured; set eval.zeroshot and/or eval.retrieval")
    uris = [uri for data in sets for uri in data.images]
    weights = ray.put((model.config.to_dict(), model.state_dict()))
    features, ok, rate = embed_images_ray(weights, uris, cfg)
    registry.renew_version(claim)
    metrics: dict[str, float] = {}
    num_classes, start = 0, 0
    for data in sets:
        rows = slice(start, start + len(data.images))
        start = rows.stop
        if isinstance(data, ZeroShotSet):
            result = zero_shot_result(model, tokenizer, data, features[rows], ok[rows], templates)
            num_classes = num_classes or len(data.classnames)
        else:
            result = retrieval_result(model, tokenizer, data, features[rows], ok[rows])
        log_dataset(client, eval_run, data.name, result)
        metrics.update({f"{data.name}/{k}": v for k, v in result.metrics.items()})
    _log_metrics(client, eval_run, {**metrics, "images_per_second": rate}, 0)
    return metrics, num_classes, rate


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()])


# ---- CLI -------------------------------------------------------------------------------------------


