"""Scale of the block-wise engine: plans of terabyte volumes, and many small blocks per second.

1. ``--dry-run`` of predict, segment, evaluate, convert and synth on *virtual* 1 TB and
   10 TB volumes: Zarr arrays with a fill value and no stored chunk, so nothing is read. Wall time
   and peak RSS of the whole command (a fresh subprocess each).
2. ``predict`` *running* on the same virtual volumes (the CPU default path: client, scheduler and
   task threads in one process; null model; stopped after 30 s): the process's peak RSS at 1 TB
   against 10 TB (the issue's goal: ratio ≤ 1.1) and the blocks done by then.
3. A real run of many small blocks: a 32×2048×2048 uint8 volume in 8×128×128 blocks (1,024
   blocks), a null model (sigmoid of the input, no convolution) written as uint8, on one local
   cluster of 2 worker processes: time to the first finished block, blocks/s, and the peak RSS of
   the client process (which also runs the scheduler). Side by side in the same run, on the same
   cluster: the same blocks through ``dask.array.map_blocks`` (from_zarr → map_blocks → to_zarr),
   the baseline a user would write.

    python benchmarks/scale.py            # appends a section to benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_DIR, RESULTS_DIR, machine_info, measure  # noqa: E402

WORK = DATA_DIR / "scale"
SIZES = {"1 TB": (1024, 31232, 31232), "10 TB": (2206, 67296, 67296)}
SMALL_SHAPE, SMALL_BLOCK = (32, 2048, 2048), (8, 128, 128)

DRY_PREDICT = """
import sys, time, torch, resource
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
class Null(torch.nn.Module):
    def forward(self, x): return torch.sigmoid(x)
t = time.perf_counter()
predict(Null(), {spec!r}, {out!r}, WindowOptions((8, 256, 256)), RunOptions(block_shape=(32, 512, 512), dry_run=True, gpus=0),
        OutputOptions(chunks=(32, 512, 512)), log=lambda m: print(m))
print("SECONDS", time.perf_counter() - t)
"""


DRY_POST = """
import time
from cleftchunk.post.segment import segment
from cleftchunk.post.metrics import evaluate
from cleftchunk.run.options import RunOptions
from cleftchunk.io.convert import convert_path
from cleftchunk.synth.write import synthesize
from cleftchunk.run.options import RunOptions
t = time.perf_counter()
if {stage!r} == "segment":
    segment({spec!r}, {out!r}, kind="prob", chunks=(32, 512, 512), run=RunOptions(block_shape=(64, 1024, 1024), dry_run=True), log=print)
elif {stage!r} == "evaluate":
    evaluate({spec!r}, {spec!r}, pred_kind="prob", gt_kind="mask", voxel_size=(40, 4, 4), run=RunOptions(block_shape=(64, 1024, 1024), dry_run=True), log=print)
elif {stage!r} == "convert":
    convert_path({spec!r}, {out!r}, voxel_size=(40, 4, 4), levels=3, run=RunOptions(dry_run=True), log=print)
else:
    synthesize({out_dir!r}, {shape!r}, chunks=(32, 512, 512), run=RunOptions(dry_run=True), log=print)
print("SECONDS", time.perf_counter() - t)
"""


RUN_PREDICT = """
import os, threading, time, resource, torch
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions
class Null(torch.nn.Module):
    def forward(self, x): return torch.sigmoid(x)
def stop():
    time.sleep({seconds})
    print("PEAK_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
    os._exit(0)
threading.Thread(target=stop, daemon=True).start()
predict(Null(), {spec!r}, {out!r}, WindowOptions((8, 256, 256)), RunOptions(block_shape=(32, 512, 512), gpus=0, progress=False),
        OutputOptions(chunks=(32, 512, 512)), log=lambda m: None)
print("FINISHED")
"""


def running_predicts(seconds: int = 30) -> list[str]:
    """Client (and in-process scheduler) memory while predict runs on a virtual 1 TB and 10 TB
    volume: the CPU default path, null model, stopped after ``seconds``; blocks done from the record."""
    import zarr

    rows = []
    for label, shape in SIZES.items():
        spec = virtual_volume(label.replace(" ", ""), shape)
        out = WORK / f"run-{label.replace(' ', '')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        m = measure([sys.executable, "-c", RUN_PREDICT.format(seconds=seconds, spec=spec, out=str(out / "pred"))])
        peak = float(m.stdout.split("PEAK_MIB")[1].split()[0])
        record = WORK / f".{out.name}.pred.predict-done.zarr"
        done = int(np.count_nonzero(zarr.open_array(str(record), mode="r")[:])) if record.exists() else 0
        rows.append(f"| {label} {shape} | {seconds} s | {done} | {peak:.0f} MiB |")
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(record, ignore_errors=True)
    return rows


def virtual_volume(name: str, shape) -> str:
    """A Zarr array of ``shape`` uint8 with fill value 0 and no chunk stored (nothing written)."""
    import zarr

    path = WORK / f"{name}.zarr"
    if not path.exists():
        group = zarr.open_group(str(path), mode="w")
        group.create_array("raw", shape=shape, chunks=(32, 512, 512), dtype="uint8", fill_value=0)
    return f"{path}/raw"


def dry_runs() -> list[str]:
    rows = []
    for label, shape in SIZES.items():
        spec = virtual_volume(label.replace(" ", ""), shape)
        code = DRY_PREDICT.format(spec=spec, out=str(WORK / "never.zarr" / "pred"))
        m = measure([sys.executable, "-c", code])
        inner = float(m.stdout.split("SECONDS")[1].split()[0])
        blocks = next(line for line in m.stdout.splitlines() if line.startswith("plan:")).split(" blocks")[0][6:]
        assert not (WORK / "never.zarr").exists(), "a dry run created the output"
        rows.append(f"| predict --dry-run | {label} {shape} | {blocks} | {inner:.2f} s | {m.seconds:.1f} s | {m.peak_rss_mib:.0f} MiB |")
        for stage in ("segment", "evaluate", "convert", "synth"):
            code = DRY_POST.format(stage=stage, spec=spec, out=str(WORK / "never.zarr" / "ids"), out_dir=str(WORK / "never.zarr"), shape=shape)
            m = measure([sys.executable, "-c", code])
            inner = float(m.stdout.split("SECONDS")[1].split()[0])
            blocks = next(line for line in m.stdout.splitlines() if line.startswith("plan:")).split(" blocks")[0].split()[-1]
            assert not (WORK / "never.zarr").exists(), "a dry run created the output"
            rows.append(f"| {stage} --dry-run | {label} {shape} | {blocks} | {inner:.2f} s | {m.seconds:.1f} s | {m.peak_rss_mib:.0f} MiB |")
    return rows


def null_block(src: str, dst: str, block, _prepared=None) -> dict:
    """The null model on one block: uint8 round(255·sigmoid(raw/255))."""
    from cleftchunk.io.volumes import open_volume

    raw = open_volume(src).read(block.write_roi)
    out = np.floor(255.0 / (1.0 + np.exp(-raw.astype(np.float32) / 255.0)) + 0.5).astype(np.uint8)
    open_volume(dst, mode="r+").write(block.write_roi, out)
    return {"voxels": block.write_roi.size}


def null_array(raw: np.ndarray) -> np.ndarray:
    return np.floor(255.0 / (1.0 + np.exp(-raw.astype(np.float32) / 255.0)) + 0.5).astype(np.uint8)


def small_blocks() -> dict:
    """The executor and map_blocks on one cluster, one after the other, same blocks."""
    import functools

    import dask.array as da
    import psutil

    from cleftchunk.geometry import Roi
    from cleftchunk.io.volumes import create_like, open_volume
    from cleftchunk.run.cluster import ClusterSpec, dask_client
    from cleftchunk.run.executor import BlockwiseTask, run_blockwise
    from cleftchunk.run.layout import GridLayout
    from cleftchunk.run.records import BlockRecord

    src_path = WORK / "small.zarr"
    if not src_path.exists():
        import zarr

        group = zarr.open_group(str(src_path), mode="w")
        array = group.create_array("raw", shape=SMALL_SHAPE, chunks=SMALL_BLOCK, dtype="uint8", fill_value=0)
        array[:] = np.random.default_rng(0).integers(0, 256, SMALL_SHAPE, dtype=np.uint8)
    src = f"{src_path}/raw"
    source = open_volume(src)
    out = {}
    process = psutil.Process()
    with dask_client(ClusterSpec(workers=2, cores=2)) as client:
        client.run(lambda: None)  # workers up
        for attempt in ("executor", "map_blocks", "executor-batch1"):
            dst = str(WORK / f"out-{attempt}.zarr" / "pred")
            shutil.rmtree(WORK / f"out-{attempt}.zarr", ignore_errors=True)
            create_like(dst, source, np.uint8, chunks=SMALL_BLOCK)
            rss_before = process.memory_info().rss
            started = time.perf_counter()
            if attempt.startswith("executor"):
                layout = GridLayout(Roi.from_shape(SMALL_SHAPE), SMALL_BLOCK)
                record, _ = BlockRecord.open(WORK / f"record-{attempt}.zarr", len(layout), "bench", fresh=True)
                batch = layout.auto_batch() if attempt == "executor" else 1
                task = BlockwiseTask("null", layout, functools.partial(null_block, src, dst), record=record, batch=batch)
                report = run_blockwise(client, task, progress=False)
                seconds = time.perf_counter() - started
                out[attempt] = {
                    "seconds": seconds, "blocks": report.written, "first": report.first_block_seconds, "batch": batch,
                    "failed": len(report.failed),
                }
            else:
                raw = da.from_zarr(str(src_path), component="raw")
                da.map_blocks(null_array, raw, dtype=np.uint8).to_zarr(str(WORK / f"out-{attempt}.zarr"), component="pred", overwrite=True)
                seconds = time.perf_counter() - started
                out[attempt] = {"seconds": seconds, "blocks": len(GridLayout(Roi.from_shape(SMALL_SHAPE), SMALL_BLOCK)), "first": None}
            out[attempt]["client_rss_mib"] = max(process.memory_info().rss, rss_before) / 2**20
        worker_rss = client.run(lambda: __import__("psutil").Process().memory_info().rss / 2**20)
        out["worker_rss_mib"] = sorted(worker_rss.values())
    expected = open_volume(str(WORK / "out-executor.zarr" / "pred")).read(Roi.from_shape(SMALL_SHAPE))
    import zarr

    baseline = zarr.open_array(str(WORK / "out-map_blocks.zarr"), path="pred")[:]
    out["same_bytes"] = bool(np.array_equal(expected, baseline))
    return out


def noop_block(block, _prepared=None) -> dict:
    return {"voxels": block.write_roi.size}


def tiny_blocks() -> list[str]:
    """The executor's own cost per block: 2,000 no-op blocks of 1×10×10, 2 worker processes."""
    from distributed import Client, LocalCluster

    from cleftchunk.geometry import Roi
    from cleftchunk.run.executor import BlockwiseTask, run_blockwise
    from cleftchunk.run.layout import GridLayout
    from cleftchunk.run.records import BlockRecord

    layout = GridLayout(Roi.from_shape((20, 100, 100)), (1, 10, 10))
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster, Client(cluster) as client:
        for batch in (1, layout.auto_batch()):
            record, _ = BlockRecord.open(WORK / "noop-record.zarr", len(layout), "noop", fresh=True)
            started = time.perf_counter()
            report = run_blockwise(client, BlockwiseTask("noop", layout, noop_block, record=record, batch=batch), progress=False)
            seconds = time.perf_counter() - started
            rows.append(f"| no-op 1×10×10, batch {batch} | {report.written} | {seconds:.2f} | {report.written / seconds:.0f} | {report.first_block_seconds:.2f} s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="dry,run,tiny,small", help="dry, run, tiny, small (comma-separated)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    lines = [f"\n## Scale run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", f"Machine: {machine_info()}.",
             f"Load average before: {open('/proc/loadavg').read().split()[:3]} (the machine is shared with other jobs: wall times are loaded ones).", ""]
    if "dry" in parts:
        lines += ["| command | volume | blocks | plan (in process) | whole command | peak RSS |", "|---|---|---|---|---|---|"]
        lines += dry_runs()
        lines.append("")
    if "run" in parts:
        lines += ["predict running on the virtual volumes (CPU default path: client, scheduler and task threads in one process; null model; stopped after the time shown):", "",
                  "| volume | ran | blocks done | peak RSS of the process |", "|---|---|---|---|"]
        lines += running_predicts()
        lines.append("")
    if "tiny" in parts:
        lines += ["Executor overhead (record included):", "", "| blocks | done | seconds | blocks/s | first block |", "|---|---|---|---|---|"]
        lines += tiny_blocks()
        lines.append("")
    if "small" in parts:
        r = small_blocks()
        lines += [
            f"Many small blocks: {SMALL_SHAPE} uint8 in {SMALL_BLOCK} blocks, null model, 2 worker processes (one cluster):", "",
            "| contender | blocks | seconds | blocks/s | first block | client+scheduler RSS |", "|---|---|---|---|---|---|",
        ]
        for name in ("executor", "executor-batch1", "map_blocks"):
            x = r[name]
            first = f"{x['first']:.2f} s" if x.get("first") is not None else "n/a"
            label = f"{name} (batch {x['batch']})" if "batch" in x else name
            lines.append(f"| {label} | {x['blocks']} | {x['seconds']:.2f} | {x['blocks'] / x['seconds']:.0f} | {first} | {x['client_rss_mib']:.0f} MiB |")
        lines += ["", f"Worker RSS after: {', '.join(f'{w:.0f}' for w in r['worker_rss_mib'])} MiB; executor and map_blocks outputs identical: {r['same_bytes']}."]
    lines.append(f"Load average after: {open('/proc/loadavg').read().split()[:3]}.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(RESULTS_DIR / "scale.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
