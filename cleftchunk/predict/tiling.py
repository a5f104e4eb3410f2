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
- The hot path's helpers keep that arithmetic and remove its temporaries: cached weight maps
  (:func:`weights_for`, :func:`fixed_weights`) and :func:`fixed_scaled`, denominators from per-axis
  shift sums (:func:`block_denominator`), blending slab by slab in place (:func:`blended_uint8`) or on
  the device (:func:`blended_uint8_torch`), each tested against the plain formula.
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

#: Fixed-point scale of the blending sums: contributions w·p ∈ [0, 1] become integers ≤ 2**24.
#: 24 bits keep a voxel's sums in int32 up to 127 covering tiles (every overlap up to 0.75), so a
#: block's sums, its spills and its denominators take 4 bytes a voxel; the quantum 2^-24 moves
#: 255·Σw·p/Σw by at most 255 · cover · 2^-24 / Σw (below 0.001 where Σw ≥ 1/2, at overlap 0.5),
#: so it changes a byte of the output only for values within that of a rounding boundary.
FIXED_BITS = 24
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
    """Refuse a grid whose sums float64 could not hold exactly (every step of the engine relies on it)."""
    if grid.max_cover() > FLOAT_EXACT_TILES:
        raise CleftchunkError(
            f"overlap too high: up to {grid.max_cover()} tiles cover a voxel; use a smaller --overlap"
        )


#: Integers below 2**53 are exact in float64, so float64 arithmetic on fixed-point sums is integer
#: arithmetic while every sum stays below it: FLOAT_EXACT_TILES contributions q(w·p) ≤ 2**FIXED_BITS
#: at most (w ≤ 1 and probabilities p ∈ [0, 1]); :func:`check_fixed_headroom` refuses more.
FLOAT_EXACT_TILES = 2 ** (53 - FIXED_BITS) - 1
#: Covering tiles at most for every sum to fit int32 (127 at 24 fractional bits).
INT32_TILES = (2**31 - 1) // 2**FIXED_BITS


def sums_dtype(grid: TileGrid) -> np.dtype:
    """The integer type that holds every fixed-point sum of ``grid``: int32 while at most
    :data:`INT32_TILES` tiles cover a voxel (overlap ≤ 0.75), else int64."""
    return np.dtype(np.int32 if grid.max_cover() <= INT32_TILES else np.int64)


@functools.lru_cache(maxsize=8)
def weights_for(window: Coord, blend: str) -> np.ndarray:
    """The importance map in float64 (exact: it is float32 widened), cached and read-only."""
    return _read_only(importance_map(window, blend).astype(np.float64))


@functools.lru_cache(maxsize=8)
def fixed_weights(window: Coord, blend: str) -> np.ndarray:
    """q(w) = to_fixed(w) of the importance map (int64), cached and read-only."""
    return _read_only(to_fixed(weights_for(window, blend)))


def fixed_scaled(weights: np.ndarray) -> np.ndarray:
    """w·2^FIXED_BITS in float64 (exact: a power-of-two scaling), so that rint(p · scaled) is
    to_fixed(w·p) for float32 p: the product of two float32 values is exact in float64."""
    return np.ascontiguousarray(weights, dtype=np.float64) * float(2**FIXED_BITS)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# Blocks of this many voxels keep the float64 temporaries of the blending in the CPU caches.
_BLEND_SLAB = 1 << 18


def blended_uint8(numerator: np.ndarray, denominator: np.ndarray, in_place: bool = False) -> np.ndarray:
    """round(255 · Σw·p / Σw) as uint8 (0 where nothing covers a voxel).

    Exactly floor(float64(num) / float64(max(den, 1)) · 255 + 0.5), clipped to [0, 255]: computed
    slab by slab along the first axis, with no float64 copy of the whole block; ``in_place``: a
    float64 ``numerator`` (integers held exactly) is used as the scratch space itself.
    """
    numerator, denominator = np.asarray(numerator), np.asarray(denominator)
    out = np.empty(numerator.shape, dtype=np.uint8)
    in_place = in_place and numerator.dtype == np.float64 and numerator.flags.writeable
    if numerator.ndim == 0 or numerator.size == 0:
        out[...] = _blend_slab(numerator, denominator, in_place)
        return out
    step = max(1, _BLEND_SLAB // max(1, numerator[0].size))
    for z in range(0, numerator.shape[0], step):
        out[z : z + step] = _blend_slab(numerator[z : z + step], denominator[z : z + step], in_place)
    return out


def blended_uint8_of_parts(parts: Sequence[tuple[tuple[slice, ...], np.ndarray]], denominator, dtype=np.float64) -> np.ndarray:
    """:func:`blended_uint8` of the sum of ``parts`` — (where, array of integers) pairs added into
    zeros of the denominator's shape — with that sum assembled one slab (along the first axis) at
    a time in a cache-sized buffer of ``dtype``, never as a whole block; so is the denominator
    when it is a :class:`BlockDenominator`. ``dtype`` float64 only
    when the sums are below 2^53 (then its additions are the integer additions)."""
    if not isinstance(denominator, BlockDenominator):
        denominator = np.asarray(denominator)
    shape = tuple(denominator.shape)
    out = np.empty(shape, dtype=np.uint8)
    step = max(1, _BLEND_SLAB // max(1, math.prod(shape[1:])))
    buffer = np.empty((min(step, shape[0]),) + shape[1:], dtype=dtype)
    sliced = isinstance(denominator, BlockDenominator)
    den_buffer = np.empty(buffer.shape, dtype=denominator.dtype) if sliced else None
    for z0 in range(0, shape[0], step):
        z1 = min(z0 + step, shape[0])
        numerator = buffer[: z1 - z0]
        numerator.fill(0)
        for where, part in parts:
            lo, hi = max(where[0].start, z0), min(where[0].stop, z1)
            if lo < hi:
                numerator[(slice(lo - z0, hi - z0),) + tuple(where[1:])] += part[lo - where[0].start : hi - where[0].start]
        den = denominator.slab(z0, z1, den_buffer[: z1 - z0]) if sliced else denominator[z0:z1]
        out[z0:z1] = _blend_slab(numerator, den, in_place=dtype == np.float64)
    return out


def _blend_slab(numerator: np.ndarray, denominator: np.ndarray, in_place: bool = False) -> np.ndarray:
    # Σ q(w) are integers ≥ 0: max(·, 1) is where(> 0); converted to float64 as it is taken
    den = np.maximum(denominator, 1, dtype=np.float64)
    p = numerator if in_place else numerator.astype(np.float64)
    np.divide(p, den, out=p)
    p *= 255.0
    p += 0.5
    np.floor(p, out=p)
    np.clip(p, 0, 255, out=p)
    return p.astype(np.uint8)


def blended_uint8_torch(numerator, denominator):
    """:func:`blended_uint8` on torch tensors (e.g. on the GPU): the same IEEE float64 operations
    (division is correctly rounded on CPUs and CUDA alike), so the same bytes; returns uint8."""
    import torch

    p = numerator.to(torch.float64)
    p.div_(denominator.clamp(min=1).to(torch.float64)).mul_(255.0).add_(0.5).floor_().clamp_(0, 255)
    return p.to(torch.uint8)


def blended_uint8_of_parts_torch(parts, denominator, device) -> np.ndarray:
    """:func:`blended_uint8_of_parts` in torch on ``device`` (e.g. a GPU): the parts — tensors
    there already, or host arrays — added into a float64 numerator (exact: integers below 2^53),
    then :func:`blended_uint8_torch`; only the uint8 block comes back to the host."""
    import torch

    numerator = torch.zeros(tuple(denominator.shape), dtype=torch.float64, device=device)
    for where, part in parts:
        if not isinstance(part, torch.Tensor):  # (read-only pieces from files are copied: torch needs writable memory)
            part = torch.from_numpy(np.require(part, requirements="CW"))
        numerator[where].add_(part.to(device=device, dtype=torch.float64))
    den = torch.from_numpy(np.asarray(denominator)).to(device)
    return blended_uint8_torch(numerator, den).cpu().numpy()


# -- denominators: Σ q(w) over a region, from per-axis shift sums --------------------------
@dataclass(frozen=True)
class BlockDenominator:
    """Σ q(w) over a block, held as its y–x shift-sum ``planes`` (one tile's depth × the block's
    y–x extent: 8 MiB for 32×512×512 blocks and 8-deep tiles, shared by every block of the same
    y–x phase) and the z starts of the tiles relative to the block; a z-slab of the block's
    denominator is summed from them when the blend needs it (:meth:`slab`), so no block-sized
    denominator is ever held (the z pass is the last step of :func:`separable_denominator`: the
    same integers). ``np.asarray`` gives the whole block's."""

    planes: np.ndarray
    z_starts: tuple[int, ...]
    depth: int

    @property
    def shape(self) -> Coord:
        return (self.depth,) + tuple(self.planes.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.planes.dtype

    def slab(self, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
        """The denominator of z ∈ [z0, z1) (into ``out``, of that shape and ``dtype``, if given):
        the z pass of :func:`separable_denominator` over those sections only."""
        return _shift_sum(self.planes, [s - z0 for s in self.z_starts], 0, z1 - z0, self.dtype, out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.slab(0, self.depth)
        return whole if dtype is None else whole.astype(dtype)


def block_denominator(grid: TileGrid, blend: str, roi: Roi) -> BlockDenominator:
    """Σ q(w) over ``roi`` of every tile of ``grid``, in :func:`sums_dtype` (see :class:`BlockDenominator`).

    It depends only on where the tiles start relative to ``roi``; the y–x planes are cached by
    the y and x offsets, so blocks of one y–x phase (every interior block) share them.
    """
    relative = tuple(
        tuple(s - b for s in starts if s < e and s + w > b)
        for starts, w, b, e in zip(grid.starts, grid.window, roi.begin, roi.end)
    )
    planes = _yx_planes(relative[1], relative[2], roi.shape[1:], grid.window, blend, sums_dtype(grid).str)
    return BlockDenominator(planes, relative[0], roi.shape[0])


# Eight entries: 8 MiB each for 512×512 blocks and 8-deep tiles (first, interior and last blocks
# along y and x, and a few concurrent blends).
@functools.lru_cache(maxsize=8)
def _yx_planes(rel_y: tuple[int, ...], rel_x: tuple[int, ...], shape_yx: Coord, window: Coord, blend: str, dtype: str) -> np.ndarray:
    """Σ over the y and x starts of shifted q: the first two passes of :func:`separable_denominator`."""
    return _read_only(_yx_sums(fixed_weights(window, blend), rel_y, rel_x, shape_yx, np.dtype(dtype)))


def _yx_sums(q: np.ndarray, rel_y: Sequence[int], rel_x: Sequence[int], shape_yx: Sequence[int], dtype) -> np.ndarray:
    """The x then y passes of :func:`separable_denominator` (the y pass straight into ``dtype``)."""
    out = _shift_sum(np.asarray(q, dtype=np.int64), rel_x, 2, shape_yx[1])
    return _shift_sum(out, rel_y, 1, shape_yx[0], dtype)


def separable_denominator(q: np.ndarray, relative: Sequence[Sequence[int]], shape: Sequence[int], dtype=np.int64) -> np.ndarray:
    """D[v] = Σ_{i,j,k} q[v − (z_i, y_j, x_k)] over the in-range terms, for tiles at the product of
    per-axis ``relative`` starts: one axis at a time (shift-sum along x, then y, then z).

    q itself is not separable (float32 rounding, the clamp), but the sum over a product grid of
    shifts is a product of per-axis shift-sums, and integer addition is exact in any order, so
    this equals the tile-by-tile sum bit for bit, at about a quarter of its additions. The last
    (block-sized) pass sums straight into ``dtype``, which must hold the result (:func:`sums_dtype`).
    """
    planes = _yx_sums(q, relative[1], relative[2], shape[1:], dtype)
    return _shift_sum(planes, relative[0], 0, shape[0], dtype)


def _shift_sum(src: np.ndarray, starts: Sequence[int], axis: int, length: int, dtype=np.int64,
               out: np.ndarray | None = None) -> np.ndarray:
    """out[..., X, ...] = Σ_s src[..., X − s, ...] for X in [0, length), X − s in [0, W) (into
    ``out``, of that shape and ``dtype``, when given)."""
    w = src.shape[axis]
    if out is None:
        out = np.zeros(src.shape[:axis] + (length,) + src.shape[axis + 1 :], dtype=dtype)
    else:
        out.fill(0)
    head = (slice(None),) * axis
    for s in starts:
        lo, hi = max(s, 0), min(s + w, length)
        if lo < hi:
            out[head + (slice(lo, hi),)] += src[head + (slice(lo - s, hi - s),)]
    return out


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
