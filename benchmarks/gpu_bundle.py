"""Build `.gpu-bundle/`: the Python packages clipflow's end-to-end path needs on the lent GPU machine.

    python benchmarks/gpu_bundle.py [--out .gpu-bundle] [--cache /tmp/clipflow-gpu-wheels]

Why: the lent H200 machine (see benchmarks/GPU_E2E.md) has Python 3.12, a CUDA torch and a long
list of packages, but no Ray, no MLflow and no ftfy, and it cannot download anything. Whatever it
lacks has to travel with the working tree, and everything that travels (repository included) must
fit in 64 MiB. The Ray wheel alone is 79 MB, so wheels cannot travel as they are. This script
downloads the exact wheels (cp312, manylinux x86_64, no dependency resolution: every package is
pinned below, and packages the GPU image already has are left out), unpacks them into one
site-packages tree, drops the parts of Ray and MLflow that the e2e path never loads (Java jars,
RLlib, MLflow's prebuilt web UI, JavaScript source maps) and packs the tree as one
`site.tar.xz`. On the GPU machine:

    mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site &&
        export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH

A tarball installs no console scripts, so the tree gets `bin/clipflow`, `bin/mlflow` and `bin/ray`:
shell shims that run `${PYTHON:-python3} -m ...` (`clipflow demo` finds `mlflow` on PATH).

Standard library only; pip is run as `sys.executable -m pip download`.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit for everything that travels, repository included

# What the GPU image runs: CPython 3.12 on x86_64 Linux (glibc 2.39), so any manylinux_2_N, N <= 39.
PYTHON_VERSION = "3.12"
PLATFORMS = (["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
             + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)])

# (distribution, version). Versions are those of the project's dev venv (Python 3.11) where it has
# the package, so the GPU run uses the combination the test suite runs. Not listed on purpose,
# because the GPU image has them (KINDS.md): numpy, pyarrow, pandas, pyyaml, requests, aiohttp (+
# aiosignal, frozenlist, multidict, yarl, propcache, aiohappyeyeballs), grpcio, protobuf, msgpack,
# click, filelock, cloudpickle, psutil, packaging, pillow, regex, tokenizers, tqdm, fsspec, jinja2,
# markupsafe, werkzeug, prometheus-client, attrs, anyio, h11, annotated-doc, wrapt, zipp, six,
# python-dateutil, matplotlib, scipy, scikit-learn, torch, torchvision, timm, huggingface-hub,
# safetensors. Also left out: boto3/botocore (clipflow reaches S3 through pyarrow.fs, never boto3),
# kubernetes and kubernetes-validate (only `clipflow k8s` and its tests), py-spy and virtualenv
# (ray[default] extras for `ray stack` and runtime_env virtualenvs; 8.5 MB of wheels, not imported
# by `ray.init`).
PACKAGES: list[tuple[str, str]] = [
    # Ray Core, Data and Train (ray.train.v2 imports ray.tune, which is kept)
    ("ray", "2.60.0"),
    ("jsonschema", "4.26.0"), ("jsonschema-specifications", "2025.9.1"),
    ("referencing", "0.37.0"), ("rpds-py", "2026.9.1"),
    # ray[default]: without these Ray starts in "minimal" mode (no dashboard agent, no metrics)
    ("aiohttp-cors", "0.8.1"), ("colorful", "0.5.8"),
    ("opencensus", "0.11.4"), ("opencensus-context", "0.1.3"),
    ("google-api-core", "2.44.0"), ("googleapis-common-protos", "1.76.0"), ("proto-plus", "1.29.0"),
    ("google-auth", "2.63.0"), ("pyasn1", "0.6.5"), ("pyasn1-modules", "0.4.2"), ("cachetools", "7.3.3"),
    ("opentelemetry-api", "1.45.2"), ("opentelemetry-sdk", "1.45.2"), ("opentelemetry-proto", "1.45.2"),
    ("opentelemetry-semantic-conventions", "0.66b2"), ("opentelemetry-exporter-prometheus", "0.66b2"),
    ("pydantic", "2.14.4"), ("pydantic-core", "2.50.5"), ("annotated-types", "0.8.0"),
    ("typing-inspection", "0.4.5"),
    # pydantic 2.14 needs typing-extensions>=4.16; carried so that an older one on the image is shadowed
    ("typing-extensions", "4.16.0"),
    ("smart-open", "9.0.2"),
    # ray[train]
    ("tensorboardx", "2.6.5"),
    # MLflow: the three distributions share the `mlflow` package; `mlflow`, unpacked last, holds all
    ("mlflow-tracing", "3.17.2"), ("mlflow-skinny", "3.17.2"), ("mlflow", "3.17.2"),
    # the SQLite tracking/registry store (cryptography: imported by the registry's DB models)
    ("sqlalchemy", "2.1.9"), ("greenlet", "3.5.6"), ("alembic", "1.20.1"), ("mako", "1.4.3"),
    ("sqlparse", "0.6.1"), ("cryptography", "50.0.2"), ("cffi", "2.1.1"), ("pycparser", "3.12"),
    # the rest of mlflow-skinny's requirements
    ("databricks-sdk", "0.162.0"), ("fastapi", "0.165.0"), ("starlette", "1.10.0"), ("uvicorn", "0.54.0"),
    ("gitpython", "3.2.1"), ("gitdb", "4.0.12"), ("smmap", "5.0.3"), ("importlib-metadata", "9.1.0"),
    ("python-dotenv", "1.2.4"),
    # the rest of mlflow's requirements (`mlflow server`, its GraphQL API and job queue, model flavors)
    ("flask", "3.1.3"), ("flask-cors", "6.0.5"), ("itsdangerous", "2.2.0"), ("blinker", "1.9.0"),
    ("graphene", "3.4.3"), ("graphql-core", "3.2.14"), ("graphql-relay", "3.2.0"),
    ("gunicorn", "26.2.0"), ("huey", "3.5.4"), ("docker", "7.2.0"), ("skops", "0.16.0"),
    ("prettytable", "3.18.0"),
    # clipflow itself (clip_core's tokenizer) and benchmarks/gpu_bench.py's OpenCLIP reference
    ("ftfy", "6.3.1"), ("wcwidth", "0.9.4"), ("open-clip-torch", "3.3.0"),
]

# Paths inside the site-packages tree that are never loaded on the e2e path (fnmatch patterns).
EXCLUDES: list[str] = [
    "ray/jars/*",                    # Java workers (33 MB)
    "ray/rllib/*",                   # reinforcement learning
    "mlflow/server/js/*",            # MLflow's web UI (4.7 MB packed): the REST server works without it
    "*.map",                         # JavaScript source maps
]


# Console scripts as shell shims (the device's python3 is the one with CUDA torch).
SHIMS: dict[str, str] = {
    "clipflow": "-m workflows.ops.cli",  # needs the repository on PYTHONPATH
    "mlflow": "-m mlflow",
    "ray": "-c 'import sys; from ray.scripts.scripts import main; sys.exit(main())'",
}


@dataclass
class Unpacked:
    name: str
    version: str
    wheel_bytes: int
    kept_bytes: int
    dropped_bytes: int


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def download(cache: Path) -> dict[tuple[str, str], Path]:
    """Fetch every pinned wheel into ``cache`` (pip skips files already there); map pin -> wheel."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp",
           "--abi", "cp312", "--abi", "abi3", "--abi", "none", "--dest", str(cache)]
    for platform in PLATFORMS + ["any"]:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={version}" for name, version in PACKAGES]
    subprocess.run(cmd, check=True)
    found: dict[tuple[str, str], Path] = {}
    for name, version in PACKAGES:  # wheel names are DIST-VERSION-...whl, DIST with "_" for "-"
        matches = [p for p in cache.glob("*.whl")
                   if [normalize(p.name.split("-")[0]), p.name.split("-")[1]] == [normalize(name), version]]
        if len(matches) != 1:
            raise SystemExit(f"expected one wheel for {name}=={version} in {cache}, found {matches}")
        found[(name, version)] = matches[0]
    return found


def excluded(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in EXCLUDES)


def write_shims(site: Path) -> None:
    (site / "bin").mkdir()
    for name, args in SHIMS.items():
        shim = site / "bin" / name
        shim.write_text(f'#!/bin/sh\nexec "${{PYTHON:-python3}}" {args} "$@"\n')
        shim.chmod(0o755)


def unpack(wheels: dict[tuple[str, str], Path], site: Path) -> list[Unpacked]:
    """Unpack the wheels into one tree, as `pip install --target` would (later wheels overwrite)."""
    report = []
    for (name, version), wheel in wheels.items():
        kept = dropped = 0
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                path = info.filename
                parts = path.split("/", 2)
                if parts[0].endswith(".data"):  # NAME.data/{purelib,platlib,headers,scripts,data}/...
                    if parts[1] not in ("purelib", "platlib"):  # C headers, console scripts: not needed
                        dropped += info.file_size
                        continue
                    path = parts[2]
                if excluded(path):
                    dropped += info.file_size
                    continue
                target = site / path
                data = zf.read(info)
                if target.exists() and target.read_bytes() != data:
                    print(f"note: {wheel.name} replaces a different {info.filename}", file=sys.stderr)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                mode = (info.external_attr >> 16) & 0o777
                if mode & 0o111:  # Ray's raylet and gcs_server are executables
                    target.chmod(0o755)
                kept += info.file_size
        report.append(Unpacked(name, version, wheel.stat().st_size, kept, dropped))
    return report


def pack(site: Path, archive: Path) -> int:
    """One xz stream over files sorted by suffix, so that similar files share the 64 MiB dictionary.
    Returns the tree's size."""
    files = sorted((p for p in site.rglob("*") if p.is_file()),
                   key=lambda p: (p.suffix, p.name, str(p)))
    print(f"packing {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB, "
          "with xz -9 (a few minutes)...", flush=True)
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(site)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(archive)
    return sum(p.stat().st_size for p in files)


def repo_bytes(exclude: Path) -> int:
    """About what travels besides the bundle: the working tree less .git, venvs and caches."""
    skip = {".git", ".venv", ".clipflow", "__pycache__", ".pytest_cache", "build", "dist", "mlruns"}
    total = 0
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")
                   and Path(root, d) != exclude and not d.startswith(".gpu-bundle")]
        total += sum(Path(root, f).stat().st_size for f in files)
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:7.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-bundle", help="bundle directory")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clipflow-gpu-wheels",
                        help="where downloaded wheels are kept between runs")
    parser.add_argument("--mlflow-ui", action="store_true",
                        help="keep MLflow's web UI (+4.7 MiB); without it `mlflow server` serves the API only")
    args = parser.parse_args(argv)
    if args.mlflow_ui:
        EXCLUDES.remove("mlflow/server/js/*")

    wheels = download(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ".gitignore").write_text("*\n")  # git ignores the bundle: name it in the run's carry
    with tempfile.TemporaryDirectory(prefix="clipflow-gpu-site-") as tmp:
        site = Path(tmp)
        report = unpack(wheels, site)
        write_shims(site)
        tree = pack(site, args.out / "site.tar.xz")

    lines = [f"{'package':36} {'version':10} {'wheel':>11} {'unpacked':>11} {'dropped':>11}",
             "(mlflow-skinny's and mlflow-tracing's files are all in mlflow's too: they count twice here)"]
    for r in sorted(report, key=lambda r: -r.kept_bytes):
        lines.append(f"{r.name:36} {r.version:10} {mib(r.wheel_bytes)} {mib(r.kept_bytes)} {mib(r.dropped_bytes)}")
    lines.append(f"{'total':47} {mib(sum(r.wheel_bytes for r in report))} "
                 f"{mib(sum(r.kept_bytes for r in report))} {mib(sum(r.dropped_bytes for r in report))}")
    lines.append(f"site tree as unpacked on the device: {mib(tree)}")
    (args.out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    bundle = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    repo = repo_bytes(args.out)
    print(f"\nbundle {args.out}: {mib(bundle)} (site.tar.xz {mib((args.out / 'site.tar.xz').stat().st_size)})")
    print(f"working tree besides it (approx.): {mib(repo)}; together {mib(bundle + repo)} "
          f"of the {mib(TRAVEL_LIMIT)} that may travel")
    if bundle + repo > TRAVEL_LIMIT:
        print("OVER THE LIMIT: the device tool will refuse the call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
