"""Ray Train pretraining: config checks, the deterministic data order, and integration runs on a local
Ray cluster (2 CPU workers, gloo): fault injection + exact resume (sample-key ledger) + loss falls,
and an S3 run with feature-cached accumulation resumed at another world size with the same global batch."""

from __future__ import annotations

import collections
import importlib.util
import io
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from clip_core import ClipLoss, Tokenizer, load_checkpoint, normalize, save_checkpoint
from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.tracking.run import tracking_uri
from workflows.tracking.tracker import TrainingTracking
from workflows.train import loop as train_loop
from workflows.train.driver import prepare_run, run_training
from workflows.train.feed import (ROW_ORDER, SOURCE_BLOCKS, STREAM_ORDER, DataOrder, Permutation, Shard, _padded,
                                  load_units, seeded)
from workflows.train.loop import TrainDebug, build_model, to_device

from tiny_data import COLORS, CONTEXT, ROWS, SHARDS, SIZE, shape_jpeg


def _cfg(data: Path | str, home: Path, *extra: str):
    return load_config(None, [
        f"home={home}", f"train.data={data}", "model.name=tiny-vit", f"tokenizer.context_length={CONTEXT}",
        "train.global_batch_size=16", "train.epochs=3", "train.warmup_steps=2",
        "train.log_every=3", "train.checkpoint_every=3", "train.keep_checkpoints=2", "scaling.max_failures=2",
        *extra])


# ---- driver-side checks (no Ray) -----------------------------------------------------------------------


def test_impossible_configs_fail_before_workers_start(train_data, tmp_path):
    with pytest.raises(UserError, match="no training data manifest.*clipflow preprocess"):
        prepare_run(_cfg(tmp_path / "nothing", tmp_path), TrainDebug())
    with pytest.raises(UserError, match="global_batch_size 16 gives fewer than one sample to each of 17 workers"):
        prepare_run(_cfg(train_data, tmp_path, "train.global_batch_size=16", "scaling.max_workers=17"), TrainDebug())
    with pytest.raises(UserError, match="context_length 16 but tokenizer.context_length is 77"):
        prepare_run(_cfg(train_data, tmp_path, "tokenizer.context_length=77"), TrainDebug())
    with pytest.raises(UserError, match="zero-shot eval set .* has no <class>/<image> files"):
        prepare_run(_cfg(train_data, tmp_path, "train.zero_shot_every=5", f"eval.zeroshot=[{train_data / 'tokenizer'}]"),
                    TrainDebug())
    with pytest.raises(UserError, match="fewer than one global batch"):
        prepare_run(_cfg(train_data, tmp_path, "train.global_batch_size=128"), TrainDebug())
    other = tmp_path / "mismatch"
    other.mkdir()
    for f in train_data.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    Tokenizer.train(["something else entirely"] * 5, vocab_size=518, context_length=CONTEXT).save(other / "tokenizer")
    with pytest.raises(UserError, match="records tokenizer .* re-run `clipflow preprocess`"):
        prepare_run(_cfg(other, tmp_path), TrainDebug())
    with pytest.raises(UserError, match="tokenizer.source is 'openai_bpe' but .* 'trained' tokenizer"):
        prepare_run(_cfg(train_data, tmp_path, "tokenizer.source=openai_bpe"), TrainDebug())
    with pytest.raises(UserError, match="tokenizer.path .* holds tokenizer .* but .* was tokenized with"):
        prepare_run(_cfg(train_data, tmp_path, "tokenizer.source=path", f"tokenizer.path={other / 'tokenizer'}"),
                    TrainDebug())
    prepare_run(_cfg(train_data, tmp_path, "tokenizer.source=path", f"tokenizer.path={train_data / 'tokenizer'}"),
                TrainDebug())  # the data's own tokenizer directory is fine

    # A checkpoint to continue from must fit the run: same model, global batch and data, steps left to train.
    setup = prepare_run(_cfg(train_data, tmp_path), TrainDebug())
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(_cfg(train_data, tmp_path), setup), setup.tokenizer,
                           trainer_state={"step": 18, "global_batch_size": 16, "data_manifest_hash": "tiny-v1"})
    resume = f"train.resume_from={ckpt}"
    with pytest.raises(UserError, match="already at or past this run's 18 steps; raise train.max_steps"):
        prepare_run(_cfg(train_data, tmp_path, resume), TrainDebug())
    with pytest.raises(UserError, match="trained with global batch 16"):
        prepare_run(_cfg(train_data, tmp_path, resume, "train.global_batch_size=32", "train.max_steps=30"),
                    TrainDebug())
    with pytest.raises(UserError, match="is a 'tiny-vit' model; set model.name=tiny-vit"):
        prepare_run(_cfg(train_data, tmp_path, resume, "model.name=tiny-rn"), TrainDebug())
    assert prepare_run(_cfg(train_data, tmp_path, resume, "train.max_steps=20"), TrainDebug()).total_steps == 20


def _step_samples(order: DataOrder, epoch: int, world: int, first_step: int = 0) -> dict[int, list]:
    """step -> the (shard, row) samples all ranks train in it, from ``read_units`` (batches of G/W rows per rank)."""
    per_worker, by_step = order.global_batch // world, collections.defaultdict(list)
    for rank in range(world):
        units = order.read_units(epoch, first_step, rank, world)
        rows = [(u["shard"], int(r)) for u in units for r in order.unit_rows(u)]
        for i in range(0, len(rows), per_worker):
            by_step[first_step + i // per_worker] += rows[i:i + per_worker]
    return by_step


def test_step_samples_do_not_depend_on_world_size(train_data, tmp_path):
    setup = prepare_run(_cfg(train_data, tmp_path), TrainDebug())
    assert setup.order.steps_per_epoch == 6 and setup.total_steps == 18
    # Shards of several shuffle blocks (256 rows), one ragged: 1756 rows, 18 steps of 96, 28 rows left over.
    order = DataOrder((Shard("a", 600), Shard("b", 300), Shard("c", 856)), seed=3, global_batch=96)
    one, two, three = (_step_samples(order, 1, world) for world in (1, 2, 3))
    assert sorted(one) == list(range(18)) and all(len(v) == 96 for v in one.values())
    assert {s: sorted(v) for s, v in one.items()} == {s: sorted(v) for s, v in two.items()} \
        == {s: sorted(v) for s, v in three.items()}
    flat = [x for v in one.values() for x in v]
    assert len(flat) == len(set(flat)) == 18 * 96  # no sample twice in an epoch
    assert _step_samples(order, 0, 1) != one  # a different order each epoch
    assert _step_samples(order, 1, 2, first_step=11) == {s: v for s, v in two.items() if s >= 11}  # resume
    for unit in order.read_units(1, 0, 1, 2):  # every read is one block of one shard
        assert len({int(r) // 256 for r in order.unit_rows(unit)}) == 1
    # Independent streams per purpose and key, even where a key ends in 0 (NumPy seeds [3, 1, 0] == [3, 1]).
    state = lambda *args: seeded(*args).bit_generator.state["state"]  # noqa: E731
    assert state(ROW_ORDER, 3, 1, 0, 0) != state(ROW_ORDER, 3, 1, 0) != state(SOURCE_BLOCKS, 3, 1, 0)
    # the epoch's stream and data set 0's block order (copy 0): equal keys without the tags
    assert not np.array_equal(Permutation.seeded(10, STREAM_ORDER, 3, 1).keys,
                              Permutation.seeded(10, SOURCE_BLOCKS, 3, 1, 0, 0).keys)


def test_summary_throughput_leaves_out_the_warm_up_window(monkeypatch):
    clock = iter([0.0,  # the attempt starts
                  50.0,  # step 10's window ends: 40 s of compilation in it
                  60.0, 70.0])  # steps 20 and 30 at 1 step/s
    monkeypatch.setattr(train_loop.time, "perf_counter", lambda: next(clock))
    meter = train_loop.Meter(global_batch=8, step=0, flops_per_sample=1.0, peak_per_device=1.0, world=1)
    assert meter.window(10)["samples_per_second"] == pytest.approx(80 / 50)  # the chart shows the warm-up
    assert meter.window(20)["samples_per_second"] == pytest.approx(8.0)
    assert meter.attempt_rate(30) == pytest.approx(8.0)  # the summary does not


def test_summary_throughput_of_a_run_shorter_than_one_window(monkeypatch):
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(train_loop.time, "perf_counter", lambda: next(clock))
    meter = train_loop.Meter(global_batch=8, step=4, flops_per_sample=1.0, peak_per_device=1.0, world=1)
    assert meter.attempt_rate(9) == pytest.approx(4.0)  # (9 - 4) x 8 samples in 10 s


def test_load_units_reads_the_planned_rows_with_reproducible_augmentation(train_data):
    order = DataOrder(tuple(Shard(str(train_data / f"shard-{i:05d}.parquet"), ROWS) for i in range(SHARDS)), 7, 16)
    units = order.read_units(0, 0, 1, 2)[:2]
    batch = {k: np.array([u[k] for u in units]) for k in ("epoch", "shard", "block")}
    batch["take"] = np.empty(len(units), dtype=object)  # Ray Data's form of a ragged list column
    batch["take"][:] = [np.array(u["take"]) for u in units]
    out = load_units(batch, order=order, image_size=SIZE, augment="cpu", endpoint="")
    expected = []
    for u in units:
        table = pq.read_table(train_data / f"shard-{u['shard']:05d}.parquet")
        expected += [table.column("key")[int(r)].as_py() for r in order.unit_rows(u)]
    assert list(out["key"]) == expected and len(expected) == sum(len(u["take"]) for u in units)
    assert out["image"].shape == (len(expected), 3, SIZE, SIZE) and out["image"].dtype == np.uint8
    assert out["tokens"].shape == (len(expected), CONTEXT) and out["tokens"].dtype == np.int64
    assert "box" not in out
    again = load_units(batch, order=order, image_size=SIZE, augment="cpu", endpoint="")
    np.testing.assert_array_equal(again["image"], out["image"])

    # augment_on=device: the task ships the decoded image and the same seeded box; the trainer's crop
    # (to_device) gives the CPU path's pixels, to within one level of rounding.
    device = load_units(batch, order=order, image_size=SIZE, augment="device", endpoint="")
    assert list(device["key"]) == expected and np.array_equal(device["tokens"], out["tokens"])
    assert device["box"].shape == (len(expected), 4) and (device["box"][:, 2:] < SIZE).any()  # real crops
    images, _ = to_device(device, torch.device("cpu"))
    assert images.shape == out["image"].shape and images.dtype == torch.uint8
    assert np.abs(images.numpy().astype(int) - out["image"].astype(int)).max() <= 1
    plain = load_units(batch, order=order, image_size=SIZE, augment="none", endpoint="")
    assert not np.array_equal(plain["image"], out["image"])  # no augmentation: the stored (centre) image


@pytest.mark.timeout(120)
def test_feed_bench_smoke_runs_both_crop_modes(ray_runtime, capsys, monkeypatch):
    """benchmarks/feed_bench.py is run on GPU machines whose time is scarce: keep it runnable."""
    script = Path(__file__).parent.parent / "benchmarks" / "feed_bench.py"
    spec = importlib.util.spec_from_file_location("feed_bench", script)
    feed_bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "feed_bench", feed_bench)
    spec.loader.exec_module(feed_bench)
    result = feed_bench.main(["--samples", "96", "--size", "32", "--batch", "16", "--repeats", "1"])
    assert set(result["per_core"]) == set(result["feed"]) == {"cpu", "device"}
    assert all(rate > 0 for part in result.values() for rate in part.values())
    assert "device/cpu:" in capsys.readouterr().out


def test_device_crop_pads_keep_aspect_images_and_refuses_oversized_ones():
    wide = np.full((3, 10, 20), 7, dtype=np.uint8)  # preprocess.resize_mode=keep_aspect stores such shapes
    canvas = _padded(wide, 24)
    assert canvas.shape == (3, 24, 24) and (canvas[:, :10, :20] == 7).all() and canvas.sum() == wide.sum()
    with pytest.raises(ValueError, match="exceeds the data's 16 px; re-run `clipflow preprocess`"):
        _padded(wide, 16)


# ---- integration on a local Ray cluster ----------------------------------------------------------------


def _ledger(directory: Path) -> list[tuple[int, int, int, int, str]]:
    rows = []
    for f in sorted(directory.glob("rank-*.tsv")):
        for line in f.read_text().splitlines():
            epoch, step, rank, world, key = line.split("\t")
            rows.append((int(epoch), int(step), int(rank), int(world), key))
    return rows


def _keys_by_step(ledger) -> dict[int, tuple[int, set[str]]]:
    """step -> (how many attempts trained it, its keys); every attempt of a step must train the same 16 keys."""
    by_step: dict[int, list[str]] = collections.defaultdict(list)
    for _, step, _, _, key in ledger:
        by_step[step].append(key)
    out = {}
    for step, keys in by_step.items():
        counts = collections.Counter(keys)
        attempts = len(keys) // 16
        assert len(keys) == 16 * attempts and len(counts) == 16 and set(counts.values()) == {attempts}, step
        out[step] = (attempts, set(counts))
    return out


def _batch_loss(model, data: Path, tok_ctx: int = CONTEXT) -> float:
    tables = [pq.read_table(data / f"shard-{i:05d}.parquet") for i in range(SHARDS)]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((SIZE, SIZE)))
                                           .transpose(2, 0, 1).copy())
                          for t in tables for b in t.column("image").to_pylist()])
    tokens = torch.tensor([x for t in tables for x in t.column("tokens").to_pylist()], dtype=torch.long)
    with torch.no_grad():
        return ClipLoss()(*model(normalize(images), tokens)).item()


@pytest.mark.timeout(240)
def test_two_workers_survive_a_killed_worker_with_exact_resume(ray_runtime, train_data, tmp_path):
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    zeroshot = tmp_path / "colors"  # an ImageFolder set for train.zero_shot_every
    rng = np.random.default_rng(1)
    for color in ("red", "blue", "green"):
        (zeroshot / color).mkdir(parents=True)
        for n in range(2):
            (zeroshot / color / f"{n}.jpg").write_bytes(shape_jpeg(COLORS[color], "square", rng))
    cfg = _cfg(train_data, tmp_path, f"storage.path={tmp_path / 'runs'}", "mlflow.publish_every=3",
               f"eval.zeroshot=[{zeroshot}]", "train.zero_shot_every=9")
    result = run_training(cfg, TrainDebug(ledger_dir=str(ledger_dir), fail_at_step=7, fail_rank=1, fail_after_s=5),
                          TrainingTracking.for_config(cfg))

    assert (ledger_dir / "failed-at-7").exists()  # rank 1 really died after step 7
    assert (result.steps, result.samples_seen) == (18, 18 * 16)
    ledger = _ledger(ledger_dir)
    by_step = _keys_by_step(ledger)
    assert sorted(by_step) == list(range(1, 19))
    # The restart resumed from the step-6 checkpoint (fail_after_s lets Ray register it, see TrainDebug):
    # step 7 was trained twice -- on exactly the same 16 samples (checked in _keys_by_step) -- the rest once.
    assert {s: a for s, (a, _) in by_step.items()} == {s: 2 if s == 7 else 1 for s in range(1, 19)}
    for epoch in range(3):  # within each epoch every sample exactly once
        keys = [k for s in range(epoch * 6 + 1, epoch * 6 + 7) for k in by_step[s][1]]
        assert len(keys) == len(set(keys)) == SHARDS * ROWS

    # The final checkpoint is a plain clip_core checkpoint, and the model learned.
    ckpt = load_checkpoint(result.checkpoint_uri)
    assert ckpt.trainer_state["step"] == 18 and ckpt.trainer_state["epoch"] == 2
    assert ckpt.load_training_state()["optimizer"]["state"]
    setup = prepare_run(cfg, TrainDebug())
    before, after = _batch_loss(build_model(cfg, setup), train_data), _batch_loss(ckpt.model, train_data)
    assert after < before - 0.5, (before, after)
    kept = sorted(p.name for p in Path(result.checkpoint_uri).parent.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000015", "checkpoint_00000018"]  # keep_checkpoints=2

    # Rank 0 tracked both worker groups in ONE MLflow run (the local store under home), with a point per
    # log step, and registered every 3rd checkpoint (publish_every=3) plus the final one.
    client = MlflowClient(tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`clipflow.run_key` = '{result.run_name}'")
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id] and runs[0].info.status == "FINISHED"
    logged = {m: {p.step for p in client.get_metric_history(result.mlflow_run_id, m)}
              for m in ("loss", "lr", "temperature", "samples_per_second", "mfu", "data_wait_fraction")}
    assert all(steps == {3, 6, 9, 12, 15, 18} for steps in logged.values()), logged
    zero_shot = client.get_metric_history(result.mlflow_run_id, "colors/acc1")  # train.zero_shot_every=9
    assert sorted(p.step for p in zero_shot) == [9, 18] and all(0 <= p.value <= 1 for p in zero_shot)
    versions = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    published = {int(v.tags["step"]): v for v in versions if v.run_id == result.mlflow_run_id}
    assert sorted(published) == [9, 18]
    assert published[18].tags["checkpoint_uri"] == result.checkpoint_uri
    assert published[18].tags["eval_status"] == "pending"


@pytest.mark.timeout(240)
def test_s3_checkpoints_and_resume_at_another_world_size(ray_runtime, s3_server, train_data, tmp_path):
    bucket = s3_server.create_bucket("clipflow-train")
    client = s3_server.client()
    for f in sorted(train_data.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"data/{f.relative_to(train_data).as_posix()}")
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    common = [f"storage.path=s3://{bucket}/runs", f"storage.s3_endpoint={s3_server.endpoint}",
              "train.checkpoint_every=2", "mlflow.publish_every=100",  # only final checkpoints are registered
              "train.micro_batch_size=4"]  # feature-cached accumulation: 2 (2 workers) or 4 (1 worker) micro-batches
    data = f"s3://{bucket}/data"
    first_cfg = _cfg(data, tmp_path, *common, "train.max_steps=8")
    first = run_training(first_cfg, TrainDebug(ledger_dir=str(ledger_dir)), TrainingTracking.for_config(first_cfg))
    assert first.checkpoint_uri.startswith(f"s3://{bucket}/runs/") and first.world_size == 2
    second_cfg = _cfg(data, tmp_path, *common, "train.max_steps=10", f"train.resume_from={first.checkpoint_uri}",
                      "scaling.min_workers=1", "scaling.max_workers=1",
                      "model.compile=regional",  # a checkpoint of an eager run resumes compiled: same state dict
                      "train.augment_on=device")  # the same seeded crops, cut by the trainer: same samples per step
    second = run_training(second_cfg, TrainDebug(ledger_dir=str(ledger_dir)), TrainingTracking.for_config(second_cfg))
    assert (second.steps, second.samples_seen, second.world_size) == (10, 160, 1)
    assert second.final_loss < 0.8 * math.log(16)  # below chance for a batch of 16 pairs

    ledger = _ledger(ledger_dir)
    worlds = {step: world for _, step, _, world, _ in ledger}
    assert all(worlds[s] == 2 for s in range(1, 9)) and all(worlds[s] == 1 for s in range(9, 11))
    per_step = collections.Counter(step for _, step, *_ in ledger)
    assert all(per_step[s] == 16 for s in range(1, 11))  # the global batch whatever the world size
    epoch1 = [key for e, step, *_, key in ledger if e == 1]  # steps 7..10: 2 workers then 1
    assert len(epoch1) == len(set(epoch1)) == 64

    local = tmp_path / "downloaded"
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint.split("://")[1], scheme="http", region="us-east-1")
    pafs.copy_files(second.checkpoint_uri[len("s3://"):], str(local), source_filesystem=fs)
    ckpt = load_checkpoint(local)
    assert ckpt.trainer_state["step"] == 10 and ckpt.trainer_state["world_size"] == 1
    assert ckpt.tokenizer.id == prepare_run(_cfg(train_data, tmp_path), TrainDebug()).tokenizer.id

    # Both runs registered their final checkpoint, straight from S3.
    mlflow = MlflowClient(tracking_uri(_cfg(data, tmp_path)))
    for run in (first, second):
        (version,) = mlflow.search_model_versions(f"name = 'clipflow-demo' and run_id = '{run.mlflow_run_id}'")
        assert version.tags["checkpoint_uri"] == run.checkpoint_uri and version.tags["step"] == str(run.steps)
