"""The demo's trivial baseline: a global intensity threshold of the raw data (clefts are dark),
its threshold chosen on the validation sample like the model's operating point, which the trained
model's scores are set beside."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BASELINE_THRESHOLDS = (20, 35, 50, 65, 80, 95)


def best_baseline_threshold(sample: Path) -> int:
    """The dark-voxel threshold t (cleft := raw <= t) with the best CREMI score on ``sample``.

    The demo chooses it where it chooses the model's operating point, on the validation sample,
    never on the test sample. A sample of a few clefts chooses a weak baseline (16 sections with 3
    clefts chose raw ≤ 20, against 95 on 64 sections), so it is a whole sample, not a few sections.
    """
    from cleftchunk.post.metrics import cremi_metrics_reference, distances_to_gt
    from cleftchunk.labels import CREMI_BACKGROUND
    from cleftchunk.io.volumes import open_volume

    raw_volume = open_volume(sample / "raw")
    raw = raw_volume[:]
    gt = open_volume(sample / "clefts")[:] != CREMI_BACKGROUND
    gt_distances = distances_to_gt(gt, raw_volume.voxel_size)  # the same for every threshold
    scores = {}
    for t in BASELINE_THRESHOLDS:
        result = cremi_metrics_reference(raw <= t, gt, raw_volume.voxel_size, gt_distances=gt_distances)
        score = result.get("cremi_score")
        scores[t] = float("inf") if score is None or not np.isfinite(score) else float(score)
    return min(scores, key=lambda t: (scores[t], t))


def write_threshold_baseline(raw_spec: Path, out: Path, threshold: int) -> None:
    """Write ``raw <= threshold`` as a 0/1 uint8 volume, chunk by chunk."""
    from cleftchunk.geometry import ChunkGrid
    from cleftchunk.io.volumes import create_like, open_volume

    raw = open_volume(raw_spec)
    target = create_like(out, raw, np.uint8, overwrite=True)
    for _, roi in ChunkGrid(raw.roi, raw.chunks).chunks():
        target.write(roi, (raw.read(roi) <= threshold).astype(np.uint8))
