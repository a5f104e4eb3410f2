"""Benchmark: block-wise `evaluate` and `segment` against the whole-volume scipy implementations.

At two volume sizes (8x apart; 4x with --quick), each contender runs in a fresh subprocess
(time and peak RSS of the process tree), repeated; medians are reported with ratios to the
whole-volume reference. The data are sparse synthetic clefts (vertical sheets a few voxels thick,
as in EM at 40 x 4 x 4 nm), and a prediction made from them by shifting, growing, dropping some
and adding false ones, stored as uint8 probabilities; the ground truth is uint64 CREMI ids.

    python benchmarks/evaluate.py [--quick] [--repeats N]
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

VOXEL_SIZE = (40.0, 4.0, 4.0)
SIZES = {"full": [(32, 256, 512), (64, 512, 1024)], "quick": [(16, 128, 128), (32, 256, 256)]}
BLOCK_SHAPE = "32,256,256"


def sheet_clefts(shape, seed: int, density: float = 1.0) -> list[tuple]:
    """Random vertical sheets: (centre z, y, x, normal angle, radius px, half-height sections)."""
    rng = np.random.default_rng(seed)
    n = max(1, int(density * np.prod(shape) / 150_000))
    return [
        (rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(0, shape[2]),
         rng.uniform(0, np.pi), rng.uniform(10, 30), rng.integers(1, 4))
        for _ in range(n)
    ]


def draw(shape, clefts, thickness: float, shift=(0, 0)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for cz, cy, cx, angle, radius, half in clefts:
        cy, cx = cy + shift[0], cx + shift[1]
        r = int(radius) + 2
        z0, z1 = max(0, cz - half), min(shape[0], cz + half + 1)
        y0, y1 = max(0, cy - r), min(shape[1], cy + r + 1)
        x0, x1 = max(0, cx - r), min(shape[2], cx + r + 1)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - cy, xx - cx
        across = np.abs(dy * np.cos(angle) - dx * np.sin(angle))
        sheet = (across <= thickness) & (dy * dy + dx * dx <= radius * radius)
        mask[z0:z1, y0:y1, x0:x1] |= sheet
    return mask


def make_data(shape, path: Path) -> dict:
    from cleftchunk.labels import CREMI_BACKGROUND
    from cleftchunk.io.volumes import create_volume

    rng = np.random.default_rng(1)
    truth = sheet_clefts(shape, seed=0)
    gt_mask = draw(shape, truth, thickness=1.5)
    kept = [c for c in truth if rng.random() > 0.1]  # 10 % missed
    false = sheet_clefts(shape, seed=2, density=0.1)  # ~10 % false clefts
    pred_mask = draw(shape, kept, thickness=2.5, shift=(1, -1)) | draw(shape, false, thickness=2.0)
    noise = rng.integers(0, 100, size=shape, dtype=np.uint8)
    pred = np.where(pred_mask, 200, noise).astype(np.uint8)
    gt = np.full(shape, CREMI_BACKGROUND, dtype=np.uint64)
    gt[gt_mask] = 1
    if path.exists():
        shutil.rmtree(path)
    for name, data, fill in (("pred", pred, 0), ("gt", gt, int(CREMI_BACKGROUND))):
        v = create_volume(f"{path}/{name}", shape, data.dtype, chunks=(16, 256, 256), voxel_size=VOXEL_SIZE, fill_value=fill)
        v.array[...] = data
    return {"pred_fraction": float(pred_mask.mean()), "gt_fraction": float(gt_mask.mean())}


def reference_evaluate_code(path: Path) -> str:
    return (
        "import json, numpy as np\n"
        "from cleftchunk import open_volume\n"
        "from cleftchunk.post.metrics import cremi_metrics_reference\n"
        "from cleftchunk.io.volumes import CREMI_BACKGROUND, CREMI_INVALID\n"
        f"pred = open_volume('{path}/pred')[...]; gt = open_volume('{path}/gt')[...]\n"
        "r = cremi_metrics_reference(pred >= 128, gt != CREMI_BACKGROUND, (40, 4, 4), invalid_mask=gt == CREMI_INVALID)\n"
        "print(json.dumps({'score': r['cremi_score'], 'fp': r['fp'], 'fn': r['fn']}))\n"
    )


def reference_segment_code(path: Path) -> str:
    return (
        "import numpy as np\n"
        "from cleftchunk import open_volume\n"
        "from cleftchunk.post.segment import connected_components_reference\n"
        "from cleftchunk.io.volumes import create_volume, CREMI_BACKGROUND\n"
        f"src = open_volume('{path}/pred'); pred = src[...]\n"
        "ids = connected_components_reference(pred >= 128, 26)\n"
        f"v = create_volume('{path}/ref_clefts', ids.shape, np.uint64, chunks=(16, 256, 256), "
        "fill_value=int(CREMI_BACKGROUND), overwrite=True)\n"
        "v.array[...] = ids\n"
        "print(int((ids != CREMI_BACKGROUND).sum()))\n"
    )


def blockwise_evaluate_argv(path: Path, out_json: Path) -> list[str]:
    code = (
        "from cleftchunk_cli.main import main\n"
        f"main(['evaluate', '{path}/pred', '{path}/gt', '--block-shape', '{BLOCK_SHAPE}', "
        f"'--json', '{out_json}', '--overwrite'])\n"
    )
    return python_argv(code)


def blockwise_segment_argv(path: Path) -> list[str]:
    code = (
        "from cleftchunk_cli.main import main\n"
        f"main(['segment', '{path}/pred', '-o', '{path}/clefts', '--block-shape', '{BLOCK_SHAPE}', '--overwrite'])\n"
    )
    return python_argv(code)


def run(sizes, repeats: int) -> str:
    rows, checks, fractions = [], [], []
    for shape in sizes:
        path = DATA_DIR / f"evaluate_{'x'.join(map(str, shape))}.zarr"
        info = make_data(shape, path)
        out_json = path.parent / (path.stem + "_metrics.json")
        contenders = {
            ("evaluate", "whole-volume scipy (reference)"): python_argv(reference_evaluate_code(path)),
            ("evaluate", f"block-wise cleftchunk ({BLOCK_SHAPE})"): blockwise_evaluate_argv(path, out_json),
            ("segment", "whole-volume scipy (reference)"): python_argv(reference_segment_code(path)),
            ("segment", f"block-wise cleftchunk ({BLOCK_SHAPE})"): blockwise_segment_argv(path),
        }
        results = {key: [measure(argv) for _ in range(repeats)] for key, argv in contenders.items()}
        checks.append(_check_agreement(path, out_json, results))
        for (task, name), ms in results.items():
            ref = results[(task, "whole-volume scipy (reference)")]
            t, mem = median([m.seconds for m in ms]), median([m.peak_rss_mib for m in ms])
            t_ref, mem_ref = median([m.seconds for m in ref]), median([m.peak_rss_mib for m in ref])
            rows.append([
                task, "×".join(map(str, shape)), f"{np.prod(shape) / 1e6:.1f}", name,
                f"{t:.2f}", f"{t / t_ref:.2f}", f"{mem:.0f}", f"{mem / mem_ref:.2f}",
            ])
        fractions.append(f"{'×'.join(map(str, shape))}: {100 * info['pred_fraction']:.2f} % predicted, "
                         f"{100 * info['gt_fraction']:.2f} % true cleft voxels")
        print(rows[-4:], info, flush=True)
    header = ["task", "shape (z×y×x)", "Mvoxels", "contender", "time (s)", "time / ref", "peak RSS (MiB)", "RSS / ref"]
    body = (
        f"Median of {repeats} runs, each in a fresh process (import and Zarr I/O included). Data: synthetic "
        f"sparse cleft sheets ({'; '.join(fractions)}), prediction = shifted/grown clefts, 10 % missed, 10 % false; "
        "uint8 probabilities vs uint64 CREMI ids, voxel 40×4×4 nm, Zarr chunks 16×256×256. Block-wise: "
        f"`cleftchunk evaluate|segment --block-shape {BLOCK_SHAPE}` (default halo θ, default Dask threads). "
        "Reference: whole arrays in memory, scipy.ndimage.distance_transform_edt(sampling) / label, "
        "same definitions.\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + "\n".join(checks)
    )
    return body


def _check_agreement(path: Path, out_json: Path, results) -> str:
    """The contenders must agree: same score and counts, identical segmentations."""
    from cleftchunk import open_volume

    ref = json.loads(results[("evaluate", "whole-volume scipy (reference)")][0].stdout.strip().splitlines()[-1])
    got = json.loads(out_json.read_text())
    same_metrics = (ref["fp"], ref["fn"]) == (got["fp"], got["fn"]) and np.isclose(ref["score"], got["cremi_score"], rtol=1e-12)
    same_ids = np.array_equal(open_volume(f"{path}/clefts")[...], open_volume(f"{path}/ref_clefts")[...])
    if not (same_metrics and same_ids):
        raise SystemExit(f"contenders disagree on {path}: metrics {ref} vs {got}, ids equal: {same_ids}")
    return (
        f"Check {path.name}: block-wise and reference agree (CREMI score {got['cremi_score']:.3f} nm, "
        f"FP {got['fp']}, FN {got['fn']}, {got['inputs']['far_voxels']} voxels resolved by the far search; "
        "segmentations identical)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller volumes, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    sizes = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 3)
    body = run(sizes, repeats)
    if not args.quick:
        path = write_fragment("evaluate", "Post-processing: block-wise CREMI evaluation and segmentation", body)
        print(f"wrote {path}")
    else:
        print(body)


if __name__ == "__main__":
    main()
