"""Pictures shared by the stages that draw (the synth preview, the demo report): raw sections with
masks blended on top."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def overlay(raw: np.ndarray, layers: Iterable[tuple[np.ndarray | None, np.ndarray]], alpha: float) -> np.ndarray:
    """RGB uint8 of a 2-D raw section with each (mask, colour) blended on top, in order.

    ``colour`` is one RGB triple, or one triple per masked voxel (``mask.sum()`` rows)."""
    rgb = np.repeat(raw.astype(np.float32)[..., None], 3, axis=-1)
    for mask, colour in layers:
        if mask is not None and mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)
