"""The CLI wrappers of the four stage commands: arguments, the stage's ``run_*`` call, its summary.

The stages themselves (``workflows.data``, ``workflows.train``, ``workflows.eval``) take a config and
return a result; presentation and wiring live here. Training gets its MLflow run from here too
(``TrainingTracking``): the training package knows no tracking server.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflows.common import storage
from workflows.common.config import REGISTERED_MODEL_URI, Config, absolute_path
from workflows.common.errors import EXIT_FAILED, EXIT_OK, UserError
from workflows.common.log import get_logger

if TYPE_CHECKING:
    from workflows.data.preprocess import PreprocessResult
    from workflows.eval.job import EvalResult
    from workflows.train.driver import TrainResult

log = get_logger("train")


class SampleData:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """No options beyond --config/--set (see the ``sample_data`` config section)."""

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        from workflows.data.sample_data import generate_sample_data

        summary = generate_sample_data(cfg.sample_data, endpoint=cfg.storage.s3_endpoint)
        print(format_sample_data(summary))
        return EXIT_OK


class Preprocess:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--force", action="store_true",
                            help="redo everything, ignoring finished shards and parts of an earlier run")

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        from workflows.data.preprocess import run_preprocess

        print(format_preprocess(run_preprocess(cfg, force=args.force)))
        return EXIT_OK


class Train:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--resume-from", default=None, metavar="CHECKPOINT",
                            help="continue from this checkpoint directory (local or s3://); "
                                 "= --set train.resume_from=...")
        parser.add_argument("--run-id", default=None, metavar="ID",
                            help="the run's stable name: the same command with the same run id continues the run "
                                 "from its latest checkpoint; = --set train.run_id=...")

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        if args.resume_from:
            cfg = replace(cfg, train=replace(cfg.train, resume_from=absolute_path(args.resume_from)))
        if args.run_id:
            cfg = with_run_id(cfg, args.run_id)
        print(format_train(train_with_tracking(cfg)))
        return EXIT_OK


def with_run_id(cfg: Config, run_id: str) -> Config:
    """``cfg`` with ``train.run_id`` set (``--run-id``), validated as a config value is."""
    train = replace(cfg.train, run_id=run_id)
    train.validate()
    return replace(cfg, train=train)


class Eval:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--pending", action="store_true", help="evaluate every version whose eval_status is pending")
        which.add_argument("--version", default=None, help="evaluate this version of mlflow.registered_model")
        which.add_argument("--alias", default=None, help="evaluate the version with this alias (e.g. champion)")
        which.add_argument("--checkpoint", default=None, metavar="PATH",
                           help="evaluate a checkpoint directory or pretrained weights file (local or s3://), "
                                "without the registry")

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        from workflows.eval.job import run_eval, run_eval_checkpoint
        from workflows.tracking import registry

        if args.checkpoint:
            result = run_eval_checkpoint(cfg, args.checkpoint)
        else:
            result = run_eval(cfg, pending=args.pending, version=args.version, alias=args.alias)
        print(format_eval(result))
        refused = result.with_status("refused")
        if refused:
            raise UserError(refused[0].reason)
        return EXIT_FAILED if result.with_status(registry.FAILED) else EXIT_OK


class Sync:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("path", metavar="RUN_OR_SPOOL_DIR",
                            help="the run's directory (storage.path/<run name>, local or s3://) or its mlflow-spool/, "
                                 "as the message that asked for this command named it")

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        from workflows.tracking.sync import sync

        result = sync(args.path, cfg)
        if not result.run_id:
            print(f"clipflow sync: nothing pending in {result.spool}")
            return EXIT_OK
        versions = ", ".join(f"v{v} (step {step})" for step, v in sorted(result.versions.items())) or "none"
        print(f"clipflow sync: run {result.run_id}: {result.metric_points} metric points delivered; versions {versions}"
              + (f"; ended {result.status}" if result.status else ""))
        return EXIT_OK


def train_with_tracking(cfg: Config) -> TrainResult:
    """`clipflow train`: the training stage with its MLflow run (what the CLI and the demo run)."""
    from workflows.tracking.tracker import TrainingTracking
    from workflows.train.driver import run_training

    requested = cfg.model.pretrained  # what checkpoints record: a models:/ URI resolves to another path over time
    cfg = resolve_pretrained(cfg)  # first: the run's params record the checkpoint it starts from
    return run_training(cfg, run_log=TrainingTracking.for_config(cfg), pretrained=requested)


def resolve_pretrained(cfg: Config) -> Config:
    """``cfg`` with a registered version in ``model.pretrained`` (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``) replaced by a checkpoint directory training can read (training knows no
    registry): the one the version was published from (its ``checkpoint_uri`` tag) while it exists, else,
    once Ray Train has rotated it away, a copy of the version's own checkpoint in storage.path/pretrained/."""
    from clip_core.checkpoint import MANIFEST
    from workflows.artifacts import CheckpointInfo
    from workflows.tracking import registry
    from workflows.tracking.run import client_for

    uri, endpoint = cfg.model.pretrained, cfg.storage.s3_endpoint
    if not uri.startswith(REGISTERED_MODEL_URI):
        return cfg
    parsed = re.fullmatch(r"([^/@]+)(?:@([^/@]+)|/(\d+))", uri[len(REGISTERED_MODEL_URI):])
    if parsed is None:
        raise UserError(f"model.pretrained {uri} is not models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = parsed.groups()
    client = client_for(cfg)
    mv = registry.resolve_version(client, name, version, alias)
    checkpoint = mv.tags.get("checkpoint_uri", "")
    if not (checkpoint and CheckpointInfo.is_complete(checkpoint, endpoint)):
        checkpoint = storage.join(cfg.storage.path, "pretrained", f"{name}-v{mv.version}")
        if not CheckpointInfo.is_complete(checkpoint, endpoint):
            with tempfile.TemporaryDirectory(prefix="clipflow-pretrained-") as tmp:
                local = registry.download_checkpoint(client, mv, Path(tmp))
                # the file list last: a copy cut short is not complete, and is copied again next time
                for path in sorted(local.rglob("*"), key=lambda p: p.name == MANIFEST):
                    if path.is_file():
                        storage.write_bytes(storage.join(checkpoint, str(path.relative_to(local))),
                                            path.read_bytes(), endpoint)
    log.info(f"model.pretrained {uri}: version {mv.version}, checkpoint {checkpoint}")
    return replace(cfg, model=replace(cfg.model, pretrained=checkpoint))


def format_sample_data(summary: dict[str, Any]) -> str:
    rejects = ", ".join(f"{k}={v}" for k, v in summary["expected_rejects"].items()) or "none"
    return "\n".join([
        "=" * 72,
        f"sample data: {summary['output']}  ({summary['seconds']:.1f} s)",
        f"  train         {summary['train_samples']:,} samples in {len(summary['train_shards'])} tar shard(s)",
        f"  bad samples   {rejects}; duplicates={summary['expected_duplicates']}",
        f"  zero-shot     {summary['zeroshot_images']} images, {len(summary['zeroshot_classes'])} classes: "
        f"{', '.join(summary['zeroshot_classes'])}",
        f"  retrieval     {summary['retrieval_images']} images with captions",
        f"next: clipflow preprocess   (inputs {storage.join(summary['output'], 'raw', '*.tar')})",
        "=" * 72,
    ])


def format_preprocess(result: PreprocessResult) -> str:
    m = result.manifest
    counts = m.counts
    width = shutil.get_terminal_size((80, 20)).columns
    lines = ["=" * min(width, 72), f"preprocess: {result.output}"]
    if result.up_to_date:
        lines.append("  already up to date (same inputs and config): nothing to do")
    lines += [
        f"  input samples   {counts['input']:>10,}",
        f"  written         {counts['written']:>10,}  in {len(m.shards)} shard(s), "
        f"{m.extra['bytes'] / 1e6:,.1f} MB",
        f"  duplicates      {counts['duplicates']:>10,}",
        f"  rejected        {sum(counts['rejected'].values()):>10,}",
    ]
    lines += [f"    {reason:<22}{n:>8,}" for reason, n in counts["rejected"].items()]
    lines.append(f"  tokenizer       {m.tokenizer} (vocab {m.extra['vocab_size']}, context {m.context_length})")
    if not result.up_to_date:
        lines.append(f"  throughput      {result.samples_per_second:,.0f} samples/s "
                     f"({result.process_seconds:.1f} s processing, {result.wall_seconds:.1f} s total)")
        lines.append("  stages          " + ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_seconds.items()))
        if result.parts_reused or result.shards_reused:
            lines.append(f"  resumed         {result.parts_reused} source part(s) and "
                         f"{result.shards_reused} shard(s) reused from an interrupted run")
    lines.append("=" * min(width, 72))
    return "\n".join(lines)


def format_train(r: TrainResult) -> str:
    if r.already_finished:
        return "\n".join([
            "", "=== clipflow train: summary ===",
            f"run         {r.run_name} had already finished: nothing trained now",
            f"trained     {r.steps} steps, {r.samples_seen} samples, final loss {r.final_loss:.4f}",
            f"checkpoint  {r.checkpoint_uri}",
            f"mlflow run  {r.mlflow_run_id or '(none)'}",
            "next        raise train.max_steps (or train.epochs) to train it further, or choose another "
            "train.run_id (--run-id) for a new run",
        ])
    return "\n".join([
        "", "=== clipflow train: summary ===",
        f"run         {r.run_name} ({r.world_size} workers at the end)",
        f"trained     {r.steps} steps, {r.samples_seen} samples, final loss {r.final_loss:.4f}",
        f"throughput  {r.samples_per_second:.1f} samples/s; wall {r.wall_seconds:.0f} s",
        f"checkpoint  {r.checkpoint_uri}",
        f"mlflow run  {r.mlflow_run_id or '(none)'}",
    ])


def format_eval(result: EvalResult) -> str:
    from workflows.tracking import registry

    lines = ["", f"=== clipflow eval: {result.registered_model} ==="]
    if not result.outcomes:
        lines.append("no pending versions")
    for r in result.outcomes:
        target = f"v{r.version}" if r.version is not None else r.checkpoint
        if r.status == registry.DONE:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r.metrics.items())
                              if k.split("/")[-1] in ("acc1", "acc5", "image_retrieval_recall@1",
                                                      "text_retrieval_recall@1", "lp_acc1"))
            lines.append(f"{target}  done     {shown}; {r.images_per_second:.0f} images/s; "
                         f"aliases: {', '.join(r.aliases) or 'none'}")
        else:
            lines.append(f"{target}  {r.status:<8} {r.reason}")
    return "\n".join(lines)
