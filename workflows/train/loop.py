"""The per-worker training loop that Ray Train runs: a plain PyTorch loop, plus Ray's report/checkpoint.

Read top to bottom: build the model -> restore the latest checkpoint (model, optimizer, scheduler,
RNG, step) -> for each step: next batch of this rank's share of the global batch (Ray Data, see
``train.feed``), normalise on the device, feature-cached accumulation, clip, AdamW step, clamp the
temperature -> every ``log_every`` steps metrics to MLflow (rank 0) -> every ``checkpoint_every``
steps and at the end a clip_core checkpoint through ``ray.train.report`` -> every few steps the stop check
(``train.preemption``): a SIGTERM on the driver or a node drain makes a checkpoint at that step.

Only log steps synchronise with the device (``loss.item()``); checkpoints go up asynchronously
except the final one, which must be durable before the run reports success.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import torch
import torch.distributed as dist

from clip_core import (ClipLoss, SigLipLoss, Tokenizer, create_model, load_checkpoint, load_pretrained,
                       model_flops_per_sample, resized_crops, save_checkpoint)
from clip_core.model import CLIP, get_model_config
from workflows.artifacts import TrainerState
from workflows.common import storage
from workflows.common.config import Config
from workflows.common.log import get_logger, setup_logging
from workflows.data.eval_sets import zero_shot_in_process
from workflows.train.acceleration import compile_for_training, use_channels_last, uses_cudagraphs
from workflows.train.accumulation import plan_batches
from workflows.train.faults import TrainDebug, after_step
from workflows.train.feed import DataOrder, augmentation, epoch_batches
from workflows.train.optim import build_optimizer, build_scheduler, optimizer_step
from workflows.train.preemption import STOP, DriverStopped, StopCheck
from workflows.train.throughput import mfu, peak_flops, peak_memory_bytes

log = get_logger("train")
LOCAL_CHECKPOINT_PREFIX = "clipflow-ckpt-"  # + "<pid>-": rank 0's local copy of a checkpoint until Ray uploaded it
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # Zhai et al., 2023: t' = log 10, b = -10
SIGLIP_INIT_LOGIT_BIAS = -10.0


class RunLog(Protocol):
    """Where rank 0 reports the run: metrics and checkpoints to publish. clipflow's is the MLflow run
    (``workflows.tracking.tracker.TrainingTracking``); training itself knows no tracking server. It must
    never raise into training."""

    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_group_start(self, world_size: int, step: int, restored: bool) -> None: ...

    def publish_checkpoint(self, checkpoint_uri: str, step: int, samples_seen: int, final: bool) -> str | None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class RunLogFactory(Protocol):
    """Opens the run's log on rank 0 of every worker group; picklable (it travels to the workers) and built
    on the driver, which ends the run with it: the driver also sees the failures rank 0 never does (a
    killed worker group, Ctrl-C)."""

    def __call__(self, setup: "RunSetup") -> RunLog: ...

    def end(self, setup: "RunSetup", status: str) -> str:
        """End the run as ``status`` (FINISHED, FAILED, KILLED) unless rank 0 did; returns its id ("" if none)."""
        ...


@dataclass(frozen=True)
class RunSetup:
    """Everything the driver resolved before starting workers (see ``train.driver.prepare_run``)."""

    run_name: str
    order: DataOrder
    tokenizer: Tokenizer
    image_size: int
    context_length: int
    total_steps: int
    checkpoint_root: str  # storage.path/run_name: where Ray Train persists checkpoints
    manifest_hash: str
    log_level: str = "info"  # the driver's: workers are other processes and set up logging again
    debug: TrainDebug = field(default_factory=TrainDebug)
    run_log: RunLogFactory | None = None  # None: no tracking (benchmarks, tests of the loop alone)
    # What the first worker group restores when Ray Train has no checkpoint of this run (``restore``):
    # train.resume_from, or the run's own latest checkpoint when Ray's record of them is missing
    resume_checkpoint: str = ""
    pretrained: str = ""  # model.pretrained as given (before models:/ resolution): what checkpoints record
    finished_checkpoint: str = ""  # the run's final checkpoint when it already trained total_steps: no worker starts


def build_model(cfg: Config, setup: RunSetup, device: str | None = None) -> CLIP:
    """The run's model with random weights and its towers locked as configured (``model.pretrained`` is
    loaded into it later, on a fresh run only: ``read_pretrained``). ``device="meta"``: the structure alone,
    for the driver's checks."""
    siglip, m = cfg.train.loss == "siglip", cfg.model
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    extra = {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS} if siglip else {}
    model = create_model(m.name, device, vocab_size=setup.tokenizer.vocab_size, context_length=setup.context_length,
                         image_size=setup.image_size, patch_dropout=m.patch_dropout,
                         grad_checkpointing=m.grad_checkpointing, **extra)
    if m.lock_image:
        model.lock_image_tower(m.lock_image_unlocked_groups, m.lock_image_freeze_bn_stats)
    if m.lock_text:
        model.lock_text_tower(m.lock_text_unlocked_groups)
    return model


def read_pretrained(cfg: Config) -> CLIP:
    """``model.pretrained`` (a clipflow checkpoint directory or an OpenAI/OpenCLIP weights file, local or
    ``s3://``) as a CPU model whose architecture is read from the file, with model.name's activation
    (weights files cannot show it; checkpoints and archives that record another are refused)."""
    uri, endpoint = cfg.model.pretrained, cfg.storage.s3_endpoint
    with tempfile.TemporaryDirectory(prefix="clipflow-pretrained-") as tmp:
        local = uri
        if storage.is_s3(uri):
            local = (str(storage.download_tree(uri, Path(tmp), endpoint)) if storage.is_dir(uri, endpoint)
                     else storage.local_copy(uri, tmp, endpoint))
        return load_pretrained(local, quick_gelu=get_model_config(cfg.model.name).quick_gelu)


def make_loss(cfg: Config, model: CLIP):
    """(image_features, text_features, logit_scale) -> loss over the global batch (whose size tells the
    loss every rank's share at any world size)."""
    global_batch = cfg.train.global_batch_size
    if cfg.train.loss == "siglip":
        siglip = SigLipLoss(global_batch=global_batch)
        return lambda image, text, scale: siglip(image, text, scale, model.logit_bias)
    return ClipLoss(local_loss=cfg.train.local_loss, gather_with_grad=cfg.train.gather_with_grad,
                    global_batch=global_batch)


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Ray hands out read-only views of its object store, which ``to_device`` wraps without a copy and only
# reads; torch warns about each one. The filter is installed once: a per-call ``catch_warnings`` resets
# every module's warning registry, so each step would repeat every other once-only warning.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A feed batch's uint8 images and int64 tokens on ``device``, without a host copy (normalising
    makes a new tensor). A batch with crop boxes (``train.augment_on=device``) is cropped and resized
    here, on the device."""
    images, tokens = torch.from_numpy(batch["image"]), torch.from_numpy(batch["tokens"])
    images = images.to(device, non_blocking=True)
    if "box" in batch:
        images = resized_crops(images, torch.from_numpy(batch["box"]).to(device), images.shape[-1])
    return images, tokens.to(device, non_blocking=True)


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(saved: list[dict[str, Any]] | None, cfg: Config, rank: int, step: int, device: torch.device) -> None:
    """The rank's own saved RNG when the world size is unchanged, else a seed derived from (seed, rank, step)."""
    if saved is not None and rank < len(saved) and len(saved) == dist_world():
        torch.set_rng_state(saved[rank]["torch"])
        if device.type == "cuda" and saved[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
    else:
        torch.manual_seed(hash((cfg.train.seed, rank, step)) % 2 ** 63)


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_rng_states(device: torch.device) -> list[dict[str, Any]]:
    state = _rng_state(device)
    if dist_world() == 1:
        return [state]
    states: list[Any] = [None] * dist_world()
    dist.all_gather_object(states, state)
    return states


@contextlib.contextmanager
def _run_log(cfg: Config, setup: RunSetup, rank: int, world_size: int, step: int,
             restored: bool) -> Iterator[RunLog | None]:
    """Rank 0's run log (the same run again after a restart: keyed by the run name), ended FAILED if
    this worker's loop raises (KILLED on KeyboardInterrupt). It records the group's start (world size, the
    step it starts from) and, after a restore, queues again what a torn-down group may not have published."""
    if rank != 0 or setup.run_log is None:
        yield None
        return
    tracker = setup.run_log(setup)
    try:
        tracker.log_group_start(world_size, step, restored)
        if restored:
            publish_kept(cfg, setup, tracker, step)
        yield tracker
    except BaseException as exc:
        tracker.close(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.close()


class Meter:
    """Rank 0's throughput over a logging window: global samples/s, MFU and the fraction of wall time
    spent waiting for the next batch (``timed`` wraps the batch iterator)."""

    def __init__(self, global_batch: int, step: int, flops_per_sample: float, peak_per_device: float, world: int):
        self.global_batch, self.flops, self.peak, self.world = global_batch, flops_per_sample, peak_per_device, world
        self.attempt_start = self.start = time.perf_counter()
        self.attempt_step = self.first_step = step
        self.data_wait = 0.0
        self.steady: tuple[float, int] | None = None  # (time, step) at the end of the attempt's first window

    def timed(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        it = iter(batches)
        while True:
            wait_start = time.perf_counter()
            batch = next(it, None)
            self.data_wait += time.perf_counter() - wait_start
            if batch is None:
                return
            yield batch

    def window(self, step: int) -> dict[str, float]:
        """The window's metrics; starts the next window."""
        now = time.perf_counter()
        elapsed = now - self.start
        rate = (step - self.first_step) * self.global_batch / elapsed
        out = {"samples_per_second": rate, "mfu": mfu(self.flops, rate, self.peak, self.world),
               "data_wait_fraction": self.data_wait / elapsed}
        self.start, self.first_step, self.data_wait = now, step, 0.0
        self.steady = self.steady or (now, step)
        return out

    def attempt_rate(self, step: int) -> float:
        """Samples/s of this worker group after its first logging window, which holds the warm-up
        (compilation, the data pipeline's start); over the whole attempt if that is all there was.
        The run's summary figure."""
        since, first = self.steady if self.steady and step > self.steady[1] else (self.attempt_start, self.attempt_step)
        return (step - first) * self.global_batch / (time.perf_counter() - since)


def restore(raw: CLIP, cfg: Config, setup: RunSetup) -> tuple[TrainerState, dict[str, Any] | None]:
    """Load the run's latest checkpoint as Ray Train knows it (after a restart, or a new driver of the same
    run id), else ``setup.resume_checkpoint``, into ``raw``; returns (trainer_state, training_state): step 0
    and None for a fresh run."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None and setup.resume_checkpoint:
        fs, path = storage.resolve(setup.resume_checkpoint, cfg.storage.s3_endpoint)
        latest = ray.train.Checkpoint(path=path, filesystem=fs)
    if latest is None:
        return TrainerState(), None
    with latest.as_directory() as directory:
        restored = load_checkpoint(directory)
        raw.load_state_dict(restored.model.state_dict())
        return TrainerState.from_dict(restored.trainer_state), restored.load_training_state()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Config = config["cfg"]
    setup: RunSetup = config["setup"]
    setup_logging(setup.log_level, worker=True)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    plan = plan_batches(cfg.train.global_batch_size, world, cfg.train.micro_batch_size, rank)
    order, debug, total_steps = setup.order, setup.debug, setup.total_steps

    raw = build_model(cfg, setup)
    trainer_state, training_state = restore(raw, cfg, setup)
    if training_state is None and rank == 0 and cfg.model.pretrained:  # DDP broadcasts rank 0's weights
        raw.load_state_dict(read_pretrained(cfg).state_dict())
    channels_last = cfg.model.channels_last and use_channels_last(raw)  # before DDP registers the parameters
    model = ray.train.torch.prepare_model(raw)  # to device + DDP when world > 1
    optimizer = build_optimizer(raw, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, total_steps)
    step = trainer_state.step
    if training_state is not None:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
    _restore_rng(training_state and training_state["rng"], cfg, rank, step, device)
    loss_fn, autocast = make_loss(cfg, raw), autocast_for(cfg, device)
    model, loss_fn = compile_for_training(model, loss_fn, cfg.model.compile, cfg.model.compile_mode)
    cudagraphs = uses_cudagraphs(cfg.model.compile, cfg.model.compile_mode)
    if rank == 0:
        log.info(f"{setup.run_name}: world {world}, {plan.describe()}, steps {step}->{total_steps}"
                 + (" (resumed)" if step else "")
                 + (f", compile {cfg.model.compile}/{cfg.model.compile_mode}" if cfg.model.compile != "none" else "")
                 + (", channels_last" if channels_last else "")
                 + (", crops on the device" if augmentation(cfg.train) == "device" else ""))
    meter = Meter(plan.global_batch, step, model_flops_per_sample(raw.config),
                  peak_flops(device, cfg.train.peak_flops) if rank == 0 else 0.0, world)
    loss = torch.zeros(())
    stop = StopCheck(config.get("stop"), rank)  # SIGTERM on the driver, a node drain: see train.preemption
    restored = training_state is not None

    # A stop ends the loop with DriverStopped, so the run log ends KILLED, and the workers return cleanly
    with contextlib.suppress(DriverStopped), _run_log(cfg, setup, rank, world, step, restored) as tracker:
        while step < total_steps:
            epoch, done = divmod(step, order.steps_per_epoch)
            steps_left = min(total_steps, (epoch + 1) * order.steps_per_epoch) - step
            batches = epoch_batches(order, epoch, done, rank, world, image_size=setup.image_size,
                                    augment=augmentation(cfg.train), endpoint=cfg.storage.s3_endpoint)
            for batch in itertools.islice(meter.timed(batches), steps_left):
                images, tokens = to_device(batch, device)
                loss = optimizer_step(model, raw, loss_fn, optimizer, scheduler, images, tokens, plan.accum_steps,
                                      autocast, cfg.train.grad_clip_norm, cudagraphs, channels_last)
                step += 1
                if debug.ledger_dir:
                    after_step(debug, rank, world, epoch, step, batch["key"])
                if rank == 0 and step % cfg.train.log_every == 0:
                    metrics = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                               "temperature": raw.logit_scale.exp().item(), **meter.window(step),
                               "peak_memory_gib": peak_memory_bytes(device) / 2 ** 30, "epoch": epoch,
                               "samples_seen": step * plan.global_batch}
                    if tracker is not None:
                        tracker.log_metrics(metrics, step=step)
                    log.info(f"step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                             f"T {metrics['temperature']:.1f} {metrics['samples_per_second']:.1f} samples/s "
                             f"mfu {metrics['mfu']:.1%} data-wait {metrics['data_wait_fraction']:.0%}")
                if rank == 0 and cfg.train.zero_shot_every and step % cfg.train.zero_shot_every == 0:
                    zero_shot(raw, setup.tokenizer, cfg, device, tracker, step)
                notice = stop.poll(step)  # every rank, the same answer: a checkpoint now, uploaded before going on
                if step % cfg.train.checkpoint_every == 0 or step == total_steps or notice:
                    states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "rng": _all_rng_states(device), "scaler": None}  # bf16 needs no loss scaler
                    report_checkpoint(cfg, setup, raw, states, tracker, rank=rank, world=world, step=step,
                                      epoch=epoch, loss=loss.item(), samples_per_second=meter.attempt_rate(step),
                                      sync=notice is not None)
                if notice == STOP and step < total_steps:
                    raise DriverStopped(f"stopped at step {step} (SIGTERM on the driver)")


def zero_shot(raw: CLIP, tokenizer: Tokenizer, cfg: Config, device: torch.device, tracker: RunLog | None,
              step: int) -> None:
    """``train.zero_shot_every``: rank 0 scores the model in memory on ``eval.zeroshot`` (the other ranks
    wait at the next all-reduce), logged under the same ``<dataset>/acc1`` names as `clipflow eval`."""
    raw.eval()
    try:
        metrics = zero_shot_in_process(raw, tokenizer, cfg, device)
    finally:
        raw.train()
    if tracker is not None:
        tracker.log_metrics(metrics, step=step)
    log.info(f"step {step} zero-shot " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(metrics.items())
                                                   if k.endswith("acc1")))


CHECKPOINT_PREFIX = "checkpoint_"  # + the step: the run's checkpoint directories under its storage path


def checkpoint_names(root: str, endpoint: str) -> list[str]:
    """The run's checkpoint directory names under ``root`` (``checkpoint_<step>``), oldest first."""
    prefix = root.rstrip("/") + "/"
    files = [uri[len(prefix):] for uri in storage.list_files(root, endpoint, recursive=True)]
    return sorted({f.split("/")[0] for f in files if f.startswith(CHECKPOINT_PREFIX) and "/" in f})


def publication_due(cfg: Config, step: int, total_steps: int) -> bool:
    """Whether the checkpoint at ``step`` gets a model version: every ``mlflow.publish_every``-th one of the
    ``train.checkpoint_every`` grid, the final one, and any off the grid (a stop or preemption checkpoint)."""
    every = cfg.train.checkpoint_every
    return step == total_steps or step % every != 0 or (step // every) % cfg.mlflow.publish_every == 0


def publish_kept(cfg: Config, setup: RunSetup, tracker: RunLog, restored_step: int) -> None:
    """Queue the publication of every kept checkpoint up to the restored one that was due: a worker group torn
    down (a lost node, a resize, a killed driver) loses the publications its rank 0 had queued, and the run
    resumes from checkpoints that would then have no version. Those already registered are skipped there."""
    endpoint = cfg.storage.s3_endpoint
    try:
        names = checkpoint_names(setup.checkpoint_root, endpoint)
    except OSError as exc:
        log.warning(f"cannot list {setup.checkpoint_root} ({exc}); checkpoints an earlier worker group left "
                    f"unpublished are not registered now")
        return
    for name in names:
        step = int(name[len(CHECKPOINT_PREFIX):])
        if step <= restored_step and publication_due(cfg, step, setup.total_steps):
            tracker.publish_checkpoint(storage.join(setup.checkpoint_root, name), step,
                                       step * cfg.train.global_batch_size, final=False)


def local_checkpoint_dir() -> str:
    """A new local directory for rank 0's checkpoint, which Ray deletes once uploaded.

    A process killed during the upload leaves its directory behind: a whole checkpoint (weights and AdamW state)
    on the node's disk, and Ray starts the next worker in the same node or pod, so each failure would leave one
    more. The directory's name carries its writer's PID: those of processes that no longer run are removed first.
    """
    for path in Path(tempfile.gettempdir()).glob(f"{LOCAL_CHECKPOINT_PREFIX}*-*"):
        pid = path.name[len(LOCAL_CHECKPOINT_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            log.info("removing %s, left by process %s that is gone (killed during an upload)", path, pid)
            shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def report_checkpoint(cfg: Config, setup: RunSetup, raw: CLIP, states: dict[str, Any], tracker: RunLog | None, *,
                      rank: int, world: int, step: int, epoch: int, loss: float, samples_per_second: float,
                      sync: bool = False) -> None:
    """Every rank reports (Ray Train requires it); rank 0 writes the clip_core checkpoint, Ray uploads it
    into ``RunConfig.storage_path`` (asynchronously unless final or ``sync``: a slow store must not stall training,
    but the final checkpoint must be durable before the run reports success, and a stop or preemption checkpoint
    before the process or node goes), and rank 0 publishes it to MLflow."""
    import ray.train
    from ray.train import CheckpointUploadMode

    order, final = setup.order, step == setup.total_steps
    samples_seen = step * cfg.train.global_batch_size
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    metrics = {"step": step, "samples_seen": samples_seen, "loss": loss, "samples_per_second": samples_per_second,
               "mlflow_run_id": tracker.run_id if tracker else "", "world_size": world}
    checkpoint = None
    if rank == 0:
        local = local_checkpoint_dir()
        state = TrainerState(**metrics, epoch=epoch, steps_done_in_epoch=step - epoch * order.steps_per_epoch,
                             global_batch_size=cfg.train.global_batch_size, steps_per_epoch=order.steps_per_epoch,
                             total_steps=setup.total_steps, data_seed=order.seed,
                             data_manifest_hash=setup.manifest_hash, run_name=setup.run_name,
                             pretrained=setup.pretrained, resume_from=cfg.train.resume_from)
        save_checkpoint(local, raw, setup.tokenizer, training_state=states, trainer_state=state.to_dict())
        checkpoint = ray.train.Checkpoint.from_directory(local)
    mode = CheckpointUploadMode.SYNC if final or sync else CheckpointUploadMode.ASYNC
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)
    if tracker is not None and publication_due(cfg, step, setup.total_steps):
        tracker.publish_checkpoint(storage.join(setup.checkpoint_root, name), step, samples_seen, final)
