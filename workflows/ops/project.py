"""Where the clipflow checkout is: `k8s render` reads its ``ray_cluster.yaml`` and `submit` uploads it.

The installed package is not the checkout: after ``pip install .`` the code lives in site-packages,
far from ``ray_cluster.yaml`` and ``configs/``. So the checkout is the folder at or above the current
directory that holds clipflow's ``pyproject.toml`` and ``ray_cluster.yaml``; an editable install (whose
package folder sits inside its checkout) also finds it from anywhere else.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from workflows.common.errors import UserError

PROJECT_NAME = "clipflow"


def project_root(cwd: Path | None = None) -> Path:
    """The clipflow checkout containing ``cwd`` (default: the current directory), else the editable install's."""
    start = (cwd or Path.cwd()).resolve()
    for folder in (start, *start.parents, Path(__file__).resolve().parents[2]):
        if is_checkout(folder):
            return folder
    raise UserError(f"no clipflow checkout (pyproject.toml of project {PROJECT_NAME!r} next to ray_cluster.yaml) "
                    f"at or above {start}: run from a clipflow checkout")


def is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is a clipflow checkout: another project's pyproject.toml does not count."""
    pyproject = folder / "pyproject.toml"
    if not (pyproject.is_file() and (folder / "ray_cluster.yaml").is_file()):
        return False
    try:
        return tomllib.loads(pyproject.read_text()).get("project", {}).get("name") == PROJECT_NAME
    except tomllib.TOMLDecodeError:
        return False
