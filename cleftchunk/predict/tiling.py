"""The sliding-window tile grid and the importance (blending) maps: small pure helpers.

Everything here is a function of the volume geometry and the prediction parameters alone, never
of how the work is later cut into blocks; the block-wise engine in :mod:`cleftchunk.predict` and
its in-memory reference both build on it.

- The *frame* is the volume ROI grown by the padding (reflect padding by half a window with
  ``pad``, and whatever an axis shorter than the window needs to reach one window).
- Tiles form a global grid over the frame, per axis: stride T = int(W·(1 − overlap)) (at least 1),
  n = 1 + ceil((S − W) / T) tiles, start_i = min(i·T, S − W) (:func:`geometry.tile_starts`).
- Blending is Σ w·p / Σ w. The sums are kept in fixed point (:func:`to_fixed`): each
  contribution is rounded once to an integer, and integer addition is associative, so the sum does
  not depend on the order contributions arrive in — that is what makes block-wise results exact.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Coord, Roi, as_coord, tile_starts

#: Fixed-point scale of the blending sums: contributions w·p ∈ [0, 1] become integers < 2**40.
FIXED_BITS = 40
#: Largest sum the fixed-point accumulators may reach (int64 with headroom).
FIXED_LIMIT = 2**62
BLEND_MODES = ("gaussian", "constant")


def stride_for(window: Sequence[int], overlap: float) -> Coord:
    """Per-axis stride T = int(W·(1 − overlap)), at least 1 (MONAI's rule)."""
    if not 0.0 <= overlap < 1.0:
        raise CleftchunkError(f"overlap {overlap} must be in [0, 1): e.g. --overlap 0.5")
    return tuple(max(1, int(w * (1.0 - overlap))) for w in window)


def frame_padding(shape: Sequence[int], window: Sequence[int], pad: bool) -> tuple[Coord, Coord]:
    """Voxels added (before, after) each axis: half a window with ``pad``, and on any axis still
    shorter than the window, enough after it to make one window."""
    before = tuple(w // 2 if pad else 0 for w in window)
    after = list(before)
    for a, (s, w) in enumerate(zip(shape, window)):
        after[a] += max(0, w - (s + before[a] + after[a]))
    return before, tuple(after)


@dataclass(frozen=True)
class TileGrid:
    """The global grid of windows over ``frame`` (world voxels), in C order of tile indices."""

    frame: Roi
    window: Coord
    stride: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", as_coord(self.window, self.frame.ndim))
        object.__setattr__(self, "stride", as_coord(self.stride, self.frame.ndim))

    @classmethod
    def over(cls, volume_roi: Roi, window: Sequence[int], overlap: float, pad: bool) -> "TileGrid":
        window = as_coord(window, volume_roi.ndim)
        before, after = frame_padding(volume_roi.shape, window, pad)
        return cls(volume_roi.grow(before, after), window, stride_for(window, overlap))

    @functools.cached_property
    def starts(self) -> tuple[list[int], ...]:
        """Start positions per axis, in world voxels."""
        return tuple(
            [o + s for s in tile_starts(size, w, t)]
            for o, size, w, t in zip(self.frame.offset, self.frame.shape, self.window, self.stride)
        )

    @property
    def grid_shape(self) -> Coord:
        return tuple(len(s) for s in self.starts)

    @property
    def count(self) -> int:
        return math.prod(self.grid_shape)

    def tile(self, index: Sequence[int]) -> Roi:
        return Roi(tuple(s[i] for s, i in zip(self.starts, index)), self.window)

    def tiles(self) -> Iterator[tuple[Coord, Roi]]:
        """All tiles in global (C) order."""
        for index in itertools.product(*(range(n) for n in self.grid_shape)):
            yield index, self.tile(index)

    def tiles_overlapping(self, roi: Roi) -> Iterator[tuple[Coord, Roi]]:
        """The tiles that share at least one voxel with ``roi``, in global order."""
        # starts are sorted: the tiles overlapping [b, e) are those starting in (b - w, e)
        ranges = [
            range(bisect.bisect_right(starts, b - w), bisect.bisect_left(starts, e))
            for starts, w, b, e in zip(self.starts, self.window, roi.begin, roi.end)
        ]
        for index in itertools.product(*ranges):
            yield index, self.tile(index)

    def max_cover(self) -> int:
        """An upper bound on the number of tiles covering one voxel."""
        return math.prod(-(-w // t) + 1 for w, t in zip(self.window, self.stride))


# -- importance maps ----------------------------------------------------------------------
def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian weights: ∏ exp(−x²/(2σ²)), x ∈ {−(W−1)/2 … (W−1)/2}, σ = W·sigma_scale,
    clamped from below at max(min w, 1e-3) (so that no voxel of a tile is ignored)."""
    w = np.ones((), dtype=np.float64)
    for n in window:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-12)
        w = np.multiply.outer(w, np.exp(-(x**2) / (2 * sigma**2)))
    w = np.maximum(w, max(float(w.min()), 1e-3))
    return w.astype(np.float32)


def constant_importance(window: Sequence[int]) -> np.ndarray:
    return np.ones(tuple(window), dtype=np.float32)


def importance_map(window: Sequence[int], mode: str = "gaussian") -> np.ndarray:
    if mode == "gaussian":
        return gaussian_importance(window)
    if mode == "constant":
        return constant_importance(window)
    raise CleftchunkError(f"unknown blend mode {mode!r}: use {' or '.join(BLEND_MODES)}")


# -- fixed-point blending sums ------------------------------------------------------------
def to_fixed(values: np.ndarray) -> np.ndarray:
    """float32/64 values in [0, 1] → int64 with FIXED_BITS fractional bits (one rounding each).

    A product of two float32 numbers is exact in float64 and scaling by a power of two is exact,
    so ``to_fixed(w.astype(float64) * p)`` depends only on w and p.
    """
    return np.rint(np.asarray(values, dtype=np.float64) * float(2**FIXED_BITS)).astype(np.int64)


def check_fixed_headroom(grid: TileGrid) -> None:
    if grid.max_cover() * 2**FIXED_BITS >= FIXED_LIMIT:
        raise CleftchunkError(
            f"overlap too high: up to {grid.max_cover()} tiles cover a voxel; use a smaller --overlap"
        )


def blended_uint8(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """round(255 · Σw·p / Σw) as uint8 (0 where nothing covers a voxel)."""
    den = np.where(denominator > 0, denominator, 1).astype(np.float64)
    p = numerator.astype(np.float64) / den
    return np.clip(np.floor(p * 255.0 + 0.5), 0, 255).astype(np.uint8)


# -- reflect padding by index mapping -----------------------------------------------------
def reflect_index(positions: np.ndarray, size: int) -> np.ndarray:
    """Index into an axis of ``size`` voxels that numpy's ``np.pad(mode="reflect")`` uses for
    ``positions`` (any integers, e.g. negative or past the end): reflection without repeating the
    edge voxel, periodic with period 2(size − 1)."""
    positions = np.asarray(positions)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    m = np.mod(positions, period)
    return np.where(m < size, m, period - m)


def reflect_read(read, volume_roi: Roi, roi: Roi) -> np.ndarray:
    """Read ``roi`` (world voxels, possibly beyond ``volume_roi``) with reflect padding.

    ``read(roi)`` reads a ROI inside the volume. Only the bounding box of the voxels actually
    needed is read, so memory is bounded by ``roi`` grown by its reach outside the volume.
    """
    if volume_roi.contains(roi):
        return read(roi)
    index = [
        reflect_index(np.arange(b - o, e - o), s)
        for b, e, o, s in zip(roi.begin, roi.end, volume_roi.offset, volume_roi.shape)
    ]
    lo = tuple(int(i.min()) for i in index)
    hi = tuple(int(i.max()) + 1 for i in index)
    box = Roi.from_bounds(lo, hi).shift(volume_roi.offset)
    data = read(box)
    return data[np.ix_(*[i - l for i, l in zip(index, lo)])]
