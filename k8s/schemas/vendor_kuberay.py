"""Regenerate the vendored KubeRay v1 schemas (``workflows/ops/kuberay_schemas/*.json``) from the published CRDs.

The CRDs are large (~3 MB of YAML); the tests need only each kind's ``openAPIV3Schema`` for the
served ``v1`` version. Descriptions are dropped (they are most of the bytes) and everything that
constrains a manifest is kept verbatim: types, ``required``, ``enum``, formats, patterns, bounds and
the ``x-kubernetes-*`` markers. They are package data of ``workflows``, so `clipflow k8s render` validates
what it writes from any install. Run from the repository root:

    python k8s/schemas/vendor_kuberay.py /path/to/kuberay/ray-operator/config/crd/bases SOURCE_NOTE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
         "RayCronJob": "ray.io_raycronjobs.yaml"}
OUT = Path(__file__).resolve().parents[2] / "workflows" / "ops" / "kuberay_schemas"


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(crd_dir: str, source: str) -> None:
    for kind, filename in KINDS.items():
        crd = yaml.safe_load((Path(crd_dir) / filename).read_text())
        assert crd["spec"]["names"]["kind"] == kind, filename
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        doc = {"$comment": f"KubeRay {crd['spec']['group']}/v1 {kind} openAPIV3Schema from {source}, "
                           f"file {filename}; descriptions removed. Regenerate with vendor_kuberay.py.",
               **schema}
        path = OUT / f"{kind.lower()}.json"
        path.write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
