"""clip_core.load_pretrained on every file layout it reads, each written from an OpenCLIP model: the
same embeddings as OpenCLIP's (to 1e-5, see test_openclip_equivalence), in both activations, and the
activation never guessed silently -- GELU and QuickGELU weights have the same keys and shapes.

Models are small and random (no weights are downloaded). Loading by shape alone takes the head count
as width / 64, OpenAI's rule, so those tests use a model with 64-wide heads; "tiny-vit" (32-wide)
loads by its zoo name.
"""

from __future__ import annotations

import copy
import random
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_openclip_equivalence import assert_same_embeddings, openclip_model, openclip_model_module

from clip_core import CLIP, Tokenizer, load_pretrained, save_checkpoint
from clip_core.checkpoint import MODEL_FILE

VOCAB, CONTEXT, IMAGE = 530, 16, 32
SMALL64 = {"embed_dim": 32,
           "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 64, "heads": 1, "layers": 2}}
LAYOUTS = ["bin", "pt", "openclip-training-checkpoint", "safetensors"]


@pytest.fixture(scope="module")
def openclip() -> Iterator[types.ModuleType]:
    with openclip_model_module() as module:
        yield module


def activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def reference(openclip: types.ModuleType, quick_gelu: bool) -> torch.nn.Module:
    """A random OpenCLIP model whose architecture the weights' shapes fully determine."""
    torch.manual_seed(0)
    return openclip.CLIP(**SMALL64, quick_gelu=quick_gelu).eval()


def write(layout: str, state_dict: dict[str, torch.Tensor], directory: Path) -> Path:
    """``state_dict`` saved as OpenCLIP's releases and its trainer save them."""
    if layout == "safetensors":  # open_clip_model.safetensors on the Hugging Face hub
        path = directory / "open_clip_model.safetensors"
        safetensors.torch.save_file(state_dict, path)
    elif layout == "openclip-training-checkpoint":  # open_clip_train's epoch_N.pt: DDP's "module." keys
        path = directory / "epoch_32.pt"
        torch.save({"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    else:  # open_clip_pytorch_model.bin, or a .pt of model.state_dict()
        path = directory / f"open_clip_pytorch_model.{layout}"
        torch.save(state_dict, path)
    return path


def openai_style_archive(model: torch.nn.Module, path: Path, hide_activation: bool = False) -> Path:
    """``model`` traced into a TorchScript archive laid out like OpenAI's released .pt files: the three
    metadata entries in its state dict, the causal mask a constant rather than a buffer.
    ``hide_activation`` renames the activation modules' class, so the archive does not show which it is."""
    model = copy.deepcopy(model)
    mask = model.attn_mask
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    del model.context_length, model.vocab_size  # OpenCLIP's plain int attributes of the same names
    for key, value in (("input_resolution", IMAGE), ("context_length", CONTEXT), ("vocab_size", VOCAB)):
        model.register_buffer(key, torch.tensor(value))
    if hide_activation:
        for name, module in list(model.named_modules()):
            if name.endswith("mlp.gelu"):
                model.get_submodule(name.removesuffix(".gelu")).gelu = type("Activation", (type(module),), {})()
    images, tokens = torch.randn(2, 3, IMAGE, IMAGE), torch.randint(0, VOCAB, (2, CONTEXT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but OpenAI's weights are TorchScript archives
        traced = torch.jit.trace_module(model, {"forward": (images, tokens), "encode_image": (images,),
                                                "encode_text": (tokens,)}, check_trace=False)
    traced.save(str(path))
    return path


def load_quietly(*args, **kwargs) -> CLIP:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
        return load_pretrained(*args, **kwargs)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=activation)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_layouts_compute_what_openclip_computes(openclip, tmp_path, layout, quick_gelu):
    theirs = reference(openclip, quick_gelu)
    ours = load_pretrained(write(layout, theirs.state_dict(), tmp_path), quick_gelu=quick_gelu)
    assert not ours.training and ours.config.quick_gelu == quick_gelu
    assert_same_embeddings(ours, theirs)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=activation)
def test_zoo_name_gives_the_architecture_and_quick_gelu_overrides_its_activation(openclip, tmp_path, quick_gelu):
    torch.manual_seed(0)
    theirs = openclip_model(openclip, "tiny-vit", quick_gelu=quick_gelu).eval()
    path = write("safetensors", theirs.state_dict(), tmp_path)
    ours = load_pretrained(path, "tiny-vit", quick_gelu=True) if quick_gelu else load_pretrained(path, "tiny-vit")
    assert (ours.config.name, ours.config.quick_gelu, ours.config.text.heads) == ("tiny-vit", quick_gelu, 2)
    assert_same_embeddings(ours, theirs)


def test_plain_state_dict_without_a_name_is_refused(openclip, tmp_path):
    path = write("bin", reference(openclip, False).state_dict(), tmp_path)
    with pytest.raises(ValueError, match="cannot tell GELU from QuickGELU.*'ViT-B-32'.*'ViT-B-32-quickgelu'"):
        load_pretrained(path)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=activation)
def test_torchscript_archive_shows_its_activation(openclip, tmp_path, quick_gelu):
    theirs = reference(openclip, quick_gelu)
    ours = load_quietly(openai_style_archive(theirs, tmp_path / "ViT.pt"))
    assert ours.config.quick_gelu == quick_gelu  # read from the archive, not assumed
    assert_same_embeddings(ours, theirs)


def test_archive_that_hides_its_activation_is_taken_as_openai_quickgelu(openclip, tmp_path):
    theirs = reference(openclip, True)
    ours = load_quietly(openai_style_archive(theirs, tmp_path / "RN.pt", hide_activation=True))
    assert ours.config.quick_gelu
    assert_same_embeddings(ours, theirs)


def test_gelu_weights_asked_for_as_quickgelu_are_caught(openclip, tmp_path):
    """Where the file records its activation, a name of the other one is an error, not a silent load."""
    gelu = reference(openclip, False)
    archive = openai_style_archive(gelu, tmp_path / "gelu.pt")
    with pytest.raises(ValueError, match="holds GELU weights but QuickGELU was asked for"):
        load_quietly(archive, quick_gelu=True)
    with pytest.raises(ValueError, match="holds GELU weights but QuickGELU was asked for"):
        load_quietly(archive, "ViT-B-32-quickgelu")

    model = load_pretrained(write("safetensors", gelu.state_dict(), tmp_path), quick_gelu=False)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", model, tokenizer())
    with pytest.raises(ValueError, match="model_config.json.*holds GELU weights but QuickGELU was asked for"):
        load_pretrained(checkpoint, quick_gelu=True)


def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    words = ["cat", "dog", "red", "blue", "photo", "of", "a", "the", "small", "big", "car", "tree"]
    return Tokenizer.train([" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)],
                           vocab_size=VOCAB, context_length=CONTEXT)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=activation)
def test_clipflow_checkpoint_directory(openclip, tmp_path, quick_gelu):
    theirs = reference(openclip, quick_gelu)
    model = load_pretrained(write("safetensors", theirs.state_dict(), tmp_path), quick_gelu=quick_gelu)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", model, tokenizer())
    assert (checkpoint / MODEL_FILE).is_file()
    ours = load_pretrained(checkpoint)  # its model_config.json says which activation
    assert not ours.training and ours.config.quick_gelu == quick_gelu
    assert_same_embeddings(ours, theirs)


class Payload:
    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (Path.touch, (self.flag,))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"visual.proj": Payload(tmp_path / "payload-ran")}, path)
    with pytest.raises(ValueError, match="without unpickling code"):
        load_pretrained(path, "ViT-B-32")
    assert not (tmp_path / "payload-ran").exists()


def test_bad_requests_say_what_to_do(openclip, tmp_path):
    path = write("safetensors", reference(openclip, False).state_dict(), tmp_path)
    with pytest.raises(ValueError, match="not a tiny-rn; pass the right model_name"):
        load_pretrained(path, "tiny-rn")
    with pytest.raises(ValueError, match="Did you mean 'ViT-B-32'"):
        load_pretrained(path, "ViT-B/32")
    not_clip = tmp_path / "classifier.safetensors"
    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, not_clip)
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        load_pretrained(not_clip, quick_gelu=False)
    with pytest.raises(FileNotFoundError, match="local files only"):
        load_pretrained(tmp_path / "ViT-B-32.pt", "ViT-B-32")
