"""Geometry as small, pure value types: every stage speaks in these.

All coordinates are integer voxel positions in (z, y, x) order. Physical (nm) positions
only appear at the edges of the system (metadata, user options) and are converted with
:func:`voxels_from_nm` / :func:`nm_from_voxels`, which refuse positions that are not on
the voxel grid rather than rounding them silently.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from cleftchunk.errors import CleftchunkError

Coord = tuple[int, ...]


def as_coord(values: Sequence[int] | int, ndim: int | None = None) -> Coord:
    """A tuple of ints; a scalar is broadcast to ``ndim`` axes."""
    if isinstance(values, (int,)) and not isinstance(values, bool):
        if ndim is None:
            raise ValueError("a scalar coordinate needs ndim")
        return (int(values),) * ndim
    out = tuple(int(v) for v in values)
    if any(o != v for o, v in zip(out, values)):
        raise ValueError(f"coordinate {tuple(values)} is not integral")
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"coordinate {out} has {len(out)} axes, expected {ndim}")
    return out


class OffGridError(CleftchunkError, ValueError):
    """A position in nm that is not on the voxel grid (a ValueError too, for older callers)."""


#: Voxel sizes beyond 1 mm are a unit mistake (µm or m given as nm), not microscopy.
MAX_VOXEL_SIZE_NM = 1e6


def check_voxel_size(voxel_size: Sequence[float], offset_nm: Sequence[float] | None = None, where: str = "volume") -> None:
    """Voxel sizes must be finite, positive and plausible (<= 1 mm); offsets finite."""
    sizes = tuple(float(v) for v in voxel_size)
    if not all(math.isfinite(v) and 0 < v <= MAX_VOXEL_SIZE_NM for v in sizes):
        raise CleftchunkError(
            f"{where}: voxel size {sizes} nm must be positive, finite and at most {MAX_VOXEL_SIZE_NM:g} nm (1 mm): "
            "give it in nm, e.g. --voxel-size 40,4,4"
        )
    if offset_nm is not None and not all(math.isfinite(float(o)) for o in offset_nm):
        raise CleftchunkError(f"{where}: offset {tuple(offset_nm)} nm must be finite: e.g. --offset 0,0,0")


def voxels_from_nm(nm: Sequence[float], voxel_size: Sequence[float]) -> Coord:
    """Convert a physical position to voxels; it must lie on the voxel grid."""
    out = []
    for p, v in zip(nm, voxel_size, strict=True):
        q = p / v
        if not math.isclose(q, round(q), abs_tol=1e-6):
            raise OffGridError(
                f"offset {tuple(nm)} nm is not a multiple of the voxel size {tuple(voxel_size)} nm: give an offset on the voxel grid"
            )
        out.append(int(round(q)))
    return tuple(out)


def nm_from_voxels(voxels: Sequence[int], voxel_size: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(p) * float(v) for p, v in zip(voxels, voxel_size, strict=True))


@dataclass(frozen=True)
class Roi:
    """A box of voxels: ``offset`` (inclusive begin) and ``shape``; may have any number of axes.

    Empty ROIs (some extent 0) are allowed and compare equal only to ROIs with the same fields.
    """

    offset: Coord
    shape: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", as_coord(self.offset))
        object.__setattr__(self, "shape", as_coord(self.shape))
        if len(self.offset) != len(self.shape):
            raise ValueError(f"offset {self.offset} and shape {self.shape} differ in length")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative shape {self.shape}")

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> "Roi":
        begin = as_coord(begin)
        end = as_coord(end)
        return cls(begin, tuple(max(e - b, 0) for b, e in zip(begin, end, strict=True)))

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> "Roi":
        shape = as_coord(shape)
        return cls((0,) * len(shape), shape)

    # -- derived values -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def begin(self) -> Coord:
        return self.offset

    @property
    def end(self) -> Coord:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return self.size == 0

    @property
    def center(self) -> tuple[float, ...]:
        return tuple(o + s / 2 for o, s in zip(self.offset, self.shape))

    # -- arithmetic -----------------------------------------------------------------
    def shift(self, by: Sequence[int] | int) -> "Roi":
        by = as_coord(by, self.ndim)
        return Roi(tuple(o + b for o, b in zip(self.offset, by)), self.shape)

    def grow(self, before: Sequence[int] | int, after: Sequence[int] | int | None = None) -> "Roi":
        """Grow by ``before`` at the begin and ``after`` (default: ``before``) at the end.

        Negative amounts shrink; the result never has a negative extent.
        """
        before = as_coord(before, self.ndim)
        after = before if after is None else as_coord(after, self.ndim)
        begin = tuple(o - b for o, b in zip(self.offset, before))
        end = tuple(e + a for e, a in zip(self.end, after))
        return Roi.from_bounds(begin, tuple(max(b, e) for b, e in zip(begin, end)))

    def intersect(self, other: "Roi") -> "Roi":
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin, strict=True))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        return Roi.from_bounds(begin, tuple(max(b, e) for b, e in zip(begin, end)))

    def union(self, other: "Roi") -> "Roi":
        """The bounding box of both."""
        begin = tuple(min(a, b) for a, b in zip(self.begin, other.begin, strict=True))
        end = tuple(max(a, b) for a, b in zip(self.end, other.end, strict=True))
        return Roi.from_bounds(begin, end)

    def contains(self, other: "Roi | Sequence[int]") -> bool:
        if isinstance(other, Roi):
            if other.empty:
                return True
            return all(a <= b for a, b in zip(self.begin, other.begin)) and all(
                a >= b for a, b in zip(self.end, other.end)
            )
        point = as_coord(other, self.ndim)
        return all(b <= p < e for b, p, e in zip(self.begin, point, self.end))

    def snap(self, grid: Sequence[int], mode: str = "grow") -> "Roi":
        """Snap begin and end to multiples of ``grid``.

        ``grow`` rounds outwards (smallest grid-aligned ROI containing this one), ``shrink``
        inwards, ``closest`` to the nearest multiple.
        """
        grid = as_coord(grid, self.ndim)
        if mode == "grow":
            lo, hi = math.floor, math.ceil
        elif mode == "shrink":
            lo, hi = math.ceil, math.floor
        elif mode == "closest":
            lo = hi = lambda v: math.floor(v + 0.5)
        else:
            raise ValueError(f"unknown snap mode {mode!r}: use grow, shrink or closest")
        begin = tuple(lo(b / g) * g for b, g in zip(self.begin, grid))
        end = tuple(hi(e / g) * g for e, g in zip(self.end, grid))
        return Roi.from_bounds(begin, tuple(max(b, e) for b, e in zip(begin, end)))

    def relative_to(self, other: "Roi | Sequence[int]") -> "Roi":
        """This ROI in the frame whose origin is ``other``'s begin."""
        origin = other.begin if isinstance(other, Roi) else as_coord(other, self.ndim)
        return Roi(tuple(o - g for o, g in zip(self.offset, origin)), self.shape)

    def to_slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Slices into an array whose element 0 lies at ``origin`` (default: 0)."""
        origin = (0,) * self.ndim if origin is None else as_coord(origin, self.ndim)
        return tuple(slice(b - o, e - o) for b, e, o in zip(self.begin, self.end, origin))

    def to_nm(self, voxel_size: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return nm_from_voxels(self.offset, voxel_size), nm_from_voxels(self.shape, voxel_size)

    @classmethod
    def from_nm(cls, offset_nm: Sequence[float], shape_nm: Sequence[float], voxel_size: Sequence[float]) -> "Roi":
        return cls(voxels_from_nm(offset_nm, voxel_size), voxels_from_nm(shape_nm, voxel_size))

    def __repr__(self) -> str:
        return f"Roi[{', '.join(f'{b}:{e}' for b, e in zip(self.begin, self.end))}]"


@dataclass(frozen=True)
class ChunkGrid:
    """A regular grid of chunks covering ``roi`` (the last chunk on each axis may be partial)."""

    roi: Roi
    chunk_shape: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_shape", as_coord(self.chunk_shape, self.roi.ndim))
        if any(c <= 0 for c in self.chunk_shape):
            raise ValueError(f"chunk shape {self.chunk_shape} must be positive")

    @property
    def grid_shape(self) -> Coord:
        return tuple(-(-s // c) for s, c in zip(self.roi.shape, self.chunk_shape))

    @property
    def num_chunks(self) -> int:
        return math.prod(self.grid_shape)

    def chunk_roi(self, index: Sequence[int]) -> Roi:
        index = as_coord(index, self.roi.ndim)
        if not all(0 <= i < n for i, n in zip(index, self.grid_shape)):
            raise IndexError(f"chunk index {index} outside grid {self.grid_shape}")
        begin = tuple(o + i * c for o, i, c in zip(self.roi.offset, index, self.chunk_shape))
        full = Roi(begin, self.chunk_shape)
        return full.intersect(self.roi)

    def indices(self) -> Iterator[Coord]:
        return itertools.product(*(range(n) for n in self.grid_shape))

    def chunks(self) -> Iterator[tuple[Coord, Roi]]:
        for index in self.indices():
            yield index, self.chunk_roi(index)

    def indices_overlapping(self, roi: Roi) -> Iterator[Coord]:
        """Indices of the chunks that intersect ``roi``."""
        inside = roi.intersect(self.roi)
        if inside.empty:
            return iter(())
        rel = inside.relative_to(self.roi)
        ranges = [
            range(b // c, -(-e // c)) for b, e, c in zip(rel.begin, rel.end, self.chunk_shape)
        ]
        return itertools.product(*ranges)


@dataclass(frozen=True)
class Block:
    """A unit of block-wise work: read ``read_roi`` (context included), write ``write_roi``."""

    index: Coord
    read_roi: Roi
    write_roi: Roi

    @property
    def context(self) -> tuple[Coord, Coord]:
        """Context before and after the write ROI, per axis."""
        before = tuple(w - r for w, r in zip(self.write_roi.begin, self.read_roi.begin))
        after = tuple(r - w for w, r in zip(self.write_roi.end, self.read_roi.end))
        return before, after


def blocks(total: Roi, block_shape: Sequence[int], context: Sequence[int] | int = 0, clip: bool = True) -> list[Block]:
    """Blocks whose write ROIs tile ``total`` on a grid of ``block_shape``.

    Read ROIs are the write ROIs grown by ``context``; with ``clip`` they are cut to ``total``.
    """
    grid = ChunkGrid(total, block_shape)
    context = as_coord(context, total.ndim)
    out = []
    for index, write in grid.chunks():
        read = write.grow(context)
        if clip:
            read = read.intersect(total)
        out.append(Block(index, read, write))
    return out


def tile_starts(size: int, window: int, stride: int) -> list[int]:
    """Start positions of a sliding window along one axis (the original pipeline's grid).

    n = 1 + ceil((size - window) / stride) windows, start_i = min(i * stride, size - window):
    the last window is snapped to the end so that every voxel is covered. ``size`` must be
    at least ``window`` (pad the volume first otherwise).
    """
    if window <= 0 or stride <= 0:
        raise ValueError(f"window {window} and stride {stride} must be positive")
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}: pad it first")
    n = 1 + -(-(size - window) // stride)
    return [min(i * stride, size - window) for i in range(n)]


# -- keys: the numpy-style indexing every source and view accepts ------------------------------
def normalize_key(key: Any, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Expand ``key`` to one step-1 slice per axis; also return the axes indexed by an int.

    Sources read boxes, so this accepts what the volume layer and dask pass: slices with
    step 1, ints and Ellipsis.
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        raise IndexError(f"too many indices for an array of shape {tuple(shape)}")
    slices, dropped = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, numbers.Integral):  # ints and numpy integers
            k = int(k) + (n if k < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
            slices.append(slice(k, k + 1))
            dropped.append(axis)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError(f"only contiguous slices (step 1) are read here, not {k!r}: read the box, then step through the array")
            slices.append(slice(start, max(start, stop)))
        else:
            raise IndexError(f"unsupported index {k!r}: use slices or ints")
    return tuple(slices), tuple(dropped)


def drop_axes(data: Any, axes: Sequence[int]) -> Any:
    return data.squeeze(axis=tuple(axes)) if axes else data
