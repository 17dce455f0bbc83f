"""Fine-tuning (issue 17): training from pretrained weights (a file, a checkpoint, a registered version),
LiT tower locking with unlocked layer groups (as OpenCLIP groups them), and layer-wise lr decay.

Unit tests run the trainer's own pieces (``prepare_run``'s checks, ``build_model``, ``read_pretrained``,
``build_optimizer``, ``optimizer_step``) without Ray; one Ray Train run fine-tunes a registered version
through `clipflow train`'s code path against a real ``mlflow server``.
"""

from __future__ import annotations

import contextlib
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import safetensors.torch
import torch
from mlflow import MlflowClient
from test_openclip_equivalence import openclip_model_module

from clip_core import create_model, load_checkpoint, save_checkpoint
from clip_core.model import config_from_openai_state_dict, model_from_state_dict
from workflows.common.config import ConfigError, load_config
from workflows.common.errors import UserError
from workflows.ops.stages import resolve_pretrained, train_with_tracking
from workflows.train.driver import prepare_run
from workflows.train.loop import TrainDebug, build_model, make_loss, read_pretrained
from workflows.train.optim import build_optimizer, build_scheduler, exclude_from_decay, optimizer_step

from mlflow_helpers import publish, training_run, unique_name
from tiny_data import CONTEXT, SIZE

# Small OpenCLIP ViT (3 blocks a tower) for comparing the lock groups; 64-wide heads as in every release.
OPENCLIP_VIT = {"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 64},
                "text_cfg": {"context_length": 16, "vocab_size": 530, "width": 64, "heads": 1, "layers": 3}}


def _cfg(data: Path, home: Path, *extra: str):
    return load_config(None, [f"home={home}", f"train.data={data}", "model.name=tiny-vit",
                              f"tokenizer.context_length={CONTEXT}", "train.global_batch_size=16",
                              "train.warmup_steps=1", *extra])


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def openclip() -> Iterator[types.ModuleType]:
    with openclip_model_module() as module:
        yield module


@pytest.fixture(scope="module")
def pretrained(train_data, tmp_path_factory) -> dict:
    """A tiny-vit for the tiny training data, as an OpenCLIP-layout weights file and as a clipflow checkpoint."""
    root = tmp_path_factory.mktemp("pretrained")
    setup = prepare_run(_cfg(train_data, root), TrainDebug())
    torch.manual_seed(123)  # not the run's seed: the weights must differ from its random init
    model = create_model("tiny-vit", vocab_size=setup.tokenizer.vocab_size, context_length=CONTEXT, image_size=SIZE)
    file = root / "open_clip_model.safetensors"
    safetensors.torch.save_file(model.state_dict(), file)
    checkpoint = save_checkpoint(root / "checkpoint", model, setup.tokenizer)
    return {"file": file, "checkpoint": checkpoint, "state": model.state_dict(), "tokenizer": setup.tokenizer}


# ---- lock groups ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["image", "text"])
def test_unlocked_groups_train_what_openclip_trains(openclip, tower):
    """Every unlocked-group count trains the same parameters as OpenCLIP's lock on the same architecture."""
    reference = openclip.CLIP(**OPENCLIP_VIT)
    weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}  # the same parameter names
    ours = model_from_state_dict(config_from_openai_state_dict(weights, quick_gelu=False), weights)
    groups = len(getattr(ours, f"{tower}_layer_groups")())
    assert groups == 3 + 2  # embeddings, blocks 0 and 1, [block 2 + final LayerNorm], projection
    for unlocked in range(groups + 1):
        reference.requires_grad_(True)
        ours.requires_grad_(True)
        if tower == "image":
            reference.lock_image_tower(unlocked_groups=unlocked)
            ours.lock_image_tower(unlocked_groups=unlocked)
        else:
            reference.lock_text_tower(unlocked_layers=unlocked)
            ours.lock_text_tower(unlocked_groups=unlocked)
        assert _trainable(ours) == _trainable(reference), unlocked
    # one group: the projection alone; all but one: everything except the embeddings
    ours.requires_grad_(True)
    ours.lock_image_tower(unlocked_groups=1)
    assert {n for n in _trainable(ours) if n.startswith("visual.")} == {"visual.proj"}
    with pytest.raises(ValueError, match="image tower has 5 layer groups; unlocked_groups=6 must be in 0..5"):
        ours.lock_image_tower(unlocked_groups=6)


def test_resnet_tower_locks_by_stage_and_keeps_locked_batchnorm_statistics(openclip):
    """OpenCLIP locks a ResNet tower only whole (same parameters here); clip_core also unlocks by stage,
    and the locked stages' BatchNorm statistics stay fixed in train mode while unlocked ones update."""
    reference = openclip.CLIP(embed_dim=32, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
                              text_cfg={"context_length": 16, "vocab_size": 1024, "width": 64, "heads": 2,
                                        "layers": 2})
    model = create_model("tiny-rn")
    model.load_state_dict(reference.state_dict())
    reference.lock_image_tower()
    model.lock_image_tower()
    assert _trainable(model) == _trainable(reference)

    model = create_model("tiny-rn")
    model.lock_image_tower(unlocked_groups=2)  # layer4 and the attention pool train
    assert {n.split(".")[1] for n in _trainable(model) if n.startswith("visual.")} == {"layer4", "attnpool"}
    model.train()
    before = {n: b.clone() for n, b in model.visual.named_buffers()}
    model.encode_image(torch.randn(4, 3, 64, 64))
    moved = {n.split(".")[0] for n, b in model.visual.named_buffers() if not torch.equal(before[n], b)}
    assert moved == {"layer4"}
    model.requires_grad_(True)
    model.lock_image_tower(freeze_bn_stats=False)  # OpenCLIP's default: the statistics keep moving
    model.train()
    model.encode_image(torch.randn(4, 3, 64, 64))
    assert not torch.equal(before["bn1.running_mean"], model.visual.bn1.running_mean)


# ---- fine-tuning steps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "checkpoint"])
def test_fine_tuning_moves_only_the_unlocked_parameters(train_data, tmp_path, pretrained, source):
    cfg = _cfg(train_data, tmp_path, f"model.pretrained={pretrained[source]}", "model.lock_image=true",
               "model.lock_image_unlocked_groups=1", "model.lock_text=true", "model.lock_text_unlocked_groups=2",
               "train.layer_decay=0.5", "train.lr=1e-2")
    setup = prepare_run(cfg, TrainDebug())
    raw = build_model(cfg, setup)
    raw.load_state_dict(read_pretrained(cfg).state_dict())  # what rank 0 does on a fresh run
    for name, tensor in pretrained["state"].items():
        assert torch.equal(raw.state_dict()[name], tensor), name
    optimizer = build_optimizer(raw, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, 10)
    images = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8)
    tokens = pretrained["tokenizer"]([f"a photo of a {c} square" for c in ("red", "green", "blue", "black")] * 4)
    for _ in range(3):
        optimizer_step(raw, raw, make_loss(cfg, raw), optimizer, scheduler, images, tokens, 1,
                       contextlib.nullcontext(), 0.0)
    after = raw.state_dict()
    unlocked = {"visual.proj", "text_projection", "ln_final.weight", "ln_final.bias", "logit_scale"}
    unlocked |= {n for n in after if n.startswith("transformer.resblocks.1.")}  # the text tower's last block
    assert _trainable(raw) == unlocked
    for name, tensor in pretrained["state"].items():
        assert torch.equal(after[name], tensor) != (name in unlocked), name  # locked: bitwise; the rest moved


# ---- layer-wise lr decay -------------------------------------------------------------------------------


def _depth(name: str) -> int:
    """tiny-vit's layer groups (2 blocks a tower), spelled out: 0 embeddings ... 3 the projection."""
    if name in ("visual.proj", "text_projection"):
        return 3
    if ".resblocks.1." in name or name.startswith(("visual.ln_post", "ln_final")):
        return 2
    if ".resblocks.0." in name:
        return 1
    return 0


def test_layer_decay_scales_each_group_by_its_depth(train_data, tmp_path):
    cfg = _cfg(train_data, tmp_path, "train.layer_decay=0.6", "train.lr=1e-3", "train.weight_decay=0.1")
    model = create_model("tiny-vit", init_logit_bias=-10.0)
    optimizer = build_optimizer(model, cfg.train)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        expected = 1e-3 if name in ("logit_scale", "logit_bias") else 1e-3 * 0.6 ** (3 - _depth(name))
        assert group["lr"] == pytest.approx(expected, rel=1e-12), name
        assert group["weight_decay"] == (0.0 if exclude_from_decay(name, param) else 0.1), name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the first group's lr is the one the loop logs
    # The schedule multiplies every group's lr alike, so the ratios stay those of the depths.
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6)
    initial = [g["initial_lr"] for g in optimizer.param_groups]  # the lr each group was built with
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / initial[0]
    assert 0 < factor < 1
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr * factor for lr in initial])
    # off (1.0): the two groups every existing checkpoint's optimizer state has
    plain = build_optimizer(model, _cfg(train_data, tmp_path).train)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.2, 0.0]
    assert all(g["lr"] == 1e-3 for g in plain.param_groups)


# ---- what is refused, in one line, before any worker starts ---------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["model.lock_image=true", "model.lock_image_unlocked_groups=-1"], "lock_image_unlocked_groups=-1 must be >= 0"),
    (["model.lock_text_unlocked_groups=2"], "needs model.lock_text=true"),
    (["train.layer_decay=0"], r"train.layer_decay=0.0 must be in \(0, 1\]"),
    (["train.layer_decay=1.5"], r"train.layer_decay=1.5 must be in \(0, 1\]"),
])
def test_config_refuses_impossible_fine_tuning_values(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, [f"home={tmp_path}", *overrides])
    assert "\n" not in str(caught.value)


def test_driver_refuses_pretrained_weights_that_do_not_fit(train_data, tmp_path, pretrained):
    def refused(*overrides: str) -> str:
        with pytest.raises(UserError) as caught:
            prepare_run(_cfg(train_data, tmp_path, *overrides), TrainDebug())
        assert "\n" not in str(caught.value)
        return str(caught.value)

    missing = tmp_path / "nothing.safetensors"
    assert f"model.pretrained {missing} does not exist" in refused(f"model.pretrained={missing}")
    assert "text tower has 4 layer groups; unlocked_groups=5 must be in 0..4" in refused(
        "model.lock_text=true", "model.lock_text_unlocked_groups=5")
    other = tmp_path / "rn.safetensors"
    safetensors.torch.save_file(create_model("tiny-rn").state_dict(), other)
    message = refused(f"model.pretrained={other}")
    assert "holds a custom model (64 px, context 16, vocab 1024) but this run trains tiny-vit" in message
    assert "set model.name to the weights' architecture" in message
    assert "logit_bias missing" in refused(f"model.pretrained={pretrained['file']}", "train.loss=siglip")
    assert "registered version" in refused("model.pretrained=models:/clip@champion")
    with pytest.raises(UserError, match="is not models:/<name>@<alias> or models:/<name>/<version>"):
        resolve_pretrained(_cfg(train_data, tmp_path, "model.pretrained=models:/clip/latest/1"))


def test_resuming_refuses_another_pretrained_init(train_data, tmp_path, pretrained):
    """The checkpoint's weights win on resume; a model.pretrained other than the one its run started from would
    mislabel the run, the same one continues it (how a fine-tuning run is retried)."""
    setup = prepare_run(_cfg(train_data, tmp_path), TrainDebug())
    state = {"step": 2, "global_batch_size": 16, "data_manifest_hash": "tiny-v1"}
    model = build_model(_cfg(train_data, tmp_path), setup)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, setup.tokenizer, trainer_state=state)  # no `pretrained`: random
    with pytest.raises(UserError, match=r"initialised from random weights but model.pretrained is .*"
                                        r"run with --set model.pretrained= to continue it"):
        prepare_run(_cfg(train_data, tmp_path, f"train.resume_from={ckpt}", f"model.pretrained={pretrained['file']}"),
                    TrainDebug())
    tuned = save_checkpoint(tmp_path / "tuned", model, setup.tokenizer,
                            trainer_state={**state, "pretrained": str(pretrained["file"])})
    assert prepare_run(_cfg(train_data, tmp_path, f"train.resume_from={tuned}",
                            f"model.pretrained={pretrained['file']}"), TrainDebug()).resume_checkpoint == str(tuned)
    with pytest.raises(UserError, match=r"initialised from '.*' but model.pretrained is unset"):
        prepare_run(_cfg(train_data, tmp_path, f"train.resume_from={tuned}"), TrainDebug())


# ---- registered versions -------------------------------------------------------------------------------


def _publish(server, pretrained: dict, directory: Path) -> tuple[MlflowClient, str, str]:
    mlflow.set_tracking_uri(server.uri)  # publishing logs the pyfunc model through the process-wide URI
    client = MlflowClient(server.uri)
    name = unique_name("base")
    checkpoint = shutil.copytree(pretrained["checkpoint"], directory / "checkpoint_00000004")
    return client, name, publish(client, name, training_run(client), checkpoint, step=4)


@pytest.mark.timeout(300)
def test_registered_version_resolves_to_its_checkpoint_even_after_rotation(mlflow_server, train_data, tmp_path,
                                                                           pretrained):
    client, name, version = _publish(mlflow_server, pretrained, tmp_path)
    cfg = _cfg(train_data, tmp_path, f"mlflow.tracking_uri={mlflow_server.uri}", f"model.pretrained=models:/{name}/1",
               f"storage.path={tmp_path / 'runs'}")
    original = str(tmp_path / "checkpoint_00000004")
    assert resolve_pretrained(cfg).model.pretrained == original  # the version's checkpoint_uri tag
    shutil.rmtree(original)  # Ray Train rotated it away (train.keep_checkpoints)
    copy = resolve_pretrained(cfg).model.pretrained
    assert copy == str(tmp_path / "runs" / "pretrained" / f"{name}-v{version}")
    for key, tensor in load_checkpoint(copy).model.state_dict().items():
        assert torch.equal(tensor, pretrained["state"][key]), key
    assert resolve_pretrained(cfg).model.pretrained == copy  # copied once


@pytest.mark.timeout(480)
def test_clipflow_train_fine_tunes_a_registered_version(ray_runtime, mlflow_server, train_data, tmp_path, pretrained):
    """`clipflow train` with model.pretrained=models:/<name>@<alias>: 2 workers (rank 0 loads, DDP broadcasts),
    the locked tower unchanged in the final checkpoint, and the run's params naming the checkpoint it started from."""
    client, name, version = _publish(mlflow_server, pretrained, tmp_path)
    client.set_registered_model_alias(name, "base", version)
    cfg = _cfg(train_data, tmp_path, f"mlflow.tracking_uri={mlflow_server.uri}",
               f"model.pretrained=models:/{name}@base", f"storage.path={tmp_path / 'runs'}", "model.lock_image=true",
               "train.layer_decay=0.8",
               "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2", "mlflow.system_metrics=false",
               f"mlflow.registered_model={unique_name('tuned')}")
    result = train_with_tracking(cfg)
    # the init as given: a continued run compares it, and models:/ resolves to other paths over time
    assert load_checkpoint(result.checkpoint_uri).trainer_state["pretrained"] == f"models:/{name}@base"
    final = load_checkpoint(result.checkpoint_uri).model.state_dict()
    for key, tensor in pretrained["state"].items():
        assert torch.equal(final[key], tensor) == key.startswith("visual."), key
    params = client.get_run(result.mlflow_run_id).data.params
    assert params["model.pretrained"] == str(tmp_path / "checkpoint_00000004")
    assert (params["model.lock_image"], params["model.lock_image_unlocked_groups"]) == ("True", "0")
    assert params["train.layer_decay"] == "0.8"
