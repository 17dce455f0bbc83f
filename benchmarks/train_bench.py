"""Training throughput on whatever device is here: samples/s, MFU and the data-wait fraction with the
real Ray Data feed (Parquet read + JPEG decode + augmentation in Ray tasks) vs synthetic in-memory
batches (the baseline: no data cost at all), measured in the same run.

    python benchmarks/train_bench.py [--config FILE] [--set key=value ...] [--steps 20]

Uses ``train.data`` (run `clipflow preprocess` first), one process (world size 1), the config's
global batch, model and micro-batch cap. On one machine the Ray Data tasks share the CPUs with the
training step, so the data-wait here is an upper bound for a cluster whose CPU nodes do the decoding.
Add ``--set train.micro_batch_size=N`` to see the cost of feature-cached accumulation.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Iterator

import numpy as np
import torch

from clip_core import model_flops_per_sample
from workflows.common.config import load_config
from workflows.common.runtime import ensure_ray
from workflows.train.acceleration import compile_for_training, use_channels_last, uses_cudagraphs
from workflows.train.accumulation import plan_batches
from workflows.train.driver import prepare_run
from workflows.train.feed import augmentation, epoch_batches
from workflows.train.loop import TrainDebug, autocast_for, build_model, make_loss, to_device
from workflows.train.optim import build_optimizer, build_scheduler, optimizer_step
from workflows.train.throughput import mfu, peak_flops


def measure(batches: Iterator[dict], steps: int, cfg, setup, device) -> dict[str, float]:
    """Train a fresh model for ``steps`` optimizer steps on ``batches`` (after one untimed warm-up step)."""
    model = build_model(cfg, setup)
    channels_last = cfg.model.channels_last and use_channels_last(model)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, steps + 1)
    plan = plan_batches(cfg.train.global_batch_size, 1, cfg.train.micro_batch_size)
    loss_fn, autocast = make_loss(cfg, model), autocast_for(cfg, device)
    step_model, loss_fn = compile_for_training(model, loss_fn, cfg.model.compile, cfg.model.compile_mode)
    cudagraphs = uses_cudagraphs(cfg.model.compile, cfg.model.compile_mode)
    wait, start = 0.0, 0.0
    for i in range(steps + 1):  # step 0 warms up (first batch, allocator), not timed
        if i == 1:
            wait, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        images, tokens = to_device(batch, device)
        loss = optimizer_step(step_model, model, loss_fn, optimizer, scheduler, images, tokens, plan.accum_steps,
                              autocast, cfg.train.grad_clip_norm, cudagraphs, channels_last)
    loss.item()  # wait for the device
    elapsed = time.perf_counter() - start
    return {"samples_per_second": steps * plan.global_batch / elapsed, "data_wait": wait / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup = prepare_run(cfg, TrainDebug())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ensure_ray()
    order, g = setup.order, cfg.train.global_batch_size

    def real() -> Iterator[dict]:
        for epoch in itertools.count():
            yield from epoch_batches(order, epoch, 0, 0, 1, image_size=setup.image_size,
                                     augment=augmentation(cfg.train), endpoint=cfg.storage.s3_endpoint)

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, setup.tokenizer.vocab_size - 1, (g, setup.context_length))
    tokens[:, -1] = setup.tokenizer.eot_token_id
    fixed = {"image": rng.integers(0, 256, (g, 3, setup.image_size, setup.image_size), np.uint8), "tokens": tokens}

    flops = model_flops_per_sample(build_model(cfg, setup).config)
    peak = peak_flops(device, cfg.train.peak_flops)
    # Synthetic runs before AND after the real feed: their mean is the baseline, their spread the noise.
    before = measure(itertools.repeat(fixed), args.steps, cfg, setup, device)
    feed = measure(real(), args.steps, cfg, setup, device)
    after = measure(itertools.repeat(fixed), args.steps, cfg, setup, device)
    synth = {k: (before[k] + after[k]) / 2 for k in before}
    print(f"device {device} ({torch.get_num_threads()} threads), model {cfg.model.name}, {setup.image_size} px, "
          f"global batch {g} (micro-batch cap {cfg.train.micro_batch_size or 'none'}), {args.steps} steps, "
          f"peak {peak / 1e9:.1f} GFLOP/s, {3 * flops / 1e9:.2f} GFLOP per trained sample")
    for name, r in (("synthetic in-memory", synth), ("Ray Data feed", feed)):
        print(f"{name:>20}: {r['samples_per_second']:8.1f} samples/s  "
              f"MFU {mfu(flops, r['samples_per_second'], peak, 1):6.1%}  data-wait {r['data_wait']:5.1%}")
    print(f"synthetic before/after: {before['samples_per_second']:.1f} / {after['samples_per_second']:.1f} samples/s")
    print(f"Ray Data feed / synthetic throughput ratio: {feed['samples_per_second'] / synth['samples_per_second']:.2f}")


if __name__ == "__main__":
    main()
