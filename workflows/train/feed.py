"""The training feed: a deterministic global sample order, read and decoded by Ray Data on CPU.

Order. Epoch ``e`` is one stream of rows: the shards in a seeded random order (seed, e); each
shard's blocks of ``BLOCK_ROWS`` consecutive rows (= preprocess's Parquet row groups) in a seeded
order (seed, e, shard); each block's rows in a seeded order (seed, e, shard, block). Global step
``s`` of the epoch trains stream positions ``[s*G, (s+1)*G)`` (G = global batch), and rank ``r`` of
``W`` takes the contiguous slice ``[s*G + r*G/W, s*G + (r+1)*G/W)``. Which samples form step ``s``
therefore depends on the seed, the epoch and ``s`` only, never on the world size. An epoch has
``floor(rows / G)`` steps; the ``rows mod G`` rows at the end of the stream are not trained in that
epoch (a different, random set each epoch). The shuffle is block-local (a step's samples come from
about G/256 blocks, spread over the data set), so a read is one Parquet row group used in full,
never a whole shard read to take a few random rows of it.

Exact resume (the guarantee). A checkpoint records ``(epoch, steps done in the epoch)``; on resume
each rank rebuilds the epoch's stream and starts at the next step, so within an epoch every
sample of the trained steps is seen exactly once in the restored trajectory: nothing twice,
nothing skipped, at any world size. Steps trained after the last checkpoint by the failed attempt
are rolled back with the model and trained again on exactly the same samples. (Stronger than
"at most one shard per worker": the unit of position is a global step, not a shard.)
Augmentation is drawn per sample from (seed, epoch, shard, row), so it is reproduced too.

Ray Data. Each rank builds, per epoch, a small dataset of read units (one block: the positions in it
that are this rank's, in stream order) from ``ray.data.from_items``; ``map_batches`` reads the block's
row group from Parquet and decodes + augments the JPEGs in Ray tasks that can run on any CPU node,
``preserve_order`` keeps the order, and ``iter_batches(batch_size=G/W, prefetch_batches=...)``
regroups the rows into per-step batches and overlaps reading with training. A rank reads only the
blocks holding its positions, each once. The pixels travel as uint8; normalisation happens on the
device. With ``augment="device"`` the tasks only decode: each stored image travels whole (padded to
the stored square) with its crop box, and the trainer cuts and resizes the batch on its device
(``clip_core.resized_crops``). The box is drawn from the same stream, so both modes train the same
crops (the pixels equal to within a level of rounding), and the decode-only tasks need about half
the CPU. Why not ``ray.train.get_dataset_shard``: its streaming split hands blocks to whichever rank
asks first, so the sample->rank->step map is not reproducible, and exact resume is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.transforms import (decode_image, random_resized_crop, random_resized_crop_box, resize_center_crop,
                                  to_uint8_chw)
from workflows.artifacts import ROW_GROUP_ROWS
from workflows.common import storage
from workflows.common.config import TrainConfig
from workflows.common.runtime import ray_data_context

COLUMNS = ["key", "image", "tokens"]
BLOCK_ROWS = ROW_GROUP_ROWS  # the shuffle's unit of locality: one Parquet row group of a training shard
AUGMENT_SCALE = (0.9, 1.0)  # OpenCLIP's default RandomResizedCrop scale for CLIP training
# Where a sample's image is cropped: "none" (centre crop, no augmentation), "cpu" (random resized crop in
# the Ray Data task) or "device" (the task only decodes; the trainer crops on its device).
Augment = Literal["none", "cpu", "device"]


def augmentation(train: TrainConfig) -> Augment:
    return train.augment_on if train.augment else "none"


# One random stream per purpose and key. NumPy's SeedSequence ignores trailing zeros ([s, e, 0] seeds
# the same generator as [s, e]), so the purpose tag goes last and is never 0.
SHARD_ORDER, BLOCK_ORDER, ROW_ORDER, AUGMENTATION = 1, 2, 3, 4


def seeded(purpose: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([*key, purpose])


@dataclass(frozen=True)
class Shard:
    uri: str
    rows: int


@dataclass(frozen=True)
class DataOrder:
    """The deterministic sample order of every epoch (see the module docstring)."""

    shards: tuple[Shard, ...]
    seed: int
    global_batch: int

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def shard_order(self, epoch: int) -> np.ndarray:
        return seeded(SHARD_ORDER, self.seed, epoch).permutation(len(self.shards))

    def block_order(self, epoch: int, shard: int) -> np.ndarray:
        return seeded(BLOCK_ORDER, self.seed, epoch, shard).permutation(-(-self.shards[shard].rows // BLOCK_ROWS))

    def block_size(self, shard: int, block: int) -> int:
        return min(BLOCK_ROWS, self.shards[shard].rows - block * BLOCK_ROWS)

    def block_rows(self, epoch: int, shard: int, block: int) -> np.ndarray:
        """Rows of ``shard`` in ``block``, in this epoch's order."""
        permutation = seeded(ROW_ORDER, self.seed, epoch, shard, block).permutation(self.block_size(shard, block))
        return block * BLOCK_ROWS + permutation

    def read_units(self, epoch: int, first_step: int, rank: int, world_size: int) -> list[dict[str, Any]]:
        """What rank ``rank`` reads for steps ``first_step..`` of ``epoch``, in training order: per block
        holding any of its positions, the indices (into ``block_rows``) of those positions."""
        per_worker = self.global_batch // world_size
        start, stop = first_step * self.global_batch, self.steps_per_epoch * self.global_batch
        units, offset = [], 0
        for shard in self.shard_order(epoch):
            shard = int(shard)
            for block in self.block_order(epoch, shard):
                count = self.block_size(shard, int(block))
                lo, hi = max(start, offset), min(stop, offset + count)
                if lo < hi:
                    positions = np.arange(lo, hi)
                    mine = positions[(positions % self.global_batch) // per_worker == rank] - offset
                    if len(mine):
                        units.append({"epoch": epoch, "shard": shard, "block": int(block), "take": mine.tolist()})
                offset += count
                if offset >= stop:
                    return units
        return units

    def unit_rows(self, unit: dict[str, Any]) -> np.ndarray:
        """The shard rows a read unit trains, in order."""
        return self.block_rows(int(unit["epoch"]), int(unit["shard"]), int(unit["block"]))[np.asarray(unit["take"])]


def read_rows(uri: str, rows: np.ndarray, endpoint: str = "") -> pa.Table:
    """``rows`` (indices into the file, any order) of a training shard, reading only their row groups."""
    with storage.open_input(uri, endpoint) as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = pf.read_row_groups(groups.tolist(), columns=COLUMNS)
    base = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])[np.searchsorted(groups, group_of)]
    return table.take(pa.array(rows - starts[group_of] + base))


def load_units(batch: dict[str, np.ndarray], *, order: DataOrder, image_size: int, augment: Augment,
               endpoint: str) -> dict[str, np.ndarray]:
    """Ray Data map: read units -> decoded samples (uint8 CHW images, int64 tokens, keys; with
    ``augment="device"`` also each image's crop box, as (left, top, width, height))."""
    keys, images, boxes, tokens = [], [], [], []
    for unit in (dict(zip(batch, values)) for values in zip(*batch.values())):
        epoch, shard = int(unit["epoch"]), int(unit["shard"])
        rows = order.unit_rows(unit)
        table = read_rows(order.shards[shard].uri, rows, endpoint)
        ids = table.column("tokens").combine_chunks()
        tokens.append(ids.flatten().to_numpy().reshape(len(rows), -1).astype(np.int64))
        keys.extend(table.column("key").to_pylist())
        for row, data in zip(rows, table.column("image").to_pylist()):
            img = decode_image(data)
            if augment == "none":
                images.append(to_uint8_chw(resize_center_crop(img, image_size)))
                continue
            rng = seeded(AUGMENTATION, order.seed, epoch, shard, int(row))
            if augment == "cpu":
                images.append(to_uint8_chw(random_resized_crop(img, image_size, rng, scale=AUGMENT_SCALE)))
            else:
                boxes.append(random_resized_crop_box(*img.size, rng, scale=AUGMENT_SCALE))
                images.append(_padded(to_uint8_chw(img), image_size))
    out = {"key": np.array(keys, dtype=object), "image": np.stack(images), "tokens": np.concatenate(tokens)}
    if boxes:
        out["box"] = np.array(boxes, dtype=np.int64)
    return out


def _padded(image: np.ndarray, size: int) -> np.ndarray:
    """A stored image (3, h, w) in the top-left corner of a (3, size, size) canvas, so a batch stacks;
    the crop box never reaches the padding. Stored images are at most ``size`` on each side (the
    manifest's image size, which is also the training size)."""
    if image.shape[1:] == (size, size):
        return image
    if max(image.shape[1:]) > size:
        raise ValueError(f"a stored image of {image.shape[2]}x{image.shape[1]} exceeds the data's "
                         f"{size} px; re-run `clipflow preprocess`")
    canvas = np.zeros((3, size, size), dtype=np.uint8)
    canvas[:, :image.shape[1], :image.shape[2]] = image
    return canvas


def epoch_batches(order: DataOrder, epoch: int, first_step: int, rank: int, world_size: int, *,
                  image_size: int, augment: Augment, endpoint: str = "",
                  prefetch_batches: int = 2) -> Iterator[dict[str, Any]]:
    """This rank's per-step batches (``global_batch / world_size`` samples each) for the rest of ``epoch``."""
    import ray.data

    units = order.read_units(epoch, first_step, rank, world_size)
    if not units:
        return iter(())
    with ray_data_context(preserve_order=True):  # the order IS the resume position
        ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            load_units, batch_size=1, batch_format="numpy",
            fn_kwargs={"order": order, "image_size": image_size, "augment": augment, "endpoint": endpoint})
    return ds.iter_batches(batch_size=order.global_batch // world_size, batch_format="numpy",
                           prefetch_batches=prefetch_batches)
