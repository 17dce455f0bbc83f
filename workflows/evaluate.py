"""`clipflow eval`: zero-shot classification and image-text retrieval of registered model versions.

What a RayJob or CronJob runs. ``--pending`` evaluates every version whose ``eval_status`` is
pending (or whose claimant's lease expired); ``--version N`` / ``--alias A`` evaluates one. Each
version is claimed atomically first (``workflows.registry``), so concurrent jobs never evaluate the
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

Eval sets (``clipflow sample-data`` writes both): ImageFolder ``<dir>/<class>/<image>`` with an
optional ``classnames.txt`` (line i names the i-th class folder in sorted order), and retrieval
``<dir>/captions.jsonl`` lines ``{"image": "images/x.jpg", "captions": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_core import (CLIP, CheckpointError, ImageDecodeError, Tokenizer, build_zero_shot_classifier,
                       classification_metrics, load_checkpoint, load_templates, retrieval_metrics)
from workflows import registry, storage
from workflows.config import Config
from workflows.errors import EXIT_FAILED, EXIT_OK, UserError
from workflows.log import get_logger
from workflows.serving import embed_images, embed_texts, images_to_tensor, model_image_size
from workflows.tokenizer_io import load_tokenizer
from workflows.tracking import get_or_create_experiment, mlflow_key, tracking_uri

log = get_logger("eval")


# ---- eval sets -------------------------------------------------------------------------------------


@dataclass
class ZeroShotSet:
    name: str
    classnames: list[str]
    images: list[str]  # URIs
    labels: list[int]


@dataclass
class RetrievalSet:
    name: str
    images: list[str]
    captions: list[str]
    text_to_image: list[int]


def dataset_name(uri: str) -> str:
    return storage.basename(uri)


def read_zeroshot_set(uri: str, endpoint: str = "") -> ZeroShotSet:
    root = uri.rstrip("/")
    files = storage.list_files(root, endpoint, recursive=True)
    by_class: dict[str, list[str]] = {}
    for file in files:
        parts = file[len(root) + 1:].split("/")
        if len(parts) == 2 and not parts[1].startswith("."):
            by_class.setdefault(parts[0], []).append(file)
    if not by_class:
        raise UserError(f"zero-shot eval set {uri} has no <class>/<image> files (ImageFolder layout); "
                        f"run `clipflow sample-data` or fix eval.zeroshot")
    folders = sorted(by_class)
    names_uri = storage.join(root, "classnames.txt")
    if storage.exists(names_uri, endpoint):
        classnames = [line.strip() for line in storage.read_bytes(names_uri, endpoint).decode().splitlines()
                      if line.strip()]
        if len(classnames) != len(folders):
            raise UserError(f"{names_uri} names {len(classnames)} classes but {uri} has {len(folders)} class "
                            f"folders; line i must name the i-th folder in sorted order")
    else:
        classnames = [f.replace("_", " ") for f in folders]
    images, labels = [], []
    for label, folder in enumerate(folders):
        for file in sorted(by_class[folder]):
            images.append(file)
            labels.append(label)
    return ZeroShotSet(dataset_name(uri), classnames, images, labels)


def read_retrieval_set(uri: str, endpoint: str = "") -> RetrievalSet:
    root = uri.rstrip("/")
    index = storage.join(root, "captions.jsonl")
    if not storage.exists(index, endpoint):
        raise UserError(f"retrieval eval set {uri} has no captions.jsonl; run `clipflow sample-data` or fix "
                        f"eval.retrieval")
    images, captions, text_to_image = [], [], []
    for n, line in enumerate(storage.read_bytes(index, endpoint).decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, texts = item["image"], list(item["captions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} line {n}: expected {{\"image\": ..., \"captions\": [...]}} ({exc})") from exc
        for text in texts:
            captions.append(str(text))
            text_to_image.append(len(images))
        images.append(storage.join(root, image))
    if not images or not captions:
        raise UserError(f"{index} lists no image with captions")
    return RetrievalSet(dataset_name(uri), images, captions, text_to_image)


# ---- image embeddings ------------------------------------------------------------------------------


def _read_pixels(uris: list[str], image_size: int, endpoint: str) -> tuple[torch.Tensor, np.ndarray]:
    """Decoded images and an ok-mask: an unreadable eval image is counted, not fatal."""
    ok = np.ones(len(uris), dtype=bool)
    pixels = []
    for i, uri in enumerate(uris):
        try:
            pixels.append(images_to_tensor([storage.read_bytes(uri, endpoint)], image_size)[0])
        except (OSError, ImageDecodeError):
            ok[i] = False
            pixels.append(torch.zeros(3, image_size, image_size, dtype=torch.uint8))
    return torch.stack(pixels), ok


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
        pixels, ok = _read_pixels(list(batch["uri"]), model_image_size(self.model), self.endpoint)
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


def embed_images_local(model: CLIP, uris: list[str], cfg: Config, device: str | torch.device = "cpu"):
    """The same in-process (training's periodic eval, and the benchmark's baseline)."""
    start = time.perf_counter()
    features, oks = [], []
    for i in range(0, len(uris), cfg.eval.batch_size):
        pixels, ok = _read_pixels(uris[i:i + cfg.eval.batch_size], model_image_size(model), cfg.storage.s3_endpoint)
        features.append(embed_images(model, pixels, device))
        oks.append(ok)
    return torch.cat(features), np.concatenate(oks), len(uris) / (time.perf_counter() - start)


# ---- metrics ---------------------------------------------------------------------------------------


@dataclass
class DatasetResult:
    metrics: dict[str, float]
    per_class: list[tuple[str, float | None, int]] = field(default_factory=list)  # (class, recall, support)
    confusion: list[list[int]] | None = None
    classnames: list[str] = field(default_factory=list)


def zero_shot_result(model: CLIP, tokenizer: Tokenizer, data: ZeroShotSet, features: torch.Tensor, ok: np.ndarray,
                     templates: list[str], device: str | torch.device = "cpu") -> DatasetResult:
    classifier = build_zero_shot_classifier(model, tokenizer, data.classnames, templates, device=device).cpu()
    keep = torch.from_numpy(ok)
    if not keep.any():
        raise UserError(f"no image of eval set {data.name} could be read")
    targets = torch.tensor(data.labels)[keep]
    m = classification_metrics(features[keep] @ classifier, targets)
    support = torch.bincount(targets, minlength=len(data.classnames)).tolist()
    metrics = {"acc1": m["acc1"], "acc5": m["acc5"], "mean_per_class_recall": m["mean_per_class_recall"],
               "images": float(keep.sum()), "unreadable_images": float((~keep).sum())}
    return DatasetResult(metrics, list(zip(data.classnames, m["per_class_recall"], support)), m["confusion_matrix"],
                         data.classnames)


def retrieval_result(model: CLIP, tokenizer: Tokenizer, data: RetrievalSet, features: torch.Tensor, ok: np.ndarray,
                     device: str | torch.device = "cpu") -> DatasetResult:
    """Unreadable images are masked out of the ranking but stay in the denominators: a broken eval
    image counts as a miss rather than making the task easier."""
    texts = embed_texts(model, tokenizer, data.captions, device)
    m = retrieval_metrics(features, texts, torch.tensor(data.text_to_image), image_ok=torch.from_numpy(ok))
    return DatasetResult({**m, "images": float(ok.sum()), "unreadable_images": float((~ok).sum())})


def zero_shot_in_process(model: CLIP, tokenizer: Tokenizer, cfg: Config,
                         device: str | torch.device = "cpu") -> dict[str, float]:
    """Zero-shot metrics of a model in memory, without Ray Data: for training's ``zero_shot_every``.

    Returns ``{"<dataset>/acc1": ..., "<dataset>/acc5": ..., "<dataset>/mean_per_class_recall": ...}``
    for every ``eval.zeroshot`` set. The caller switches the model to eval mode and back.
    """
    templates = load_templates(cfg.eval.templates or None)
    out: dict[str, float] = {}
    with torch.no_grad():
        for uri in cfg.eval.zeroshot:
            data = read_zeroshot_set(uri, cfg.storage.s3_endpoint)
            features, ok, _ = embed_images_local(model, data.images, cfg, device)
            result = zero_shot_result(model, tokenizer, data, features, ok, templates, device)
            out.update({f"{data.name}/{k}": v for k, v in result.metrics.items()
                        if k in ("acc1", "acc5", "mean_per_class_recall")})
    return out


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
    manifest = storage.join(cfg.train.data, "manifest.json")
    if storage.exists(manifest, cfg.storage.s3_endpoint):
        return json.loads(storage.read_bytes(manifest, cfg.storage.s3_endpoint)).get("tokenizer")
    return None


def run_eval(cfg: Config, pending: bool = False, version: str | int | None = None, alias: str | None = None,
             claimant: str | None = None) -> list[dict[str, Any]]:
    """Evaluate pending versions, or one by number or alias; one result dict per version considered.

    Result keys: ``version``, ``status`` (done | failed | skipped | refused), ``reason``, ``metrics``
    (``<dataset>/<metric>``), ``num_classes``, ``aliases``, ``run_id`` (the training run),
    ``eval_run_id``, ``images_per_second``.
    """
    import mlflow

    from workflows.local_services import ensure_ray

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
    claimant = claimant or registry.claimant_id()
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


def _evaluate_claimed(cfg: Config, client, claim: registry.Claim, mv) -> dict[str, Any]:
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


def _evaluate_model(cfg: Config, client, claim: registry.Claim, checkpoint, eval_run: str):
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
    registry.renew(claim)
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
        _log_dataset(client, eval_run, data.name, result)
        metrics.update({f"{data.name}/{k}": v for k, v in result.metrics.items()})
    _log_metrics(client, eval_run, {**metrics, "images_per_second": rate}, 0)
    return metrics, num_classes, rate


def _log_dataset(client, run_id: str, name: str, result: DatasetResult) -> None:
    """Per-class accuracy table and confusion-matrix image of a classification set."""
    if not result.per_class:
        return
    import pandas as pd

    table = pd.DataFrame(result.per_class, columns=["class", "recall", "support"])
    client.log_table(run_id, data=table, artifact_file=f"{name}/per_class_accuracy.json")
    client.log_figure(run_id, confusion_figure(result.confusion, result.classnames, name),
                      f"{name}/confusion_matrix.png")


def confusion_figure(confusion: list[list[int]], classnames: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 2 + 0.5 * n))
    ax.imshow(np.asarray(confusion), cmap="Blues")
    ax.set_xticks(range(n), classnames, rotation=90)
    ax.set_yticks(range(n), classnames)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}: confusion matrix")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()])


# ---- CLI -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pending", action="store_true", help="evaluate every version whose eval_status is pending")
    which.add_argument("--version", default=None, help="evaluate this version of mlflow.registered_model")
    which.add_argument("--alias", default=None, help="evaluate the version with this alias (e.g. champion)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    results = run_eval(cfg, pending=args.pending, version=args.version, alias=args.alias)
    print(format_summary(cfg, results))
    refused = [r for r in results if r["status"] == "refused"]
    if refused:
        raise UserError(refused[0]["reason"])
    return EXIT_FAILED if any(r["status"] == registry.FAILED for r in results) else EXIT_OK


def format_summary(cfg: Config, results: list[dict[str, Any]]) -> str:
    lines = ["", f"=== clipflow eval: {cfg.mlflow.registered_model} ==="]
    if not results:
        lines.append("no pending versions")
    for r in results:
        if r["status"] == registry.DONE:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["metrics"].items())
                              if k.split("/")[-1] in ("acc1", "acc5", "image_retrieval_recall@1",
                                                      "text_retrieval_recall@1"))
            lines.append(f"v{r['version']}  done     {shown}; {r['images_per_second']:.0f} images/s; "
                         f"aliases: {', '.join(r['aliases']) or 'none'}")
        else:
            lines.append(f"v{r['version']}  {r['status']:<8} {r['reason']}")
    return "\n".join(lines)
