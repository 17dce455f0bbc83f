"""One typed run config drives every stage.

The defaults ARE the embedded demo (a small CPU run on the generated sample data); cluster configs in
``configs/`` override sizes and URIs. The paper's recipe values are in ``configs/vit_*.yaml``.

A YAML file plus ``--set section.key=value`` overrides are merged onto the defaults below and
validated on load: unknown keys are errors (with the closest valid key suggested) and every value
is checked against its field's type. ``{home}`` in any string is replaced by ``home``, so one
config runs on a laptop (``home: .clipflow``) and on a cluster (``home: s3://bucket/clipflow``).

Every local path (the fields marked ``PATH``, and a local MLflow store) is made absolute against the
current directory once, here, on the driver: Ray Train workers and Ray Data tasks run in working
directories of their own, where a relative path would name other files.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import posixpath
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from workflows.common.errors import UserError

CompileScope = Literal["none", "regional", "full"]  # see workflows/acceleration.py
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


PATH = {"path": True}  # field metadata: a local path or URI, made absolute on load (see the module docstring)
REGISTERED_MODEL_URI = "models:/"  # a registered model version (model.pretrained), not a path
# What `clipflow eval` logs per data set (clip_core.zero_shot's names; a test keeps them equal), so a
# config naming a metric eval cannot produce is refused on load instead of never crowning a champion.
ZEROSHOT_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10))
LINEAR_PROBE_METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")  # CLIP_benchmark's linear_probe names
# Built-in prompt sets and class name lists (clip_core.zero_shot's BUILTIN_TEMPLATES / BUILTIN_CLASSNAMES; a
# test keeps them equal), named here without importing torch: such a value is a name, not a path to resolve.
TEMPLATE_SETS = ("openai_imagenet", "openai_imagenet_simple")
CLASSNAME_SETS = ("openai_imagenet",)


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message says which key and what to do."""


@dataclass
class SampleDataConfig:
    """The embedded sample data set (`clipflow sample-data`)."""

    output: str = field(default="{home}/data", metadata=PATH)
    seed: int = 0
    train_samples: int = 4000
    train_shards: int = 4
    image_size: int = 96  # raw images are larger than the training resolution, so resize is real
    zeroshot_per_class: int = 10
    retrieval_samples: int = 200
    bad_samples: bool = True  # corrupt JPEG, empty caption, truncated tar member, ...
    # held-out zero-shot classes: the 8 colours (learnt in minutes on a CPU) or the 8 shapes (harder)
    zeroshot_task: Literal["color", "shape"] = "color"
    workers: int = 0  # rendering processes; 0 = one per CPU core (one per 500 images, at least 1)

    def validate(self) -> None:
        if self.train_samples < 1 or self.train_shards < 1 or self.train_shards > self.train_samples:
            raise ConfigError(f"sample_data: need 1 <= train_shards ({self.train_shards}) <= train_samples "
                              f"({self.train_samples})")
        if self.image_size < 16:
            raise ConfigError(f"sample_data.image_size={self.image_size} must be >= 16")
        if self.zeroshot_per_class < 1 or self.retrieval_samples < 1:
            raise ConfigError("sample_data.zeroshot_per_class and sample_data.retrieval_samples must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"sample_data.workers={self.workers} must be >= 0 (0 = one per CPU core)")


@dataclass
class PreprocessConfig:
    """Raw image-text shards -> training shards (Parquet + manifest.json)."""

    inputs: list[str] = field(default_factory=lambda: ["{home}/data/raw/*.tar"], metadata=PATH)
    input_format: Literal["auto", "webdataset", "parquet", "csv", "jsonl"] = "auto"
    output: str = field(default="{home}/data/train", metadata=PATH)
    image_size: int = 64
    resize_mode: Literal["center_crop", "keep_aspect"] = "center_crop"
    jpeg_quality: int = 90
    min_side: int = 32
    max_aspect_ratio: float = 3.0
    max_image_pixels: int = 89_478_485  # decompression-bomb guard (PIL's default limit)
    caption_min_chars: int = 1
    caption_max_chars: int = 1000
    dedup: Literal["none", "image", "image_caption"] = "image"
    rows_per_shard: int = 1000
    # Task counts of the dedup shuffle (workflows/data/dedup.py), 0 = sized from the data; they never change
    # the output, only how the work is split.
    dedup_map_tasks: int = 0
    dedup_partitions: int = 0
    # Hostile-input bounds (workflows/data/readers.py): the largest tar member, Parquet cell or manifest-listed
    # file read (larger ones are rejected unread); where CSV/JSONL rows may point ([] = the manifest's own
    # directory tree, or its bucket for an s3:// manifest); the image formats PIL may decode (its format ids).
    max_member_bytes: int = 64 << 20
    allowed_roots: list[str] = field(default_factory=list, metadata=PATH)
    image_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])

    def validate(self) -> None:
        """Values no run can use, all of them in one error."""
        problems = []
        if self.image_size < 8:
            problems.append(f"preprocess.image_size={self.image_size} must be >= 8")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"preprocess.jpeg_quality={self.jpeg_quality} must be in 1..100")
        if self.min_side < 1:
            problems.append(f"preprocess.min_side={self.min_side} must be >= 1")
        if self.max_aspect_ratio < 1:
            problems.append(f"preprocess.max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        if self.max_image_pixels < 1:
            problems.append(f"preprocess.max_image_pixels={self.max_image_pixels} must be >= 1")
        if not 0 <= self.caption_min_chars <= self.caption_max_chars:
            problems.append(f"preprocess.caption_min_chars={self.caption_min_chars} and caption_max_chars="
                            f"{self.caption_max_chars} must satisfy 0 <= min <= max")
        if self.rows_per_shard < 1:
            problems.append(f"preprocess.rows_per_shard={self.rows_per_shard} must be >= 1")
        if self.dedup_map_tasks < 0 or self.dedup_partitions < 0:
            problems.append(f"preprocess.dedup_map_tasks={self.dedup_map_tasks} and dedup_partitions="
                            f"{self.dedup_partitions} must be >= 0 (0 = sized from the data)")
        if self.max_member_bytes < 1:
            problems.append(f"preprocess.max_member_bytes={self.max_member_bytes} must be >= 1")
        if any(not root for root in self.allowed_roots):
            problems.append("preprocess.allowed_roots has an empty entry; list directories or s3:// prefixes")
        problems.extend(_image_format_problems(self.image_formats))
        if problems:
            raise ConfigError("; ".join(problems))


def _image_format_problems(formats: list[str]) -> list[str]:
    """preprocess.image_formats must name formats this PIL can open (PIL is imported only here, when checked)."""
    from PIL import Image

    if not formats:
        return ["preprocess.image_formats is empty; list at least one format, e.g. [JPEG, PNG, WEBP]"]
    Image.init()
    unknown = [f for f in formats if f not in Image.OPEN]
    if unknown:
        return [f"preprocess.image_formats: {', '.join(unknown)} not formats PIL opens (PIL's names, upper case: "
                f"{', '.join(sorted(Image.OPEN))})"]
    return []


@dataclass
class TokenizerConfig:
    """Where the BPE vocabulary comes from."""

    source: Literal["train", "openai_bpe", "path"] = "train"
    vocab_size: int = 1024  # source=train: size of the vocabulary learned from the captions
    bpe_path: str = field(default="", metadata=PATH)  # source=openai_bpe: path to bpe_simple_vocab_16e6.txt.gz
    path: str = field(default="", metadata=PATH)  # source=path: a directory written by Tokenizer.save
    context_length: int = 32  # the demo's captions are short; the paper's models use 77
    # source=train: the BPE learns from a seeded sample of at most this many captions (recorded in the manifest)
    train_captions: int = 2_000_000
    seed: int = 0

    def validate(self) -> None:
        if self.context_length < 2:
            raise ConfigError(f"tokenizer.context_length={self.context_length} must be >= 2")
        if self.train_captions < 1:
            raise ConfigError(f"tokenizer.train_captions={self.train_captions} must be >= 1")


@dataclass
class ModelConfig:
    """Which clip_core architecture, and its training-time options."""

    name: str = "demo-vit"
    # Fine-tuning: start from these weights instead of random ones (strict: they must be a model.name for this
    # data): a clipflow checkpoint directory, an OpenAI .pt / OpenCLIP .bin|.pt|.safetensors file (local or
    # s3://), or a registered version, models:/<name>@<alias> or models:/<name>/<version>; "" = random init
    pretrained: str = field(default="", metadata=PATH)
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0
    # LiT (OpenCLIP's --lock-image/--lock-text): no gradients to a tower but its last N layer groups
    # (clip_core.lock); a locked ResNet tower's BatchNorm statistics stay fixed unless freeze_bn_stats is false
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = True
    lock_text: bool = False
    lock_text_unlocked_groups: int = 0
    # Speed levers (workflows/acceleration.py): torch.compile each block ("regional"), the whole model
    # and loss ("full"), or nothing; the mode's CUDA graphs suit small models; NHWC ResNet towers.
    compile: CompileScope = "none"
    compile_mode: CompileMode = "default"
    channels_last: bool = True

    def validate(self) -> None:
        problems = []
        for tower in ("image", "text"):
            groups = getattr(self, f"lock_{tower}_unlocked_groups")
            if groups < 0:
                problems.append(f"model.lock_{tower}_unlocked_groups={groups} must be >= 0 (the last N layer "
                                f"groups stay trainable)")
            elif groups and not getattr(self, f"lock_{tower}"):
                problems.append(f"model.lock_{tower}_unlocked_groups={groups} needs model.lock_{tower}=true "
                                f"(without it the whole tower trains)")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class DataSource:
    """One preprocessed data set of a weighted mix (``train.data`` as a list). ``weight`` is its sampling
    rate per epoch: its ``round(weight x blocks)`` row groups, whole copies and then a seeded subset, a new
    one each epoch (workflows/train/feed.py), so its share is about weight x rows / sum of weight x rows."""

    path: str = field(default="", metadata=PATH)  # the training shards and manifest.json
    weight: float = 1.0


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # train.run_id: a safe directory and MLflow run name


@dataclass
class TrainConfig:
    """The paper's optimisation recipe by default (AdamW 0.9/0.98/1e-6, wd 0.2, warmup + cosine)."""

    # the training shards and manifest.json, or a weighted mix of several: [{path: ..., weight: 2.0}, ...]
    data: str | list[DataSource] = field(default="{home}/data/train", metadata=PATH)
    global_batch_size: int = 128
    micro_batch_size: int = 0  # per-worker forward batch cap; 0 = no cap (no accumulation)
    epochs: int = 6
    max_steps: int = 0  # 0 = derived from epochs and the manifest's row count
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.2
    layer_decay: float = 1.0  # layer-wise lr decay (workflows/train/optim.py): in (0, 1], 1 = off
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float = 0.0  # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = False
    gather_with_grad: bool = True
    augment: bool = True  # random resized crop on the training images
    # Where that crop runs: "cpu" in the Ray Data tasks; "device" on the training GPU (the tasks only
    # decode: about half the CPU per sample, benchmarks/feed_bench.py). For GPU training only.
    augment_on: Literal["cpu", "device"] = "cpu"
    seed: int = 0
    log_every: int = 5
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    zero_shot_every: int = 0  # in-process zero-shot eval every N steps; 0 = off
    # Added by the training stage:
    # a checkpoint directory (local or s3://) to continue from; "" = fresh run
    resume_from: str = field(default="", metadata=PATH)
    # The run's stable name: its checkpoints live in storage.path/<run_id>/ and its MLflow run is keyed by it, so
    # a new driver with the same run id (a re-submit, a RayJob retry) continues the run; "" = a new name each time
    run_id: str = ""
    # With a run id: "auto" continues its latest complete checkpoint; "never" refuses a run id that has checkpoints
    resume: Literal["auto", "never"] = "auto"
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = GPU table / measured on CPU

    def validate(self) -> None:
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        sources = self.sources()
        where = ["train.data" if isinstance(self.data, str) else f"train.data[{i}]" for i in range(len(sources))]
        problems = [f"{w}: no path given; name a preprocessed data set" for w, s in zip(where, sources) if not s.path]
        problems += [f"{w}.weight={s.weight} must be a number > 0" for w, s in zip(where, sources)
                     if not 0 < s.weight < float("inf")]
        paths = [s.path for s in sources]
        problems += [f"train.data lists {p} twice; give it one entry with the weights added up"
                     for p in sorted({p for p in paths if paths.count(p) > 1})]
        if not sources:
            problems.append("train.data is an empty list; name at least one preprocessed data set")
        if not 0 < self.layer_decay <= 1:
            problems.append(f"train.layer_decay={self.layer_decay} must be in (0, 1] (1 = off; fine-tuning uses "
                            f"e.g. 0.65-0.9)")
        if self.run_id and not RUN_ID.fullmatch(self.run_id):
            problems.append(f"train.run_id {self.run_id!r} must be 1 to 100 letters, digits, '-', '_' or '.', "
                            f"starting with a letter or digit (it names a directory and an MLflow run)")
        if problems:
            raise ConfigError("; ".join(problems))

    def sources(self) -> list[DataSource]:
        """The data set(s) to train on: one path is one data set of weight 1."""
        return [DataSource(self.data)] if isinstance(self.data, str) else list(self.data)


@dataclass
class ScalingConfig:
    """Elastic worker range; on KubeRay pair it with the GPU group's min/max replicas."""

    min_workers: int = 2
    max_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small machines, so Ray Data's tasks are not starved
    max_failures: int = 3
    # min < max: how often Ray Train checks whether more workers fit (the scale-up delay after capacity
    # returns; Ray's default); each resize restarts the group from its latest checkpoint
    resize_interval_s: float = 60.0

    def validate(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ConfigError(f"scaling needs 1 <= min_workers <= max_workers, got "
                              f"{self.min_workers}..{self.max_workers}")
        if not self.resize_interval_s > 0:
            raise ConfigError(f"scaling.resize_interval_s must be > 0 seconds, got {self.resize_interval_s}")


@dataclass
class StorageConfig:
    """Where Ray Train writes checkpoints: a local directory or s3://bucket/prefix."""

    path: str = field(default="{home}/runs", metadata=PATH)
    s3_endpoint: str = ""  # S3-compatible endpoint, e.g. http://127.0.0.1:9000; "" = AWS


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else a local store under home
    experiment: str = "clipflow-demo"
    registered_model: str = "clipflow-demo"
    publish_every: int = 1  # register every N-th checkpoint (the final one always)
    system_metrics: bool = True
    buffer_size: int = 10_000  # metrics kept while the server is unreachable
    # How long ending a run keeps trying to deliver (the final checkpoint's registration included); then
    # what is left stays in the run's spool for `clipflow sync`
    close_timeout_seconds: float = 300.0

    def validate(self) -> None:
        if self.publish_every < 1:
            raise ConfigError(f"mlflow.publish_every must be >= 1, got {self.publish_every}")
        if not 0 < self.close_timeout_seconds < float("inf"):
            raise ConfigError(f"mlflow.close_timeout_seconds must be a number of seconds > 0, got "
                              f"{self.close_timeout_seconds}")


@dataclass
class EvalConfig:
    """`clipflow eval`: eval sets (ImageFolder or CLIP_benchmark webdataset dirs), prompts, linear probe, actors."""

    zeroshot: list[str] = field(default_factory=lambda: ["{home}/data/eval/zeroshot"], metadata=PATH)
    retrieval: list[str] = field(default_factory=lambda: ["{home}/data/eval/retrieval"], metadata=PATH)
    # Dirs with train/ and test/ splits: CLIP_benchmark's linear probe on the frozen image tower's features
    linear_probe: list[str] = field(default_factory=list, metadata=PATH)
    # Prompts for sets without their own zeroshot_classification_templates.txt: "" = clip_core's default set,
    # a built-in set (TEMPLATE_SETS: openai_imagenet = the paper's 80), or a YAML list / .txt file
    templates: str = field(default="", metadata={**PATH, "names": TEMPLATE_SETS})
    # Class names for sets without their own classnames.txt: "" = the folder names, a built-in list
    # (CLASSNAME_SETS: openai_imagenet = OpenAI's 1000 ImageNet names) or a .txt file with one name a line
    classnames: str = field(default="", metadata={**PATH, "names": CLASSNAME_SETS})
    batch_size: int = 128
    # "<eval set>/<metric>" that decides `champion`; "" = the first zero-shot set's acc1 (without zero-shot
    # sets: the first retrieval set's image_retrieval_recall@1, else the first linear-probe set's lp_acc1).
    # An eval set is named by its last path part.
    primary_metric: str = ""
    lease_seconds: int = 900
    num_actors: int = 1
    # Embedding actors: "gpu" asks for a GPU each (so an autoscaled-to-zero GPU group starts), "cpu" never,
    # "auto" only when the cluster has GPUs now; a GPU that does not appear in gpu_wait_seconds is an error
    device: Literal["auto", "cpu", "gpu"] = "auto"
    gpu_wait_seconds: int = 900
    # The linear probe's training (CLIP_benchmark's defaults); val_proportion > 0 holds out that share of the
    # train split to search the weight decay, 0 trains with weight decay 0
    linear_probe_epochs: int = 10
    linear_probe_lr: float = 0.1
    linear_probe_batch_size: int = 64
    linear_probe_val_proportion: float = 0.0
    linear_probe_seed: int = 0

    def validate(self) -> None:
        """Values no eval can run with, all of them in one error."""
        problems = [f"eval.{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("batch_size", "lease_seconds", "num_actors", "gpu_wait_seconds",
                                 "linear_probe_epochs", "linear_probe_batch_size") if getattr(self, name) < 1]
        if self.linear_probe_lr <= 0:
            problems.append(f"eval.linear_probe_lr must be > 0, got {self.linear_probe_lr}")
        if not 0 <= self.linear_probe_val_proportion < 1:
            problems.append(f"eval.linear_probe_val_proportion must be in [0, 1), got "
                            f"{self.linear_probe_val_proportion}")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class K8sConfig:
    namespace: str = "clipflow"
    image: str = "ghcr.io/clipflow/clipflow:0.1.0"
    ray_cluster: str = "clipflow"
    # Rendered RayJobs fail (DeadlineExceeded) and free their nodes after this long; 0 = no deadline
    active_deadline_seconds: int = 0


@dataclass
class Config:
    name: str = "demo"
    home: str = ".clipflow"
    sample_data: SampleDataConfig = field(default_factory=SampleDataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                resolve_paths: bool = True) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated; ``{home}`` expanded; local paths made
    absolute unless ``resolve_paths`` is False (commands that only pass the config on to a cluster)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    if resolve_paths:
        cfg.home = absolute_path(cfg.home)
    _expand_home(cfg, cfg.home)
    if resolve_paths:
        _absolute_paths(cfg)
        cfg.mlflow.tracking_uri = _absolute_store_uri(cfg.mlflow.tracking_uri)
    cfg.eval.primary_metric = _primary_metric(cfg.eval)
    for section in dataclasses.fields(cfg):
        validate = getattr(getattr(cfg, section.name), "validate", None)
        if validate is not None:
            validate()
    return cfg


def absolute_path(value: str) -> str:
    """A local path made absolute against the current directory; URIs (``s3://...``, ``models:/...``) and ""
    unchanged."""
    if not value or "://" in value or value.startswith(REGISTERED_MODEL_URI):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _absolute_paths(node: Any) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        items = value if isinstance(value, list) else [value]
        if any(dataclasses.is_dataclass(item) for item in items):  # a section, or entries (train.data's list)
            for item in items:
                _absolute_paths(item)
        elif f.metadata.get("path") and value not in f.metadata.get("names", ()):
            setattr(node, f.name, [absolute_path(v) for v in value] if isinstance(value, list)
                    else absolute_path(value))


def _absolute_store_uri(uri: str) -> str:
    """A local MLflow store (a plain path, ``file:`` or ``sqlite:///`` relative path) made absolute."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            return uri if rest.startswith("/") else scheme + absolute_path(rest)
    return absolute_path(uri) if uri and ":" not in uri else uri


def eval_metric_names(section: EvalConfig) -> list[str]:
    """Every ``<set>/<metric>`` `clipflow eval` logs for these eval sets."""
    def name(uri: str) -> str:
        return posixpath.basename(uri.rstrip("/"))

    return ([f"{name(u)}/{m}" for u in section.zeroshot for m in ZEROSHOT_METRICS]
            + [f"{name(u)}/{m}" for u in section.retrieval for m in RETRIEVAL_METRICS]
            + [f"{name(u)}/{m}" for u in section.linear_probe for m in LINEAR_PROBE_METRICS])


def _primary_metric(section: EvalConfig) -> str:
    """The configured primary metric, else the default; refused if eval would never log it."""
    produced = eval_metric_names(section)
    if not section.primary_metric:
        defaults = [m for m in produced if m.endswith(("/acc1", "/image_retrieval_recall@1", "/lp_acc1"))]
        return defaults[0] if defaults else ""
    if section.primary_metric not in produced:
        close = difflib.get_close_matches(section.primary_metric, produced, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"eval.primary_metric {section.primary_metric!r} is not a metric eval logs for these "
                          f"eval sets; {hint}(valid: {', '.join(produced) or 'none: no eval sets configured'})")
    return section.primary_metric


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 5e-4, ...}``: the form MLflow params and ``--set`` use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", config_to_dict(cfg))
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-3), got {item!r}")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {_join(where, close[0])!r}?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"unknown config key {_join(where, str(key))!r}{hint} (valid: {valid})")
    kwargs = {name: _coerce(hints[name], raw[name], _join(where, name)) for name in fields if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _expand_home(node: Any, home: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        items = value if isinstance(value, list) else [value]
        if any(dataclasses.is_dataclass(item) for item in items):  # a section, or entries (train.data's list)
            for item in items:
                _expand_home(item, home)
        elif isinstance(value, str) and f.name != "home":
            setattr(node, f.name, value.replace("{home}", home))
        elif isinstance(value, list):
            setattr(node, f.name, [v.replace("{home}", home) if isinstance(v, str) else v for v in value])


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
