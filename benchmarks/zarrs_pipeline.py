"""Convert and read I/O with zarr-python's default codec pipeline vs the zarrs (Rust) one.

The switch is zarr's own configuration, read from the environment by every process (workers
included): ``ZARR_CODEC_PIPELINE__PATH=zarrs.ZarrsCodecPipeline``. Each run is a fresh process;
runs alternate so that load from other users of the machine hits both alike. Reports wall and
CPU seconds (children included) and whether the stored chunk bytes are identical.

    python benchmarks/zarrs_pipeline.py [--shape 64,1024,1024] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = {"default": None, "zarrs": "zarrs.ZarrsCodecPipeline"}
READ = "from cleftchunk.io.volumes import open_volume; v = open_volume({out!r}); print(int(v[:].sum()))"


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout.strip()


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "zarr.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="64,1024,1024")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import numpy as np

    shape = tuple(int(s) for s in args.shape.split(","))
    work = Path(tempfile.mkdtemp(prefix="zarrs-bench-"))
    try:
        rng = np.random.default_rng(0)
        # EM-like: smooth structure plus noise, so compression does real work.
        base = rng.integers(0, 256, (shape[0], shape[1] // 8, shape[2] // 8), dtype=np.uint8)
        data = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2) // 2 + rng.integers(0, 64, shape, dtype=np.uint8)
        np.save(work / "src.npy", data)
        print(f"shape {shape} ({data.nbytes / 2**20:.0f} MiB uint8), loadavg {open('/proc/loadavg').read().split()[:3]}")
        rows = []
        for rep in range(args.repeats):
            for name, path in PIPELINES.items():
                env = dict(os.environ)
                env.pop("ZARR_CODEC_PIPELINE__PATH", None)
                if path:
                    env["ZARR_CODEC_PIPELINE__PATH"] = path
                out = work / f"{name}-{rep}.zarr"
                convert = [sys.executable, "-m", "cleftchunk_cli.main", "convert", str(work / "src.npy"), str(out),
                           "--voxel-size", "40,4,4", "--no-progress"]
                cw, cc, _ = timed(convert, env)
                rw, rc, total = timed([sys.executable, "-c", READ.format(out=str(out))], env)
                rows.append((name, rep, cw, cc, rw, rc, digest(out / "s0"), total))
        print("| pipeline | run | convert wall s | convert CPU s | read wall s | read CPU s | chunk bytes sha256 | sum |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]} | {r[7]} |")
        print(f"loadavg after {open('/proc/loadavg').read().split()[:3]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
