"""The lazy predict plan: per-axis tables agree with a brute-force plan; huge plans stay small."""

from __future__ import annotations

import itertools
import time
import tracemalloc

import pytest

from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.predict.plan import tile_layout
from cleftchunk.predict.tiling import TileGrid


def brute_force(grid: TileGrid, volume: Roi, block_shape):
    """Ownership and dependencies tile by tile, block by block (the definition)."""
    blocks = ChunkGrid(volume, block_shape)
    owner = {}
    for t, roi in grid.tiles():
        start = tuple(min(max(s, b), e - 1) for s, b, e in zip(roi.begin, volume.begin, volume.end))
        owner[t] = next(iter(blocks.indices_overlapping(Roi(start, (1, 1, 1)))))
    out = {}
    for index, write in blocks.chunks():
        tiles = [t for t in sorted(owner) if owner[t] == index]
        deps = sorted({owner[t] for t, roi in grid.tiles() if not roi.intersect(write).empty})
        out[index] = (write, tiles, deps)
    return out


@pytest.mark.parametrize(
    "shape,window,overlap,pad,block_shape",
    [
        ((10, 50, 45), (4, 16, 16), 0.5, True, (4, 16, 16)),
        ((10, 50, 45), (4, 16, 16), 0.5, False, (2, 8, 8)),
        ((9, 33, 40), (4, 16, 16), 0.25, True, (3, 20, 7)),
        ((3, 10, 10), (4, 16, 16), 0.5, False, (2, 4, 8)),  # axes shorter than the window
    ],
)
def test_lazy_plan_equals_brute_force(shape, window, overlap, pad, block_shape):
    volume = Roi((2, -3, 5), shape)
    grid = TileGrid.over(volume, window, overlap, pad)
    plan = tile_layout(grid, volume, block_shape)
    expected = brute_force(grid, volume, block_shape)
    assert len(plan) == len(expected)
    blocks = list(plan.blocks())
    assert [b.index for b in blocks] == sorted(expected)  # raster order
    spill = 0
    for work in blocks:
        write, tiles, deps = expected[work.index]
        assert work.write_roi == write
        assert list(work.tiles) == tiles and len(work.tiles) == len(tiles) and bool(work.tiles) == bool(tiles)
        assert [d for d, _ in work.deps] == deps
        assert all(d <= work.index for d in deps)  # dependencies come first in raster order
        if tiles:
            union = grid.tile(tiles[0])
            for t in tiles:
                union = union.union(grid.tile(t))
            assert work.tiles_roi == union
            spill += union.size - union.intersect(write).size
        else:
            assert work.tiles_roi.empty
        for d, roi in work.deps:
            assert roi == plan.tiles_roi(d)
            assert work.index in set(plan.users(d))
    for index in expected:
        users = {b for b, (_, _, deps) in expected.items() if index in deps}
        assert set(plan.users(index)) == users
    assert sum(1 for w in blocks if w.tiles) == plan.owners()
    assert plan.spill_voxels() == spill
    assert sum(len(w.tiles) for w in blocks) == grid.count
    assert all(plan.order(w.index) == i for i, w in enumerate(blocks))


def test_a_plan_over_a_billion_blocks_is_created_and_described_without_materializing_it():
    volume = Roi((0, 0, 0), (100_000, 100_000, 100_000))
    grid = TileGrid.over(volume, (4, 4, 4), 0.5, False)
    tracemalloc.start()
    started = time.perf_counter()
    plan = tile_layout(grid, volume, (100, 100, 100))
    text = plan.describe()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(plan) == 10**9 and "1000000000 blocks" in text
    assert grid.count == 49_999**3 and str(grid.count) in text
    last = plan.block((999, 999, 999))
    assert last.write_roi == Roi((99_900,) * 3, (100,) * 3) and len(last.tiles) == 49**3  # starts 99900..99996
    assert peak < 200 * 2**20 and seconds < 30


@pytest.mark.slow
def test_a_terabyte_plan_is_fast_and_small():
    volume = Roi((0, 0, 0), (1024, 31232, 31232))
    grid = TileGrid.over(volume, (8, 256, 256), 0.5, False)
    tracemalloc.start()
    started = time.perf_counter()
    plan = tile_layout(grid, volume, (32, 512, 512))
    plan.describe()
    first = next(itertools.islice(plan.blocks(), 0, None))
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(plan) == 32 * 61 * 61 and first.index == (0, 0, 0)
    assert seconds < 5 and peak < 300 * 2**20
