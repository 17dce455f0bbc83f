"""clip_core is the model library any trainer can import: no Ray, MLflow, Kubernetes or workflows."""

import subprocess
import sys

import clip_core

BLOCKED = ["ray", "mlflow", "kubernetes", "boto3", "workflows"]


def test_imports_without_orchestration_packages() -> None:
    # A None entry in sys.modules makes `import X` raise ImportError, as if X were not installed.
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED) + (
        "import clip_core\n"
        "m = clip_core.create_model('tiny-vit')\n"
        "print(sorted(k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in %r))\n" % BLOCKED
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_interface_names() -> None:
    for name in clip_core.__all__:
        assert hasattr(clip_core, name), name
    paper = {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
    assert paper | {f"{name}-quickgelu" for name in paper} <= set(clip_core.list_models())
    assert callable(clip_core.load_pretrained)
