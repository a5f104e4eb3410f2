"""Training throughput: the crop loader (augmented 8×256×256 crops/s), device augmentation, step time.

Loader contenders, each in a fresh subprocess, repeated, medians (crops/s counted inside the
process after a warm-up, so interpreter start-up is excluded). The rows the issue names:

- ``numpy-augment``: today's loader, all augmentations with numpy on 1 DataLoader worker;
- ``device-augment-loader``: 1 worker doing what is left for it when augmentation runs on the
  model's device (draw plans, reject, read the oversized uint8 box and label codes);
- ``device-augment-torch-cpu``: the device augmentation run by torch on this CPU, 1 thread,
  batches of 4, ``ms_per_crop`` per crop (the loader's work excluded);
- ``no-augment``: 1 worker, reads + rejection only: the floor set by storage.

And, for the markdown fragment: 2 workers, in-process, no chunk cache, "sequential warps" (each warp
resampling the whole oversized box in turn, how the original pipeline's augmentors compose) and
no rejection.

Step time: one optimisation step (forward, backward, Adam) at batch 1, 8×256×256, for the small and
the default preset, with 1 and 2 torch threads.

The data is a synthetic CREMI-like volume (``cleftchunk synth``, 32×1024×1024) under benchmarks/_data.

    python benchmarks/train.py            # about 10 minutes on 2 cores
    python benchmarks/train.py --quick    # the same rows, one repeat, few crops: under 5 minutes
    python benchmarks/train.py --json     # also one JSON object per row: name, workers, crops_per_s,
                                          # crops_per_s_per_worker, ms_per_crop, tries_per_kept_crop
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, markdown_table, measure, median, python_argv, write_fragment  # noqa: E402

DATA = DATA_DIR / "train_bench.zarr"
SHAPE = (32, 1024, 1024)
INPUT = (8, 256, 256)
TARGET_CROPS_S = 250  # what a GPU needs, fed by 16 cores (issue #4)

LOADER = """
import json, time, torch
torch.set_num_threads(1)
import numpy as np
from scipy import ndimage as ndi
from cleftchunk.train.augment import AugmentConfig, Augmenter
from cleftchunk.train.data import CropSampler, CropStream, RejectionConfig, make_loader, open_training_volumes
from cleftchunk.train.device_batches import SourceSampler
from cleftchunk.geometry import Roi

class SequentialWarps(Augmenter):
    '''Each warp resamples the whole oversized box in turn, then the centre is cut out.'''

    def resample(self, source, volume_roi, crop_offset, plan, order, base=None, convert=None):
        before, after = self.source_context()
        box = Roi(crop_offset, self.out_shape).grow(before, after)
        have = box.intersect(volume_roi)
        data = np.asarray(source[have.to_slices()])
        pad = [(h - b, e - he) for b, e, h, he in zip(box.begin, box.end, have.begin, have.end)]
        data = np.pad(data, pad, mode="reflect") if any(a or c for a, c in pad) else data
        m = self.margin_yx
        out = np.empty(self.out_shape, np.float32 if order else data.dtype)
        field = None
        if plan.elastic is not None:
            noise = np.random.default_rng(0).uniform(-1, 1, (2,) + data.shape[1:]).astype(np.float32)
            field = [ndi.gaussian_filter(n, self.config.elastic_sigma) * self.config.elastic_alpha for n in noise]
        for k, zi in enumerate(plan.z_keep):
            s = data[zi].astype(np.float32) if order else data[zi]
            if plan.angle:
                s = ndi.rotate(s, np.degrees(plan.angle), reshape=False, order=order, mode="mirror")
            if plan.scale != 1.0:
                zoomed = ndi.zoom(s, plan.scale, order=order, mode="mirror")
                c = (np.array(zoomed.shape) - np.array(s.shape)) // 2
                s = zoomed[c[0]:c[0] + s.shape[0], c[1]:c[1] + s.shape[1]] if plan.scale > 1 else np.pad(
                    zoomed, [(-c[0], s.shape[0] - zoomed.shape[0] + c[0]), (-c[1], s.shape[1] - zoomed.shape[1] + c[1])], mode="reflect")
            if field is not None:
                yy, xx = np.meshgrid(np.arange(s.shape[0]), np.arange(s.shape[1]), indexing="ij")
                s = ndi.map_coordinates(s, [yy + field[0], xx + field[1]], order=order, mode="mirror")
            dy, dx = plan.shifts[k] if plan.shifts is not None else (0, 0)
            out[k] = s[m + dy:m + dy + self.out_shape[1], m + dx:m + dx + self.out_shape[2]]
        return out

args = json.loads({args!r})
augment = AugmentConfig() if args["augment"] else AugmentConfig.off()
volumes = open_training_volumes([args["data"] + "/raw"], [args["data"] + "/clefts"])
kind = SourceSampler if args["device"] else CropSampler
sampler = kind(volumes, args["input"], augment, RejectionConfig(keep_p=args["keep_p"]), cache_mb=args["cache_mb"])
if args["sequential"]:
    sampler.augmenter.__class__ = SequentialWarps
batches = iter(make_loader(CropStream(sampler, batch_size=args["batch"], seed=args["seed"]), args["workers"]))
for _ in range(args["warmup"]):
    next(batches)
n = -(-args["crops"] // args["batch"])
t0 = time.perf_counter()
tries = 0
for _ in range(n):
    tries += int(next(batches)["tries"].sum())
seconds = time.perf_counter() - t0
print(json.dumps({{"crops_s": n * args["batch"] / seconds, "tries": tries / (n * args["batch"])}}))
"""

BREAKDOWN = """
import cProfile, json, pstats, torch
torch.set_num_threads(1)
import numpy as np
from cleftchunk.train.data import CropSampler, open_training_volumes
volumes = open_training_volumes([{data!r} + "/raw"], [{data!r} + "/clefts"])
sampler = CropSampler(volumes, {input!r})
for i in range(3):
    sampler.sample(np.random.default_rng([9, i]))
profile = cProfile.Profile()
profile.enable()
tries = sum(sampler.sample(np.random.default_rng([1, i]))["tries"] for i in range({n}))
profile.disable()
stats = pstats.Stats(profile).stats
def cum(name, file_part):
    return sum(v[3] for (f, _, fn), v in stats.items() if fn == name and file_part in f)
total = cum("sample", "data.py")
out = {{
    "total": total, "tries": tries,
    "read + decode (cache misses)": cum("_load", "data.py"),
    "warp (map_coordinates)": cum("map_coordinates", "_interpolation.py"),
    "label smoothing": cum("smooth_labels", "augment.py"),
    "draw plan (elastic field)": cum("draw", "augment.py"),
    "grayscale + missing parts + flips": cum("finish_image", "augment.py"),
}}
print(json.dumps({{k: v / {n} if k not in ("tries",) else v / {n} for k, v in out.items()}}))
"""

TORCH = """
import json, time, torch
torch.set_num_threads(1)
from cleftchunk.train.augment import AugmentConfig
from cleftchunk.train.augment_torch import TorchAugmenter
from cleftchunk.train.data import RejectionConfig, open_training_volumes
from cleftchunk.train.device_batches import SourceSampler
args = json.loads({args!r})
volumes = open_training_volumes([args["data"] + "/raw"], [args["data"] + "/clefts"])
sampler = SourceSampler(volumes, args["input"], AugmentConfig(), RejectionConfig(keep_p=args["keep_p"]))
augment = TorchAugmenter(sampler.augmenter, "cpu")
batches = [sampler.batch(args["seed"], b, 4) for b in range(args["batches"] + 1)]  # drawn first: not timed
augment(batches[0])  # warm-up
t0 = time.perf_counter()
for batch in batches[1:]:
    augment(batch)
seconds = time.perf_counter() - t0
crops = 4 * args["batches"]
print(json.dumps({{"crops_s": crops / seconds, "tries": sum(int(b["tries"].sum()) for b in batches[1:]) / crops}}))
"""

STEP = """
import json, statistics, time, torch
torch.set_num_threads({threads})
from cleftchunk.model import build_model
from cleftchunk.train import TrainConfig, make_optimizer, training_loss
torch.manual_seed(0)
net = build_model(preset={preset!r})
optimizer = make_optimizer(net.parameters(), TrainConfig())
x = torch.rand(1, 1, *{input!r})
y = (torch.rand_like(x) > 0.98).float()
times = []
for i in range({steps} + 1):
    t0 = time.perf_counter()
    loss = training_loss(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({{"step_s": statistics.median(times[1:])}}))
"""


def ensure_data() -> Path:
    if not (DATA / "clefts").exists():
        from cleftchunk.synth import synthesize

        from cleftchunk.run.options import RunOptions

        synthesize(str(DATA), SHAPE, seed=3, run=RunOptions(threads=2))
    return DATA


def run_json(code: str) -> dict:
    out = measure(python_argv(code), env={"OMP_NUM_THREADS": "1"}).stdout
    # the last JSON line: interpreter warnings at exit (a leaked-semaphore note) may follow it
    return json.loads([line for line in out.strip().splitlines() if line.startswith("{")][-1])


#: The rows the issue names, then the others of the fragment.
NAMED = {
    "numpy-augment": {},
    "device-augment-loader": {"device": True, "batch": 4},  # batches of 4, as the device augments them
    "device-augment-torch-cpu": {"torch": True},
    "no-augment": {"augment": False},
}
OTHERS = {
    "numpy-augment, 2 workers": {"workers": 2},
    "numpy-augment, in-process": {"workers": 0},
    "numpy-augment, no cache": {"cache_mb": 0},
    # in-process: its Augmenter subclass lives in the benchmark's -c script, which spawned loader
    # workers cannot import (compare it with "numpy-augment, in-process")
    "sequential warps (original style), in-process": {"sequential": True, "workers": 0},
    "numpy-augment, no rejection": {"keep_p": 1.0},
}


def loader_runs(quick: bool) -> list[dict]:
    """One dict per row, with the keys --json prints."""
    base = {"data": str(DATA), "input": list(INPUT), "augment": True, "keep_p": 0.1, "cache_mb": 512, "device": False,
            "torch": False, "sequential": False, "workers": 1, "warmup": 3, "crops": 10 if quick else 30, "seed": 0, "batch": 1,
            "batches": 2 if quick else 6}
    repeats = 1 if quick else 3
    rows = []
    for name, change in {**NAMED, **OTHERS}.items():
        settings = {**base, **change}
        script = TORCH if settings["torch"] else LOADER
        results = [run_json(script.format(args=json.dumps({**settings, "seed": r}))) for r in range(repeats)]
        rate = median([r["crops_s"] for r in results])
        workers = settings["workers"]
        rows.append({"name": name, "workers": workers, "crops_per_s": rate, "crops_per_s_per_worker": rate / max(workers, 1),
                     "ms_per_crop": 1000 / rate, "tries_per_kept_crop": median([r["tries"] for r in results])})
        print(f"{name}: {rate:.2f} crops/s ({rows[-1]['tries_per_kept_crop']:.1f} tries per crop)", file=sys.stderr, flush=True)
    return rows


def step_runs(quick: bool) -> list:
    rows = []
    settings = [("small", 1)] if quick else [("small", 1), ("small", 2), ("default", 1), ("default", 2)]
    for preset, threads in settings:
        steps = 1 if quick else (2 if preset == "default" else 3)
        result = run_json(STEP.format(threads=threads, preset=preset, input=INPUT, steps=steps))
        rows.append([preset, threads, f"{result['step_s']:.2f}", f"{1 / result['step_s']:.2f}"])
        print(f"step {preset} threads={threads}: {result['step_s']:.2f} s", file=sys.stderr, flush=True)
    return rows


RAW = DATA_DIR / "train_results.json"


def measure_all(quick: bool) -> dict:
    ensure_data()
    rows = loader_runs(quick)
    breakdown = run_json(BREAKDOWN.format(data=str(DATA), input=INPUT, n=4 if quick else 10))
    steps = step_runs(quick)
    results = {"quick": quick, "loader": rows, "breakdown": breakdown, "steps": steps,
               "load": os.getloadavg()[0], "cores": os.cpu_count()}
    RAW.write_text(json.dumps(results))
    return results


def render(results: dict) -> str:
    quick, loader, breakdown, steps = (results[k] for k in ("quick", "loader", "breakdown", "steps"))
    rates = {r["name"]: r["crops_per_s"] for r in loader}
    one = rates["numpy-augment"]
    two = rates["numpy-augment, 2 workers"]
    seq = rates["sequential warps (original style), in-process"]
    nocache = rates["numpy-augment, no cache"]
    floor = rates["no-augment"]
    free = rates["numpy-augment, no rejection"]
    device_loader = rates["device-augment-loader"]
    torch_ms = 1000 / rates["device-augment-torch-cpu"]
    rows = [[r["name"], r["workers"], f"{r['crops_per_s']:.2f}", f"{r['crops_per_s_per_worker']:.2f}", f"{r['ms_per_crop']:.1f}",
             f"{r['tries_per_kept_crop']:.1f}", f"{TARGET_CROPS_S / r['crops_per_s']:.0f}×"] for r in loader]
    parts = "\n".join(f"| {k} | {1000 * v:.0f} |" for k, v in breakdown.items() if k not in ("total", "tries"))
    return f"""
Load average when the run ended: {results['load']:.1f} on {results['cores']} cores (the machine is
shared with other jobs; timings are noisy, the step times especially so).

Input {INPUT[0]}×{INPUT[1]}×{INPUT[2]} crops (oversized box 10×512×512) from a synthetic
{SHAPE[0]}×{SHAPE[1]}×{SHAPE[2]} Zarr volume (chunks 16×256×256, Blosc-zstd), batch 1, medians of
{1 if quick else 3} run(s) of {10 if quick else 30} crops after a warm-up; each run a fresh process.
"needed" = how many such loaders it would take to reach {TARGET_CROPS_S} crops/s.
device-augment-loader: batches of 4 (what the device then augments at once); the other loaders
batch 1. device-augment-torch-cpu: batches of 4 already read, torch with 1 thread on this CPU.
{"(--quick run: one repeat, few crops — indicative only.)" if quick else ""}

{markdown_table(["loader", "workers", "crops/s", "crops/s per worker", "ms per crop", "tries per kept crop", "needed for 250/s"], rows)}

Augmentation on the model's device: a CPU worker then makes {device_loader:.1f} crops/s (goal ≥ 60;
numpy-augment {one:.1f}), and torch on this CPU augments a crop in {torch_ms:.1f} ms (goal ≤ 40;
the numpy path's whole crop {1000 / one:.0f} ms).

Where the time of one kept crop goes (in-process, profiled, ms; rejected tries included):

| part | ms per kept crop |
|---|---|
| total | {1000 * breakdown['total']:.0f} |
{parts}

Training step (forward + backward + Adam), batch 1, {INPUT[0]}×{INPUT[1]}×{INPUT[2]}, float32 on this CPU:

{markdown_table(["preset", "torch threads", "s per step", "steps/s"], steps)}

Reading the numbers:
- Baseline: one combined resampling per slice (rotation + rescale + elastic + misalignment) gives
  {rates['numpy-augment, in-process'] / seq:.1f}× the throughput of resampling the whole oversized box once per
  warp (sequential, original style; both in-process). The decoded-chunk cache gives {one / nocache:.2f}× over decoding
  every read again in these short runs (it grows as the cache fills); without augmentation a
  worker reaches {floor:.1f} crops/s, so reading is not the bottleneck — the warps are.
- Without rejection sampling ({free:.1f} crops/s) most crops hold no cleft, and label boxes
  without a cleft skip warping and smoothing altogether; with rejection, kept crops hold clefts, so
  their labels are warped and smoothed, and rejected tries add their label reads.
- 2 workers give {two / one:.2f}× one worker here: 2 cores shared with other jobs (load above)
  cap the scaling, not the loader (samples are independent; workers share nothing). At
  {one:.1f} crops/s per worker process, 16 cores would give about {16 * one:.0f} crops/s,
  {TARGET_CROPS_S / (16 * one):.1f}× short of the ~{TARGET_CROPS_S} crops/s a GPU consumes.
- Closing the gap: with augmentation on the model's device (`--augment-on device`, the default
  on a GPU) a worker only draws plans, rejects and reads the oversized uint8 box and its label
  codes: {device_loader:.1f} crops/s per worker here, about {16 * device_loader:.0f} crops/s on 16
  cores; the warps, smoothing and the rest run batch-wise with torch ({torch_ms:.1f} ms a crop on one
  CPU thread, far less on a GPU) while the model steps on the previous batch.
- On this CPU one training step takes seconds (the small preset) to tens of seconds (the default),
  so a single loader worker keeps up; the loader only matters once the model runs on a GPU. Two
  torch threads were slower than one here because the other jobs kept both cores busy.
""" + quality_section()


QUALITY = DATA_DIR / "quality"
QUALITY_COMMANDS = """\
cleftchunk synth train.zarr --shape 40,512,512 --seed 1
cleftchunk synth heldout.zarr --shape 24,512,512 --seed 2
cleftchunk train -dn train.zarr/raw -ln train.zarr/clefts -o out-small -mi 8,128,128 -b 2 -c 1 --preset small \\
    --iteration-total 1500 --iteration-save 250 --validate-image heldout.zarr/raw \\
    --validate-labels heldout.zarr/clefts --validate-roi 0:16,0:256,0:256 --validate-every 250
cleftchunk predict heldout.zarr/raw pred1500.zarr/pred --checkpoint out-small/volume_1500.pth
cleftchunk evaluate pred1500.zarr/pred heldout.zarr/clefts --json metrics1500.json"""


def quality_section() -> str:
    """The held-out CREMI metrics of the small preset trained on CPU (run by hand: see the commands)."""
    path = QUALITY / "metrics1500.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text())
    rows = [[k, f"{m[k]:.4g}" if isinstance(m[k], float) else m[k]] for k in
            ("f1", "precision", "recall", "cremi_score", "adgt", "adf", "fp", "fn", "pred_voxels", "gt_voxels")]
    return f"""
### Quality: small preset, 1,500 iterations on the CPU, held-out synthetic volume

Trained on a synthetic 40×512×512 volume (seed 1), evaluated on another (24×512×512, seed 2),
batch 2 of 8×128×128 crops, all augmentations and the original loss/optimizer (about 35 minutes
here, under load). Commands (in benchmarks/_data/quality):

```
{QUALITY_COMMANDS}
```

{markdown_table(["metric", "value"], rows)}

Far from useful: the class-rebalanced BCE makes the young model mark about
{m['pred_voxels'] / max(m['gt_voxels'], 1):.0f}× more voxels than there are cleft voxels (recall 1,
low precision); the original trains 100,000 iterations of batch 8 at 8×256×256, about 1,000× the
voxels seen here. The periodic validation on a 16×256×256 region (the run was then resumed with
--resume to 2,000 iterations) did not improve between 250 and
2,000 iterations (F1 0.02–0.09, `validation.jsonl`), so this CPU budget says nothing about the
model's reachable quality; a GPU run is needed for that.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same rows: fewer crops, one repeat, fewer step settings")
    parser.add_argument("--json", action="store_true", help="print one JSON object per loader row on stdout")
    parser.add_argument("--render", action="store_true", help=f"only rewrite the fragment from {RAW.name}")
    args = parser.parse_args()
    results = json.loads(RAW.read_text()) if args.render else measure_all(args.quick)
    if args.json:
        for row in results["loader"]:
            print(json.dumps(row), flush=True)
    path = write_fragment("train", "Training: loader throughput and step time", render(results))
    print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
