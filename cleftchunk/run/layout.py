"""A regular block layout for the executor: write regions on a grid of ``block_shape`` over a
ROI, each read with ``context`` voxels around it (clipped to the ROI), generated lazily in
raster order (nothing proportional to the number of blocks is held)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from cleftchunk.geometry import Block, ChunkGrid, Coord, Roi, as_coord

#: Voxels a batched Dask task should cover at least: tiny blocks go several to a task, so that
#: the per-task cost of Dask (a millisecond or so) stays small against the work.
BATCH_VOXELS = 4 * 2**20
MAX_BATCH = 256


def raster_order(index: Sequence[int], shape: Sequence[int]) -> int:
    """Position of block ``index`` in raster (C) order over a grid of ``shape`` blocks."""
    out = 0
    for j, n in zip(index, shape):
        out = out * n + j
    return out


@dataclass(frozen=True)
class GridLayout:
    roi: Roi
    block_shape: Coord
    context: Coord = (0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_shape", as_coord(self.block_shape, self.roi.ndim))
        object.__setattr__(self, "context", as_coord(self.context, self.roi.ndim))

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(self.roi, self.block_shape)

    @property
    def shape(self) -> Coord:
        return self.grid.grid_shape

    def __len__(self) -> int:
        return math.prod(self.shape)

    def block(self, index: Sequence[int]) -> Block:
        write = self.grid.chunk_roi(tuple(index))
        return Block(tuple(index), write.grow(self.context).intersect(self.roi), write)

    def blocks(self) -> Iterator[Block]:
        for index in itertools.product(*(range(n) for n in self.shape)):
            yield self.block(index)

    def order(self, index: Coord) -> int:
        return raster_order(index, self.shape)

    def auto_batch(self) -> int:
        """Blocks per Dask task for blocks of this shape (see BATCH_VOXELS)."""
        return max(1, min(MAX_BATCH, BATCH_VOXELS // max(1, math.prod(self.block_shape))))


@dataclass(frozen=True)
class SubsetLayout:
    """Some blocks of ``base`` (``indices``, in raster order): a later pass over the blocks an
    earlier pass found work in (e.g. evaluate's distances, only where there are cleft voxels)."""

    base: GridLayout
    indices: Sequence[Coord]

    @property
    def roi(self) -> Roi:
        return self.base.roi

    @property
    def block_shape(self) -> Coord:
        return self.base.block_shape

    def __len__(self) -> int:
        return len(self.indices)

    def block(self, index: Sequence[int]) -> Block:
        return self.base.block(index)

    def blocks(self) -> Iterator[Block]:
        return (self.base.block(index) for index in self.indices)

    def order(self, index: Coord) -> int:
        return self.base.order(index)
