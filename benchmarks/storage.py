"""Precomputed vs OME-Zarr: read throughput of one region and predict's end-to-end voxels/s (null model).

The same uint8 data (EM-like texture: smooth structure plus noise), chunks (16, 256, 256), is
written twice on local disk: as cleftchunk's OME-Zarr (Blosc-zstd, as ``convert`` writes it) and
as a neuroglancer precomputed volume (``raw`` encoding, the usual one for EM images) by
tensorstore. Contenders, each in a fresh subprocess, timed inside it (start-up and imports excluded),
medians:

- read the whole region: ``open_volume(spec)[...]`` for either (cleftchunk's path: zarr-python,
  tensorstore's ``neuroglancer_precomputed`` driver), and CloudVolume on the precomputed copy when
  ``--cloudvolume-python`` names an interpreter that has it (the reader choice, side by side);
- ``predict`` with a null model (sigmoid of the input), window 16×256×256, from either copy into
  a Zarr output: the goal is precomputed within 10 % of OME-Zarr.

    python benchmarks/storage.py            # 256×2048×2048 (1 GiB), 3 runs each
    python benchmarks/storage.py --quick    # 32×512×512 (8 MiB), a smoke run
    python benchmarks/storage.py --cloudvolume-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, markdown_table, measure, median, python_argv, write_fragment  # noqa: E402

CHUNKS = (16, 256, 256)
WINDOW = (16, 256, 256)

# Start-up and imports (tensorstore's ~0.5 s included) are outside the timed part, for every contender.
READ = """
import time, tensorstore, zarr
from cleftchunk.io.volumes import open_volume
start = time.perf_counter()
data = open_volume({spec!r})[...]
print("RESULT", time.perf_counter() - start, int(data.sum(dtype="uint64") % 1000003))
"""

READ_CLOUDVOLUME = """
import time
from cloudvolume import CloudVolume
start = time.perf_counter()
vol = CloudVolume({url!r}, mip=0, progress=False, parallel=1, fill_missing=True)
data = vol[:, :, :][..., 0]
print("RESULT", time.perf_counter() - start, int(data.sum(dtype="uint64") % 1000003))
"""

PREDICT = """
import time, torch, tensorstore, zarr
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
class Null(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)
start = time.perf_counter()
predict(Null(), {spec!r}, {out!r}, WindowOptions({window!r}), RunOptions(overwrite=True), OutputOptions(chunks={chunks!r}),
        log=lambda m: None)
print("RESULT", time.perf_counter() - start, 0)
"""


def em_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise, written slab by slab (never two copies of the volume)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    base = (np.sin(yy / 37.0) * np.cos(xx / 23.0) * 60 + 128).astype(np.float32)
    out = np.empty(shape, np.uint8)
    for z in range(shape[0]):
        out[z] = np.clip(base + np.sin(z / 5.0) * 20 + rng.normal(0, 12, shape[1:]), 0, 255).astype(np.uint8)
    return out


def write_copies(shape: tuple[int, int, int], work: Path) -> tuple[str, str]:
    import tensorstore as ts

    from cleftchunk.io.volumes import create_volume

    data = em_like(shape)
    zarr_spec = str(work / "em.zarr")
    volume = create_volume(zarr_spec, shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4), overwrite=True)
    volume.write(volume.roi, data)
    path = work / "em_precomputed"
    shutil.rmtree(path, ignore_errors=True)
    store = ts.open({
        "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path) + "/"},
        "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
        "scale_metadata": {"size": list(reversed(shape)), "resolution": [4, 4, 40], "chunk_size": list(reversed(CHUNKS)),
                           "encoding": "raw", "voxel_offset": [0, 0, 0]},
    }, create=True).result()
    store[ts.d["channel"][0]].write(data.transpose(2, 1, 0)).result()
    return zarr_spec, f"precomputed://file://{path}"


def timed(argv: list[str], repeats: int) -> tuple[float, str]:
    """Median of the in-process seconds over ``repeats`` fresh subprocesses, and the checksum seen."""
    seconds, checks = [], set()
    for _ in range(repeats):
        line = [l for l in measure(argv).stdout.splitlines() if l.startswith("RESULT")][-1].split()
        seconds.append(float(line[1]))
        checks.add(line[2])
    return median(seconds), ",".join(sorted(checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32×512×512 instead of 256×2048×2048")
    parser.add_argument("--shape", help="another region Z,Y,X (e.g. 64,1024,1024), not written to results/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cloudvolume-python", help="an interpreter with cloud-volume installed, to time it side by side")
    parser.add_argument("--no-predict", action="store_true", help="only the reads")
    args = parser.parse_args()
    shape = (32, 512, 512) if args.quick else (256, 2048, 2048)
    if args.shape:
        shape, args.quick = tuple(int(v) for v in args.shape.split(",")), True
    work = DATA_DIR / ("storage-quick" if args.quick else "storage")
    work.mkdir(parents=True, exist_ok=True)
    zarr_spec, pc_spec = write_copies(shape, work)
    voxels = int(np.prod(shape))
    reads = {"OME-Zarr (zarr-python, zstd)": python_argv(READ.format(spec=zarr_spec)),
             "precomputed (tensorstore, raw)": python_argv(READ.format(spec=pc_spec))}
    if args.cloudvolume_python:
        url = "file://" + pc_spec.split("file://", 1)[1]
        reads["precomputed (CloudVolume, raw)"] = [args.cloudvolume_python, "-c", READ_CLOUDVOLUME.format(url=url)]
    rows, results = [], {}
    for name, argv in reads.items():
        seconds, check = timed(argv, args.repeats)
        results[name] = seconds
        rows.append([name, f"{seconds:.2f}", f"{voxels / seconds / 2**20:.0f}", check])
    text = (f"#### Read {'×'.join(map(str, shape))} uint8 ({voxels / 2**20:.0f} MiB), chunks {'×'.join(map(str, CHUNKS))}, "
            f"local disk, median of {args.repeats}\n\n"
            + markdown_table(["reader", "seconds", "MiB/s", "checksum"], rows) + "\n")
    if not args.no_predict:
        prows = []
        for name, spec in (("OME-Zarr", zarr_spec), ("precomputed", pc_spec)):
            argv = python_argv(PREDICT.format(spec=spec, out=str(work / f"pred-{name}.zarr"), window=WINDOW, chunks=CHUNKS))
            seconds, _ = timed(argv, args.repeats)
            results[f"predict from {name}"] = seconds
            prows.append([f"predict from {name}", f"{seconds:.2f}", f"{voxels / seconds / 1e6:.2f}"])
        ratio = results["predict from precomputed"] / results["predict from OME-Zarr"]
        same = _same_bytes(work / "pred-OME-Zarr.zarr", work / "pred-precomputed.zarr")
        text += (f"\n#### predict, null model, window {'×'.join(map(str, WINDOW))}, threads of this process, median of {args.repeats}\n\n"
                 + markdown_table(["input", "seconds", "M voxels/s"], prows)
                 + f"\n\nprecomputed ÷ OME-Zarr wall time: **{ratio:.3f}** (goal ≤ 1.10); outputs byte-identical: **{same}**\n")
    print(text)
    print(json.dumps(results))
    if not args.quick:
        print(f"wrote {write_fragment('storage', 'Precomputed vs OME-Zarr (benchmarks/storage.py)', text)}")


def _same_bytes(a: Path, b: Path) -> bool:
    from cleftchunk.io.volumes import open_volume

    return bool(np.array_equal(open_volume(str(a))[...], open_volume(str(b))[...]))


if __name__ == "__main__":
    main()
