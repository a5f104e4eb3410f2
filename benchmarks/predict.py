"""Block-wise prediction: efficiency, memory at two volume sizes, and MONAI side by side.

Every contender runs in a fresh subprocess (peak RSS of its whole process tree), repeated; medians.

1. Efficiency = (time of the bare model forward over every tile of the grid, in a plain loop, no
   I/O) ÷ (end-to-end ``cleftchunk predict`` wall time: start-up, cluster, reads, blending,
   writes). Same model, threads and grid. Full run: default unetv0 (7.7 M parameters), window
   8×256×256, overlap 0 (64 tiles), on 32×1024×1024; the bare forward is timed on 8 tiles spread
   over the grid and scaled (``--eff-sample``), which halves a run that takes ~8 min on 2 idle
   cores. Wall and CPU time ratios are both reported. Goal ≥ 0.9.
2. Peak memory of ``cleftchunk.predict`` (block-wise, one worker process) against the in-memory
   ``predict_reference`` at two volume sizes 8× apart, with a cheap model (one convolution): the
   block-wise peak must not grow with the volume.
3. MONAI ``sliding_window_inference`` (same unetv0 small-preset model, window, overlap, Gaussian
   σ = W/8 blending, batch 1, all cores) on a volume that fits in memory, read from and written to
   Zarr like ``cleftchunk predict``: time, peak memory, and how far apart the uint8 outputs are.

    python benchmarks/predict.py            # full run (~10 min on 2 idle cores)
    python benchmarks/predict.py --quick    # small volumes and the small preset (~2 min)
    python benchmarks/predict.py --mid --only efficiency  # default model on 16×512×512 (8 tiles),
                                            # when the full efficiency run does not fit a loaded machine
    python benchmarks/predict.py --only monai,memory
    python benchmarks/predict.py --only hotpath   # null model beside MONAI, GPU projection (~2 min idle;
                                                  # writes results/predict-hotpath.md)
    python benchmarks/predict.py --only hotpath --hotpath-models   # and the real-model rows (long)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, RESULTS_DIR, markdown_table, measure, median, python_argv, write_fragment  # noqa: E402
from _hotpath import hotpath, kept_notes  # noqa: E402

WORK = DATA_DIR / "predict"
CORES = os.cpu_count() or 1

BARE_FORWARD = """
import json, time, numpy as np, torch
torch.set_num_threads({threads})
from cleftchunk.model import load_model
from cleftchunk.predict.tiling import TileGrid
from cleftchunk.io.volumes import open_volume
from cleftchunk.geometry import Roi
volume = open_volume({spec!r})
raw = volume[:]
grid = TileGrid.over(Roi((0, 0, 0), raw.shape), {window!r}, {overlap!r}, pad=False)
model = load_model({ckpt!r})
tiles = [raw[t.to_slices()] for _, t in grid.tiles()]
sample = tiles[:: max(1, len(tiles) // {sample})][:{sample}]  # evenly spread over the grid
with torch.inference_mode():
    model(torch.zeros((1, 1) + tuple({window!r})))  # warm-up, as a worker's first tile
    start, cpu = time.perf_counter(), time.process_time()
    for tile in sample:
        model(torch.from_numpy(tile[None, None]).float().div_(255.0))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
scale = len(tiles) / len(sample)  # a forward costs the same for every tile of one shape
print("RESULT", json.dumps({{"seconds": seconds * scale, "cpu": cpu * scale, "tiles": grid.count, "timed": len(sample)}}))
"""

CHEAP_BLOCKWISE = """
import torch
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    predict(model, {spec!r}, {out!r}, WindowOptions({window!r}), RunOptions(block_shape={block!r}, workers=1, overwrite=True),
            OutputOptions(chunks={chunks!r}), log=lambda m: None)
"""

CHEAP_IN_MEMORY = """
import torch, zarr
torch.set_num_threads({threads})
from cleftchunk.predict import predict_reference
from cleftchunk.io.volumes import create_volume, open_volume
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
raw = open_volume({spec!r})[:]
out = predict_reference(model, raw, {window!r})
create_volume({out!r}, out.shape, out.dtype, chunks={chunks!r}, overwrite=True).write_nm((0, 0, 0), out)
"""

MONAI = """
import numpy as np, torch
torch.set_num_threads({threads})
from monai.inferers import sliding_window_inference
from cleftchunk.model import load_model
from cleftchunk.io.volumes import create_volume, open_volume
raw = open_volume({spec!r})[:]
model = load_model({ckpt!r})
x = torch.from_numpy(raw[None, None]).float().div_(255.0)
with torch.inference_mode():
    p = sliding_window_inference(x, roi_size={window!r}, sw_batch_size=1, predictor=model, overlap={overlap!r},
                                 mode="gaussian", sigma_scale=0.125, padding_mode="reflect")
out = np.clip(np.floor(p[0, 0].numpy().astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)
create_volume({out!r}, out.shape, out.dtype, chunks={chunks!r}, overwrite=True).write_nm((0, 0, 0), out)
"""


def random_volume(shape: tuple[int, int, int], chunks: tuple[int, int, int], seed: int = 0) -> str:
    """A uint8 Zarr volume of EM-like noise (the model's time does not depend on content; no
    tile is single-valued, so none is skipped). Written slab by slab."""
    from cleftchunk.io.volumes import create_volume

    spec = str(WORK / f"raw_{'x'.join(map(str, shape))}.zarr" / "raw")
    if Path(spec).exists():
        return spec
    volume = create_volume(spec, shape, np.uint8, chunks=chunks, overwrite=True)
    rng = np.random.default_rng(seed)
    for z in range(0, shape[0], chunks[0]):
        n = min(chunks[0], shape[0] - z)
        volume.array[z : z + n] = rng.integers(0, 256, (n,) + shape[1:], dtype=np.uint8)
    return spec


def checkpoint(preset: str, window: tuple[int, int, int]) -> str:
    import torch

    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    path = WORK / f"unetv0_{preset}_{'x'.join(map(str, window))}.pth"
    if not path.exists():
        torch.manual_seed(0)
        net = build_model("unetv0", preset=preset)
        save_checkpoint(path, net, arch_spec(net), window)
    return str(path)


def cli_predict(spec: str, out: str, ckpt: str, chunks, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "cleftchunk_cli.main", "predict", spec, out, "--checkpoint", ckpt, "--chunks",
            ",".join(map(str, chunks)), "--no-progress", "--overwrite", *extra]


def result_line(text: str) -> dict:
    return json.loads(text.split("RESULT", 1)[1].strip().splitlines()[0])


# -- 1. efficiency --------------------------------------------------------------------------
def efficiency(cfg: dict, repeats: int) -> str:
    shape, window, overlap, chunks = cfg["eff_shape"], cfg["eff_window"], cfg["eff_overlap"], cfg["chunks"]
    spec = random_volume(shape, chunks)
    ckpt = checkpoint(cfg["eff_preset"], window)
    out = str(WORK / "eff_out.zarr" / "pred")
    bare, bare_cpu, e2e, e2e_cpu = [], [], [], []
    sample = cfg.get("eff_sample", 10**9)
    for _ in range(repeats):
        m = measure(python_argv(BARE_FORWARD.format(threads=CORES, spec=spec, window=window, overlap=overlap, ckpt=ckpt, sample=sample)))
        r = result_line(m.stdout)
        bare.append(r["seconds"])
        bare_cpu.append(r["cpu"])
        tiles, timed = r["tiles"], r["timed"]
        before = _children_cpu()
        e2e.append(measure(cli_predict(spec, out, ckpt, chunks, ["--overlap", str(overlap), "--workers", "1"])).seconds)
        e2e_cpu.append(_children_cpu() - before)
        print(f"  efficiency: bare {bare[-1]:.1f} s ({bare_cpu[-1]:.0f} CPU s), end to end {e2e[-1]:.1f} s ({e2e_cpu[-1]:.0f} CPU s)", flush=True)
    attrs = _predict_attrs(out)
    table = markdown_table(
        ["volume", "model", "window / overlap", "tiles", "bare forward s (CPU s)", "cleftchunk predict s (CPU s)",
         "efficiency, wall", "efficiency, CPU time", "tiles run / grid"],
        [[
            "×".join(map(str, shape)), f"unetv0 {cfg['eff_preset']}", f"{'×'.join(map(str, window))} / {overlap}", tiles,
            f"{median(bare):.1f} ({median(bare_cpu):.0f})", f"{median(e2e):.1f} ({median(e2e_cpu):.0f})",
            f"**{median(bare) / median(e2e):.3f}**", f"**{median(bare_cpu) / median(e2e_cpu):.3f}**",
            f"{attrs['tiles']['run']}/{attrs['tiles']['in_grid']}",
        ]],
    )
    sampled = (
        f" The forward was timed on {timed} of the {tiles} tiles, evenly spread, and scaled by {tiles}/{timed} (a forward "
        f"costs the same for every tile of one shape)." if timed < tiles else ""
    )
    return (
        f"### Efficiency (goal ≥ 0.9)\n\nBare forward: the checkpoint's model over the tiles of the grid in a Python loop "
        f"(batch 1, {CORES} torch threads, inputs already in memory, timer around the loop only).{sampled} End to end: "
        f"`cleftchunk predict --workers 1` ({CORES} torch threads in the worker), the whole command "
        f"including interpreter start, cluster start, model load, Zarr reads, blending, scratch partials and writes. "
        f"CPU time (user + system of all processes) is given too because the shared machine's load changes wall times "
        f"between the two runs. Median of {repeats}.\n\n{table}\n"
    )


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _predict_attrs(out: str) -> dict:
    import zarr

    return dict(zarr.open_array(out + "/s0").attrs)["cleftchunk_predict"]


# -- 2. memory -------------------------------------------------------------------------------
def memory(cfg: dict, repeats: int) -> str:
    rows = []
    window, chunks, block = cfg["mem_window"], cfg["chunks"], cfg["mem_block"]
    for shape in cfg["mem_shapes"]:
        spec = random_volume(shape, chunks)
        out = str(WORK / "mem_out.zarr" / "pred")
        fmt = dict(spec=spec, out=out, window=window, chunks=chunks, block=block, threads=CORES)
        for name, code in (("cleftchunk.predict (block-wise)", CHEAP_BLOCKWISE), ("predict_reference (in memory)", CHEAP_IN_MEMORY)):
            runs = [measure(python_argv(code.format(**fmt))) for _ in range(repeats)]
            rows.append([
                f"{'×'.join(map(str, shape))} ({np.prod(shape) / 2**20:.0f} MiB)", name,
                f"{median([r.seconds for r in runs]):.1f}", f"{median([r.peak_rss_mib for r in runs]):.0f}",
            ])
            print(f"  memory {shape} {name}: {rows[-1][2]} s, {rows[-1][3]} MiB", flush=True)
    table = markdown_table(["volume (uint8)", "contender", "median s", "peak RSS MiB"], rows)
    return (
        f"### Peak memory versus volume size\n\nCheap model (Conv3d 1→1 + sigmoid), window {'×'.join(map(str, window))}, "
        f"overlap 0.5, Gaussian; block-wise with blocks {'×'.join(map(str, block))}, one worker process (peak RSS summed "
        f"over client, scheduler and worker processes). Median of {repeats}.\n\n{table}\n"
    )


# -- 3. MONAI ------------------------------------------------------------------------------
def monai(cfg: dict, repeats: int) -> str:
    try:
        import monai as _monai  # noqa: F401
    except ImportError:
        return "### MONAI sliding_window_inference\n\nNot run: `pip install -e .[bench]` installs MONAI.\n"
    shape, window, chunks = cfg["monai_shape"], cfg["monai_window"], cfg["chunks"]
    spec = random_volume(shape, chunks)
    ckpt = checkpoint("small", window)
    ours_out, monai_out = str(WORK / "monai_ours.zarr" / "pred"), str(WORK / "monai_monai.zarr" / "pred")
    contenders = {
        "cleftchunk predict (1 worker)": cli_predict(spec, ours_out, ckpt, chunks, ["--workers", "1"]),
        "MONAI sliding_window_inference": python_argv(
            MONAI.format(threads=CORES, spec=spec, ckpt=ckpt, window=window, overlap=0.5, out=monai_out, chunks=chunks)
        ),
    }
    rows, times = [], {}
    for name, argv in contenders.items():
        runs = [measure(argv) for _ in range(repeats)]
        times[name] = median([r.seconds for r in runs])
        rows.append([name, f"{times[name]:.1f}", f"{median([r.peak_rss_mib for r in runs]):.0f}"])
        print(f"  monai {name}: {rows[-1][1]} s, {rows[-1][2]} MiB", flush=True)
    base = times["MONAI sliding_window_inference"]
    for row in rows:
        row.append(f"{base / float(row[1]):.2f}×")
    from cleftchunk.io.volumes import open_volume

    a, b = open_volume(ours_out)[:].astype(int), open_volume(monai_out)[:].astype(int)
    diff = np.abs(a - b)
    table = markdown_table(["contender", "median s", "peak RSS MiB", "speed vs MONAI"], rows)
    return (
        f"### Side by side with MONAI sliding_window_inference\n\nunetv0 small preset, window {'×'.join(map(str, window))}, "
        f"overlap 0.5, Gaussian σ = W/8, batch 1, {CORES} torch threads, volume {'×'.join(map(str, shape))} uint8 read "
        f"from and written to Zarr by both. Median of {repeats}.\n\n{table}\n\n"
        f"Outputs: {np.mean(diff == 0) * 100:.3f} % of voxels identical, max |difference| {diff.max()} (uint8 levels) — "
        f"same grid and weights; MONAI sums in float32, cleftchunk in fixed point.\n"
    )


CONFIGS = {
    "full": dict(
        eff_shape=(32, 1024, 1024), eff_window=(8, 256, 256), eff_overlap=0.0, eff_preset="default", chunks=(16, 256, 256),
        eff_sample=8,
        mem_shapes=[(32, 512, 512), (64, 1024, 1024)], mem_window=(8, 256, 256), mem_block=(16, 256, 256),
        monai_shape=(16, 512, 512), monai_window=(8, 256, 256),
        null_shapes=[(32, 1024, 1024), (64, 1024, 1024)], null_window=(8, 256, 256),
        model_rows=[("small", (16, 512, 512), 3), ("default", (8, 512, 512), 1)],
        # 134 and 268 M voxels: MONAI's whole-volume float buffers grow with the volume, ours should
        # not; overlap 0.25 (525 tiles, not 1,519, at 128) keeps one run of each near 6 and 12 minutes
        memory_rows=[("small", (128, 1024, 1024), 0.25), ("small", (256, 1024, 1024), 0.25)],
        # scratch through files (worker processes): a volume with blocks inside it, both block shapes
        scratch_shape=(128, 2048, 2048), scratch_blocks=[(32, 512, 512), (64, 1024, 1024)], scratch_interior=(1024, 8192, 8192),
    ),
    "mid": dict(
        eff_shape=(16, 512, 512), eff_window=(8, 256, 256), eff_overlap=0.0, eff_preset="default", chunks=(16, 256, 256),
        eff_sample=8,
        mem_shapes=[(16, 256, 256), (32, 512, 512)], mem_window=(8, 128, 128), mem_block=(8, 128, 128),
        monai_shape=(16, 256, 256), monai_window=(8, 128, 128),
        null_shapes=[(32, 1024, 1024)], null_window=(8, 256, 256), model_rows=[("small", (16, 512, 512), 3)],
    ),
    "loaded": dict(  # the hot-path goals' grid on a shared, loaded machine: no default-model row
        chunks=(16, 256, 256), null_shapes=[(32, 1024, 1024)], null_window=(8, 256, 256), model_rows=[("small", (16, 512, 512), 1)],
    ),
    "quick": dict(
        eff_shape=(16, 256, 256), eff_window=(8, 128, 128), eff_overlap=0.5, eff_preset="small", chunks=(8, 128, 128),
        mem_shapes=[(16, 256, 256), (32, 512, 512)], mem_window=(8, 128, 128), mem_block=(8, 128, 128),
        monai_shape=(16, 256, 256), monai_window=(8, 128, 128),
        null_shapes=[(16, 512, 512)], null_window=(8, 128, 128), model_rows=[("small", (16, 256, 256), 3)],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes and the small preset")
    parser.add_argument("--loaded", action="store_true", help="hotpath only: the goals' grid, small-preset row once")
    parser.add_argument("--mid", action="store_true", help="efficiency with the default model on 16×512×512 (8 tiles): for a loaded machine")
    parser.add_argument("--only", default="efficiency,memory,monai", help="comma-separated sections to run")
    parser.add_argument("--repeats", type=int, help="runs per contender (default: 1 full efficiency, 3 otherwise)")
    parser.add_argument("--eff-overlap", type=float, help="overlap of the efficiency run (full default 0: 64 tiles)")
    parser.add_argument("--hotpath-models", action="store_true", help="hotpath: also the real-model rows (tens of minutes)")
    parser.add_argument("--hotpath-memory", action="store_true", help="hotpath: also a real model's peak memory on 128 and 256×1024×1024 (~40 min)")
    parser.add_argument("--hotpath-scratch", action="store_true", help="hotpath: also scratch bytes through files on 128×2048×2048 (~5 min)")
    parser.add_argument("--eff-sample", type=int, help="time the bare forward on this many tiles and scale (full default 8)")
    args = parser.parse_args()
    cfg = dict(CONFIGS["quick" if args.quick else "mid" if args.mid else "loaded" if args.loaded else "full"])
    if args.eff_overlap is not None:
        cfg["eff_overlap"] = args.eff_overlap
    if args.eff_sample is not None:
        cfg["eff_sample"] = args.eff_sample
    WORK.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "mid" if args.mid else "full"
    runners = {
        "efficiency": lambda: efficiency(cfg, args.repeats or (3 if args.quick else 1)),
        "memory": lambda: memory(cfg, args.repeats or 3),
        "monai": lambda: monai(cfg, args.repeats or 3),
    }
    sections = [n for n in args.only.split(",") if n]
    if "hotpath" in sections:  # its own fragment (results/predict-hotpath.md)
        sections.remove("hotpath")
        helpers = dict(random_volume=random_volume, checkpoint=checkpoint, cli_predict=cli_predict, bare_forward=BARE_FORWARD,
                       result_line=result_line)
        def save(body: str) -> None:
            notes = kept_notes(RESULTS_DIR / "predict-hotpath.md")
            print(f"wrote {write_fragment('predict-hotpath', 'Prediction: the hot path', body + notes)}", flush=True)

        save(hotpath(cfg, args.repeats or 3, helpers, WORK, CORES, save, models=args.hotpath_models,
                      memory=args.hotpath_memory, scratch=args.hotpath_scratch))
        if not sections:
            return
    for name in sections:  # --only "" just reassembles the fragment
        # Each section is kept, so that sections run separately still make one fragment.
        (WORK / f"section_{mode}_{name}.md").write_text(runners[name]())
    parts = []
    for n in runners:  # each section from a full run where there is one, else from a quick run, said so
        full, mid, quick = (WORK / f"section_{m}_{n}.md" for m in ("full", "mid", "quick"))
        if mode != "quick" and full.exists():
            parts.append(full.read_text())
        elif mode != "quick" and mid.exists():
            parts.append(mid.read_text().replace("\n\n", " (mid configuration: --mid).\n\n", 1))
        elif quick.exists():
            parts.append(quick.read_text().replace("\n\n", " (quick configuration: --quick).\n\n", 1))
    load = f"Load average at the end of the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())} (the 2-core machine is shared).\n\n"
    body = load + "\n".join(parts)
    path = write_fragment("predict", "Prediction: efficiency, memory, MONAI", body)
    print(f"wrote {path}")
    shutil.rmtree(WORK / "mem_out.zarr", ignore_errors=True)


if __name__ == "__main__":
    main()
