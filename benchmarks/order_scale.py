"""Scale of the training order: what a rank pays to plan an epoch, and how mixed a global batch is; new vs old.

Simulates LAION-400M as ViT-B/32 trains it (40,000 shards of 10,000 rows, 32 ranks, global batch 32,768) and
prints, for the order of workflows/train/feed.py and for the order it replaced (the BASELINE below, a copy of
its planning logic kept here only to measure against): time and peak Python memory (tracemalloc) for one rank
to plan its epoch and to produce its first 100 read units, and the distinct shards per global batch on a
2,000-shard data set (the new order's target: about G/256 = 128, one per block).

The new order plans lazily: a rank builds the order and one table per epoch (its short blocks), and each Ray
Data task plans one step; "whole epoch, streamed" is the sum of what those tasks plan, never held at once.

    python benchmarks/order_scale.py [--shards 40000] [--ranks 32] [--batch 32768] [--steps 50]
"""

from __future__ import annotations

import argparse
import itertools
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from workflows.train.feed import BLOCK_ROWS, DataOrder, Shard, seeded

ROWS_PER_SHARD = 10_000


# ---- BASELINE: the order before issue 15 (shard by shard), its read-unit planning only ---------------------


@dataclass(frozen=True)
class BaselineOrder:
    """Epoch = shards in a seeded order, each shard's blocks in a seeded order; a rank planned its whole
    epoch up front as one list of read units."""

    shards: tuple[Shard, ...]
    seed: int
    global_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return sum(s.rows for s in self.shards) // self.global_batch

    def shard_order(self, epoch: int) -> np.ndarray:
        return seeded(1, self.seed, epoch).permutation(len(self.shards))

    def block_order(self, epoch: int, shard: int) -> np.ndarray:
        return seeded(2, self.seed, epoch, shard).permutation(-(-self.shards[shard].rows // BLOCK_ROWS))

    def block_size(self, shard: int, block: int) -> int:
        return min(BLOCK_ROWS, self.shards[shard].rows - block * BLOCK_ROWS)

    def read_units(self, epoch: int, first_step: int, rank: int, world_size: int) -> list[dict[str, Any]]:
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

    def distinct_shards(self, epoch: int, step: int) -> int:
        """Shards a global step draws on: those whose stretch of the stream meets the step's rows."""
        ends = np.cumsum([self.shards[int(i)].rows for i in self.shard_order(epoch)])
        lo, hi = step * self.global_batch, (step + 1) * self.global_batch
        return int(np.searchsorted(ends, hi - 1, side="right") - np.searchsorted(ends, lo, side="right") + 1)


# ---- measuring ---------------------------------------------------------------------------------------------


def measure(work: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak MiB of Python allocations, result): timed on its own, then run again under tracemalloc."""
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    result = work()
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return seconds, peak, result


def shards(count: int) -> tuple[Shard, ...]:
    return tuple(Shard(f"s3://bucket/laion400m/train-224/shard-{i:05d}.parquet", ROWS_PER_SHARD) for i in range(count))


def streamed_units(order: DataOrder, rank: int, ranks: int) -> Iterator[dict[str, Any]]:
    """A rank's read units of epoch 0 in order, as its Ray Data tasks plan them (one step each)."""
    for step in range(order.steps_per_epoch):
        yield from order.step_units(0, step, rank, ranks)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40_000, help="shards of 10,000 rows (40,000: LAION-400M)")
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32_768, help="global batch")
    parser.add_argument("--mix-shards", type=int, default=2_000, help="data set size for shards per batch")
    parser.add_argument("--steps", type=int, default=50, help="global batches sampled for shards per batch")
    args = parser.parse_args(argv)
    rank = args.ranks // 2
    print(f"{args.shards:,} shards x {ROWS_PER_SHARD:,} rows = {args.shards * ROWS_PER_SHARD / 1e6:,.0f}M rows, "
          f"{args.ranks} ranks, global batch {args.batch:,}; rank {rank}'s epoch")
    out: dict[str, dict[str, float]] = {}
    data = shards(args.shards)  # the manifest's list, which both orders hold: not part of the planning

    def new_plan() -> DataOrder:
        order = DataOrder(data, 0, args.batch)
        order.step_units(0, 0, rank, args.ranks)  # builds the per-order and the per-epoch tables
        return order

    plan_s, plan_mib, order = measure(new_plan)
    first_s, first_mib, _ = measure(lambda: list(itertools.islice(streamed_units(new_plan(), rank, args.ranks), 100)))
    epoch_s, epoch_mib, units = measure(lambda: sum(1 for _ in streamed_units(order, rank, args.ranks)))
    out["new"] = {"plan_s": plan_s, "plan_mib": plan_mib, "first_100_s": first_s, "first_100_mib": first_mib,
                  "epoch_streamed_s": epoch_s, "epoch_streamed_mib": epoch_mib, "units": units}

    baseline = BaselineOrder(data, 0, args.batch)
    old_s, old_mib, old_units = measure(lambda: baseline.read_units(0, 0, rank, args.ranks))
    out["baseline"] = {"plan_s": old_s, "plan_mib": old_mib, "first_100_s": old_s, "first_100_mib": old_mib,
                       "units": len(old_units)}
    del old_units

    mix_steps = DataOrder(shards(args.mix_shards), 0, args.batch).steps_per_epoch
    sampled = np.linspace(0, mix_steps - 1, min(args.steps, mix_steps)).astype(int).tolist()
    mixed = DataOrder(shards(args.mix_shards), 0, args.batch)
    new_distinct = [len({s for s, _ in mixed.step_samples(0, step)}) for step in sampled]
    old_distinct = [BaselineOrder(mixed.shards, 0, args.batch).distinct_shards(0, step) for step in sampled]
    for name, distinct in (("new", new_distinct), ("baseline", old_distinct)):
        out[name].update(shards_per_batch_mean=float(np.mean(distinct)), shards_per_batch_min=float(min(distinct)))

    n, b = out["new"], out["baseline"]
    print(f"  plan the epoch          new {n['plan_s']:8.3f} s {n['plan_mib']:8.2f} MiB   "
          f"baseline {b['plan_s']:8.2f} s {b['plan_mib']:8.1f} MiB (all {b['units']:,} units, up front)")
    print(f"  first 100 read units    new {n['first_100_s']:8.3f} s {n['first_100_mib']:8.2f} MiB   "
          f"baseline {b['first_100_s']:8.2f} s {b['first_100_mib']:8.1f} MiB (the whole plan first)")
    print(f"  whole epoch, streamed   new {n['epoch_streamed_s']:8.2f} s {n['epoch_streamed_mib']:8.2f} MiB   "
          f"({n['units']:,} units over {order.steps_per_epoch:,} step tasks, "
          f"{1e3 * n['epoch_streamed_s'] / order.steps_per_epoch:.2f} ms a step)")
    print(f"  ratio baseline/new: first 100 units {b['first_100_s'] / n['first_100_s']:.0f}x time, "
          f"{b['first_100_mib'] / n['first_100_mib']:.0f}x memory")
    print(f"{args.mix_shards:,}-shard data set, {len(sampled)} global batches of {args.batch:,} "
          f"({args.batch // BLOCK_ROWS} blocks): distinct shards per batch new mean "
          f"{n['shards_per_batch_mean']:.1f} min {n['shards_per_batch_min']:.0f}, baseline mean "
          f"{b['shards_per_batch_mean']:.1f} min {b['shards_per_batch_min']:.0f}")
    return out


if __name__ == "__main__":
    main()
