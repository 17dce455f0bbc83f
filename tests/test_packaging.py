"""What a plain ``pip install .`` gets: the declared dependencies, the checkout it finds, the commands it runs.

The dev environment (``pip install -e '.[dev]'``) hides packaging mistakes: a dev-only import or a data
file read from the checkout works there and fails for users and in the image. So the runtime
dependencies are checked against what the code imports, and one test installs the project the way
users do, into a fresh venv, and runs every command from a copy of the checkout.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.ops import project
from workflows.ops.cli import COMMANDS, build_parser, main
from workflows.ops.k8s_checks import load_documents, validate_manifest
from workflows.ops.project import project_root

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("clip_core", "workflows")  # the packages pyproject.toml ships: the runtime code
# Runtime code imports these only inside the function that needs them, behind a one-line error naming
# the extra to install: module -> extra that declares it.
OPTIONAL_IMPORTS = {"kubernetes_validate": "dev"}  # core-kind validation (tests); `k8s render` needs none


def normalize(name: str) -> str:
    """PEP 503 name: `PyYAML`, `pyyaml` and `py_yaml` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    """Distribution names of PEP 508 strings: `ray[default,train]==2.60.*` is `ray`."""
    return {normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0)) for r in requirements}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def imports_of(source: str) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in ``source``."""
    tree = ast.parse(source)
    top_level = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in top_level) for name in names]
    return found


def third_party_imports(sources: dict[str, str]) -> dict[str, dict[str, bool]]:
    """module -> {file: imported at module level there}, stdlib and first-party left out."""
    out: dict[str, dict[str, bool]] = {}
    for path, source in sources.items():
        for module, at_top in imports_of(source):
            if module not in sys.stdlib_module_names and module not in FIRST_PARTY:
                files = out.setdefault(module, {})
                files[path] = files.get(path, False) or at_top
    return out


@functools.cache
def distributions_of(module: str) -> frozenset[str]:
    """Installed distributions that provide ``module`` (mlflow: mlflow, mlflow-skinny, mlflow-tracing)."""
    return frozenset(map(normalize, importlib.metadata.packages_distributions().get(module, [])))


def dependency_problems(sources: dict[str, str], runtime: set[str], extras: dict[str, set[str]]) -> list[str]:
    """Undeclared imports, unused runtime dependencies and eager optional imports, one line each."""
    problems, used = [], set()
    for module, files in sorted(third_party_imports(sources).items()):
        where = ", ".join(sorted(files))
        candidates = distributions_of(module)
        if module in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[module]
            if not candidates & extras.get(extra, set()) or candidates & runtime:
                problems.append(f"optional import {module} ({where}) must be declared in extra {extra!r} only")
            problems += [f"{path} imports optional {module} at module level: import it where it is needed"
                         for path, at_top in sorted(files.items()) if at_top]
            continue
        declared = candidates & runtime
        if not declared:
            problems.append(f"{where} import {module} (from {sorted(candidates) or 'no installed distribution'}), "
                            "which pyproject.toml does not declare in [project] dependencies")
        used |= declared
    problems += [f"runtime dependency {name} is imported by no module of {'/, '.join(FIRST_PARTY)}/"
                 for name in sorted(runtime - used)]
    return problems


def runtime_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text()
            for package in FIRST_PARTY for p in sorted((ROOT / package).rglob("*.py"))}


def declared_dependencies() -> tuple[set[str], dict[str, set[str]]]:
    """(runtime dependency names, extra -> names) from pyproject.toml."""
    meta = pyproject()["project"]
    extras = {name: requirement_names(reqs) for name, reqs in meta.get("optional-dependencies", {}).items()}
    return requirement_names(meta["dependencies"]), extras


# --- the runtime dependencies are what the code imports -----------------------------------------------

def test_runtime_dependencies_are_exactly_what_the_code_imports() -> None:
    runtime, extras = declared_dependencies()
    assert dependency_problems(runtime_sources(), runtime, extras) == []


def test_the_dependency_check_catches_each_mistake() -> None:
    """The check above passes because the code is right, not because it cannot fail."""
    runtime, extras = {"numpy", "boto3"}, {"dev": {"kubernetes-validate", "pytest"}}
    sources = {
        "workflows/a.py": "import numpy as np\nimport os\nfrom workflows import b\nfrom . import c\n",
        "workflows/b.py": "import pytest\nimport kubernetes_validate\n",
        "workflows/c.py": "def f():\n    import kubernetes_validate\n",
    }
    problems = dependency_problems(sources, runtime, extras)
    assert any(p.startswith("workflows/b.py import pytest") for p in problems), problems
    assert "workflows/b.py imports optional kubernetes_validate at module level: import it where it is needed" \
        in problems
    assert "runtime dependency boto3 is imported by no module of clip_core/, workflows/" in problems
    assert len(problems) == 3, problems


def test_python_floor_is_the_tested_python() -> None:
    """`submit --timeout` catches the builtin TimeoutError that asyncio.wait_for raises from 3.11 on."""
    assert pyproject()["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


# --- the checkout is found from where you run, not from where the package is installed ------------------

def test_project_root_is_the_checkout_around_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT / "configs")
    assert project_root() == ROOT
    clone = tmp_path / "clone"
    (clone / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", clone)
    shutil.copy(ROOT / "ray_cluster.yaml", clone)
    monkeypatch.chdir(clone / "configs")
    assert project_root() == clone  # the clone you stand in wins over the editable install


def test_another_project_is_not_a_checkout(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    shutil.copy(ROOT / "ray_cluster.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert project_root() == ROOT  # the editable install's checkout is the fallback
    # A non-editable install has no checkout around its package:
    monkeypatch.setattr(project, "__file__", str(tmp_path / "site-packages" / "workflows" / "project.py"))
    with pytest.raises(UserError, match="run from a clipflow checkout$"):
        project_root()
    assert main(["k8s", "render", "--config", str(ROOT / "configs" / "vit_b32_laion400m.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("run from a clipflow checkout") and len(err.splitlines()) == 1


def test_kuberay_validation_needs_no_dev_extra_and_core_kinds_say_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes_validate", None)  # `import kubernetes_validate` fails
    assert validate_manifest(load_documents(ROOT / "k8s" / "overlays" / "paper-vit-b32" / "rayjob-train.yaml")[0]) == []
    with pytest.raises(UserError, match=r"^Namespace/clipflow: .*needs kubernetes-validate: "
                                        r"pip install 'clipflow\[dev\]'$"):
        validate_manifest(load_documents(ROOT / "k8s" / "base" / "namespace.yaml")[0])


# --- a plain install, the way users and the image install it -----------------------------------------------

def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name (none for a command without any)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def every_help_command() -> list[list[str]]:
    """`--help` of clipflow, of each command and of each command's subcommands (e.g. `k8s render`)."""
    argvs = [["--help"]]
    for name in COMMANDS:
        argvs.append([name, "--help"])
        argvs += [[name, sub, "--help"] for sub in subcommands(subcommands(build_parser(name))[name])]
    return argvs


def copy_checkout(dest: Path) -> Path:
    """What a clone of the working tree would hold: tracked and new files, nothing git ignores."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"copying the checkout needs git and a git work tree: {listed.stderr.strip()}")
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():  # tracked files deleted in the working tree are listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def torch_pin() -> str:
    """The Makefile's CPU torch, so the venv gets the same wheel as `make install`."""
    return re.search(r"^TORCH_PIN \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A subprocess that sees none of the suite's PYTHONPATH (it points at the source tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_plain_install_runs_every_command_from_a_checkout(tmp_path: Path) -> None:
    """`pip install .` (no extras, not editable): every command's help, `k8s render`, `submit`'s request."""
    started = time.monotonic()
    help_commands = every_help_command()
    venv, checkout = tmp_path / "venv", copy_checkout(tmp_path / "clipflow")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, clipflow = venv / "bin" / "python", venv / "bin" / "clipflow"
    # This venv's pip installs into the new one (no ensurepip), with the CPU torch `make install` pins.
    install = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile",
                   "--disable-pip-version-check", torch_pin(), str(checkout)], tmp_path, timeout=1500)
    assert install.returncode == 0, install.stdout + install.stderr
    installed = time.monotonic()

    nobody = f"http://127.0.0.1:{free_port()}"
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # each command imports torch, ray, mlflow
        probe = pool.submit(run, [str(python), "-P", "-c",
                                  "import workflows; print(workflows.__file__); import kubernetes_validate"], checkout)
        helps = {tuple(argv): pool.submit(run, [str(clipflow), *argv], checkout) for argv in help_commands}
        rendered = pool.submit(run, [str(clipflow), "k8s", "render", "--config", "configs/vit_b32_laion400m.yaml"],
                               checkout)
        submit = pool.submit(run, [str(clipflow), "submit", "--address", nobody, "--stage", "sample-data"], checkout)
        outside = pool.submit(run, [str(clipflow), "k8s", "render"], tmp_path)

    # The installed package runs (not the copy in the cwd), and the dev extra is absent:
    assert Path(probe.result().stdout.strip()).is_relative_to(venv), probe.result()
    assert probe.result().returncode == 1 and "No module named 'kubernetes_validate'" in probe.result().stderr
    for argv, future in helps.items():
        result = future.result()
        assert result.returncode == 0 and "usage: clipflow" in result.stdout, (argv, result.stderr)
    assert rendered.result().returncode == 0, rendered.result().stderr
    (job,) = yaml.safe_load_all(rendered.result().stdout)
    (committed,) = load_documents(ROOT / "k8s" / "overlays" / "paper-vit-b32" / "rayjob-train.yaml")  # rendered with --suspend
    committed["spec"].pop("suspend")
    assert job["kind"] == "RayJob" and job == committed
    # submit finds the checkout to upload, then fails only on the cluster that is not there:
    assert submit.result().returncode == 2 and "cannot reach the Ray job server" in submit.result().stderr, \
        submit.result().stderr
    assert outside.result().returncode == 2, outside.result().stderr
    assert outside.result().stderr.strip().endswith("run from a clipflow checkout"), outside.result().stderr
    print(f"plain install: {installed - started:.0f} s install, {time.monotonic() - installed:.0f} s commands")
