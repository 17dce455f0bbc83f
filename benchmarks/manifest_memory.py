"""Peak memory of reading a CSV/JSONL manifest, against the manifest's size: the reader streams the file, so its
memory does not grow with the rows (a 400M-row LAION manifest is ~36 GB of JSONL, read by one task).

Each size runs in a fresh process (peak RSS is per process): it writes an N-row manifest of (path, caption)
whose images do not exist, reads every sample with the preprocessing reader (each row is a counted
``unreadable_image`` reject), and prints the peak RSS above the interpreter's, next to the file size.

    .venv/bin/python benchmarks/manifest_memory.py --rows 250000 1000000
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_manifest(path: Path, rows: int) -> None:
    with open(path, "w", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.writer(f)
            writer.writerow(["path", "caption"])
            writer.writerows([f"images/{i:09d}.jpg", f"a photo of thing number {i} on a table"] for i in range(rows))
        else:
            f.writelines(json.dumps({"path": f"images/{i:09d}.jpg", "caption": f"a photo of thing number {i}"}) + "\n"
                         for i in range(rows))


def measure(path: str) -> None:
    """In the child: read every sample, print the outcome counts and the peak RSS growth as one JSON line."""
    from workflows.data.readers import ReadLimits, Source, read_source

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fmt = "csv" if path.endswith(".csv") else "jsonl"
    counts = Counter(sample.error or "ok" for sample in read_source(Source(path, fmt, 0, 0, ReadLimits())))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"samples": dict(counts), "peak_rss_growth_kib": grown}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    with tempfile.TemporaryDirectory(prefix="clipflow-manifest-") as tmp:
        for rows in args.rows:
            for suffix in (".jsonl", ".csv"):
                path = Path(tmp) / f"m{rows}{suffix}"
                write_manifest(path, rows)
                child = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True,
                                       text=True, check=True)
                result = json.loads(child.stdout.strip().splitlines()[-1])
                size = path.stat().st_size
                grown = result["peak_rss_growth_kib"] * 1024
                print(f"{suffix[1:]:5s} rows {rows:>10,}  file {size / 2**20:8.1f} MiB  peak RSS growth "
                      f"{grown / 2**20:7.1f} MiB  ratio to the file {grown / size:.3f}  samples {result['samples']}",
                      flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
