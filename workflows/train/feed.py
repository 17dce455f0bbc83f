"""The training feed: a deterministic global sample order, read and decoded by Ray Data on CPU.

Order. The unit of the order is a block: ``BLOCK_ROWS`` consecutive rows of a shard (= one Parquet row
group, the last block of a shard may be shorter). Each epoch ``e`` is one stream of block slots in a
seeded random order over the WHOLE data set, each block's rows in a seeded order (seed, e, shard,
block). Global step ``s`` trains stream positions ``[s*G, (s+1)*G)`` (G = global batch), so a step's
samples come from about G/256 blocks drawn from anywhere in the data (at ViT-B/32's G = 32,768 and
10,000-row shards: about 128 distinct shards per step, ``benchmarks/order_scale.py``), and rank ``r``
of ``W`` trains the contiguous slice ``[s*G + r*G//W, s*G + (r+1)*G//W)`` (``clip_core.loss.share_bounds``:
any W <= G, shares differing by at most one sample). Which samples form step ``s``
(``DataOrder.step_samples``) therefore depends on the seed, the epoch and ``s`` only, never on the
world size. A read is always one whole row group, never a shard read to take a few rows of it.

Weighted data sets (``train.data`` as a list). Data set ``i`` with ``B_i`` blocks and weight ``w_i``
fills ``n_i = max(1, round(w_i * B_i))`` block slots of every epoch: ``floor(n_i / B_i)`` copies of each
of its blocks, plus a seeded subset (seed, e, i) of ``n_i mod B_i`` blocks, a different one each epoch
(w = 2: every sample twice; w = 0.5: a random half). Its share of an epoch's samples is therefore
about ``w_i * rows_i / sum_j w_j * rows_j``; OpenCLIP's ``--train-data-upsampling-factors``. A repeated
block keeps its row order and crops within the epoch. All slots of all data sets go through the
one stream permutation, so every step mixes the data sets in those proportions.

Lazily. Nothing is materialised per block or per sample: the stream order is a seeded bijection of
the ``N`` slot indices (a Feistel network, ``Permutation``), evaluated only for the blocks a step
needs, and a block's stream offset is ``BLOCK_ROWS * j`` minus the missing rows of the short blocks
before it (one per shard, found by inverting the permutation once per epoch). Planning a step costs
about a millisecond and memory in the size of a step; the per-epoch state is one entry per shard
(``benchmarks/order_scale.py``: the old up-front plan of a 400M-row epoch took a rank 110 MiB).

Epoch length. An epoch has ``floor(R / G)`` steps, ``R`` the rows of its slots (a subset counted
as its smallest blocks, so that ``R`` is the same every epoch); the stream's rows past the last
whole step are not trained in that epoch (other ones each epoch).

Exact resume (the guarantee). A checkpoint records ``(epoch, steps done in the epoch)``; on resume
each rank plans the epoch from the next step, so within an epoch every sample slot of the trained
steps is seen exactly once in the restored trajectory: nothing twice, nothing skipped, at any world
size. Steps trained after the last checkpoint by the failed attempt are rolled back with the model
and trained again on exactly the same samples. Augmentation is drawn per sample from (seed, epoch,
shard, row), so it is reproduced too.

Ray Data. Each rank builds, per epoch, ``ray.data.range`` over its remaining steps; a map task plans
one step (``DataOrder.step_units``: the blocks holding this rank's positions of the step, each with
the indices of those positions) and, per block, reads its row group from Parquet and decodes +
augments the JPEGs; tasks run on any CPU node. A block that holds positions of several of the rank's
steps (small G/W) is read once, by the first of them. ``preserve_order`` keeps the order and
``iter_batches(batch_size=<the rank's share>, prefetch_batches=...)`` regroups the rows into per-step batches and
overlaps reading with training. The pixels travel as uint8; normalisation happens on the device. With
``augment="device"`` the tasks only decode: each stored image travels whole (padded to the stored
square) with its crop box, and the trainer cuts and resizes the batch on its device
(``clip_core.resized_crops``). The box is drawn from the same stream, so both modes train the same
crops (the pixels equal to within a level of rounding), and the decode-only tasks need about half
the CPU. Why not ``ray.train.get_dataset_shard``: its streaming split hands blocks to whichever rank
asks first, so the sample->rank->step map is not reproducible, and exact resume is impossible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_core.loss import share_bounds
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
STREAM_ORDER, SOURCE_BLOCKS, ROW_ORDER, AUGMENTATION = 1, 2, 3, 4


def seeded(purpose: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([*key, purpose])


ROUNDS = 6  # Feistel rounds, an even number (the halves swap sizes each round); 4 already look random
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))  # splitmix64's finaliser


@dataclass(frozen=True, eq=False)
class Permutation:
    """A seeded bijection of ``range(n)``, evaluated for any array of indices without building the whole
    table: an unbalanced Feistel network on the ``2**b >= n`` values of ``b`` bits, cycle-walked back into
    range (Black and Rogaway, 2002; fewer than 2 passes on average), so a 1.6M-block epoch costs nothing
    until a step asks for its blocks."""

    n: int
    keys: np.ndarray  # one uint64 per round

    @classmethod
    def seeded(cls, n: int, purpose: int, *key: int) -> "Permutation":
        return cls(n, seeded(purpose, *key).integers(0, 2 ** 64, size=ROUNDS, dtype=np.uint64))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._walk(x, self._encrypt)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return self._walk(y, self._decrypt)

    @cached_property
    def _bits(self) -> tuple[np.uint64, np.uint64]:
        """Bits of the left and the right part of a value."""
        bits = max(2, (self.n - 1).bit_length())
        return np.uint64(bits - bits // 2), np.uint64(bits // 2)

    @staticmethod
    def _round(part: np.ndarray, key: np.uint64, bits: np.uint64) -> np.ndarray:
        z = part ^ key
        z = (z ^ (z >> np.uint64(30))) * _MIX[0]
        z = (z ^ (z >> np.uint64(27))) * _MIX[1]
        return (z ^ (z >> np.uint64(31))) & ((np.uint64(1) << bits) - np.uint64(1))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """(left, right) -> (right, left ^ F(right)), ROUNDS times; the parts trade sizes each round."""
        left_bits, right_bits = self._bits
        left, right = x >> right_bits, x & ((np.uint64(1) << right_bits) - np.uint64(1))
        for key in self.keys:
            left, right = right, left ^ self._round(right, key, left_bits)
            left_bits, right_bits = right_bits, left_bits
        return (left << right_bits) | right

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        left_bits, right_bits = self._bits
        left, right = x >> right_bits, x & ((np.uint64(1) << right_bits) - np.uint64(1))
        for key in self.keys[::-1]:
            left, right = right ^ self._round(left, key, right_bits), left
            left_bits, right_bits = right_bits, left_bits
        return (left << right_bits) | right

    def _walk(self, x: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        out = step(np.asarray(x, dtype=np.uint64).copy())
        todo = np.flatnonzero(out >= self.n)
        while todo.size:  # the network permutes 2**b >= n values: walk on until back in range(n)
            out[todo] = step(out[todo])
            todo = todo[out[todo] >= self.n]
        return out.astype(np.int64)


@dataclass(frozen=True)
class Shard:
    uri: str
    rows: int
    source: int = 0  # which weighted data set it belongs to (an index into ``DataOrder.weights``)


def _as_shard(shard: Shard | tuple[str, int]) -> Shard:
    return shard if isinstance(shard, Shard) else Shard(*shard)


@dataclass(frozen=True)
class _Source:
    """One data set's blocks, numbered 0..blocks-1 through its shards in order, and its slots per epoch."""

    members: np.ndarray  # indices of its shards in DataOrder.shards
    first: np.ndarray  # first block number of each member, and the total at the end
    rows: int
    slots: int
    short: np.ndarray  # block numbers of its short blocks (a shard's last, when rows % BLOCK_ROWS)
    missing: np.ndarray  # BLOCK_ROWS minus each short block's rows

    @property
    def blocks(self) -> int:
        return int(self.first[-1])


@dataclass(frozen=True)
class DataOrder:
    """The deterministic sample order of every epoch (see the module docstring). ``shards`` may be given as
    ``(uri, rows)`` tuples or ``Shard``s; ``weights[i]`` is the sampling weight of the shards with
    ``source == i`` (``DataOrder.mixed`` builds both from several data sets)."""

    shards: tuple[Shard, ...]
    seed: int
    global_batch: int
    weights: tuple[float, ...] = (1.0,)
    _epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, init=False, repr=False,
                                                                   compare=False)

    def __post_init__(self) -> None:
        shards = tuple(_as_shard(s) for s in self.shards)
        object.__setattr__(self, "shards", shards)
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not all(0 < w < math.inf for w in self.weights):
            raise ValueError(f"data set weights must be positive numbers, got {list(self.weights)}")
        if any(not 0 <= s.source < len(self.weights) for s in shards):
            raise ValueError(f"a shard's source must index the {len(self.weights)} weight(s)")

    @classmethod
    def mixed(cls, sources: Sequence[tuple[Sequence[Shard | tuple[str, int]], float]], seed: int,
              global_batch: int) -> "DataOrder":
        """The order of several data sets, each given as (its shards, its weight)."""
        shards = [replace(_as_shard(s), source=i) for i, (members, _) in enumerate(sources) for s in members]
        return cls(tuple(shards), seed, global_batch, tuple(w for _, w in sources))

    @property
    def rows(self) -> int:
        """Rows in the data set(s), each counted once."""
        return sum(s.rows for s in self.shards)

    @cached_property
    def _sources(self) -> tuple[_Source, ...]:
        rows = np.array([s.rows for s in self.shards], dtype=np.int64)
        of = np.array([s.source for s in self.shards], dtype=np.int64)
        out = []
        for i, weight in enumerate(self.weights):
            members = np.flatnonzero(of == i)
            counts = -(-rows[members] // BLOCK_ROWS)
            first = np.concatenate([[0], np.cumsum(counts)])
            remainder = rows[members] % BLOCK_ROWS
            has_short = remainder > 0
            blocks = int(first[-1])
            slots = max(1, math.floor(weight * blocks + 0.5)) if blocks else 0
            out.append(_Source(members, first, int(rows[members].sum()), slots, first[1:][has_short] - 1,
                               BLOCK_ROWS - remainder[has_short]))
        return tuple(out)

    @cached_property
    def _slot_base(self) -> np.ndarray:
        """Slot index of each data set's first slot; the last entry is the epoch's slot count N."""
        return np.concatenate([[0], np.cumsum([s.slots for s in self._sources])]).astype(np.int64)

    @cached_property
    def epoch_rows(self) -> int:
        """Rows of an epoch's slots, a data set's subset counted as its smallest blocks (the same every epoch)."""
        total = 0
        for src in self._sources:
            if not src.blocks:
                continue
            copies, rest = divmod(src.slots, src.blocks)
            sizes = np.sort(BLOCK_ROWS - src.missing)
            smallest = int(sizes[:rest].sum()) + max(0, rest - len(sizes)) * BLOCK_ROWS
            total += copies * src.rows + smallest
        return total

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_rows // self.global_batch

    def block_size(self, shard: int, block: int) -> int:
        return min(BLOCK_ROWS, self.shards[shard].rows - block * BLOCK_ROWS)

    def block_rows(self, epoch: int, shard: int, block: int) -> np.ndarray:
        """Rows of ``shard`` in ``block``, in this epoch's order."""
        permutation = seeded(ROW_ORDER, self.seed, epoch, shard, block).permutation(self.block_size(shard, block))
        return block * BLOCK_ROWS + permutation

    # -- the stream of an epoch: slot j of the stream -> (shard, block), and where its rows start ----------

    def _stream(self, epoch: int) -> Permutation:
        return Permutation.seeded(int(self._slot_base[-1]), STREAM_ORDER, self.seed, epoch)

    def _source_blocks(self, epoch: int, source: int, copy: int) -> Permutation:
        return Permutation.seeded(self._sources[source].blocks, SOURCE_BLOCKS, self.seed, epoch, source, copy)

    def _slot_blocks(self, epoch: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, block) of each slot: slot k of data set i is its block ``pi_c(k mod B_i)`` for copy
        ``c = k div B_i``, with ``pi_c`` a seeded permutation of its blocks (a subset for the last copy)."""
        source = np.searchsorted(self._slot_base, slots, side="right") - 1
        shards, blocks = np.empty_like(slots), np.empty_like(slots)
        for i in np.unique(source):
            src, mine = self._sources[i], source == i
            copy, index = np.divmod(slots[mine] - self._slot_base[i], src.blocks)
            numbers = np.empty_like(index)
            for c in np.unique(copy):
                numbers[copy == c] = self._source_blocks(epoch, int(i), int(c))(index[copy == c])
            member = np.searchsorted(src.first, numbers, side="right") - 1
            shards[mine], blocks[mine] = src.members[member], numbers - src.first[member]
        return shards, blocks

    def _short_slots(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions of the epoch's short blocks (sorted) and the rows missing before each, cumulated:
        the block at stream position j starts at row ``BLOCK_ROWS * j - missing[#short positions < j]``."""
        if epoch not in self._epoch_cache:
            slots, missing = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            for i, src in enumerate(self._sources):
                for c in range(-(-src.slots // src.blocks) if src.blocks else 0):
                    k = c * src.blocks + self._source_blocks(epoch, i, c).inverse(src.short)
                    kept = k < src.slots
                    slots.append(self._slot_base[i] + k[kept])
                    missing.append(src.missing[kept])
            positions = self._stream(epoch).inverse(np.concatenate(slots))
            by_position = np.argsort(positions)
            cumulated = np.concatenate([[0], np.cumsum(np.concatenate(missing)[by_position])]).astype(np.int64)
            self._epoch_cache.clear()  # one epoch at a time: a rank plans epoch after epoch
            self._epoch_cache[epoch] = (positions[by_position], cumulated)
        return self._epoch_cache[epoch]

    def _offsets(self, epoch: int, j: np.ndarray) -> np.ndarray:
        positions, cumulated = self._short_slots(epoch)
        return BLOCK_ROWS * j - cumulated[np.searchsorted(positions, j, side="left")]

    def _slot_at(self, epoch: int, row: int) -> int:
        """The stream position of the block holding stream row ``row`` (bisection on the offsets)."""
        positions, cumulated = self._short_slots(epoch)
        lo, hi = 0, int(self._slot_base[-1])  # offset(lo) <= row < offset(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if BLOCK_ROWS * mid - int(cumulated[np.searchsorted(positions, mid)]) <= row:
                lo = mid
            else:
                hi = mid
        return lo

    def _blocks_of(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(shard, block, first stream row) of each block holding stream rows ``lo..hi-1``, in stream order."""
        j = np.arange(self._slot_at(epoch, lo), self._slot_at(epoch, hi - 1) + 1)
        shards, blocks = self._slot_blocks(epoch, self._stream(epoch)(j))
        return zip(shards.tolist(), blocks.tolist(), self._offsets(epoch, j).tolist())

    # -- what is trained where -----------------------------------------------------------------------------

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} is not one of this order's {self.steps_per_epoch} steps per epoch")

    def step_samples(self, epoch: int, step: int) -> list[tuple[int, int]]:
        """Global step ``step`` of ``epoch`` as ``(shard index, row)`` pairs in training order (rank r of W
        trains the r-th of W contiguous slices, ``share_bounds``): a pure function of (seed, epoch, step)."""
        self._check_step(step)
        lo, hi = step * self.global_batch, (step + 1) * self.global_batch
        pairs: list[tuple[int, int]] = []
        for shard, block, start in self._blocks_of(epoch, lo, hi):
            rows = self.block_rows(epoch, shard, block)[max(lo - start, 0):hi - start]
            pairs.extend((shard, row) for row in rows.tolist())
        return pairs

    def step_units(self, epoch: int, step: int, rank: int, world_size: int, first_step: int = 0
                   ) -> list[dict[str, Any]]:
        """The read units of rank ``rank``'s slice of ``step``, in training order, for a plan that starts at
        ``first_step``: per block holding its positions, the indices (into ``block_rows``) of ALL its positions
        in the block from ``first_step`` on. A block is planned once, by the first step that needs it."""
        self._check_step(step)
        first, last = share_bounds(self.global_batch, world_size)[rank:rank + 2]
        lo = step * self.global_batch + first
        start, stop = first_step * self.global_batch, self.steps_per_epoch * self.global_batch
        units = []
        for shard, block, offset in self._blocks_of(epoch, lo, lo + last - first):
            positions = np.arange(max(offset, start), min(offset + self.block_size(shard, block), stop))
            mine = positions[(first <= positions % self.global_batch) & (positions % self.global_batch < last)]
            if mine[0] >= lo:  # else an earlier step of this plan reads the block
                units.append({"epoch": epoch, "shard": shard, "block": block, "take": (mine - offset).tolist()})
        return units

    def read_units(self, epoch: int, first_step: int, rank: int, world_size: int) -> list[dict[str, Any]]:
        """Every read unit of rank ``rank`` for steps ``first_step..`` of ``epoch``, at once (tests and
        benchmarks; the feed plans step by step)."""
        return [unit for step in range(first_step, self.steps_per_epoch)
                for unit in self.step_units(epoch, step, rank, world_size, first_step)]

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



def decode_unit(unit: dict[str, Any], *, order: DataOrder, image_size: int, augment: Augment,
                endpoint: str) -> dict[str, np.ndarray]:
    """One read unit -> its decoded samples (uint8 CHW images, int64 tokens, keys; with
    ``augment="device"`` also each image's crop box, as (left, top, width, height))."""
    epoch, shard = int(unit["epoch"]), int(unit["shard"])
    rows = order.unit_rows(unit)
    table = read_rows(order.shards[shard].uri, rows, endpoint)
    images, boxes = [], []
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
    ids = table.column("tokens").combine_chunks()
    out = {"key": np.array(table.column("key").to_pylist(), dtype=object), "image": np.stack(images),
           "tokens": ids.flatten().to_numpy().reshape(len(rows), -1).astype(np.int64)}
    if boxes:
        out["box"] = np.array(boxes, dtype=np.int64)
    return out


def load_units(batch: dict[str, np.ndarray], *, order: DataOrder, image_size: int, augment: Augment,
               endpoint: str) -> dict[str, np.ndarray]:
    """Ray Data's columnar form of read units (epoch, shard, block, take) -> their decoded samples, in order."""
    parts = [decode_unit(dict(zip(batch, values)), order=order, image_size=image_size, augment=augment,
                         endpoint=endpoint) for values in zip(*batch.values())]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def load_steps(batch: dict[str, np.ndarray], *, order: DataOrder, epoch: int, first_step: int, rank: int,
               world_size: int, image_size: int, augment: Augment, endpoint: str) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map over step numbers (counted from ``first_step``): plan each step's read units for this
    rank and yield each unit's decoded samples, one output block per row group read."""
    for step in batch["id"].tolist():
        for unit in order.step_units(epoch, first_step + step, rank, world_size, first_step):
            yield decode_unit(unit, order=order, image_size=image_size, augment=augment, endpoint=endpoint)


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
    """This rank's per-step batches (its share of the global batch each, ``share_bounds``) for the rest of
    ``epoch``."""
    import ray.data

    steps = order.steps_per_epoch - first_step
    if steps < 1:
        return iter(())
    order._short_slots(epoch)  # the epoch's table, built once here: each task gets it with the order
    with ray_data_context(preserve_order=True):  # the order IS the resume position
        ds = ray.data.range(steps, override_num_blocks=steps).map_batches(
            load_steps, batch_size=1, batch_format="numpy",
            fn_kwargs={"order": order, "epoch": epoch, "first_step": first_step, "rank": rank,
                       "world_size": world_size, "image_size": image_size, "augment": augment, "endpoint": endpoint})
    first, last = share_bounds(order.global_batch, world_size)[rank:rank + 2]
    return ds.iter_batches(batch_size=last - first, batch_format="numpy",
                           prefetch_batches=prefetch_batches)
