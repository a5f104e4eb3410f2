"""The plan of a prediction as a value: blocks aligned to the output chunks, the tiles each owns
(the block holding the tile's clamped start), and the blocks whose partials each needs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence


from cleftchunk.geometry import Coord, Roi, as_coord
from cleftchunk.predict.tiling import (
    TileGrid,
)



# -- the plan: blocks, the tiles each owns, and whose partials each needs -------------------
def _name(index: Coord) -> str:
    return "_".join(map(str, index))


@dataclass(frozen=True)
class BlockWork:
    index: Coord
    write_roi: Roi
    tiles: tuple[Coord, ...]  # tiles this block runs (it contains their clamped start), global order
    tiles_roi: Roi  # the union of those tiles (empty when it owns none)
    deps: tuple[tuple[Coord, Roi], ...]  # (block, its tiles_roi) of every block whose tiles reach write_roi


@dataclass(frozen=True)
class Plan:
    """The whole computation as a value: inspect it (``describe``) before running it."""

    grid: TileGrid
    volume_roi: Roi
    block_shape: Coord
    blocks: tuple[BlockWork, ...]  # raster order

    def block(self, index: Coord) -> BlockWork:
        return self._by_index[index]

    @property
    def _by_index(self) -> dict[Coord, BlockWork]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {b.index: b for b in self.blocks}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def describe(self) -> str:
        owners = sum(1 for b in self.blocks if b.tiles)
        max_deps = max((len(b.deps) for b in self.blocks), default=0)
        return (
            f"{len(self.blocks)} blocks of {self.block_shape} over {self.volume_roi}; "
            f"{self.grid.count} tiles of {self.grid.window} (stride {self.grid.stride}) over frame {self.grid.frame}, "
            f"run by {owners} blocks; each block blends the partials of at most {max_deps} blocks"
        )


def make_plan(grid: TileGrid, volume_roi: Roi, block_shape: Sequence[int]) -> Plan:
    """Blocks aligned to ``block_shape``; tile ownership and dependencies are computed per axis
    (the grids are products of per-axis grids), so planning stays cheap for millions of blocks."""
    block_shape = as_coord(block_shape, 3)
    owned, deps = [], []
    for a in range(3):
        begin, size, bs = volume_roi.offset[a], volume_roi.shape[a], block_shape[a]
        n_blocks = -(-size // bs)
        starts, w = grid.starts[a], grid.window[a]
        owner = [(min(max(s, begin), begin + size - 1) - begin) // bs for s in starts]
        owned.append([[i for i, o in enumerate(owner) if o == j] for j in range(n_blocks)])
        deps.append(
            [
                sorted({owner[i] for i, s in enumerate(starts) if s < begin + (j + 1) * bs and s + w > begin + j * bs})
                for j in range(n_blocks)
            ]
        )

    def tiles_roi(index: Coord) -> Roi:
        lists = [owned[a][index[a]] for a in range(3)]
        if not all(lists):
            return Roi(volume_roi.offset, (0, 0, 0))
        begin = tuple(grid.starts[a][lists[a][0]] for a in range(3))
        end = tuple(grid.starts[a][lists[a][-1]] + grid.window[a] for a in range(3))
        return Roi.from_bounds(begin, end)

    from cleftchunk.geometry import ChunkGrid

    blocks = []
    for index, write in ChunkGrid(volume_roi, block_shape).chunks():
        tiles = tuple(itertools.product(*(owned[a][index[a]] for a in range(3))))
        dep_blocks = tuple((d, tiles_roi(d)) for d in itertools.product(*(deps[a][index[a]] for a in range(3))))
        blocks.append(BlockWork(index, write, tiles, tiles_roi(index), dep_blocks))
    return Plan(grid, volume_roi, block_shape, tuple(blocks))
