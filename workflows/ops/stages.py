"""The CLI wrappers of the four stage commands: arguments, the stage's ``run_*`` call, its summary.

The stages themselves (``workflows.data``, ``workflows.train``, ``workflows.eval``) take a config and
return a result; presentation and wiring live here. Training gets its MLflow run from here too
(``TrainingTracking``): the training package knows no tracking server.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from workflows.common import storage
from workflows.common.config import Config
from workflows.common.errors import EXIT_FAILED, EXIT_OK, UserError

if TYPE_CHECKING:
    from workflows.train.driver import TrainResult


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

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        if args.resume_from:
            cfg = replace(cfg, train=replace(cfg.train, resume_from=args.resume_from))
        print(format_train(train_with_tracking(cfg)))
        return EXIT_OK


class Eval:

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--pending", action="store_true", help="evaluate every version whose eval_status is pending")
        which.add_argument("--version", default=None, help="evaluate this version of mlflow.registered_model")
        which.add_argument("--alias", default=None, help="evaluate the version with this alias (e.g. champion)")

    @staticmethod
    def main(cfg: Config, args: argparse.Namespace) -> int:
        from workflows.eval.job import run_eval
        from workflows.tracking import registry

        results = run_eval(cfg, pending=args.pending, version=args.version, alias=args.alias)
        print(format_eval(cfg, results))
        refused = [r for r in results if r["status"] == "refused"]
        if refused:
            raise UserError(refused[0]["reason"])
        return EXIT_FAILED if any(r["status"] == registry.FAILED for r in results) else EXIT_OK


def train_with_tracking(cfg: Config) -> TrainResult:
    """`clipflow train`: the training stage with its MLflow run (what the CLI and the demo run)."""
    from workflows.tracking.client import TrainingTracking
    from workflows.train.driver import run_training

    return run_training(cfg, run_log=TrainingTracking.for_config(cfg))


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


def format_preprocess(result: dict[str, Any]) -> str:
    counts, run = result["counts"], result.get("run", {})
    width = shutil.get_terminal_size((80, 20)).columns
    lines = ["=" * min(width, 72), f"preprocess: {run.get('output', '')}"]
    if run.get("up_to_date"):
        lines.append("  already up to date (same inputs and config): nothing to do")
    lines += [
        f"  input samples   {counts['input']:>10,}",
        f"  written         {counts['written']:>10,}  in {len(result['shards'])} shard(s), "
        f"{result['bytes'] / 1e6:,.1f} MB",
        f"  duplicates      {counts['duplicates']:>10,}",
        f"  rejected        {sum(counts['rejected'].values()):>10,}",
    ]
    lines += [f"    {reason:<22}{n:>8,}" for reason, n in counts["rejected"].items()]
    lines.append(f"  tokenizer       {result['tokenizer']} (vocab {result['vocab_size']}, "
                 f"context {result['context_length']})")
    if not run.get("up_to_date") and run:
        lines.append(f"  throughput      {run['samples_per_second']:,.0f} samples/s "
                     f"({run['process_seconds']:.1f} s processing, {run['wall_seconds']:.1f} s total)")
        if run["parts_reused"] or run["shards_reused"]:
            lines.append(f"  resumed         {run['parts_reused']} source part(s) and "
                         f"{run['shards_reused']} shard(s) reused from an interrupted run")
    lines.append("=" * min(width, 72))
    return "\n".join(lines)


def format_train(r: TrainResult) -> str:
    return "\n".join([
        "", "=== clipflow train: summary ===",
        f"run         {r.run_name} ({r.world_size} workers at the end)",
        f"trained     {r.steps} steps, {r.samples_seen} samples, final loss {r.final_loss:.4f}",
        f"throughput  {r.samples_per_second:.1f} samples/s; wall {r.wall_seconds:.0f} s",
        f"checkpoint  {r.checkpoint_uri}",
        f"mlflow run  {r.mlflow_run_id or '(none)'}",
    ])


def format_eval(cfg: Config, results: list[dict[str, Any]]) -> str:
    from workflows.tracking import registry

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
