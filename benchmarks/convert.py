"""HDF5 → Zarr conversion: throughput and peak memory of ``cleftchunk convert`` against two baselines.

Contenders, each run in a fresh subprocess (so that its peak RSS is its own), repeated, medians:

- ``cleftchunk convert`` with the threaded Dask scheduler (the default) and with processes;
- ``dask.array.from_array(h5_dataset).to_zarr(...)``, the common one-liner;
- a plain h5py loop reading 16-section slabs and writing them to Zarr.

All write the same Zarr v3 layout: chunks (16, 256, 256), Blosc-zstd level 5 with byte shuffle.
The inputs are uint8 HDF5 datasets with EM-like texture (smooth structure plus noise) so that
compression does real work: uncompressed and contiguous (like the CREMI downloads) at two sizes
at least 4× apart, to show whether peak memory grows with the volume; and gzip-compressed in
64³ chunks (as many tools write HDF5), where reads that cut source chunks decompress them
repeatedly.

    python benchmarks/convert.py            # 0.25 GiB and 1 GiB (+ 0.25 GiB chunked), 3 runs each (~12 min on 2 cores)
    python benchmarks/convert.py --quick    # 32 MiB and 128 MiB (+ 128 MiB chunked), 3 runs each
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, machine_info, markdown_table, measure, median, python_argv, write_fragment  # noqa: E402

PLANE = (2048, 2048)
CHUNKS = (16, 256, 256)

DASK_BASELINE = """
import dask.array as da, h5py, zarr, zarr.codecs as zc
f = h5py.File({src!r}, 'r')
x = da.from_array(f['raw'], chunks={chunks!r})
out = zarr.create_array({dst!r}, shape=x.shape, chunks={chunks!r}, dtype=x.dtype,
                        compressors=[zc.BloscCodec(cname='zstd', clevel=5, shuffle='shuffle')])
x.to_zarr(out)
"""

SLAB_LOOP = """
import h5py, zarr, zarr.codecs as zc
f = h5py.File({src!r}, 'r')
ds = f['raw']
out = zarr.create_array({dst!r}, shape=ds.shape, chunks={chunks!r}, dtype=ds.dtype,
                        compressors=[zc.BloscCodec(cname='zstd', clevel=5, shuffle='shuffle')])
step = {chunks!r}[0]
for z in range(0, ds.shape[0], step):
    out[z:z + step] = ds[z:z + step]
"""


def em_like_volume(path: Path, depth: int, seed: int = 0, chunked: bool = False) -> None:
    """Write a uint8 HDF5 volume slab by slab (never the whole volume in memory).

    ``chunked``: gzip level 4 in 64³ chunks (fewer sections if the volume is thinner); else
    uncompressed and contiguous.
    """
    import h5py
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    texture = gaussian_filter(rng.normal(size=(512, 512)), 6)
    texture = ((texture - texture.min()) / np.ptp(texture) * 200 + 20).astype(np.uint8)
    tiled = np.tile(texture, (PLANE[0] // 512, PLANE[1] // 512))
    with h5py.File(path, "w") as f:
        layout = dict(chunks=(min(64, depth), 64, 64), compression="gzip", compression_opts=4) if chunked else {}
        ds = f.create_dataset("raw", shape=(depth,) + PLANE, dtype=np.uint8, **layout)
        ds.attrs["resolution"] = (40.0, 4.0, 4.0)
        for z in range(0, depth, 16):
            n = min(16, depth - z)
            shift = rng.integers(0, 512, size=2)
            slab = np.roll(tiled, tuple(shift), axis=(0, 1))[None].repeat(n, axis=0)
            slab = slab + rng.integers(0, 24, size=slab.shape, dtype=np.uint8)
            ds[z : z + n] = slab


def measure_with_cpu(argv: list[str]):
    """``measure`` plus the CPU seconds (user + system) of the whole process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = measure(argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return m, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def contenders(src: Path, dst: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "cleftchunk_cli.main", "convert", str(src), f"{dst}/raw", "--chunks", ",".join(map(str, CHUNKS)),
           "--no-progress", "--overwrite"]
    fmt = dict(src=str(src), dst=str(dst), chunks=CHUNKS)
    return {
        "cleftchunk convert (threads)": cli + ["--workers", "0"],
        "cleftchunk convert (processes)": cli + ["--workers", "2"],
        "dask from_array().to_zarr()": python_argv(DASK_BASELINE.format(**fmt)),
        "h5py slab loop → zarr": python_argv(SLAB_LOOP.format(**fmt)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes (32 and 128 MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = [(8, False), (32, False), (32, True)] if args.quick else [(64, False), (256, False), (64, True)]
    work = DATA_DIR / "convert"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for depth, chunked in cases:
        src = work / f"em_{depth}{'_gzip64' if chunked else ''}.h5"
        if not src.exists():
            em_like_volume(src, depth, chunked=chunked)
        size = depth * PLANE[0] * PLANE[1]
        layout = f"gzip, {min(64, depth)}×64×64 chunks" if chunked else "contiguous"
        results = {}
        for repeat in range(args.repeats):
            for name, argv in contenders(src, work / "out.zarr").items():  # interleaved: load noise hits all alike
                shutil.rmtree(work / "out.zarr", ignore_errors=True)
                m, cpu = measure_with_cpu(argv)
                results.setdefault(name, []).append((m, cpu))
                print(f"{depth:4d} sections {layout:16s} {name:32s} {m.seconds:7.2f} s  {cpu:7.2f} CPU s  {m.peak_rss_mib:7.0f} MiB", flush=True)
        base = median([m.seconds for m, _ in results["dask from_array().to_zarr()"]])
        for name, runs in results.items():
            seconds = median([m.seconds for m, _ in runs])
            rows.append([
                f"{size / 2**30:.3g} GiB ({depth}×{PLANE[0]}×{PLANE[1]}), {layout}", name, f"{seconds:.2f}",
                f"{size / 2**20 / seconds:.0f}", f"{median([cpu for _, cpu in runs]):.2f}",
                f"{median([m.peak_rss_mib for m, _ in runs]):.0f}", f"{base / seconds:.2f}×",
            ])
    shutil.rmtree(work / "out.zarr", ignore_errors=True)
    table = markdown_table(["HDF5 volume", "contender", "median s", "MiB/s", "CPU s", "peak RSS MiB", "speed vs dask"], rows)
    body = (
        f"HDF5 (uint8, EM-like texture) → Zarr v3, chunks {CHUNKS}, Blosc-zstd 5; "
        f"median of {args.repeats} runs, each in a fresh process; peak RSS of the whole process tree; "
        "CPU s = user + system time of the process tree, which depends far less than wall time on what "
        "else the (shared) machine runs."
        f"{' Quick run (--quick).' if args.quick else ''}\n\n{table}\n"
    )
    path = write_fragment("convert", "Conversion: HDF5 → Zarr", body)
    print(machine_info())
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
