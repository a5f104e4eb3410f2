"""Statistics of distance sets for the CREMI metrics: exact from values, or from (value, count)
histograms merged across blocks, so that block-wise and whole-volume results are equal; and the
metrics as JSON and as a table for the terminal."""

from __future__ import annotations

import json
import math
from typing import Any

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


def merge_histograms(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    values = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct, np.bincount(inverse.ravel(), weights=counts, minlength=distinct.size).astype(np.int64)


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


# -- reporting -----------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Infinity as the string "inf" and NaN as null: strict JSON parsers accept neither."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def to_json(result: dict) -> str:
    return json.dumps(jsonable(result), indent=2, allow_nan=False)


def format_table(result: dict) -> str:
    """The metrics as an aligned text table for the terminal."""

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
        return str(v)

    theta = result["inputs"]["theta_nm"]
    rows = [
        ("CREMI score (nm)", fmt(result["cremi_score"])),
        ("ADGT (nm)", fmt(result["adgt"])),
        ("ADF (nm)", fmt(result["adf"])),
        (f"FP (> {theta:g} nm)", fmt(result["fp"])),
        (f"FN (> {theta:g} nm)", fmt(result["fn"])),
        ("precision", fmt(result["precision"])),
        ("recall", fmt(result["recall"])),
        ("F1", fmt(result["f1"])),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    header = f"{'distances (nm)':<{width}}  " + "  ".join(f"{k:>10}" for k in STAT_KEYS)
    lines.append(header)
    for direction, label in (("pred_to_gt", "prediction -> GT"), ("gt_to_pred", "GT -> prediction")):
        s = result[direction]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{fmt(s[k]):>10}" for k in STAT_KEYS))
    return "\n".join(lines)
