"""Batch tokenisation throughput: clip_core.Tokenizer vs OpenAI's pure-Python tokenizer (OpenCLIP's copy).

Both tokenise the same synthetic web-like captions (Zipf-distributed words, capitals, punctuation, numbers,
HTML entities, some non-ASCII, a few very long ones) with OpenAI's vocabulary; the outputs must be
identical, and the script prints captions/s of each and the ratio. Both run on one thread and both
cache per-word BPE results, so each gets the same warm-up on other captions first.

    python benchmarks/tokenizer_bench.py [--captions 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import time
from pathlib import Path
from types import ModuleType

import torch

from clip_core.tokenizer import Tokenizer

OPEN_CLIP_DIR = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
OPENAI_BPE = OPEN_CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz"
NON_ASCII = ["café", "naïve", "über", "’s", "“new”", "—", "…", "°C", "€5", "東京", "😍", "👍🏽", "niño", "Zürich", "½"]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;3", "&nbsp;"]
TEMPLATES = ["{}", "a photo of {}", "{} - stock image", "Image may contain: {}", "{} | Free Shipping", "{} ({} cm)",
             "New {} for sale!", "{}, {} and {}", "{}: {}", "#{} #{}"]


def load_reference() -> ModuleType:
    """OpenCLIP's tokenizer module by file path (`import open_clip` needs torchvision)."""
    spec = importlib.util.spec_from_file_location("openclip_tokenizer_reference", OPEN_CLIP_DIR / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_captions(n: int, seed: int) -> list[str]:
    """Web-caption-like text over the English words of OpenAI's vocabulary, Zipf-weighted."""
    rng = random.Random(seed)
    tok = Tokenizer.from_openai_bpe(OPENAI_BPE)
    pieces = (tok.decode([i]) for i in range(512, tok.sot_token_id))
    words = [w for w in pieces if len(w) > 1 and w.isascii() and w.isalpha()]
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 1.1 for rank in range(len(words))))

    def phrase() -> str:
        k = rng.choice([1, 2, 3, 3, 4, 6, 8, 12]) if rng.random() > 0.02 else 80
        out = rng.choices(words, cum_weights=cum_weights, k=k)
        if rng.random() < 0.3:
            out[0] = out[0].capitalize()
        if rng.random() < 0.15:
            out.append(str(rng.randint(1, 2024)))
        if rng.random() < 0.08:
            out.insert(rng.randrange(len(out) + 1), rng.choice(NON_ASCII))
        if rng.random() < 0.03:
            out.insert(rng.randrange(len(out) + 1), rng.choice(ENTITIES))
        return " ".join(out)

    captions = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        captions.append(template.format(*(phrase() for _ in range(template.count("{}")))) + rng.choice(["", ".", "!"]))
    return captions


def rate(fn, captions: list[str]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(captions)
    return len(captions) / (time.perf_counter() - start), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    captions = make_captions(args.captions, args.seed)
    warmup = make_captions(2000, args.seed + 1)
    reference = load_reference()
    ours = Tokenizer.from_openai_bpe(OPENAI_BPE)
    print(f"{len(captions)} captions, {sum(map(len, captions)) / len(captions):.0f} chars on average, "
          f"{sum(not c.isascii() for c in captions) / len(captions):.1%} non-ASCII; {os.cpu_count()} CPUs")

    reference.tokenize(warmup)
    ref_rate, ref_out = rate(reference.tokenize, captions)
    ours(warmup)
    our_rate, our_out = rate(ours, captions)
    if not torch.equal(our_out, ref_out):
        raise SystemExit("MISMATCH: clip_core.Tokenizer ids differ from the reference")
    print(f"reference (OpenCLIP SimpleTokenizer, pure Python): {ref_rate:10,.0f} captions/s")
    print(f"clip_core.Tokenizer:                               {our_rate:10,.0f} captions/s")
    print(f"ratio (ours / reference): {our_rate / ref_rate:.2f}x; ids identical on every caption")


if __name__ == "__main__":
    main()
