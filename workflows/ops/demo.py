"""`clipflow demo`: the whole workflow on one machine, through the same code paths as the cluster.

sample data (if absent) -> preprocess -> train (2 CPU workers) -> register -> eval, with a local Ray
runtime and a real ``mlflow server`` on loopback (SQLite store under ``home``) unless
``$MLFLOW_TRACKING_URI`` points elsewhere. Ends with a one-screen summary and ``demo-summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflows.common.config import Config
from workflows.common.errors import UserError
from workflows.common.log import get_logger
from workflows.common.runtime import ensure_ray
from workflows.ops.local_mlflow import LocalMlflowServer

if TYPE_CHECKING:
    from workflows.eval.job import EvalOutcome, EvalResult

log = get_logger("demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", default=None,
                        help="directory for data, MLflow store and results (default: ./.clipflow)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    summary = run_demo(cfg)
    print_summary(summary)
    return 0


def run_demo(cfg: Config) -> dict[str, Any]:
    """Run every stage; return the summary (also written to ``<home>/demo-summary.json``)."""
    from workflows.data.preprocess import run_preprocess
    from workflows.data.sample_data import generate_sample_data
    from workflows.eval.job import run_eval
    from workflows.ops.stages import train_with_tracking

    if "://" in cfg.home:
        raise UserError(f"the demo runs on local files; home must be a local directory, got {cfg.home!r}")
    start = time.monotonic()
    home = Path(cfg.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    log.info("clipflow demo: home %s", home)

    with ExitStack() as stack:
        server: LocalMlflowServer | None = None
        uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            log.info("starting MLflow tracking server (SQLite store under home)")
            server = stack.enter_context(LocalMlflowServer(home / "mlflow"))
            uri = server.uri
        cfg = replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=uri))
        ensure_ray()

        raw = Path(cfg.sample_data.output) / "raw"
        if any(raw.glob("*.tar")):
            log.info("1/4 sample data: reusing %s", raw)
        else:
            log.info("1/4 sample data: generating")
            generate_sample_data(cfg.sample_data)

        log.info("2/4 preprocess (Ray Data)")
        data = run_preprocess(cfg).manifest

        log.info("3/4 train (Ray Train) + register checkpoints (MLflow)")
        train = train_with_tracking(cfg)
        run_url = _run_url(uri, train.mlflow_run_id)  # asks the server, which stops with this block

        log.info("4/4 eval pending model versions")
        evals = run_eval(cfg, pending=True)
        champion = _champion(uri, cfg.mlflow.registered_model)

    result = _final_eval(evals, train.mlflow_run_id)
    metrics = result.metrics
    zs_top1 = _metric(metrics, "acc1")
    summary = {
        "zero_shot_top1": zs_top1,
        "chance_top1": 1.0 / result.num_classes,
        "retrieval_recall_at_1": _metric(metrics, "image_retrieval_recall@1"),
        "text_retrieval_recall_at_1": _metric(metrics, "text_retrieval_recall@1"),
        "registered_model": cfg.mlflow.registered_model,
        "model_version": result.version,
        "aliases": result.aliases,
        "champion_version": champion,
        "tracking_uri": uri,
        "mlflow_run_id": train.mlflow_run_id,
        "mlflow_run_url": run_url,
        "mlflow_ui_command": server.ui_command() if server else f"open {uri}",
        "data_counts": data.counts,
        "train_samples_per_second": train.samples_per_second,
        "train_steps": train.steps,
        "final_loss": train.final_loss,
        "checkpoint_uri": train.checkpoint_uri,
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    path = home / "demo-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["summary_path"] = str(path)
    return summary


def _final_eval(evals: EvalResult, run_id: str) -> EvalOutcome:
    """The eval result of the newest version this run registered (the final checkpoint)."""
    done = [e for e in evals.with_status("done") if (e.run_id or run_id) == run_id]
    if not done:
        reasons = "; ".join(f"v{e.version}: {e.reason}" for e in evals.outcomes) or "no pending versions"
        raise UserError(f"no model version of this run was evaluated ({reasons})")
    return max(done, key=lambda e: int(e.version))


def _metric(metrics: dict[str, float], name: str) -> float:
    """The first dataset's value of ``name`` (metrics are keyed ``<dataset>/<metric>``)."""
    values = [v for k, v in sorted(metrics.items()) if k.split("/", 1)[-1] == name]
    if not values:
        raise UserError(f"eval produced no {name!r} metric (got {sorted(metrics)})")
    return float(values[0])


def _run_url(uri: str, run_id: str) -> str:
    if not uri.startswith("http"):
        return f"(run {run_id} in {uri})"
    import mlflow

    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{uri}/#/experiments/{experiment_id}/runs/{run_id}"


def _champion(uri: str, name: str) -> str | None:
    """The version holding the ``champion`` alias (best primary metric so far, possibly an earlier demo's);
    None before any version was evaluated successfully."""
    import mlflow

    from workflows.tracking import registry

    return registry.registered_model(mlflow.MlflowClient(uri), name).aliases.get(registry.CHAMPION_ALIAS)


def print_summary(s: dict[str, Any]) -> None:
    counts = s["data_counts"]
    rejected = counts.get("rejected", {})
    rejects = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
    ratio = s["zero_shot_top1"] / s["chance_top1"]
    lines = [
        "",
        "=== clipflow demo: summary ===",
        f"data       {counts['input']} pairs in -> {counts['written']} written, "
        f"{counts['duplicates']} duplicates, {sum(rejected.values())} rejected ({rejects})",
        f"train      {s['train_steps']} steps, {s['train_samples_per_second']:.1f} samples/s, "
        f"final loss {s['final_loss']:.3f}",
        f"zero-shot  top-1 {s['zero_shot_top1']:.1%} (chance {s['chance_top1']:.1%}, {ratio:.1f}x)",
        f"retrieval  text->image recall@1 {s['retrieval_recall_at_1']:.1%}, "
        f"image->text recall@1 {s['text_retrieval_recall_at_1']:.1%}",
        f"registry   {s['registered_model']} version {s['model_version']} "
        f"(aliases: {', '.join(s['aliases']) or 'none'}); champion is version {s['champion_version']}",
        f"mlflow     {s['mlflow_run_url']}",
        f"           reopen the UI: {s['mlflow_ui_command']}",
        f"wall time  {s['wall_seconds']:.0f} s; summary written to {s['summary_path']}",
    ]
    print("\n".join(lines))
