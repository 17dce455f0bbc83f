"""Fault injection for the tests: a ledger of every trained sample, and a worker that dies on cue.

Off by default (``TrainDebug()``); the exact-resume and elasticity tests turn it on through
``run_training(cfg, debug=...)``. Kept out of the training loop, which only calls ``after_step``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from workflows.common.log import get_logger

log = get_logger("train")


@dataclass(frozen=True)
class TrainDebug:
    """Test hooks, off by default. ``ledger_dir``: every rank appends ``epoch step rank world key`` per
    trained sample to ``rank-<r>.tsv``; ``fail_at_step``/``fail_rank``: that rank ``os._exit(1)``s after
    that step, once (a flag file in ``ledger_dir`` remembers it), ``fail_after_s`` seconds later.

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s): a worker that dies sooner takes the latest report
    with it and the group resumes from the one before. A delay longer than that interval makes the
    restart point deterministic for a test; the exact-resume guarantee holds either way."""

    ledger_dir: str = ""
    fail_at_step: int = 0
    fail_rank: int = 1
    fail_after_s: float = 0.0


def after_step(debug: TrainDebug, rank: int, world: int, epoch: int, step: int, keys: Iterable[str]) -> None:
    """Record the step's samples, then fail here if this is the step and rank to fail at."""
    _append_ledger(debug, rank, world, epoch, step, keys)
    _maybe_fail(debug, rank, step)


def _append_ledger(debug: TrainDebug, rank: int, world: int, epoch: int, step: int, keys) -> None:
    lines = "".join(f"{epoch}\t{step}\t{rank}\t{world}\t{k}\n" for k in keys)
    with open(Path(debug.ledger_dir) / f"rank-{rank}.tsv", "a") as f:
        f.write(lines)


def _maybe_fail(debug: TrainDebug, rank: int, step: int) -> None:
    if debug.fail_at_step == step and debug.fail_rank == rank:
        flag = Path(debug.ledger_dir) / f"failed-at-{step}"
        if not flag.exists():
            flag.touch()
            log.warning("fault injection: rank %d exits after step %d in %.0f s", rank, step, debug.fail_after_s)
            time.sleep(debug.fail_after_s)
            os._exit(1)
