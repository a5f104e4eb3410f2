"""The in-memory reference of prediction: the same answer as the block-wise engine, written
plainly over one array (the tests' oracle, and what validation during training runs)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.predict.tiling import (
    blended_uint8,
    frame_padding,
    importance_map,
    to_fixed,
)
from cleftchunk.predict.params import PredictParams
from cleftchunk.predict.runner import TileRunner, is_empty_tile



# -- the in-memory reference --------------------------------------------------------------
def predict_reference(
    model: Any,
    raw: np.ndarray,
    window: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    pad: bool = False,
    batch_size: int = 1,
    tta: int = 1,
    precision: str = "fp32",
    mask: np.ndarray | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """The semantics of :func:`predict`, written plainly over one in-memory array (tests' oracle)."""
    params = PredictParams(tuple(window), overlap, blend, pad, batch_size, tta, precision, _device_kind(device))
    volume = Roi.from_shape(raw.shape)
    before, after = frame_padding(raw.shape, params.window, pad)
    widths = list(zip(before, after))
    padded = np.pad(raw, widths, mode="reflect")
    padded_mask = None if mask is None else np.pad(mask, widths, mode="reflect")
    grid = params.grid(volume)
    weights = importance_map(params.window, blend).astype(np.float64)
    numerator = np.zeros(padded.shape, dtype=np.int64)
    denominator = np.zeros(padded.shape, dtype=np.int64)
    to_run = []
    for _, tile in grid.tiles():
        where = tile.to_slices(grid.frame.offset)
        denominator[where] += to_fixed(weights)
        tile_mask = None if padded_mask is None else padded_mask[where]
        if not is_empty_tile(padded[where], tile_mask):
            to_run.append(where)
    runner = TileRunner(model, params, device)
    for where, p in zip(to_run, runner.run(padded[w] for w in to_run)):
        numerator[where] += to_fixed(weights * p)
    inside = volume.to_slices(grid.frame.offset)
    out = blended_uint8(numerator[inside], denominator[inside])
    if mask is not None:
        out[mask == 0] = 0
    return out


def _device_kind(device: Any) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"
