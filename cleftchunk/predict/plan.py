"""The plan of a prediction as a lazy value: blocks aligned to the output chunks, the tiles each
owns (the block holding the tile's clamped start), and the blocks whose tile sums each needs.

Blocks and tiles are both products of per-axis grids, so everything is computed per axis and
stored per axis: a :class:`TileLayout` (the layout of a prediction's blocks: its
:class:`~cleftchunk.run.operation.Plan`'s ``layout``, and the executor's) holds a few tables of length "blocks along one axis" and
generates each :class:`BlockWork` on demand. Nothing proportional to the number of tiles or of
blocks is ever held, so a plan over 10^9 blocks is created and described in milliseconds.

Along one axis, the owner of a tile (the block containing its start clamped into the volume) is
a non-decreasing function of the tile index, because tile starts are sorted. Hence the tiles a
block owns are a contiguous range of tile indices, and the owners of the tiles that reach a
block are a contiguous range of block indices. A tile owned by block j starts at or after block
j's begin (or before the volume, for block 0), so it reaches only blocks ≥ j: a block depends
on itself and on blocks before it along every axis — the raster order runs dependencies first.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from cleftchunk.geometry import Coord, Roi, as_coord
from cleftchunk.predict.tiling import TileGrid, sums_dtype
from cleftchunk.run.layout import raster_order


def _name(index: Coord) -> str:
    return "_".join(map(str, index))


@dataclass(frozen=True)
class TileSet:
    """The tiles a block owns: the product of one range of tile indices per axis, iterated on
    demand in global (C) order; ``len`` and truth are cheap."""

    ranges: tuple[range, ...]

    def __iter__(self) -> Iterator[Coord]:
        return itertools.product(*self.ranges)

    def __len__(self) -> int:
        return math.prod(len(r) for r in self.ranges)

    def __bool__(self) -> bool:
        return all(self.ranges)


@dataclass(frozen=True)
class BlockWork:
    index: Coord
    write_roi: Roi
    tiles: TileSet  # tiles this block runs (it contains their clamped start), global order
    tiles_roi: Roi  # the union of those tiles (empty when it owns none)
    deps: tuple[tuple[Coord, Roi], ...]  # (block, its tiles_roi) of every block whose tiles reach write_roi
    users: tuple[tuple[Coord, Roi], ...] = ()  # (block, its write_roi) of every block this block's tiles reach


@dataclass(frozen=True)
class AxisPlan:
    """One axis of the plan: blocks of ``block`` voxels from ``begin`` over ``size`` voxels, and
    per block the owned tile range, its extent, the dependency range and the user range."""

    begin: int
    size: int
    block: int
    owned: tuple[range, ...]  # tile indices each block owns
    extent: tuple[tuple[int, int], ...]  # [lo, hi) world voxels its tiles cover ((0, 0) when none)
    deps: tuple[tuple[int, ...], ...]  # blocks whose tiles reach this block (ascending)
    users: tuple[tuple[int, ...], ...]  # blocks that this block's tiles reach (ascending)

    def __len__(self) -> int:
        """Blocks along this axis."""
        return len(self.owned)

    def write(self, j: int) -> tuple[int, int]:
        lo = self.begin + j * self.block
        return lo, min(lo + self.block, self.begin + self.size)

    def spill(self, j: int) -> int:
        """Voxels of block j's tile extent outside its write range, along this axis."""
        lo, hi = self.extent[j]
        wlo, whi = self.write(j)
        return (hi - lo) - max(0, min(hi, whi) - max(lo, wlo))


def axis_plan(starts: Sequence[int], window: int, begin: int, size: int, block: int) -> AxisPlan:
    """Per-axis tables in O(tiles + blocks) along this axis (see the module docstring)."""
    count = -(-size // block)
    owner = [(min(max(s, begin), begin + size - 1) - begin) // block for s in starts]
    first = [bisect.bisect_left(owner, j) for j in range(count + 1)]
    owned = tuple(range(first[j], first[j + 1]) for j in range(count))
    extent = tuple((starts[r[0]], starts[r[-1]] + window) if r else (0, 0) for r in owned)
    deps: list[tuple[int, ...]] = []
    users: list[list[int]] = [[] for _ in range(count)]
    for j in range(count):
        lo, hi = begin + j * block, min(begin + (j + 1) * block, begin + size)
        t0, t1 = bisect.bisect_right(starts, lo - window), bisect.bisect_left(starts, hi)
        # owners of the tiles reaching block j: a contiguous range, less blocks that own no tile
        ds = tuple(d for d in range(owner[t0], owner[t1 - 1] + 1) if owned[d]) if t1 > t0 else ()
        deps.append(ds)
        for d in ds:
            users[d].append(j)
    return AxisPlan(begin, size, block, owned, extent, tuple(deps), tuple(tuple(u) for u in users))


@dataclass(frozen=True)
class TileLayout:
    """The blocks of a prediction over ``roi`` (the volume) and the tiles each owns, as a lazy
    value: inspect it (``describe``) before running it. ``len()`` is the block count.

    Blocks are generated in raster order by :meth:`blocks`; :meth:`block` builds one by index.
    """

    grid: TileGrid
    roi: Roi
    block_shape: Coord
    axes: tuple[AxisPlan, ...]

    @property
    def shape(self) -> Coord:
        """Blocks along each axis."""
        return tuple(len(a) for a in self.axes)

    def __len__(self) -> int:
        return math.prod(self.shape)

    def block(self, index: Sequence[int]) -> BlockWork:
        index = tuple(int(i) for i in index)
        deps = tuple(self.block_deps(index))
        return BlockWork(
            index,
            self.write_roi(index),
            TileSet(tuple(a.owned[j] for a, j in zip(self.axes, index))),
            self.tiles_roi(index),
            deps,
            tuple((u, self.write_roi(u)) for u in self.users(index)),
        )

    def blocks(self) -> Iterator[BlockWork]:
        """Every block, in raster order (dependencies before the blocks that need them)."""
        for index in itertools.product(*(range(n) for n in self.shape)):
            yield self.block(index)

    def write_roi(self, index: Coord) -> Roi:
        write = [a.write(j) for a, j in zip(self.axes, index)]
        return Roi.from_bounds([w[0] for w in write], [w[1] for w in write])

    def tiles_roi(self, index: Coord) -> Roi:
        ext = [a.extent[j] for a, j in zip(self.axes, index)]
        if any(hi <= lo for lo, hi in ext):
            return Roi(self.roi.offset, (0,) * len(index))
        return Roi.from_bounds([e[0] for e in ext], [e[1] for e in ext])

    def block_deps(self, index: Coord) -> Iterator[tuple[Coord, Roi]]:
        """(block, its tiles_roi) of every block whose tiles reach block ``index``."""
        for d in itertools.product(*(a.deps[j] for a, j in zip(self.axes, index))):
            yield d, self.tiles_roi(d)

    def users(self, index: Coord) -> Iterator[Coord]:
        """The blocks whose write regions the tiles of block ``index`` reach (itself included)."""
        return itertools.product(*(a.users[j] for a, j in zip(self.axes, index)))

    def order(self, index: Coord) -> int:
        """Position of a block in raster order."""
        return raster_order(index, self.shape)

    # -- sizes, all from the per-axis tables: Σ over blocks of Π over axes = Π of Σ --------------
    def tiles_voxels(self) -> int:
        return math.prod(sum(hi - lo for lo, hi in a.extent) for a in self.axes)

    def spill_voxels(self) -> int:
        """Voxels of tile sums outside their block's write region, summed over blocks: what goes
        through scratch (the rest stays with its block)."""
        inside = math.prod(sum(a.extent[j][1] - a.extent[j][0] - a.spill(j) for j in range(len(a))) for a in self.axes)
        return self.tiles_voxels() - inside

    def owners(self) -> int:
        return math.prod(sum(1 for r in a.owned if r) for a in self.axes)

    def max_deps(self) -> int:
        return math.prod(max((len(r) for r in a.deps), default=0) for a in self.axes)

    def max_tiles_shape(self) -> Coord:
        return tuple(max((hi - lo for lo, hi in a.extent), default=0) for a in self.axes)

    def describe(self) -> str:
        return (
            f"{len(self)} blocks of {self.block_shape} over {self.roi}; "
            f"{self.grid.count} tiles of {self.grid.window} (stride {self.grid.stride}) over frame {self.grid.frame}, "
            f"run by {self.owners()} blocks; each block blends the partials of at most {self.max_deps()} blocks"
        )


def tile_layout(grid: TileGrid, volume_roi: Roi, block_shape: Sequence[int]) -> TileLayout:
    """Blocks aligned to ``block_shape``; tile ownership and dependencies per axis (lazy)."""
    block_shape = as_coord(block_shape, 3)
    axes = tuple(
        axis_plan(grid.starts[a], grid.window[a], volume_roi.offset[a], volume_roi.shape[a], block_shape[a]) for a in range(3)
    )
    return TileLayout(grid, volume_roi, block_shape, axes)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def describe_lines(layout: TileLayout, volume, mask, params, in_this_process: bool) -> tuple[str, ...]:
    """Predict's lines of the ``--dry-run`` plan (after the common ones): volume and output, tiles
    and scratch bytes, all from the per-axis tables (nothing is
    materialized)."""
    voxels = layout.roi.size
    sums_type = sums_dtype(layout.grid)
    spill = sums_type.itemsize * layout.spill_voxels()  # before compression
    layers = max(1, layout.shape[0])
    return (
        f"  volume {volume.shape} {volume.dtype} ({_bytes(voxels * volume.dtype.itemsize)}); output uint8 {_bytes(voxels)} before compression",
        f"  tiles: {layout.grid.count} of {layout.grid.window} (stride {layout.grid.stride}) over frame {layout.grid.frame}, "
        f"{layout.owners()} blocks own some; largest block's tiles span {layout.max_tiles_shape()}; "
        f"each block blends the partials of at most {layout.max_deps()} blocks",
        f"  scratch: {_bytes(spill)} written in all ({spill / max(voxels, 1):.2f} bytes per output voxel, {sums_type} before compression), "
        f"about {_bytes(2 * spill / layers)} at once (two layers of blocks)"
        + ("; here in memory instead (task threads of one process), up to a quarter of the available memory (at most 4 GiB)" if in_this_process else ""),
    )


def task_memory(layout: TileLayout, volume, mask, params) -> int:
    """Bytes a worker task thread holds: the sums and the input of the largest block's tiles, one
    batch of tiles in float32 (in and out, per TTA variant), and the blend (the block's own sums,
    its denominator, output uint8); the model comes on top."""
    sums = sums_dtype(layout.grid).itemsize  # bytes of a voxel's sums (int32 up to overlap 0.75)
    in_bytes = volume.dtype.itemsize + (1 if mask is not None else 0)
    window = math.prod(params.window)
    return (math.prod(layout.max_tiles_shape()) * (sums + in_bytes) + 8 * window * params.batch_size * params.tta
            + math.prod(layout.block_shape) * (2 * sums + 1))
