"""A picture of a few sections side by side with the clefts overlaid in colour."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.figures import overlay
from cleftchunk.geometry import Roi
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID

GAP_PX = 8


def cleft_colours(ids: np.ndarray) -> np.ndarray:
    """A bright, stable colour per cleft id (uint8 RGB), from the bits of the id."""
    h = (ids * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    hue = (h & np.uint64(0xFFFF)).astype(np.float64) / 65536.0
    # Saturated colours away from grey: rotate through red, magenta, yellow, cyan, green.
    r = 0.5 + 0.5 * np.cos(2 * np.pi * hue)
    g = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + 1 / 3))
    b = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + 2 / 3))
    rgb = np.stack([r, g, b], axis=-1)
    rgb = (rgb - rgb.min(axis=-1, keepdims=True)) / np.maximum(np.ptp(rgb, axis=-1, keepdims=True), 1e-6)
    return (60 + 195 * rgb).astype(np.uint8)


def tint_clefts(raw: np.ndarray, clefts: np.ndarray, alpha: float = 0.55, outline_only: bool = False) -> np.ndarray:
    """RGB uint8 of one section with cleft voxels tinted by their id's colour."""
    is_cleft = (clefts != CREMI_BACKGROUND) & (clefts != CREMI_INVALID)
    if outline_only:
        inner = is_cleft.copy()
        inner[1:-1, 1:-1] &= is_cleft[:-2, 1:-1] & is_cleft[2:, 1:-1] & is_cleft[1:-1, :-2] & is_cleft[1:-1, 2:]
        is_cleft &= ~inner
    return overlay(raw, [(is_cleft, cleft_colours(clefts[is_cleft]))], alpha)


def preview_image(raw: np.ndarray, clefts: np.ndarray, sections: Sequence[int] | None = None, with_plain: bool = True):
    """A PIL image: for each chosen section its raw (top) and raw with clefts tinted (bottom)."""
    from PIL import Image

    if raw.ndim != 3 or raw.shape != clefts.shape:
        raise ValueError(f"raw {raw.shape} and clefts {clefts.shape} must be the same 3-d shape")
    sections = list(sections) if sections is not None else pick_sections(clefts, 3)
    _, h, w = raw.shape
    rows = 2 if with_plain else 1
    canvas = np.full((rows * h + (rows - 1) * GAP_PX, len(sections) * w + (len(sections) - 1) * GAP_PX, 3), 255, np.uint8)
    for i, z in enumerate(sections):
        x0 = i * (w + GAP_PX)
        if with_plain:
            canvas[:h, x0 : x0 + w] = np.repeat(raw[z][..., None], 3, axis=-1)
        y0 = (h + GAP_PX) if with_plain else 0
        canvas[y0 : y0 + h, x0 : x0 + w] = tint_clefts(raw[z], clefts[z])
    return Image.fromarray(canvas)


def pick_sections(clefts: np.ndarray, count: int) -> list[int]:
    """The sections with the most cleft voxels, kept apart, in z order (the middle ones if none)."""
    per_section = ((clefts != CREMI_BACKGROUND) & (clefts != CREMI_INVALID)).sum(axis=(1, 2))
    nz = len(per_section)
    if per_section.max() == 0:
        return sorted({int(round(v)) for v in np.linspace(0, nz - 1, count + 2)[1:-1]})
    chosen: list[int] = []
    spacing = max(1, nz // (2 * count))
    for z in np.argsort(-per_section, kind="stable"):
        if all(abs(int(z) - c) >= spacing for c in chosen):
            chosen.append(int(z))
        if len(chosen) == count:
            break
    return sorted(chosen)


def save_preview(path: str | os.PathLike, raw: np.ndarray, clefts: np.ndarray, sections: Sequence[int] | None = None) -> None:
    if not str(path).lower().endswith(".png"):
        raise CleftchunkError(f"preview {path} must be a .png file: give a name ending in .png")
    preview_image(raw, clefts, sections).save(path)


def preview_region(shape: Sequence[int], size: int = 384, depth: int = 24) -> Roi:
    """A central region of at most depth × size × size voxels of a volume of ``shape``."""
    extent = (min(depth, shape[0]), min(size, shape[1]), min(size, shape[2]))
    begin = tuple((s - e) // 2 for s, e in zip(shape, extent))
    return Roi(begin, extent)
