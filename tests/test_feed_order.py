"""The training order (workflows.train.feed.DataOrder): mixed global batches, a pure function of
(seed, epoch, step), rank slices and resume at any world size, weighted data sets; and train.data's list form."""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from clip_core.loss import share_bounds
from workflows import DataOrder, Shard
from workflows.common.config import ConfigError, DataSource, dump_config, load_config
from workflows.common.errors import UserError
from workflows.train.driver import prepare_run
from workflows.train.feed import BLOCK_ROWS, Permutation, epoch_batches
from workflows.train.loop import TrainDebug

from tiny_data import CONTEXT, ROWS, SHARDS, SIZE

RAGGED = (Shard("a", 600), ("b", 300), Shard("c", 856), ("d", 1000))  # short last blocks; tuples accepted too


def rank_steps(order: DataOrder, epoch: int, world: int, first_step: int = 0) -> dict[int, list[tuple[int, int]]]:
    """step -> every rank's slice of it, concatenated in rank order, from the read units each rank plans."""
    bounds, by_step = share_bounds(order.global_batch, world), collections.defaultdict(list)
    for rank in range(world):
        per_worker = bounds[rank + 1] - bounds[rank]
        units = order.read_units(epoch, first_step, rank, world)
        reads = collections.Counter((u["shard"], u["block"]) for u in units)
        assert max(reads.values()) <= math.ceil(max(order.weights))  # each block read once a copy by the rank
        rows = [(u["shard"], int(r)) for u in units for r in order.unit_rows(u)]
        assert all(int(r) // BLOCK_ROWS == u["block"] for u in units for r in order.unit_rows(u))  # one row group
        for i in range(0, len(rows), per_worker):
            by_step[first_step + i // per_worker] += rows[i:i + per_worker]
    return dict(by_step)


def test_a_global_batch_draws_on_as_many_shards_as_it_has_blocks() -> None:
    """ViT-B/32's shape: 2,000 shards of 10,000 rows, G = 32,768 = 128 blocks of 256 rows (the old order: 4-5)."""
    order = DataOrder(tuple((f"s3://b/shard-{i:05d}.parquet", 10_000) for i in range(2000)), 0, 32_768)
    distinct = [len({shard for shard, _ in order.step_samples(3, step)}) for step in range(0, 600, 12)]
    assert np.mean(distinct) >= 120 and min(distinct) >= 115, distinct


@pytest.mark.parametrize("global_batch", [96, 1536])  # blocks spanning several steps of a rank; and not
def test_each_sample_once_per_epoch_and_rank_slices_make_the_step(global_batch: int) -> None:
    order = DataOrder(RAGGED * (4 if global_batch > 1000 else 1), seed=3, global_batch=global_batch)
    steps = order.steps_per_epoch
    assert steps == order.rows // global_batch  # unweighted: every row once, the remainder untrained
    samples = {s: order.step_samples(1, s) for s in range(steps)}
    flat = [x for step in samples.values() for x in step]
    assert len(flat) == len(set(flat)) == steps * global_batch
    assert all(0 <= row < order.shards[shard].rows for shard, row in flat)
    again = DataOrder(tuple(order.shards), seed=3, global_batch=global_batch)
    assert [again.step_samples(1, s) for s in range(steps)] == list(samples.values())  # a pure function
    assert order.step_samples(0, 0) != samples[0]  # another order each epoch
    for world in (1, 2, 3, 4, 5, 7):  # world sizes dividing G, and 5 and 7 that do not (unequal shares)
        assert rank_steps(order, 1, world) == samples, world
    for world in (3, 7):  # a checkpoint at world 2, resumed at world 3; one at 3, resumed at 7 (shares 13-14)
        resumed = rank_steps(order, 1, world, first_step=steps // 2)
        assert resumed == {s: v for s, v in samples.items() if s >= steps // 2}, world


def test_permutation_is_a_seeded_bijection_with_an_inverse() -> None:
    for n in (1, 2, 3, 5, 64, 1000, 4097):  # odd and even bit counts, powers of two and one past
        perm = Permutation.seeded(n, 1, 7, 2)
        out = perm(np.arange(n))
        assert sorted(out.tolist()) == list(range(n)) and np.array_equal(perm.inverse(out), np.arange(n))
    assert not np.array_equal(Permutation.seeded(1000, 1, 7, 2)(np.arange(1000)),
                              Permutation.seeded(1000, 1, 7, 3)(np.arange(1000)))


def _source_counts(order: DataOrder, epoch: int) -> tuple[collections.Counter, collections.Counter]:
    per_source, per_sample = collections.Counter(), collections.Counter()
    for step in range(order.steps_per_epoch):
        for shard, row in order.step_samples(epoch, step):
            per_source[order.shards[shard].source] += 1
            per_sample[shard, row] += 1
    return per_source, per_sample


def test_weighted_data_sets_fill_their_share_of_every_epoch() -> None:
    """Weight w of a data set of B blocks: round(w x B) block slots an epoch (whole copies, then a seeded subset).
    Here every block is whole and the slots make whole steps, so every slot is trained: exact counts."""
    big = [(f"big-{i}", 2 * BLOCK_ROWS) for i in range(4)]  # 8 blocks, weight 1.5: 12 slots
    half = [(f"half-{i}", 3 * BLOCK_ROWS) for i in range(2)]  # 6 blocks, weight 0.5: 3 slots
    plain = [("plain", 5 * BLOCK_ROWS)]  # 5 blocks, weight 1: 5 slots
    order = DataOrder.mixed([(big, 1.5), (half, 0.5), (plain, 1.0)], seed=5, global_batch=512)
    assert order.epoch_rows == 20 * BLOCK_ROWS and order.steps_per_epoch == 10
    chosen = []
    for epoch in range(3):
        per_source, per_sample = _source_counts(order, epoch)
        assert per_source == {0: 12 * BLOCK_ROWS, 1: 3 * BLOCK_ROWS, 2: 5 * BLOCK_ROWS}
        twice = {(s, r) for (s, r), n in per_sample.items() if n == 2}
        assert set(per_sample.values()) == {1, 2} and len(twice) == 4 * BLOCK_ROWS  # 4 of big's blocks twice
        assert {order.shards[s].source for s, _ in twice} == {0}
        assert sum(1 for s, _ in per_sample if order.shards[s].source == 2) == 5 * BLOCK_ROWS  # all of plain
        chosen.append(frozenset((s, r // BLOCK_ROWS) for s, r in per_sample if order.shards[s].source == 1))
    assert len(set(chosen)) > 1  # the half of `half` changes from epoch to epoch
    for world in (2, 4):  # resumable at any world size, like the unweighted order
        assert rank_steps(order, 2, world, first_step=3) == {s: order.step_samples(2, s) for s in range(3, 10)}
    again = DataOrder.mixed([(big, 1.5), (half, 0.5), (plain, 1.0)], seed=5, global_batch=512)
    assert again.step_samples(1, 4) == order.step_samples(1, 4)


def test_weights_with_ragged_shards_keep_a_fixed_epoch_length() -> None:
    """A subset's rows vary with the blocks drawn; the epoch is as long as its smallest possible draw."""
    order = DataOrder.mixed([(RAGGED, 0.7), ([("x", 5000)], 2.0)], seed=1, global_batch=128)
    assert order.steps_per_epoch == order.epoch_rows // 128
    for epoch in range(3):
        per_source, _ = _source_counts(order, epoch)
        # the trained steps hold each data set's share to within the untrained tail (< 2 blocks + one step)
        assert abs(per_source[1] / sum(per_source.values()) - 2 * 5000 / (2 * 5000 + 0.7 * 2756)) < 0.05
    with pytest.raises(ValueError, match="weights must be positive"):
        DataOrder.mixed([(RAGGED, 0.0)], seed=1, global_batch=128)


# ---- train.data: one path, or a weighted list ----------------------------------------------------------


def test_train_data_takes_a_weighted_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("train:\n  data:\n    - {path: laion, weight: 2.0}\n"
                                       "    - path: '{home}/cc12m'\n    - {path: 's3://b/yfcc', weight: 0.5}\n")
    cfg = load_config(tmp_path / "run.yaml", ["home=h"])
    assert cfg.train.sources() == [DataSource(str(tmp_path / "laion"), 2.0),
                                   DataSource(str(tmp_path / "h/cc12m"), 1.0), DataSource("s3://b/yfcc", 0.5)]
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert load_config(overrides=["train.data=[{path: a, weight: 3}]"]).train.sources() == [
        DataSource(str(tmp_path / "a"), 3.0)]
    assert load_config(overrides=["train.data=d"]).train.sources() == [DataSource(str(tmp_path / "d"), 1.0)]
    assert load_config(overrides=["home=h"], resolve_paths=False).train.data == "h/data/train"


@pytest.mark.parametrize(("value", "message"), [
    ("[{path: a, weight: 0}]", r"train.data\[0\].weight=0.0 must be a number > 0"),
    ("[{path: a}, {path: b, weight: -1}]", r"train.data\[1\].weight=-1.0 must be a number > 0"),
    ("[{weight: 2}]", r"train.data\[0\]: no path given"),
    ("''", "train.data: no path given"),
    ("[]", "train.data is an empty list"),
    ("[{path: a}, {path: a}]", "lists .*/a twice; give it one entry"),
    ("[{path: a, wieght: 2}]", r"did you mean 'train.data\[0\].weight'"),
    ("[a, b]", r"train.data\[0\]: expected a mapping"),
])
def test_bad_train_data_is_one_clear_error(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"train.data={value}"])


def _tiny_cfg(data: str, home: Path):
    return load_config(None, [f"home={home}", f"train.data={data}", "model.name=tiny-vit",
                              f"tokenizer.context_length={CONTEXT}", "train.global_batch_size=16"])


def test_training_on_a_mix_checks_every_manifest(train_data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(train_data, other)
    setup = prepare_run(_tiny_cfg(f"[{{path: {train_data}, weight: 2}}, {{path: {other}}}]", tmp_path), TrainDebug())
    assert setup.order.weights == (2.0, 1.0) and len(setup.order.shards) == 2 * SHARDS
    assert setup.order.steps_per_epoch == 3 * SHARDS * ROWS // 16
    assert setup.manifest_hash.startswith("mix-")  # a checkpoint of the mix resumes on the same mix only
    assert prepare_run(_tiny_cfg(str(train_data), tmp_path), TrainDebug()).manifest_hash == "tiny-v1"
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "image_size": 2 * SIZE}))
    with pytest.raises(UserError, match=f"mixes data sets preprocessed differently: {other} has .*image_size "
                                        f"{2 * SIZE}, {train_data} has .*image_size {SIZE}"):
        prepare_run(_tiny_cfg(f"[{{path: {train_data}}}, {{path: {other}}}]", tmp_path), TrainDebug())
    with pytest.raises(UserError, match="no training data manifest"):
        prepare_run(_tiny_cfg(f"[{{path: {train_data}}}, {{path: {tmp_path / 'none'}}}]", tmp_path), TrainDebug())


@pytest.mark.timeout(180)
def test_the_ray_feed_trains_the_planned_samples(ray_runtime, train_data: Path) -> None:
    """Rank 2 of 3 (the unequal share: 6 of 16, the others 5), resumed at step 2, of a weighted mix whose
    blocks span several of the rank's steps."""
    shards = [(str(train_data / f"shard-{i:05d}.parquet"), ROWS) for i in range(SHARDS)]
    order = DataOrder.mixed([(shards[:2], 1.5), (shards[2:], 1.0)], seed=2, global_batch=16)
    assert order.steps_per_epoch == 4 * ROWS // 16
    keys = [b["key"].tolist() for b in epoch_batches(order, 1, 2, 2, 3, image_size=SIZE, augment="cpu")]
    expected = [[f"s{shard}-{row:03d}" for shard, row in order.step_samples(1, step)[10:]]
                for step in range(2, order.steps_per_epoch)]
    assert keys == expected
