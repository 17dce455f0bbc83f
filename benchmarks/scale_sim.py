"""Scale simulation of the data path: what the preprocess driver holds and moves as the data grows, on
1 and 2 local Ray nodes, and what planning a 400M-row epoch costs (``order_scale``).

    python benchmarks/scale_sim.py [--sizes 12000 48000 192000] [--nodes 1 2] [--cpus-per-node 2]

For each (size, nodes) it generates tiny distinct images in webdataset tars (1,000 a tar, 1% exact
duplicates), starts a real cluster (``ray start --head`` plus ``ray start --address`` worker nodes, each
with its own raylet and temp dir, token auth) and runs ``run_preprocess`` in a fresh driver process
attached to it, which reports:
- stage timings (tokenizer, parts, dedup, shards) and samples/s;
- the driver's peak RSS above its RSS right before the run (imports and the Ray connection excluded);
- the driver's read/write bytes during the run (``rchar``/``wchar`` of /proc/self/io: every read and
  write system call, sockets to Ray included), as a fraction of the output bytes.
The baseline is the same data through the previous design, where dedup and shard writing ran on the
driver: its driver read ~9.5x the output bytes (measured on main before the change, 12,000 samples).
Here the fraction must be small and fall as the data grows, and the peak RSS must stay flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ray_head import ray_cluster  # noqa: E402

PER_TAR = 1000
IMAGE_SIDE = 24


def write_tars(directory: Path, samples: int, seed: int = 0) -> None:
    """``samples`` tiny noise JPEGs with captions; every 100th repeats the one before (an exact duplicate)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    previous = b""
    for first in range(0, samples, PER_TAR):
        with tarfile.open(directory / f"part-{first // PER_TAR:05d}.tar", "w") as tar:
            for i in range(first, min(first + PER_TAR, samples)):
                if i % 100 == 99:
                    jpeg = previous
                else:
                    out = BytesIO()
                    Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(
                        out, format="JPEG", quality=80)
                    jpeg = previous = out.getvalue()
                for name, data in ((f"{i:09d}.jpg", jpeg), (f"{i:09d}.txt", f"noise sample {i % 977}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))


def _io() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def driver(raw: str, home: str) -> dict:
    """The measured side: one preprocess run in this process, attached to the cluster in $RAY_ADDRESS."""
    from workflows.common.config import load_config
    from workflows.common.runtime import ensure_ray
    from workflows.data import preprocess
    from workflows.data.preprocess import run_preprocess

    def config(inputs: str, output: str):
        return load_config(None, [f"home={home}", f"preprocess.inputs=[{inputs}]", f"preprocess.output={output}",
                                  "preprocess.image_size=16", "preprocess.min_side=16",
                                  "preprocess.rows_per_shard=1000",
                                  "tokenizer.vocab_size=520", "tokenizer.train_captions=20000"])

    ensure_ray()
    # The driver's RSS when each stage ends (stages peak inside; this says which one grows).
    stage_rss: dict[str, float] = {}
    rss0 = _rss()
    clock_done = preprocess._StageClock.done

    def done(self, stage: str) -> float:
        stage_rss[stage] = round((_rss() - rss0) / 1e6, 1)
        return clock_done(self, stage)

    preprocess._StageClock.done = done
    # Warm-up on one tar: the modules every stage imports are read now, not counted as the run's I/O.
    run_preprocess(config(f"{raw}/part-00000.tar", f"{home}/warm-up"))
    cfg = config(f"{raw}/*.tar", f"{home}/train")
    rss0, (r0, w0) = _rss(), _io()
    result = run_preprocess(cfg)
    r1, w1 = _io()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out_bytes = result.manifest.extra["bytes"]
    return {"samples": result.manifest.counts["input"], "written": result.manifest.counts["written"],
            "duplicates": result.manifest.counts["duplicates"], "shards": len(result.manifest.shards),
            "wall_s": result.wall_seconds, "stages_s": result.stage_seconds,
            "samples_per_s": round(result.manifest.counts["input"] / result.wall_seconds, 1),
            "driver_peak_rss_above_start_mb": round(max(0, peak - rss0) / 1e6, 1),
            "driver_rss_after_stage_mb": stage_rss,
            "driver_read_mb": round((r1 - r0) / 1e6, 2), "driver_write_mb": round((w1 - w0) / 1e6, 2),
            "output_mb": round(out_bytes / 1e6, 2),
            "driver_io_fraction": round((r1 - r0 + w1 - w0) / out_bytes, 3),
            "dedup_tasks": list(result.dedup_tasks)}


def simulate(sizes: list[int], node_counts: list[int], cpus_per_node: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="cf-scale-") as work:
        for size in sizes:
            raw = Path(work) / f"raw-{size}"
            start = time.perf_counter()
            write_tars(raw, size)
            print(f"[{size:,} samples generated in {time.perf_counter() - start:.0f} s]", flush=True)
            for nodes in node_counts:
                cpus = (f"--num-cpus={cpus_per_node}",)
                with ray_cluster(cpus, [cpus] * (nodes - 1), env={"PYTHONPATH": str(ROOT)}) as cluster:
                    env = cluster.env
                    home = Path(work) / f"home-{size}-{nodes}"
                    child = subprocess.run([sys.executable, __file__, "--driver", str(raw), str(home)], env=env,
                                           capture_output=True, text=True, timeout=3600)
                if child.returncode != 0:
                    raise SystemExit(f"driver failed ({size} samples, {nodes} nodes):\n{child.stderr[-3000:]}")
                row = {"nodes": nodes, **json.loads(child.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| samples | nodes | wall s | tokenizer / parts / dedup / shards s | samples/s | driver peak RSS MB "
          "| driver read+write MB | output MB | driver I/O / output |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        stages = " / ".join(f"{r['stages_s'].get(k, 0):.1f}" for k in ("tokenizer", "parts", "dedup", "shards"))
        print(f"| {r['samples']:,} | {r['nodes']} | {r['wall_s']:.1f} | {stages} | {r['samples_per_s']:,.0f} "
              f"| {r['driver_peak_rss_above_start_mb']:.1f} | {r['driver_read_mb'] + r['driver_write_mb']:.2f} "
              f"| {r['output_mb']:.2f} | {r['driver_io_fraction']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12_000, 48_000, 192_000])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--skip-order", action="store_true", help="skip the epoch-order planning part")
    parser.add_argument("--driver", nargs=2, metavar=("RAW", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        print(json.dumps(driver(*args.driver)))
        return
    print_table(simulate(args.sizes, args.nodes, args.cpus_per_node))
    if not args.skip_order:
        import order_scale

        order_scale.main([])


if __name__ == "__main__":
    main()
