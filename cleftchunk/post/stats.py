"""Statistics of distance sets for the CREMI metrics: exact from values, or from (value, count)
histograms merged across blocks, so that block-wise and whole-volume results are equal."""

from __future__ import annotations

import math

import numpy as np

STAT_KEYS = ("count", "mean", "std", "max", "median")


# -- statistics --------------------------------------------------------------------------------
def stats_from_values(d: np.ndarray) -> dict:
    """Statistics of a distance array (the reference's way)."""
    if d.size == 0:
        return _empty_stats()
    if np.isinf(d).any():
        return _infinite_stats(d.size)
    return {
        "count": int(d.size),
        "mean": float(np.mean(d)),
        "std": float(np.std(d)),
        "max": float(np.max(d)),
        "median": float(np.median(d)),
    }


def stats_from_histogram(values: np.ndarray, counts: np.ndarray) -> dict:
    """The same statistics from sorted distinct values and their counts."""
    n = int(counts.sum())
    if n == 0:
        return _empty_stats()
    if np.isinf(values).any():
        return _infinite_stats(n)
    mean = float((values * counts).sum() / n)
    std = math.sqrt(float((((values - mean) ** 2) * counts).sum() / n))
    return {"count": n, "mean": mean, "std": std, "max": float(values[-1]), "median": _median(values, counts, n)}


def _median(values: np.ndarray, counts: np.ndarray, n: int) -> float:
    ends = np.cumsum(counts)

    def at(rank: int) -> float:
        return float(values[np.searchsorted(ends, rank, side="right")])

    if n % 2:
        return at(n // 2)
    return (at(n // 2 - 1) + at(n // 2)) / 2


def _empty_stats() -> dict:
    return {"count": 0, "mean": None, "std": None, "max": None, "median": None}


def _infinite_stats(n: int) -> dict:
    """Query voxels but no target at all: every distance is infinite."""
    return {"count": int(n), "mean": math.inf, "std": None, "max": math.inf, "median": math.inf}


def assemble(pred_to_gt: dict, gt_to_pred: dict, fp: int, fn: int, inputs: dict) -> dict:
    """The metrics dict shared by the reference and the block-wise evaluation."""
    n_pred, n_gt = pred_to_gt["count"], gt_to_pred["count"]
    tp = n_pred - fp
    adgt, adf = pred_to_gt["mean"], gt_to_pred["mean"]
    defined = [a for a in (adgt, adf) if a is not None]
    if adgt is not None and adf is not None:
        score = (adgt + adf) / 2
    elif defined and math.isinf(defined[0]):
        score = math.inf
    else:
        score = None
    return {
        "pred_voxels": n_pred,
        "gt_voxels": n_gt,
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
        "adgt": adgt,
        "adf": adf,
        "cremi_score": score,
        "precision": tp / n_pred if n_pred else None,
        "recall": (n_gt - fn) / n_gt if n_gt else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None,
        "pred_to_gt": pred_to_gt,
        "gt_to_pred": gt_to_pred,
        "inputs": inputs,
    }


