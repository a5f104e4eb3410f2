"""Predict's hot path, side by side with MONAI in one run (the ``hotpath`` section of predict.py).

Rows, each contender in a fresh subprocess, medians of ``repeats``, wall and CPU seconds (user +
system of the whole process tree), peak RSS, scratch bytes written per output voxel:

- null model (sigmoid of the input, no convolution): MONAI ``sliding_window_inference`` on the
  whole volume in memory; ``cleftchunk.predict.predict`` on the CLI's default path (a local CPU
  job: one task thread per core in the calling process) and with one worker process
  (``workers=1``). Same grid (window, overlap 0.5) and Gaussian σ = W/8. Scratch bytes are the
  run's own count of spill bytes written to disk (each is read back once: traffic is twice that),
  and of the spills an in-process run handed over in memory instead (uncompressed float64).
- real models (unetv0 presets, random weights; ``--hotpath-models``): MONAI; ``cleftchunk
  predict`` (the CLI, default path); ``--workers 1``; and the bare forward over every tile of the
  grid (the model's own cost: efficiency = model time ÷ total).
- the GPU projection (PROJECTED, not measured): the engine's measured CPU cost per output voxel and
  the model's FLOPs per voxel (counted from its layers) → TB of uint8 input per GPU-hour.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from _common import markdown_table, measure, median, python_argv

NULL_MODEL = """
import torch
class Null(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(x)
"""

NULL_OURS = NULL_MODEL + """
import json
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
if __name__ == "__main__":
    torch.set_num_threads({threads})
    r = predict(Null(), {spec!r}, {out!r}, WindowOptions({window!r}), RunOptions(workers={workers}, overwrite=True),
                OutputOptions(chunks={chunks!r}), log=lambda m: None)
    print("RESULT", json.dumps({{"spill_bytes": r.spill_bytes, "spill_memory_bytes": r.spill_memory_bytes}}))
"""

MONAI_ANY = """
import numpy as np, torch
torch.set_num_threads({threads})
from monai.inferers import sliding_window_inference
from cleftchunk.io.volumes import create_volume, open_volume
{model_code}
raw = open_volume({spec!r})[:]
x = torch.from_numpy(raw[None, None]).float().div_(255.0)
with torch.inference_mode():
    p = sliding_window_inference(x, roi_size={window!r}, sw_batch_size=1, predictor=model, overlap={overlap!r},
                                 mode="gaussian", sigma_scale=0.125, padding_mode="reflect")
out = np.clip(np.floor(p[0, 0].numpy().astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)
create_volume({out!r}, out.shape, out.dtype, chunks={chunks!r}, overwrite=True).write_nm((0, 0, 0), out)
"""

DEFAULT_PATH = "cleftchunk predict, CLI default path (task threads in this process)"
CLI_DEFAULT = "cleftchunk predict (CLI default: task threads in this process)"
CLI_ONE_WORKER = "cleftchunk predict --workers 1 (one worker process)"

#: Fraction of the bf16 peak a 3-D U-Net forward is assumed to reach (cuDNN conv3d, large batch).
PEAK_FRACTION = 0.4
H100_BF16_PEAK = 790e12  # FLOP/s, dense bf16, H100/H200 SXM
HOST_CORES_PER_GPU = 8  # host cores assumed given to the engine of one GPU


class ScratchWatch:
    """Polls the prediction's scratch directories beside ``out``'s container while a run goes:
    bytes of every partial ever seen (each file at its largest size), i.e. scratch bytes written."""

    def __init__(self, out: str, poll_s: float = 0.05):
        container = Path(out).parent
        self.pattern = f".{container.name}.*predict-*"
        self.parent = container.parent
        self.sizes: dict[str, int] = {}
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            for path in self.parent.glob(self.pattern + "/spill/*/*"):
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                self.sizes[str(path)] = max(size, self.sizes.get(str(path), 0))
            time.sleep(self.poll_s)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_contenders(contenders: dict[str, tuple[list[str], str | None]], repeats: int, voxels: int) -> list[dict]:
    """Each contender ``repeats`` times, interleaved (so that load changes hit all alike)."""
    runs: dict[str, list] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (argv, out) in contenders.items():
            before = _children_cpu()
            if out is None:
                m, scratch = measure(argv), 0
            else:
                with ScratchWatch(out) as watch:
                    m = measure(argv)
                scratch = watch.bytes
            in_memory = 0
            if "RESULT" in m.stdout and "spill_bytes" in m.stdout:  # the run's own count beats polling
                counts = json.loads(m.stdout.split("RESULT", 1)[1].strip().splitlines()[0])
                scratch, in_memory = counts["spill_bytes"], counts["spill_memory_bytes"]
            runs[name].append((m.seconds, _children_cpu() - before, m.peak_rss_mib, scratch, m.stdout, in_memory))
            print(f"  {name}: {m.seconds:.1f} s, {runs[name][-1][1]:.1f} CPU s, {m.peak_rss_mib:.0f} MiB", flush=True)
    rows = []
    for name, r in runs.items():
        rows.append(dict(
            name=name, seconds=median([x[0] for x in r]), cpu=median([x[1] for x in r]), rss=median([x[2] for x in r]),
            scratch=median([x[3] for x in r]) / voxels, in_memory=median([x[5] for x in r]) / voxels, stdout=r[-1][4], all_seconds=[x[0] for x in r], all_cpu=[x[1] for x in r],
        ))
    return rows


def table(rows: list[dict], voxels: int, base: str) -> str:
    ref = next(r for r in rows if r["name"] == base)
    body = []
    for r in rows:
        body.append([
            r["name"], f"{r['seconds']:.1f}", f"{r['cpu']:.1f}", f"{voxels / r['seconds'] / 1e6:.2f}",
            f"{voxels / r['cpu'] / 1e6:.2f}", f"{r['rss']:.0f}", f"{r['rss'] / ref['rss'] * 100:.0f} %",
            f"{ref['seconds'] / r['seconds']:.2f}×", f"{ref['cpu'] / r['cpu']:.2f}×", f"{r['scratch']:.2f}", f"{r['in_memory']:.2f}",
        ])
    return markdown_table(
        ["contender", "median s", "median CPU s", "M vox/s (wall)", "M vox/CPU-s", "peak RSS MiB", "RSS vs MONAI",
         "speed vs MONAI (wall)", "vs MONAI (CPU s)", "scratch written B/vox", "spills in memory B/vox"], body,
    )


def null_rows(shape, window, chunks, repeats, random_volume, work: Path, threads: int) -> tuple[str, dict]:
    spec = random_volume(shape, chunks)
    voxels = int(np.prod(shape))
    fmt = dict(spec=spec, window=window, chunks=chunks, threads=threads, overlap=0.5)
    ours1, ours0, theirs = (str(work / f"null_{n}.zarr" / "pred") for n in ("w1", "w0", "monai"))
    contenders = {
        "MONAI sliding_window_inference (in memory)": (
            python_argv(MONAI_ANY.format(model_code=NULL_MODEL + "model = Null()", out=theirs, **fmt)), None),
        DEFAULT_PATH: (python_argv(NULL_OURS.format(out=ours0, workers=None, **fmt)), ours0),
        "cleftchunk predict, 1 worker process (workers=1)": (python_argv(NULL_OURS.format(out=ours1, workers=1, **fmt)), ours1),
    }
    rows = run_contenders(contenders, repeats, voxels)
    text = (
        f"#### Null model, {'×'.join(map(str, shape))} uint8 ({voxels / 1e6:.0f} M voxels), window {'×'.join(map(str, window))}, "
        f"overlap 0.5, Gaussian\n\n{table(rows, voxels, 'MONAI sliding_window_inference (in memory)')}\n"
    )
    return text, {r["name"]: r for r in rows}


def model_rows(shape, window, chunks, preset, repeats, h: dict, work: Path, threads: int) -> tuple[str, dict]:
    spec = h["random_volume"](shape, chunks)
    ckpt = h["checkpoint"](preset, window)
    voxels = int(np.prod(shape))
    ours1, ours0, theirs = (str(work / f"{preset}_{n}.zarr" / "pred") for n in ("w1", "w0", "monai"))
    model_code = f"from cleftchunk.model import load_model\nmodel = load_model({ckpt!r})"
    contenders = {
        "MONAI sliding_window_inference (in memory)": (
            python_argv(MONAI_ANY.format(model_code=model_code, spec=spec, window=window, chunks=chunks, threads=threads, out=theirs,
                                         overlap=0.5)), None),
        CLI_DEFAULT: (h["cli_predict"](spec, ours0, ckpt, chunks), ours0),
        CLI_ONE_WORKER: (h["cli_predict"](spec, ours1, ckpt, chunks, ["--workers", "1"]), ours1),
        "bare forward over the grid's tiles (model only)": (python_argv(h["bare_forward"].format(
            threads=threads, spec=spec, window=window, overlap=0.5, ckpt=ckpt, sample=10**9)), None),
    }
    rows = run_contenders(contenders, repeats, voxels)
    by = {r["name"]: r for r in rows}
    bare = [h["result_line"](r["stdout"]) for r in rows if r["name"].startswith("bare")][0]
    model_cpu = bare["cpu"]
    lines = []
    for name in (CLI_DEFAULT, CLI_ONE_WORKER):
        lines.append(f"- efficiency of {name}: model CPU s ÷ total CPU s = {model_cpu:.1f} / {by[name]['cpu']:.1f} = "
                     f"**{model_cpu / by[name]['cpu']:.2f}**; model wall s ÷ total wall s = {bare['seconds']:.1f} / "
                     f"{by[name]['seconds']:.1f} = **{bare['seconds'] / by[name]['seconds']:.2f}**")
    text = (
        f"#### unetv0 `{preset}` preset, {'×'.join(map(str, shape))} uint8, window {'×'.join(map(str, window))}, overlap 0.5 "
        f"({bare['tiles']} tiles)\n\n{table(rows, voxels, 'MONAI sliding_window_inference (in memory)')}\n\n"
        f"The bare-forward row is the model alone (inputs in memory, timer around the loop; its wall and CPU columns are "
        f"the whole interpreter, its model time is {bare['seconds']:.1f} s, {bare['cpu']:.1f} CPU s).\n\n" + "\n".join(lines) + "\n"
    )
    return text, by


def memory_rows(shape, window, overlap, chunks, preset, h: dict, work: Path, threads: int) -> str:
    """A real model on a volume large enough for MONAI's whole-volume buffers to show: MONAI and the
    CLI's default path once each (peak RSS is what this row is for; its wall times are one run)."""
    spec = h["random_volume"](shape, chunks)
    ckpt = h["checkpoint"](preset, window)
    voxels = int(np.prod(shape))
    ours, theirs = (str(work / f"mem_{preset}_{n}.zarr" / "pred") for n in ("w0", "monai"))
    model_code = f"from cleftchunk.model import load_model\nmodel = load_model({ckpt!r})"
    contenders = {
        "MONAI sliding_window_inference (in memory)": (python_argv(MONAI_ANY.format(
            model_code=model_code, spec=spec, window=window, chunks=chunks, threads=threads, out=theirs, overlap=overlap)), None),
        CLI_DEFAULT: (h["cli_predict"](spec, ours, ckpt, chunks, ["--overlap", str(overlap)]), ours),
    }
    rows = run_contenders(contenders, 1, voxels)
    return (
        f"#### Peak memory with a real model: unetv0 `{preset}` preset, {'×'.join(map(str, shape))} uint8 "
        f"({voxels / 2**20:.0f} MiB), window {'×'.join(map(str, window))}, overlap {overlap} (one run each)\n\n"
        f"{table(rows, voxels, 'MONAI sliding_window_inference (in memory)')}\n"
    )


def flops_per_voxel(preset: str, window) -> float:
    """FLOPs of one forward per input voxel, counted from the convolutions' shapes (2 per MAC)."""
    import torch

    from cleftchunk.model import build_model

    net = build_model("unetv0", preset=preset).eval()
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = int(np.prod(module.kernel_size))
        total += 2 * module.in_channels * module.out_channels // module.groups * k * int(np.prod(output.shape[2:]))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.inference_mode():
        net(torch.zeros((1, 1) + tuple(window)))
    for handle in handles:
        handle.remove()
    return total / int(np.prod(window))


def projection(null: dict, window) -> str:
    """PROJECTED GPU throughput: min(model bound, engine bound) at overlap 0.5."""
    engine = null[DEFAULT_PATH]
    voxels_per_cpu_s = engine["voxels"] / engine["cpu"]
    engine_bound = voxels_per_cpu_s * HOST_CORES_PER_GPU
    cover = 2**3  # tile voxels per output voxel at overlap 0.5 (stride W/2 on each axis), large volumes
    rows = []
    for preset in ("default", "small"):
        f = flops_per_voxel(preset, window)
        model_bound = H100_BF16_PEAK * PEAK_FRACTION / (f * cover)
        bound = min(model_bound, engine_bound)
        rows.append([
            f"unetv0 {preset}", f"{f / 1e3:.1f} k", f"{model_bound / 1e6:.0f}", f"{engine_bound / 1e6:.0f}",
            f"{bound * 3600 / 1e12:.2f}", "model" if model_bound < engine_bound else "engine",
        ])
    return (
        "#### GPU projection (PROJECTED from CPU measurements, not measured on a GPU)\n\n"
        f"Model bound = {H100_BF16_PEAK / 1e12:.0f} TFLOP/s (H100/H200 dense bf16 peak) × {PEAK_FRACTION:.0%} assumed "
        f"utilisation ÷ (FLOPs per tile voxel × {cover} tile voxels per output voxel at overlap 0.5). Engine bound = the "
        f"null-model CLI-path throughput measured above, {voxels_per_cpu_s / 1e6:.1f} M output voxels per CPU-second of "
        f"the whole process (start-up included; it also includes the null model and the host-side fixed-point sums "
        f"that a GPU run does on the device), "
        f"× {HOST_CORES_PER_GPU} host cores per GPU. TB/h = uint8 input bytes per GPU-hour. `benchmarks/gpu_check.py` "
        f"measures both on a real GPU.\n\n"
        + markdown_table(["model", "FLOP per tile voxel", "model bound M vox/s", "engine bound M vox/s",
                          "PROJECTED TB per GPU-hour", "bound by"], rows)
        + "\n"
    )


#: Below this line, the fragment's text is written by hand (profile, decisions) and kept by reruns.
NOTES_MARK = "<!-- hand-written notes: kept when the benchmark rewrites the measured part above -->"


def kept_notes(path: Path) -> str:
    """The hand-written part of an existing fragment (from :data:`NOTES_MARK` on), or ''."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    return "\n\n" + text[text.index(NOTES_MARK):] if NOTES_MARK in text else ""


def hotpath(cfg: dict, repeats: int, helpers: dict, work: Path, threads: int, save=lambda body: None, models: bool = False,
            memory: bool = False, scratch: bool = False) -> str:
    """The section's text; ``save(text so far)`` is called after each part (a long run killed
    half-way keeps what it measured). ``models``: also the real-model rows (tens of minutes);
    ``memory``: also the real model's peak memory on two large volumes (about 40 minutes);
    ``scratch``: also the scratch bytes of worker processes on a volume with interior blocks."""
    load_before = open("/proc/loadavg").read().split()[:3]
    parts = []

    def text() -> str:
        load_now = open("/proc/loadavg").read().split()[:3]
        return (
            f"### Hot path: null model and real models beside MONAI, and the GPU projection\n\n"
            f"Load average before {' '.join(load_before)}, at the end {' '.join(load_now)} (the {os.cpu_count()}-core "
            f"machine is shared with other jobs: wall times are inflated and noisy; CPU seconds and ratios measured in one "
            f"run are the figures to compare). Contenders interleaved, medians of {repeats} (real-model rows: as stated). "
            f"{threads} torch threads in MONAI and in worker processes; the default path's task threads, one per core "
            f"(one per block when there are fewer blocks), run torch on cores ÷ task threads each.\n\n" + "\n".join(parts)
        )

    for shape in cfg["null_shapes"]:  # the projection uses the last (largest)
        null_text, null = null_rows(shape, cfg["null_window"], cfg["chunks"], repeats, helpers["random_volume"], work, threads)
        for r in null.values():
            r["voxels"] = int(np.prod(shape))
        parts.append(null_text)
        save(text())
    parts.append(projection(null, cfg["null_window"]))
    save(text())
    for preset, shape, reps in cfg["model_rows"] if models else ():
        parts.insert(-1, model_rows(shape, cfg["null_window"], cfg["chunks"], preset, min(repeats, reps), helpers, work, threads)[0])
        save(text())
    if scratch and "scratch_shape" in cfg:
        parts.insert(-1, scratch_rows(cfg, helpers["random_volume"], work, threads))
        save(text())
    for preset, shape, overlap in cfg.get("memory_rows", ()) if memory else ():
        parts.insert(-1, memory_rows(shape, cfg["null_window"], overlap, cfg["chunks"], preset, helpers, work, threads))
        save(text())
    return text()


NULL_SCRATCH = NULL_MODEL + """
import json
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
if __name__ == "__main__":
    r = predict(Null(), {spec!r}, {out!r}, WindowOptions({window!r}), RunOptions(block_shape={block!r}, workers=1, overwrite=True),
                OutputOptions(chunks={chunks!r}, cores={threads}), log=lambda m: None)
    print("RESULT", json.dumps({{"spill_bytes": r.spill_bytes}}))
"""


def scratch_rows(cfg: dict, random_volume, work: Path, threads: int) -> str:
    """Scratch bytes through files: the null model in one worker process (spills go to scratch
    files, each read back once) on a volume with interior blocks, for each block shape; bytes
    per spilled voxel measured, and what they make of the plan's spill of a large volume."""
    from cleftchunk.geometry import Roi
    from cleftchunk.predict.params import PredictParams
    from cleftchunk.predict.plan import tile_layout

    shape, window = cfg["scratch_shape"], cfg["null_window"]
    spec = random_volume(shape, cfg["chunks"])
    voxels = int(np.prod(shape))
    rows = []
    for block in cfg["scratch_blocks"]:
        out = str(work / f"scratch_{'x'.join(map(str, block))}.zarr" / "pred")
        run = measure(python_argv(NULL_SCRATCH.format(spec=spec, out=out, window=window, chunks=cfg["chunks"], block=block, threads=threads)))
        written = json.loads(run.stdout.split("RESULT", 1)[1].split("\n")[0])["spill_bytes"]

        def spilled(volume_shape):
            roi = Roi.from_shape(volume_shape)
            return tile_layout(PredictParams(window, 0.5).grid(roi), roi, block).spill_voxels() / roi.size

        here, big = spilled(shape), spilled(cfg["scratch_interior"])
        per_spilled = written / max(1.0, here * voxels)
        rows.append(["×".join(map(str, block)), f"{run.seconds:.1f}", f"{here:.3f}", f"{written / voxels:.2f}",
                     f"{2 * written / voxels:.2f}", f"{per_spilled:.2f}", f"{big:.3f}", f"{2 * big * per_spilled:.2f}"])
    header = ["block shape", "s (one run)", "spilled voxels per output voxel", "written B/vox", "traffic B/vox (written + read)",
              "B per spilled voxel", f"spilled per output voxel, {'×'.join(map(str, cfg['scratch_interior']))} (plan)",
              "PROJECTED traffic B/vox there"]
    return (
        f"#### Scratch through files: null model, one worker process, {'×'.join(map(str, shape))} uint8 ({voxels / 1e6:.0f} M voxels), "
        f"window {'×'.join(map(str, window))}, overlap 0.5\n\n"
        "Spills are the int32 sums (24 fractional bits) compressed with Blosc-zstd; each is read back once. The last column "
        "applies the bytes per spilled voxel measured here to the plan's exact spill of the larger volume (random input: "
        "the least compressible sums).\n\n" + markdown_table(header, rows) + "\n"
    )
