"""Training-step throughput of clipflow vs OpenCLIP on one GPU, in one process, for the same models.

    PYTHONPATH=. python benchmarks/gpu_bench.py [--models ViT-B-32:512,ViT-B-16:256,ViT-L-14:128,RN50:256]
        [--steps 20] [--warmup 10] [--repeats 3] [--compile none|full|regional]
        [--compile-mode default|reduce-overhead|max-autotune-no-cudagraphs|max-autotune]
        [--systems clipflow,openclip] [--device cuda] [--peak-tflops 790] [--json OUT]

Both systems train the same architecture (clip_core's zoo config; OpenCLIP's model is built from its
own config with QuickGELU set to match) on the same per-GPU batch, under bf16 autocast, with the
paper's AdamW (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on weight matrices only,
``workflows.train.optim.param_groups``) and a warmup-cosine LR schedule stepped every step. TF32 and
cuDNN autotuning are on for both, as open_clip_train sets them.

- clipflow: the trainer's own step, ``workflows.train.optim.optimizer_step`` (one micro-batch, no gradient
  clipping: the defaults): uint8 images normalised on the device, forward + ``clip_core.ClipLoss`` +
  backward through ``workflows.train.accumulation.accumulate_gradients``, AdamW, scheduler, temperature
  clamp. Its levers are the trainer's too (``workflows.train.acceleration``; config keys in brackets),
  each switchable so gains can be attributed: ``--compile`` (``model.compile``: whole model + loss,
  or regional: each transformer block and ResNet bottleneck), ``--compile-mode``
  (``model.compile_mode``; ``reduce-overhead`` adds CUDA graphs), fused AdamW (``build_optimizer``;
  ``--no-fused-adamw``), channels_last ResNets (``model.channels_last``; ``--no-channels-last``).
  Nothing here imports MLflow or Ray, which GPU images need not have.
- OpenCLIP: open_clip_train's step with ``--precision amp_bf16``: an fp32 ``open_clip.create_model``
  run eagerly under autocast, float images already normalised (its data loader does that on the
  CPU, so it is not timed), ``open_clip.loss.ClipLoss``, plain ``torch.optim.AdamW`` (the default
  foreach kernels), temperature clamp. Random init: nothing is downloaded.

Timing: one fixed random batch already on the device; ``--warmup`` untimed steps first (compilation
and cuDNN autotuning happen there; their wall time is reported), then ``--repeats`` windows of
``--steps`` steps, each between two ``torch.cuda.synchronize()`` calls with no host sync inside (the
loss is read after the last window). samples/s is the median window. Both systems' FLOPs are
``clip_core.model_flops_per_sample`` x 3 (forward + backward), so model TFLOP/s and MFU against
``--peak-tflops`` (790: the H200's measured dense bf16 matmul rate, as the issue states;
``workflows.train.throughput`` lists the datasheet's 989) compare like for like.

Correctness in the same run: OpenCLIP's model loads the initial state dict of clipflow's model
(same seed) with ``strict=True``, so the first step of both systems sees the same weights and the
same batch: their losses must agree within ``--loss-rtol`` (bf16). A system that runs out of memory
is reported as OOM, one that fails as an error, and the run goes on. The table goes to stdout; with
``--json`` the results are also written to a file, rewritten after every model.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from clip_core import ClipLoss, create_model, list_models, model_flops_per_sample, normalize
from clip_core.model import CLIP, MAX_LOGIT_SCALE
from clip_core.model_configs import CLIPConfig
from workflows.common.config import TrainConfig
from workflows.train.acceleration import (COMPILE_MODES, COMPILE_SCOPES, compile_for_training, use_channels_last,
                                          uses_cudagraphs)
from workflows.train.optim import build_optimizer, build_scheduler, optimizer_step, param_groups
from workflows.train.throughput import mfu, peak_memory_bytes

SYSTEMS = ("clipflow", "openclip")
DEFAULT_MODELS = "ViT-B-32:512,ViT-B-16:256,ViT-L-14:128,RN50:256"
# The issue's targets: clipflow/OpenCLIP samples/s, and clipflow's MFU.
SPEEDUP_TARGETS = {("ViT-B-32", 512): 1.5}
MFU_TARGETS = {("ViT-B-16", 256): 0.45, ("ViT-L-14", 128): 0.45}

Step = Callable[[], torch.Tensor]  # one optimizer step on the fixed batch; returns the detached loss


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batch: int


@dataclass
class Row:
    """One system's result on one model."""

    model: str
    batch: int
    system: str
    status: str = "ok"
    samples_per_s: float | None = None  # median window
    window_samples_per_s: list[float] = field(default_factory=list)
    step_ms: float | None = None
    model_tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    warmup_s: float | None = None  # wall time of the warm-up steps, compilation included
    first_loss: float | None = None  # loss of the first step: initial weights, the shared batch
    last_loss: float | None = None


@dataclass
class Timing:
    first_loss: float
    last_loss: float
    warmup_s: float
    windows_s: list[float]


def parse_models(text: str) -> list[ModelSpec]:
    specs = []
    for item in text.split(","):
        name, sep, batch = item.strip().partition(":")
        if not sep or not batch.isdigit() or int(batch) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME:BATCH, e.g. ViT-B-32:512")
        if name not in list_models():
            raise argparse.ArgumentTypeError(f"unknown model {name!r}; clip_core has {', '.join(list_models())}")
        specs.append(ModelSpec(name, int(batch)))
    return specs


def parse_systems(text: str) -> list[str]:
    systems = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        raise argparse.ArgumentTypeError(f"systems must be a comma list of {', '.join(SYSTEMS)}; got {text!r}")
    return list(dict.fromkeys(systems))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--models", type=parse_models, default=DEFAULT_MODELS,
        help="comma list of NAME:PER_GPU_BATCH (default: %(default)s)")
    add("--steps", type=positive_int, default=20, help="timed steps per window (default: %(default)s)")
    add("--warmup", type=positive_int, default=10,
        help="untimed steps first, compilation included; the first is the loss check (default: %(default)s)")
    add("--repeats", type=positive_int, default=3, help="timed windows; the median is reported (default: %(default)s)")
    add("--systems", type=parse_systems, default=",".join(SYSTEMS),
        help="comma list of the systems to run, in order (default: %(default)s)")
    add("--device", default="cuda", help="default: %(default)s")
    add("--peak-tflops", type=float, default=790.0, help="per-device dense bf16 peak for MFU (default: %(default)s)")
    add("--json", type=Path, default=None, help="also write the results to this file")
    add("--seed", type=int, default=0, help="weights and batch (default: %(default)s)")
    add("--loss-rtol", type=float, default=1e-2,
        help="max relative difference of the two systems' first-step losses (default: %(default)s)")
    add("--gelu", choices=("zoo", "quick", "exact"), default="zoo",
        help="activation for both systems: the clip_core zoo's (QuickGELU for the paper's models), QuickGELU, "
             "or nn.GELU (OpenCLIP's own default for these names); default: %(default)s")
    levers = parser.add_argument_group("clipflow levers")
    levers.add_argument("--compile", choices=COMPILE_SCOPES, default="regional",
                        help="torch.compile the whole model and loss, or each transformer block and ResNet "
                             "bottleneck (default: %(default)s)")
    levers.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode; reduce-overhead and max-autotune add CUDA graphs "
                             "(default: %(default)s)")
    levers.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend; eager only traces (default: %(default)s)")
    levers.add_argument("--no-fused-adamw", dest="fused_adamw", action="store_false",
                        help="use the default (foreach) AdamW, as OpenCLIP does")
    levers.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep ResNet image towers and their input in NCHW")
    return parser.parse_args(argv)


def model_overrides(gelu: str) -> dict[str, bool]:
    return {} if gelu == "zoo" else {"quick_gelu": gelu == "quick"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last system left: compiled graphs, cached allocator blocks."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batch(cfg: CLIPConfig, batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and token rows ending in EOT (the highest id, where both towers pool), on the device."""
    generator = torch.Generator(device).manual_seed(seed)
    size, vocab = cfg.vision.image_size, cfg.text.vocab_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device, generator=generator)
    tokens = torch.randint(1, vocab - 1, (batch, cfg.text.context_length), device=device, generator=generator)
    tokens[:, -1] = vocab - 1
    return images, tokens


def build_clipflow_model(name: str, args: argparse.Namespace, device: torch.device) -> CLIP:
    torch.manual_seed(args.seed)
    return create_model(name, device=device, **model_overrides(args.gelu))


def adamw(model: nn.Module, fused: bool) -> torch.optim.AdamW:
    """The paper's AdamW on clipflow's parameter groups: ``build_optimizer`` (fused on CUDA) or the
    default foreach implementation (OpenCLIP's)."""
    train = TrainConfig()
    if fused:
        return build_optimizer(model, train)
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=train.eps)


def scheduler_for(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LRScheduler:
    return build_scheduler(optimizer, args.warmup, args.warmup + args.steps * args.repeats)


def bf16_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def clipflow_step(name: str, images: torch.Tensor, tokens: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> Step:
    raw = build_clipflow_model(name, args, device)
    channels_last = args.channels_last and use_channels_last(raw)  # the images convert in each step, as in training
    optimizer = adamw(raw, args.fused_adamw)
    scheduler = scheduler_for(optimizer, args)
    model, loss_fn = compile_for_training(raw, ClipLoss(), args.compile, args.compile_mode, args.compile_backend)
    autocast = bf16_autocast(device)
    cudagraphs = uses_cudagraphs(args.compile, args.compile_mode)
    # one micro-batch and no gradient clipping: the trainer's defaults
    return lambda: optimizer_step(model, raw, loss_fn, optimizer, scheduler, images, tokens, 1, autocast, 0.0,
                                  cudagraphs, channels_last)


def openclip_step(name: str, images: torch.Tensor, tokens: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> Step:
    import open_clip  # needs torchvision and ftfy: imported only when OpenCLIP runs

    source = build_clipflow_model(name, args, device)  # the same initial weights as clipflow's run
    model = open_clip.create_model(name, precision="amp_bf16", device=device, quick_gelu=source.config.quick_gelu)
    model.load_state_dict(source.state_dict(), strict=True)
    del source
    pixels = normalize(images)  # OpenCLIP's loader hands over normalised float images
    loss_fn = open_clip.loss.ClipLoss(cache_labels=True, rank=0, world_size=1)
    optimizer = adamw(model, fused=False)
    scheduler = scheduler_for(optimizer, args)
    autocast = bf16_autocast(device)

    def step() -> torch.Tensor:
        # open_clip_train.train.train_one_epoch, accum_freq 1, no GradScaler (bf16)
        optimizer.zero_grad()
        with autocast:
            image_features, text_features, logit_scale = model(pixels, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()

    return step


STEPS: dict[str, Callable[..., Step]] = {"clipflow": clipflow_step, "openclip": openclip_step}


def measure(step: Step, device: torch.device, args: argparse.Namespace) -> Timing:
    start = time.perf_counter()
    first_loss = step().item()  # the loss check: initial weights on the shared batch
    for _ in range(args.warmup - 1):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    windows = []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        synchronize(device)
        windows.append(time.perf_counter() - start)
    return Timing(first_loss, loss.item(), warmup_s, windows)


def fill_row(row: Row, timing: Timing, flops: float, args: argparse.Namespace, device: torch.device) -> None:
    rates = [row.batch * args.steps / seconds for seconds in timing.windows_s]
    rate = statistics.median(rates)
    row.window_samples_per_s = [round(r, 2) for r in rates]
    row.samples_per_s = rate
    row.step_ms = 1000 * row.batch / rate
    row.model_tflops = 3 * flops * rate / 1e12
    row.mfu = mfu(flops, rate, args.peak_tflops * 1e12, 1)
    row.peak_mem_gib = peak_memory_bytes(device) / 2 ** 30
    row.warmup_s = timing.warmup_s
    row.first_loss, row.last_loss = timing.first_loss, timing.last_loss
    if not math.isfinite(timing.last_loss):
        row.status = "non-finite loss"


def run_system(system: str, spec: ModelSpec, images: torch.Tensor, tokens: torch.Tensor, flops: float,
               args: argparse.Namespace, device: torch.device) -> Row:
    row = Row(spec.name, spec.batch, system)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        timing = measure(STEPS[system](spec.name, images, tokens, args, device), device, args)
    except torch.cuda.OutOfMemoryError:
        row.status = "OOM"
    except Exception as error:  # report it and go on to the other runs: device time is scarce
        traceback.print_exc()
        first_line = (str(error).splitlines() or [""])[0]
        row.status = f"error: {type(error).__name__}: {first_line}"[:160]
    else:
        fill_row(row, timing, flops, args, device)
    release(device)
    return row


def summarise(spec: ModelSpec, rows: list[Row], flops: float, rtol: float) -> dict[str, Any]:
    """Speedup, loss agreement and the issue's targets for one model."""
    by_system = {row.system: row for row in rows if row.status == "ok"}
    clipflow, openclip = by_system.get("clipflow"), by_system.get("openclip")
    summary: dict[str, Any] = {"model": spec.name, "batch": spec.batch, "forward_gflops_per_sample": flops / 1e9,
                               "rows": [asdict(row) for row in rows]}
    if clipflow and openclip:
        summary["speedup"] = clipflow.samples_per_s / openclip.samples_per_s
        rel = abs(clipflow.first_loss - openclip.first_loss) / abs(openclip.first_loss)
        summary["loss_check"] = {"clipflow": clipflow.first_loss, "openclip": openclip.first_loss,
                                 "rel_diff": rel, "rtol": rtol, "ok": rel <= rtol}
    key = (spec.name, spec.batch)
    if key in SPEEDUP_TARGETS and "speedup" in summary:
        summary["target"] = {"speedup": SPEEDUP_TARGETS[key], "met": summary["speedup"] >= SPEEDUP_TARGETS[key]}
    if key in MFU_TARGETS and clipflow:
        summary["target"] = {"mfu": MFU_TARGETS[key], "met": clipflow.mfu >= MFU_TARGETS[key]}
    return summary


def fmt(value: float | None, spec: str, width: int = 0) -> str:
    return format("-" if value is None else format(value, spec), f">{width}")


def summary_line(summary: dict[str, Any]) -> str:
    parts = []
    if "speedup" in summary:
        parts.append(f"clipflow/OpenCLIP {summary['speedup']:.2f}x")
    target = summary.get("target")
    if target:
        goal = f">= {target['speedup']}x" if "speedup" in target else f"MFU >= {target['mfu']:.0%}"
        parts.append(f"target {goal}: {'MET' if target['met'] else 'NOT MET'}")
    check = summary.get("loss_check")
    if check:
        parts.append(f"first-step loss {check['clipflow']:.4f} vs {check['openclip']:.4f} "
                     f"(rel {check['rel_diff']:.1e}, rtol {check['rtol']:.0e}: {'OK' if check['ok'] else 'MISMATCH'})")
    return f"  {summary['model']} x{summary['batch']}: " + ("; ".join(parts) or "no comparison")


def print_table(summaries: list[dict[str, Any]]) -> None:
    header = (f"{'model':<12} {'batch':>5} {'system':<8} {'samples/s':>10} {'ms/step':>8} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'peak GiB':>8} {'warm-up s':>9}  status")
    print("\n" + header + "\n" + "-" * len(header))
    for summary in summaries:
        for row in summary["rows"]:
            print(f"{row['model']:<12} {row['batch']:>5} {row['system']:<8} {fmt(row['samples_per_s'], '.1f', 10)} "
                  f"{fmt(row['step_ms'], '.1f', 8)} {fmt(row['model_tflops'], '.1f', 8)} {fmt(row['mfu'], '.1%', 6)} "
                  f"{fmt(row['peak_mem_gib'], '.1f', 8)} {fmt(row['warmup_s'], '.1f', 9)}  {row['status']}")
        print(summary_line(summary))
    print(flush=True)


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": args.peak_tflops,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "models"},
           "models": [f"{s.name}:{s.batch}" for s in args.models]}
    if "openclip" in args.systems:
        try:
            env["open_clip"] = importlib.import_module("open_clip").__version__
        except ImportError as error:  # fail before any device time is spent
            raise SystemExit(f"--systems openclip needs an importable open_clip (open-clip-torch with torchvision "
                             f"and ftfy): {error}. Use --systems clipflow to skip it.") from error
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available here: pass --device cpu for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True  # as open_clip_train sets them, for both systems
        torch.backends.cudnn.benchmark = True
    env = environment(args, device)
    lever_text = (f"compile={args.compile}/{args.compile_mode}/{args.compile_backend} fused_adamw={args.fused_adamw} "
                  f"channels_last={args.channels_last} gelu={args.gelu}")
    print(f"[gpu_bench] {env['device']}, torch {env['torch']}, open_clip {env.get('open_clip', '-')}; "
          f"peak {args.peak_tflops:g} TFLOP/s; {args.warmup} warm-up + {args.repeats} x {args.steps} steps; "
          f"clipflow levers: {lever_text}", flush=True)
    summaries: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, spec in enumerate(args.models, 1):
        cfg = create_model(spec.name, device="meta", **model_overrides(args.gelu)).config
        flops = model_flops_per_sample(cfg)
        images, tokens = random_batch(cfg, spec.batch, device, args.seed)
        rows = []
        for system in args.systems:
            print(f"[{index}/{len(args.models)}] {spec.name} x{spec.batch} {system}: running "
                  f"(t={time.perf_counter() - started:.0f} s)", flush=True)
            row = run_system(system, spec, images, tokens, flops, args, device)
            print(f"[{index}/{len(args.models)}] {spec.name} x{spec.batch} {system}: {row.status}, "
                  f"{fmt(row.samples_per_s, '.1f')} samples/s, MFU {fmt(row.mfu, '.1%')}, "
                  f"warm-up {fmt(row.warmup_s, '.1f')} s", flush=True)
            rows.append(row)
        del images, tokens
        summaries.append(summarise(spec, rows, flops, args.loss_rtol))
        print(summary_line(summaries[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"env": env, "results": summaries}, indent=2) + "\n")
    print_table(summaries)
    print(f"[gpu_bench] done in {time.perf_counter() - started:.0f} s", flush=True)
    failed = [row["status"] for s in summaries for row in s["rows"] if row["status"] not in ("ok", "OOM")]
    mismatched = [s["model"] for s in summaries if not s.get("loss_check", {"ok": True})["ok"]]
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
