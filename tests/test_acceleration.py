"""The speed levers (``workflows.train.acceleration``) change speed, not results, and the GPU benchmark runs
the trainer's own step (smoke-run here on CPU)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from clip_core import ClipLoss, create_model
from clip_core.model import CLIP
from workflows.common.config import TrainConfig
from workflows.train.acceleration import REGIONS, compile_for_training, use_channels_last, uses_cudagraphs
from workflows.train.optim import build_optimizer, build_scheduler, optimizer_step

REPO = Path(__file__).resolve().parent.parent


def _batch(model: CLIP, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size, text = model.config.vision.image_size, model.config.text
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, text.vocab_size - 1, (n, text.context_length), generator=generator)
    tokens[:, -1] = text.vocab_size - 1
    return images, tokens


def _losses(name: str, scope: str, backend: str = "inductor", channels_last: bool = False) -> tuple[list[float], CLIP]:
    """Three optimizer steps from the same init: one micro-batch, one more, then two (accumulation,
    whose no-grad embedding pass is a second compiled variant of every block)."""
    torch.manual_seed(0)
    raw = create_model(name)
    images, tokens = _batch(raw)
    channels_last = channels_last and use_channels_last(raw)
    optimizer = build_optimizer(raw, TrainConfig())
    scheduler = build_scheduler(optimizer, 1, 10)
    model, loss_fn = compile_for_training(raw, ClipLoss(), scope, "default", backend)
    losses = [optimizer_step(model, raw, loss_fn, optimizer, scheduler, images, tokens, accum, contextlib.nullcontext(),
                             1.0, channels_last=channels_last).item() for accum in (1, 1, 2)]
    return losses, raw


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_regional_inductor_compile_trains_like_eager():
    eager, reference = _losses("tiny-vit", "none")
    compiled, raw = _losses("tiny-vit", "regional")
    assert compiled == pytest.approx(eager, rel=1e-4)
    regions = [m for m in raw.modules() if isinstance(m, REGIONS)]
    assert regions and all(m._compiled_call_impl is not None for m in regions)  # every block, in place
    # Compiled in place: the state dict (the checkpoint format) is the bare model's, key for key and value for value.
    assert list(raw.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(raw.state_dict()[key], value, rtol=1e-3, atol=1e-5)


def test_full_compile_and_resnet_channels_last_train_like_eager():
    """Tracing only (the eager backend), so this stays fast: the wiring, not Inductor's kernels."""
    eager, _ = _losses("tiny-rn", "none")
    full, _ = _losses("tiny-rn", "full", backend="eager")
    nhwc, raw = _losses("tiny-rn", "regional", backend="eager", channels_last=True)
    assert full == pytest.approx(eager, rel=1e-5)
    assert nhwc == pytest.approx(eager, rel=1e-4)
    assert raw.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_leaves_transformers_alone():
    model = create_model("tiny-vit")
    assert not use_channels_last(model)
    assert model.visual.conv1.weight.is_contiguous()


def test_cudagraphs_only_with_a_cudagraph_mode_of_a_compiled_model():
    assert uses_cudagraphs("regional", "reduce-overhead") and uses_cudagraphs("full", "max-autotune")
    assert not uses_cudagraphs("none", "reduce-overhead")
    assert not uses_cudagraphs("regional", "max-autotune-no-cudagraphs")


def test_gpu_bench_smoke_runs_the_trainer_step_on_cpu(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    gpu_bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", gpu_bench)  # dataclasses look their module up
    spec.loader.exec_module(gpu_bench)
    out = tmp_path / "bench.json"
    code = gpu_bench.main(["--device", "cpu", "--systems", "clipflow", "--models", "tiny-vit:4,tiny-rn:4",
                           "--warmup", "1", "--steps", "2", "--repeats", "2", "--compile", "regional",
                           "--compile-backend", "eager", "--json", str(out)])
    assert code == 0
    rows = [row for model in json.loads(out.read_text())["results"] for row in model["rows"]]
    assert [(r["model"], r["system"], r["status"]) for r in rows] == [("tiny-vit", "clipflow", "ok"),
                                                                      ("tiny-rn", "clipflow", "ok")]
    assert all(r["samples_per_s"] > 0 and len(r["window_samples_per_s"]) == 2 for r in rows)
    assert "tiny-rn" in capsys.readouterr().out
