"""`clipflow demo` end to end, as a user runs it: a subprocess on a small budget.

It starts its own ``mlflow server`` under ``--home`` (the real default path) and joins the suite's
Ray runtime through ``RAY_ADDRESS`` (two local Ray runtimes on one small machine would only compete).
The full-size demo's accuracy is measured in the issue notes, not here: this run is too short to learn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

BIN = Path(sys.executable).parent
SMALL = ["sample_data.train_samples=600", "sample_data.train_shards=2", "sample_data.zeroshot_per_class=4",
         "sample_data.retrieval_samples=40", "preprocess.rows_per_shard=200", "tokenizer.vocab_size=600",
         "train.epochs=2", "train.global_batch_size=64", "train.warmup_steps=2"]  # one checkpoint: the final one


@pytest.mark.timeout(900)
def test_demo_runs_every_stage_and_registers_an_evaluated_model(ray_runtime, tmp_path: Path) -> None:
    import ray

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    argv = [str(BIN / "clipflow"), "demo", "--home", str(home)] + [a for s in SMALL for a in ("--set", s)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== clipflow demo: summary ===" in done.stdout

    summary = json.loads((home / "demo-summary.json").read_text())
    counts = summary["data_counts"]
    # nothing lost: every input pair is written, a duplicate, or a reject counted by reason
    assert counts["input"] == counts["written"] + counts["duplicates"] + sum(counts["rejected"].values())
    assert counts["rejected"] and counts["written"] > 500
    steps = 2 * (counts["written"] // 64)
    assert summary["train_steps"] == steps
    assert 0.0 <= summary["zero_shot_top1"] <= 1.0 and summary["chance_top1"] == pytest.approx(1 / 8)
    assert {"champion", "latest-evaluated"} <= set(summary["aliases"])  # the first version evaluated
    assert summary["champion_version"] == summary["model_version"]

    # The demo's own MLflow store (SQLite under home) holds the run, its curves and the evaluated version.
    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "demo-vit"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == steps // 5
    version = client.get_model_version("clipflow-demo", summary["model_version"])
    assert version.tags["eval_status"] == "done" and version.tags["step"] == str(steps)
    assert client.get_model_version_by_alias("clipflow-demo", "champion").version == version.version
