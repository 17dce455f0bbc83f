"""`clipflow eval` against a real ``mlflow server`` and local Ray: results, bad versions, concurrent jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from test_eval_sets import image_folder_to_wds

from clip_core import Tokenizer, create_model, load_checkpoint
from clip_core.checkpoint import MODEL_FILE
from workflows.common.errors import EXIT_INTERRUPTED, UserError
from workflows.data.eval_sets import embed_images_local, read_retrieval_set, retrieval_result, zero_shot_in_process
from workflows.eval.job import run_eval
from workflows.tracking import claims, registry
from workflows.tracking.run import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

from mlflow_helpers import (make_checkpoint, make_config, make_eval_sets, publish, train_tokenizer, training_run,
                            unique_name)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(mlflow_server, ray_runtime, tmp_path_factory):
    mlflow.set_tracking_uri(mlflow_server.uri)
    root = tmp_path_factory.mktemp("eval")
    zeroshot, retrieval = make_eval_sets(root / "data")
    tokenizer = train_tokenizer()
    checkpoints = [make_checkpoint(root / f"ckpt{i}", tokenizer, seed=i, step=10 * (i + 1)) for i in range(3)]
    client = MlflowClient(mlflow_server.uri)
    return {"client": client, "server": mlflow_server, "root": root, "zeroshot": zeroshot, "retrieval": retrieval,
            "tokenizer": tokenizer, "checkpoints": checkpoints, "run_id": training_run(client)}


@pytest.fixture
def tracking_uri_elsewhere(env, tmp_path):
    """Points the process-wide tracking URI at another store when called (the server's again afterwards)."""
    def point() -> str:
        other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
        mlflow.set_tracking_uri(other)
        return other

    yield point
    mlflow.set_tracking_uri(env["server"].uri)


def _config(env, name: str):
    return make_config(env["root"], env["server"].uri, name, zeroshot=env["zeroshot"], retrieval=env["retrieval"])


def _publish_all(env, name: str) -> list[str]:
    return [publish(env["client"], name, env["run_id"], ckpt, step=10 * (i + 1))
            for i, ckpt in enumerate(env["checkpoints"])]


def test_eval_one_version_logs_results_tags_and_aliases(env, tracking_uri_elsewhere):
    client, name = env["client"], unique_name("ev")
    version = publish(client, name, env["run_id"], env["checkpoints"][0], step=10)
    cfg = _config(env, name)
    elsewhere = tracking_uri_elsewhere()
    (result,) = run_eval(cfg, version=version).outcomes
    assert result.status == "done", result  # the config's server was used throughout ...
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri() == elsewhere  # ... and only it
    m = result.metrics
    for key in ("zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall",
                "retrieval/image_retrieval_recall@1", "retrieval/text_retrieval_recall@5",
                "retrieval/image_retrieval_recall@10"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["zeroshot/acc5"] == 1.0  # 3 classes: top-5 covers all
    assert result.num_classes == 3 and m["zeroshot/images"] == 12
    # Ray Data's actor pool gives the same numbers as the in-process path (training's periodic eval)
    checkpoint = load_checkpoint(env["checkpoints"][0])
    local = zero_shot_in_process(checkpoint.model.eval(), checkpoint.tokenizer, cfg)
    assert local["zeroshot/acc1"] == pytest.approx(m["zeroshot/acc1"])
    assert local["zeroshot/mean_per_class_recall"] == pytest.approx(m["zeroshot/mean_per_class_recall"])

    mv = client.get_model_version(name, version)
    assert mv.tags["eval_status"] == "done" and mv.tags["eval_run_id"] == result.eval_run_id
    assert not [key for key in mv.tags if key.startswith("eval.")]  # results are metrics, not ~25 tags
    # ... of the eval run, linked to the version's logged model: its page and the Models tab rank by them
    on_model = {mm.key: mm for mm in client.get_logged_model(registry.logged_model_id(mv)).metrics
                if mm.run_id == result.eval_run_id}
    assert on_model["zeroshot/acc1"].value == pytest.approx(m["zeroshot/acc1"])
    assert on_model["retrieval/image_retrieval_recall_at_1"].value == pytest.approx(
        m["retrieval/image_retrieval_recall@1"])
    assert "images_per_second" not in on_model  # the job's throughput, not the model's
    assert registry.evaluated_metric(client, mv, "zeroshot/acc1") == pytest.approx(m["zeroshot/acc1"])
    assert set(result.aliases) == {"latest-evaluated", "champion"}
    eval_run = client.get_run(result.eval_run_id)
    assert eval_run.info.status == "FINISHED" and eval_run.data.metrics["images_per_second"] > 0
    experiment = client.get_experiment(eval_run.info.experiment_id)  # opens on its runs in the MLflow UI
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    assert eval_run.data.tags["clipflow.model_version"] == version
    assert eval_run.data.metrics["zeroshot/acc1"] == pytest.approx(m["zeroshot/acc1"])
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "zeroshot")}
    assert {"zeroshot/per_class_accuracy.json", "zeroshot/confusion_matrix.png"} <= artifacts
    history = client.get_metric_history(env["run_id"], "eval/zeroshot/acc1")
    assert [h.step for h in history if h.value == pytest.approx(m["zeroshot/acc1"])] == [10]


def test_unreadable_retrieval_image_is_never_retrieved_and_counts_as_a_miss(tmp_path):
    _, retrieval = make_eval_sets(tmp_path)
    data = read_retrieval_set(str(retrieval))
    Path(data.images[0]).write_bytes(b"not an image")
    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = create_model("tiny-vit", vocab_size=tokenizer.vocab_size, context_length=16).eval()
    features, ok, _ = embed_images_local(model, data.images, make_config(tmp_path, "unused", "unused"))
    assert ok.tolist() == [False] + [True] * 5
    m = retrieval_result(model, tokenizer, data, features, ok).metrics
    assert (m["images"], m["unreadable_images"]) == (5, 1)
    # recall@10 covers all 6 images: every caption finds its readable image, image 0's 2 of 12 never can
    assert m["image_retrieval_recall@10"] == pytest.approx(10 / 12)
    assert m["text_retrieval_recall@10"] <= 5 / 6  # image 0 finds nothing


def _artifact_file(server, mv, name: str) -> Path:
    model_id = mv.source.removeprefix("models:/")
    (path,) = Path(server.root, "artifacts").glob(f"**/{model_id}/**/checkpoint/{name}")
    return path


def test_bad_versions_fail_with_reason_and_do_not_block_others(env):
    client, name = env["client"], unique_name("bad")
    good, corrupt, missing = _publish_all(env, name)
    _artifact_file(env["server"], client.get_model_version(name, corrupt), MODEL_FILE).write_bytes(b"garbage")
    _artifact_file(env["server"], client.get_model_version(name, missing), MODEL_FILE).unlink()
    cfg = _config(env, name)

    other = Tokenizer.train(["completely different words here"] * 20, vocab_size=530, context_length=16)
    other.save(env["root"] / "other-tokenizer")
    mismatched = make_config(env["root"], env["server"].uri, name, zeroshot=env["zeroshot"])
    mismatched.tokenizer.source, mismatched.tokenizer.path = "path", str(env["root"] / "other-tokenizer")
    (refused,) = run_eval(mismatched, version=good).outcomes
    assert refused.status == "refused" and "tokenizer mismatch" in refused.reason
    assert client.get_model_version(name, good).tags["eval_status"] == "pending"  # untouched

    results = {r.version: r for r in run_eval(cfg, pending=True).outcomes}
    assert results[good].status == "done"
    assert results[corrupt].status == "failed" and f"{MODEL_FILE} is corrupt" in results[corrupt].reason
    assert results[missing].status == "failed" and MODEL_FILE in results[missing].reason
    for version in (corrupt, missing):
        tags = client.get_model_version(name, version).tags
        assert tags["eval_status"] == "failed" and MODEL_FILE in tags["eval_reason"]
    assert run_eval(cfg, pending=True).outcomes == []  # nothing left pending

    with pytest.raises(UserError, match="does not exist"):
        run_eval(make_config(env["root"], env["server"].uri, "no-such-model"), pending=True)
    with pytest.raises(UserError, match="has no alias 'best'"):
        run_eval(cfg, alias="best")


def test_two_concurrent_eval_jobs_evaluate_each_version_exactly_once(env):
    import ray

    client, name = env["client"], unique_name("conc")
    versions = _publish_all(env, name)
    command = [sys.executable, "-m", "workflows.ops.cli", "eval", "--pending",
               "--set", f"home={env['root']}", "--set", f"mlflow.tracking_uri={env['server'].uri}",
               "--set", f"mlflow.registered_model={name}", "--set", "mlflow.experiment=clipflow-tests",
               "--set", f"eval.zeroshot=[{env['zeroshot']}]", "--set", f"eval.retrieval=[{env['retrieval']}]",
               "--set", "eval.batch_size=8"]
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    jobs = [subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=240)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    experiment = client.get_experiment_by_name("clipflow-tests-eval")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`clipflow.model_name` = '{name}'")
    assert sorted(r.data.tags["clipflow.model_version"] for r in runs) == sorted(versions)  # once each
    for version in versions:
        assert client.get_model_version(name, version).tags["eval_status"] == "done"
    won = [mv for mv in client.search_model_versions(f"name='{name}{claims.CLAIMS_SUFFIX}'")
           if mv.tags.get("target_version") != "promote" and mv.tags.get("outcome") in ("won", "released")]
    assert sorted(mv.tags["target_version"] for mv in won) == sorted(versions)
    assert sum(out.count(": claimed by") for out in outputs) == len(versions)


def test_eval_of_a_checkpoint_path_logs_a_run_and_leaves_the_registry_alone(env, capsys):
    """`clipflow eval --checkpoint`: CLIP_benchmark webdataset sets, a linear probe, no registry."""
    from workflows.ops.cli import main

    client, name, root = env["client"], unique_name("ckpt"), env["root"]
    zeroshot = image_folder_to_wds(env["zeroshot"], root / "wds" / "colours")
    for split in ("train", "test"):
        image_folder_to_wds(env["zeroshot"], root / "wds" / "probe", split)
    checkpoint = str(env["checkpoints"][0])
    args = ["eval", "--checkpoint", checkpoint, "--set", f"home={root}", "--set", f"mlflow.registered_model={name}",
            "--set", f"mlflow.tracking_uri={env['server'].uri}", "--set", "mlflow.experiment=clipflow-tests",
            "--set", f"eval.zeroshot=[{zeroshot}]", "--set", f"eval.retrieval=[{env['retrieval']}]",
            "--set", f"eval.linear_probe=[{root / 'wds' / 'probe'}]", "--set", "eval.batch_size=8",
            "--set", "eval.linear_probe_epochs=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{checkpoint}  done" in out and "probe/lp_acc1" in out and "colours/acc1" in out
    experiment = client.get_experiment_by_name("clipflow-tests-eval")
    (run,) = client.search_runs([experiment.experiment_id],
                                filter_string=f"tags.`clipflow.checkpoint` = '{checkpoint}'")
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert {"colours/acc1", "probe/lp_acc1", "probe/lp_acc5", "probe/lp_mean_per_class_recall",
            "retrieval/image_retrieval_recall_at_1"} <= set(metrics)
    assert metrics["probe/lp_train_images"] == metrics["probe/lp_test_images"] == 12
    ckpt = load_checkpoint(checkpoint)  # the webdataset set scores as the in-process path does
    cfg = make_config(root, env["server"].uri, name, zeroshot=zeroshot)
    local = zero_shot_in_process(ckpt.model.eval(), ckpt.tokenizer, cfg)
    assert metrics["colours/acc1"] == pytest.approx(local["colours/acc1"])
    assert client.search_registered_models(filter_string=f"name = '{name}'") == []  # no registry, no aliases

    assert main(["eval", "--checkpoint", str(root / "nowhere"), "--set", f"home={root}"]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_an_interrupted_eval_of_a_checkpoint_path_ends_its_run_killed(env):
    """Ctrl-C (SIGINT) while `clipflow eval --checkpoint` evaluates: the run ends KILLED, not FAILED, exit 130."""
    import ray

    client = env["client"]
    checkpoint = str(env["checkpoints"][1])
    command = [sys.executable, "-m", "workflows.ops.cli", "eval", "--checkpoint", checkpoint,
               "--set", f"home={env['root']}", "--set", f"mlflow.tracking_uri={env['server'].uri}",
               "--set", "mlflow.experiment=clipflow-tests-interrupted", "--set", f"eval.zeroshot=[{env['zeroshot']}]",
               "--set", f"eval.retrieval=[{env['retrieval']}]", "--set", "eval.batch_size=2"]
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 120
        runs = []
        while not runs and job.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("clipflow-tests-interrupted-eval")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            time.sleep(0.2)
        if runs:
            job.send_signal(signal.SIGINT)
        out = job.communicate(timeout=60)[0]
    finally:
        job.kill()
    assert runs and runs[0].info.status == "RUNNING", out
    assert job.returncode == EXIT_INTERRUPTED, out
    assert "clipflow eval: interrupted" in out
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_many_classes_log_the_confusion_matrix_as_json_not_an_image(env):
    from workflows.data.eval_sets import DatasetResult
    from workflows.eval.plots import MAX_FIGURE_CLASSES, log_dataset

    client, n = env["client"], MAX_FIGURE_CLASSES + 1
    names = [f"class {i}" for i in range(n)]
    confusion = torch.eye(n, dtype=torch.long).tolist()
    run = client.create_run(client.get_experiment_by_name("clipflow-tests").experiment_id).info.run_id
    log_dataset(client, run, "big", DatasetResult({}, [(c, 1.0, 1) for c in names], confusion, names))
    assert {a.path for a in client.list_artifacts(run, "big")} == {"big/per_class_accuracy.json",
                                                                   "big/confusion_matrix.json"}
    saved = mlflow.artifacts.load_dict(f"{client.get_run(run).info.artifact_uri}/big/confusion_matrix.json")
    assert saved == {"classes": names, "rows_true_columns_predicted": confusion}
