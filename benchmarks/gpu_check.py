"""A short, prepared check of prediction on a GPU machine (a few minutes on one H100/H200).

    python benchmarks/gpu_check.py                      # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --quick # exercises the script anywhere (tiny sizes)

1. Bare forward throughput of the default unetv0 (random weights) at the training window
   8×256×256: bf16 autocast and fp32, batch sizes 1, 2, 4, 8. Tile voxels/s, and what that means
   for a volume at overlap 0.5: volume voxels/s (tile voxels / tiles covering a voxel) and TB of
   uint8 input per GPU-hour. Peak GPU memory per setting (an OOM is reported, not fatal).
2. Efficiency on a synthetic volume: bare forward over every grid tile (same batch, precision) ÷
   end-to-end ``cleftchunk predict --gpus 1`` wall time.
2b. Model-bound or engine-bound: the same end-to-end run with a null model (sigmoid of the input,
   no convolution) measures the engine alone (reads, transfers, fixed-point sums on the device,
   blending, writes); against the bare forward (the model alone) it says which of the two bounds a
   GPU job, and how far each is from the other.
3. Correctness on the device: the GPU prediction of a small volume in fp32 against the CPU
   reference (max uint8 difference), and byte-identity of two GPU runs with different block shapes.
4. Training (benchmarks/_gpu_train.py, about 3 minutes): the step with data on the device, the
   device augmentation alone, the same step fed by the loader (crops/s, fraction waiting for
   data), DDP over the GPUs found. ``--sections training`` runs only this one.

Writes ``benchmarks/results/predict-gpu.md`` (and ``train-gpu.md``) when run on CUDA (not for --device cpu). Without a
GPU it says so at once and exits 0 (nothing to measure). The full run takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, markdown_table, write_fragment  # noqa: E402

WORK = DATA_DIR / "gpu_check"


class Null(__import__("torch").nn.Module):
    """A model that costs nothing: what is left of a prediction's time is the engine's."""

    def forward(self, x):
        return x.sigmoid()


def null_end_to_end(spec: str, out: str, window, chunks, batch: int, precision: str, device) -> float:
    """End-to-end seconds of the Python API (the CLI's path: one worker process per GPU)."""
    from cleftchunk.predict import OutputOptions, WindowOptions, predict
    from cleftchunk.run.options import RunOptions

    placement = {"gpus": 1} if device.type == "cuda" else {"workers": 1, "gpus": 0}
    start = time.perf_counter()
    predict(Null(), spec, out, WindowOptions(window, batch_size=batch, precision=precision),
            RunOptions(overwrite=True, progress=False, **placement), OutputOptions(chunks=chunks), log=lambda m: None)
    return time.perf_counter() - start


def verdict(model_s: float, engine_s: float, e2e_s: float) -> str:
    bound = "model-bound" if model_s >= engine_s else "engine-bound"
    return (
        f"model alone {model_s:.1f} s, engine alone (null model) {engine_s:.1f} s, both {e2e_s:.1f} s: **{bound}** "
        f"(the engine alone takes {engine_s / model_s:.2f}× the model's time)"
    )


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model, device, window, precision: str, batch: int, batches: int) -> dict:
    import torch

    from cleftchunk.predict import PredictParams, TileRunner

    params = PredictParams(window, batch_size=batch, precision=precision, device=device.type)
    runner = TileRunner(model, params, device)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, window, dtype=np.uint8) for _ in range(batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(2):  # warm-up: kernel selection, allocator
            for _ in runner.run_tensors(tiles):
                pass
        synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            for _ in runner.run_tensors(tiles):
                pass
        synchronize(device)
        seconds = time.perf_counter() - start
    except Exception as e:  # OOM (GpuOutOfMemory) or anything device-specific: report, go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    tiles_per_s = batches * batch / seconds
    return {"tiles_per_s": tiles_per_s, "tile_voxels_per_s": tiles_per_s * int(np.prod(window)), "peak_gib": peak}


def coverage(shape, window, overlap=0.5) -> float:
    """Tiles covering a voxel on average: grid tiles × tile voxels ÷ volume voxels."""
    from cleftchunk.geometry import Roi
    from cleftchunk.predict.tiling import TileGrid

    grid = TileGrid.over(Roi((0, 0, 0), shape), window, overlap, pad=False)
    return grid.count * float(np.prod(window)) / float(np.prod(shape))


def make_volume(shape, chunks) -> str:
    from cleftchunk.io.volumes import create_volume

    spec = str(WORK / f"raw_{'x'.join(map(str, shape))}.zarr" / "raw")
    if Path(spec).exists():
        return spec
    volume = create_volume(spec, shape, np.uint8, chunks=chunks, overwrite=True)
    rng = np.random.default_rng(1)
    for z in range(0, shape[0], chunks[0]):
        n = min(chunks[0], shape[0] - z)
        volume.array[z : z + n] = rng.integers(0, 256, (n,) + tuple(shape[1:]), dtype=np.uint8)
    return spec


def bare_over_grid(model, device, spec, window, precision, batch) -> tuple[float, int]:
    from cleftchunk.predict import PredictParams, TileRunner
    from cleftchunk.predict.tiling import TileGrid
    from cleftchunk.io.volumes import open_volume

    raw = open_volume(spec)[:]
    from cleftchunk.geometry import Roi

    grid = TileGrid.over(Roi((0, 0, 0), raw.shape), window, 0.5, pad=False)
    runner = TileRunner(model, PredictParams(window, batch_size=batch, precision=precision, device=device.type), device)
    tiles = (raw[t.to_slices()] for _, t in grid.tiles())
    for _ in runner.run_tensors([raw[tuple(slice(0, w) for w in window)]] * batch):  # warm-up
        pass
    synchronize(device)
    start = time.perf_counter()
    for _ in runner.run_tensors(tiles):
        pass
    synchronize(device)
    return time.perf_counter() - start, grid.count


def cli(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cleftchunk_cli.main", "predict", *args, "--no-progress", "--overwrite"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cleftchunk predict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (to exercise the script)")
    parser.add_argument("--sections", default="predict,training", help="comma-separated: predict, training [both]")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"predict", "training"}:
        parser.error(f"--sections {args.sections!r}: use predict, training or both")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device, so there is nothing to measure here "
              "(python benchmarks/gpu_check.py --device cpu --quick exercises the script on a CPU)")
        return
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    WORK.mkdir(parents=True, exist_ok=True)
    if "predict" in sections:
        predict_sections(args, device)
    if "training" in sections:
        from _gpu_train import training_section

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        body = f"Device: {name}, torch {torch.__version__}.\n\n" + training_section(device, args.quick, WORK / "train")
        print(body, flush=True)
        if device.type == "cuda":
            print(f"wrote {write_fragment('train-gpu', 'Training on a GPU', body)}")


def predict_sections(args, device) -> None:
    import torch

    from cleftchunk.model import arch_spec, build_model, load_model, save_checkpoint
    from cleftchunk.predict import predict_reference
    from cleftchunk.io.volumes import open_volume

    preset = "small" if args.quick else "default"
    window = (8, 64, 64) if args.quick else (8, 256, 256)
    shape = (16, 128, 128) if args.quick else (64, 2048, 2048)
    chunks = (8, 64, 64) if args.quick else (16, 256, 256)
    batches = 2 if args.quick else 20
    torch.manual_seed(0)
    net = build_model("unetv0", preset=preset)
    ckpt = WORK / f"unetv0_{preset}.pth"
    save_checkpoint(ckpt, net, arch_spec(net), window)
    model = load_model(ckpt, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}", flush=True)

    # 1. throughput sweep
    cover = coverage(shape, window)
    rows, best = [], None
    for precision in ("bf16", "fp32"):
        for batch in (1, 2, 4, 8):
            r = throughput(model, device, window, precision, batch, batches)
            if "error" in r:
                rows.append([precision, batch, r["error"], "", "", ""])
            else:
                volume_vps = r["tile_voxels_per_s"] / cover
                rows.append([precision, batch, f"{r['tiles_per_s']:.1f}", f"{r['tile_voxels_per_s'] / 1e6:.1f}",
                             f"{volume_vps * 3600 / 1e12:.3f}", f"{r['peak_gib']:.1f}"])
                if best is None or r["tiles_per_s"] > best[2]:
                    best = (precision, batch, r["tiles_per_s"])
            print("  ", rows[-1], flush=True)
    sweep = markdown_table(
        ["precision", "batch", "tiles/s", "tile Mvoxels/s", f"TB/GPU-hour at overlap 0.5 (÷{cover:.2f})", "peak GiB"], rows
    )

    # 2. efficiency at the best setting
    precision, batch, _ = best
    spec = make_volume(shape, chunks)
    bare, tiles = bare_over_grid(model, device, spec, window, precision, batch)
    out = str(WORK / "out.zarr" / "pred")
    gpu_args = ["--gpus", "1"] if device.type == "cuda" else ["--workers", "1"]
    e2e = cli(spec, out, "--checkpoint", str(ckpt), "-b", str(batch), "--precision", precision, "--chunks",
              ",".join(map(str, chunks)), *gpu_args)
    attrs = json.loads(json.dumps(dict(__import__("zarr").open_array(out + "/s0").attrs)["cleftchunk_predict"]))
    efficiency = markdown_table(
        ["volume", "precision / batch", "tiles", "bare forward s", "cleftchunk predict s", "efficiency", "volume TB/GPU-hour end to end"],
        [["×".join(map(str, shape)), f"{precision} / {batch}", tiles, f"{bare:.1f}", f"{e2e:.1f}", f"**{bare / e2e:.3f}**",
          f"{np.prod(shape) / e2e * 3600 / 1e12:.3f}"]],
    )
    print(efficiency, flush=True)
    assert attrs["tiles"]["run"] == tiles, attrs["tiles"]
    engine_s = null_end_to_end(spec, str(WORK / "null.zarr" / "pred"), window, chunks, batch, precision, device)
    bound = verdict(bare, engine_s, e2e)
    print(bound, flush=True)

    # 3. correctness on the device: fp32 vs the CPU reference; block shape does not matter
    small = (16, 256, 256) if not args.quick else (8, 128, 128)
    small_spec = make_volume(small, chunks)
    raw = open_volume(small_spec)[:]
    reference = predict_reference(load_model(ckpt), raw, window, batch_size=2)  # the batch the runs below use
    outs = []
    for block in ((8, 128, 128), (16, 256, 256)) if not args.quick else ((8, 64, 64), (8, 128, 128)):
        o = str(WORK / f"small_{block[1]}.zarr" / "pred")
        cli(small_spec, o, "--checkpoint", str(ckpt), "--precision", "fp32", "-b", "2", "--chunks", ",".join(map(str, chunks)),
            "--block-shape", ",".join(map(str, block)), *gpu_args)
        outs.append(open_volume(o)[:])
    diff = np.abs(outs[0].astype(int) - reference)
    identical = bool((outs[0] == outs[1]).all())
    checks = (
        f"fp32 on {name} vs the CPU reference ({'×'.join(map(str, small))}): max |difference| {diff.max()} uint8 levels, "
        f"{np.mean(diff == 0) * 100:.3f} % identical; two block shapes on the device byte-identical: {identical}"
    )
    print(checks, flush=True)
    body = (
        f"Device: {name}, torch {torch.__version__}. unetv0 {preset} preset (random weights), window "
        f"{'×'.join(map(str, window))}.\n\n### Bare forward throughput\n\n{sweep}\n\n### Efficiency (bare ÷ end to end)\n\n"
        f"{efficiency}\n\n### Model-bound or engine-bound\n\n{bound}\n\n### Correctness\n\n{checks}\n"
    )
    if device.type == "cuda":
        print(f"wrote {write_fragment('predict-gpu', 'Prediction on a GPU', body)}")
    else:
        print(body)


if __name__ == "__main__":
    main()
