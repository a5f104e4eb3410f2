"""The operating point of a trained model: the binarization threshold and the minimum cleft size,
chosen on a held-out validation region of the *training* data and stored in the checkpoint.

The network's probabilities are not calibrated for the CREMI score: a model trained with the
class-rebalanced BCE marks far more voxels than there are cleft voxels at p ≥ 0.5. Like the
demo's threshold baseline, whose intensity threshold is chosen on the training sample, the
model's threshold and minimum size are chosen on data the test never sees.

What is scored is what users run: probabilities from :func:`cleftchunk.predict.predict_reference`
(the in-memory semantics of ``predict``, byte for byte the same uint8 values), components from
:func:`cleftchunk.post.segment.connected_components_reference` (``segment``'s rule) and the CREMI
metrics of :func:`cleftchunk.post.metrics.cremi_metrics_reference`. The checkpoint's
``postprocess`` entry (``{"threshold", "min_size", ...}``) is then recorded by ``predict`` in its
output's attributes, and ``segment`` uses it when no threshold or minimum size is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError

#: uint8 thresholds (round(p*255) >= t) tried first, at min_size 0; finer near 255 because a model
#: trained with the class-rebalanced BCE over-marks (it is most often best at the top).
THRESHOLDS = tuple(range(24, 241, 24)) + (248, 252, 254)
#: Minimum cleft sizes (voxels) tried at the best threshold.
MIN_SIZES = (0, 100, 500, 2000)


def score_key(result: dict) -> tuple[float, float]:
    """Lower is better: the CREMI score, then the negative F1 (None/NaN count as worst)."""
    score, f1 = result.get("cremi_score"), result.get("f1")
    score = float(score) if score is not None and math.isfinite(score) else math.inf
    f1 = float(f1) if f1 is not None and math.isfinite(f1) else 0.0
    return score, -f1


def validation_arrays(image_spec: str, labels_spec: str, roi: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Raw (as stored), cleft mask, invalid mask and voxel size of the validation region."""
    from cleftchunk.io.volumes import open_volume
    from cleftchunk.labels import (
        CLEFT_BIT,
        INVALID_BIT,
        label_codes,
        resolve_label_kind,
    )
    from cleftchunk.train.validation import parse_roi

    image, labels = open_volume(image_spec), open_volume(labels_spec)
    slices = parse_roi(roi, image.shape)
    codes = label_codes(labels[slices], resolve_label_kind(labels, "auto", scan=False))
    return image[slices], (codes & CLEFT_BIT) > 0, (codes & INVALID_BIT) > 0, tuple(image.voxel_size)


def sweep(prob: np.ndarray, gt: np.ndarray, invalid: np.ndarray, voxel_size: Sequence[float],
          thresholds: Sequence[int] = THRESHOLDS, min_sizes: Sequence[int] = MIN_SIZES, tolerance: float = 0.0) -> dict:
    """Score thresholds (at min_size 0), choose one, then minimum sizes at it; returns the chosen
    ``threshold``/``min_size``, its metrics, and both curves.

    With ``tolerance`` 0 the threshold is the one of lowest CREMI score. With ``tolerance`` > 0 it
    is the middle (by threshold) of those whose score lies within that fraction of the lowest:
    where the curve is flat its lowest point is decided by a few voxels of a few clefts, and a
    flat curve running out to the end of the range puts it on the edge, where a model that marks a
    little more on other data loses most; the middle of the near-best band holds on other data.
    ``at_edge`` says when the chosen threshold is still the first or the last one tried.
    """
    from cleftchunk.labels import CREMI_BACKGROUND
    from cleftchunk.post.metrics import cremi_metrics_reference, distances_to_gt
    from cleftchunk.post.segment import connected_components_reference

    check_tolerance(tolerance)
    gt_distances = distances_to_gt(gt, voxel_size, invalid)  # the same for every threshold: computed once

    def score(t: int, m: int) -> dict:
        mask = prob >= t
        if m:
            mask = connected_components_reference(mask, min_size=m) != CREMI_BACKGROUND
        r = cremi_metrics_reference(mask, gt, voxel_size, invalid_mask=invalid, gt_distances=gt_distances)
        keys = ("cremi_score", "f1", "precision", "recall", "adgt", "adf")
        return {"threshold": int(t), "min_size": int(m), **{k: _plain(r.get(k)) for k in keys}}

    by_threshold = [score(t, 0) for t in thresholds]
    lowest = min(by_threshold, key=score_key)
    near = sorted(r["threshold"] for r in by_threshold if score_key(r)[0] <= score_key(lowest)[0] * (1 + tolerance))
    chosen_t = near[(len(near) - 1) // 2] if tolerance else lowest["threshold"]
    by_size = [score(chosen_t, m) for m in min_sizes]
    best = min(by_size, key=score_key)
    return {"threshold": best["threshold"], "min_size": best["min_size"], "validation": best,
            "lowest_threshold": lowest["threshold"], "near_best": near, "tolerance": tolerance,
            "at_edge": chosen_t in (min(thresholds), max(thresholds)),
            "thresholds": by_threshold, "min_sizes": by_size}


def check_tolerance(tolerance: float, name: str = "operating-point tolerance") -> None:
    """A tolerance of :func:`sweep`: a fraction of the best CREMI score in [0, 1)."""
    if not 0 <= tolerance < 1:
        raise CleftchunkError(f"{name} {tolerance} must lie in [0, 1) (a fraction of the best CREMI score)")


def choose_operating_point(
    checkpoint: str | Path,
    image: str,
    labels: str,
    roi: str | None,
    batch_size: int = 2,
    device: str = "cpu",
    thresholds: Sequence[int] = THRESHOLDS,
    min_sizes: Sequence[int] = MIN_SIZES,
    tolerance: float = 0.0,
) -> dict:
    """Predict the validation region with the shipped predictor, sweep, and store the result as the
    checkpoint's ``postprocess`` entry (rewritten atomically); returns that entry."""
    from cleftchunk.model import (
        ProbabilityModel,
        checkpoint_input_size,
        load_checkpoint,
        model_from_checkpoint,
        on_device,
        set_checkpoint_entry,
    )
    from cleftchunk.predict import predict_reference

    ckpt = load_checkpoint(checkpoint)
    raw, gt, invalid, voxel_size = validation_arrays(image, labels, roi)
    if not gt.any():
        raise CleftchunkError(f"the validation region {roi or 'whole volume'} of {labels} holds no clefts: choose a region with clefts")
    model = ProbabilityModel(on_device(model_from_checkpoint(ckpt), device)).eval()
    prob = predict_reference(model, raw, checkpoint_input_size(ckpt), batch_size=batch_size, device=device)
    entry: dict[str, Any] = sweep(prob, gt, invalid, voxel_size, thresholds, min_sizes, tolerance)
    metric = f"middle of the thresholds within {tolerance:.0%} of the lowest cremi_score" if tolerance else "cremi_score, then f1"
    entry.update(chosen_on={"image": str(image), "labels": str(labels), "roi": roi, "metric": metric})
    set_checkpoint_entry(checkpoint, "postprocess", entry)
    return entry


def _plain(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
