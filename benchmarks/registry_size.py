"""What a registry version costs to download: a training checkpoint (weights, AdamW state, trainer state) against
its weights-only export (what `clipflow train` publishes as the version), in bytes and as a ratio measured in
the same run. Random weights on the CPU: the sizes do not depend on the values.

    .venv/bin/python benchmarks/registry_size.py demo-vit ViT-B-32
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from clip_core import Tokenizer, create_model, save_checkpoint
from clip_core.checkpoint import export_weights
from workflows.common.config import load_config


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def demo_tokenizer(vocab_size: int, context_length: int) -> Tokenizer:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    return Tokenizer.train([" ".join(rng.choice(words) for _ in range(8)) for _ in range(5000)],
                           vocab_size=vocab_size, context_length=context_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="clip_core model names (the demo's takes the demo's data sizes)")
    args = parser.parse_args()
    cfg = load_config(None, [])
    tokenizer = demo_tokenizer(cfg.tokenizer.vocab_size, cfg.tokenizer.context_length)
    for name in args.models:
        sizes = dict(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
                     image_size=cfg.preprocess.image_size) if name == cfg.model.name else {}
        model = create_model(name, **sizes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # AdamW's state as training holds it: step, exp_avg, exp_avg_sq per parameter
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        with tempfile.TemporaryDirectory(prefix="clipflow-registry-size-") as tmp:
            full = save_checkpoint(Path(tmp) / "full", model, tokenizer, trainer_state={"step": 1, "samples_seen": 1},
                                   training_state={"optimizer": optimizer.state_dict(),
                                                   "scheduler": scheduler.state_dict(),
                                                   "rng": [{"torch": torch.get_rng_state()}]})
            lean = export_weights(full, Path(tmp) / "lean")
            before, after = tree_bytes(full), tree_bytes(lean)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:10s} params {params:>11,}  training checkpoint {before:>13,} B  weights-only version "
              f"{after:>13,} B  ratio {after / before:.3f} ({before / after:.2f}x smaller)", flush=True)


if __name__ == "__main__":
    main()
