"""Time to the first training step, and peak memory, on a virtual 1 TB labelled volume (a few
annotated cubes written, the rest never written, no cleft table yet) against a 1 GB one whose
labels are all written (issue 24: "≤ 30 s more than on a 1 GB one, peak memory ≤ 1 GiB").

    python benchmarks/first_step.py [--json] [--dir DIR] [--gb 1.0]

Each row runs in a fresh process (its peak RSS is that process's alone): ``cleftchunk train``'s
library call for one iteration (preset small, 8×128×128 crops, batch 2, no loader workers), once
with no table (built first: listing the store, counting the stored chunks) and once again (the
table is read). Keys: name, shape, seconds (from the call to the end of step 1), peak_rss_mib.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNKS = (16, 256, 256)
TB_SHAPE = (4096, 16384, 16384)


def make(root: Path, name: str, shape, cubes) -> tuple[str, str]:
    import numpy as np

    from cleftchunk.geometry import Roi
    from cleftchunk.io.volumes import create_volume

    image = create_volume(str(root / f"{name}.zarr/raw"), shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    labels = create_volume(str(root / f"{name}.zarr/clefts"), shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    rng = np.random.default_rng(0)
    for cube in cubes:
        # written slab by slab, so that making the 1 GB volume stays small in memory too
        for z in range(cube.begin[0], cube.end[0], CHUNKS[0]):
            slab = Roi((z, cube.begin[1], cube.begin[2]), (min(CHUNKS[0], cube.end[0] - z), *cube.shape[1:]))
            image.write(slab, (rng.integers(0, 4, slab.shape, dtype=np.uint8) * 60))
            lab = np.zeros(slab.shape, np.uint8)
            for _ in range(max(1, slab.size // 2**20)):
                a, b, c = (int(rng.integers(0, s - 8)) for s in slab.shape)
                lab[a : a + 2, b : b + 8, c : c + 8] = 1
            lab[:, ::256, ::256] = 1  # every chunk holds a cleft voxel, so Zarr stores every chunk
            labels.write(slab, lab)
    return str(root / f"{name}.zarr/raw"), str(root / f"{name}.zarr/clefts")


CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from cleftchunk.train import train
train({"images": [sys.argv[1]], "labels": [sys.argv[2]], "output": sys.argv[3], "log_dir": sys.argv[3] + "/tb",
       "iteration_total": 1, "iteration_save": 1, "input_size": [8, 128, 128], "batch_size": 2, "preset": "small",
       "loader_workers": 0, "progress": False, "image_every": 0, "label_mode": "nonzero", "threads": 2}, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def first_step(image: str, labels: str, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, image, labels, out], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", help="where the volumes go [a temporary folder]")
    parser.add_argument("--gb", type=float, default=1.0, help="size of the fully labelled volume, GB [1]")
    args = parser.parse_args()
    from cleftchunk.geometry import Roi

    root = Path(args.dir or tempfile.mkdtemp(prefix="first-step-"))
    side = int(round((args.gb * 1e9 / 64) ** 0.5 / 256)) * 256
    small_shape = (64, side, side)
    cubes = [Roi((1024, 4096, 4096), (64, 512, 512)), Roi((3008, 12288, 512), (64, 512, 512)), Roi((2000, 256, 8192), (32, 1024, 1024))]
    t0 = time.perf_counter()
    volumes = {"1TB-few-cubes": (make(root, "tb", TB_SHAPE, cubes), TB_SHAPE),
               f"{args.gb:g}GB-all-labelled": (make(root, "gb", small_shape, [Roi((0, 0, 0), small_shape)]), small_shape)}
    print(f"volumes written in {time.perf_counter() - t0:.0f} s under {root}", file=sys.stderr)
    for name, ((image, labels), shape) in volumes.items():
        for when in ("no table yet", "table stored"):
            row = {"name": f"{name} ({when})", "shape": list(shape), **first_step(image, labels, str(root / f"run-{name}"))}
            print(json.dumps(row) if args.json else f"{row['name']:40s} {row['seconds']:7.1f} s  peak {row['peak_rss_mib']:7.0f} MiB")


if __name__ == "__main__":
    main()
