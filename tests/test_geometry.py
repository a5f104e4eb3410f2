"""The geometry value types, checked against brute-force voxel sets on many random boxes."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from cleftchunk.geometry import Block, ChunkGrid, Roi, as_coord, blocks, nm_from_voxels, tile_starts, voxels_from_nm


def random_roi(rng: random.Random, ndim: int = 3, lo: int = -6, span: int = 7) -> Roi:
    return Roi(tuple(rng.randint(lo, lo + span) for _ in range(ndim)), tuple(rng.randint(0, span) for _ in range(ndim)))


def voxel_set(roi: Roi) -> set:
    return set(itertools.product(*(range(b, e) for b, e in zip(roi.begin, roi.end))))


ROIS = [random_roi(random.Random(seed)) for seed in range(60)]
PAIRS = list(zip(ROIS[::2], ROIS[1::2]))


def test_roi_basic_values():
    roi = Roi((1, 2, 3), (4, 5, 6))
    assert roi.end == (5, 7, 9)
    assert roi.size == 120 and not roi.empty and roi.ndim == 3
    assert roi.center == (3.0, 4.5, 6.0)
    assert Roi.from_bounds((1, 2, 3), (5, 7, 9)) == roi
    assert Roi.from_bounds((5,), (1,)).shape == (0,)
    assert Roi.from_shape((2, 3)) == Roi((0, 0), (2, 3))
    assert repr(roi) == "Roi[1:5, 2:7, 3:9]"


@pytest.mark.parametrize(
    "offset, shape",
    [((0, 0), (1,)), ((0,), (-1,)), ((0.5,), (1,))],
)
def test_roi_rejects_bad_fields(offset, shape):
    with pytest.raises(ValueError):
        Roi(offset, shape)


def test_as_coord():
    assert as_coord(3, 2) == (3, 3)
    assert as_coord(np.array([1, 2])) == (1, 2)
    with pytest.raises(ValueError):
        as_coord(3)
    with pytest.raises(ValueError):
        as_coord((1, 2), 3)
    with pytest.raises(ValueError):
        as_coord((1.5, 2))


@pytest.mark.parametrize("a, b", PAIRS)
def test_intersect_and_union_match_voxel_sets(a, b):
    assert voxel_set(a.intersect(b)) == voxel_set(a) & voxel_set(b)
    union = a.union(b)
    assert union.contains(a) and union.contains(b)
    if not a.empty and not b.empty:  # the bounding box is the smallest box holding both
        for axis in range(3):
            assert union.begin[axis] == min(a.begin[axis], b.begin[axis])
            assert union.end[axis] == max(a.end[axis], b.end[axis])
    assert a.intersect(b) == b.intersect(a)


@pytest.mark.parametrize("a, b", PAIRS)
def test_contains_matches_voxel_sets(a, b):
    if not b.empty:
        assert a.contains(b) == (voxel_set(b) <= voxel_set(a))
    for point in itertools.islice(voxel_set(b), 5):
        assert a.contains(point) == (point in voxel_set(a))
    assert a.contains(Roi(a.offset, (0, 0, 0)))


@pytest.mark.parametrize("roi", ROIS[:20])
def test_grow_shift_and_relative(roi):
    grown = roi.grow((1, 2, 3), (0, 1, 2))
    assert grown.begin == tuple(b - d for b, d in zip(roi.begin, (1, 2, 3)))
    assert grown.end == tuple(e + d for e, d in zip(roi.end, (0, 1, 2)))
    assert roi.grow(2).grow(-2) == roi
    assert roi.grow(-100).shape == (0, 0, 0)  # shrinking never gives negative extents
    assert roi.shift((1, -1, 2)).shift((-1, 1, -2)) == roi
    rel = roi.relative_to(Roi((1, 1, 1), (1, 1, 1)))
    assert rel.offset == tuple(o - 1 for o in roi.offset) and rel.shape == roi.shape


@pytest.mark.parametrize("roi", ROIS)
@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 4), (5, 5, 5)])
def test_snap_modes(roi, grid):
    grown = roi.snap(grid, "grow")
    assert grown.contains(roi)
    assert all(b % g == 0 and e % g == 0 for b, e, g in zip(grown.begin, grown.end, grid))
    assert all(grown.shape[i] < roi.shape[i] + 2 * grid[i] for i in range(3))
    shrunk = roi.snap(grid, "shrink")
    assert roi.contains(shrunk)
    assert all(b % g == 0 for b, g in zip(shrunk.begin, grid))
    closest = roi.snap(grid, "closest")
    assert all(abs(c - b) <= g / 2 for c, b, g in zip(closest.begin, roi.begin, grid))
    with pytest.raises(ValueError):
        roi.snap(grid, "nearest")


def test_to_slices_index_numpy_like_the_roi():
    volume = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    origin = (10, 20, 30)
    roi = Roi((11, 22, 33), (2, 3, 4))
    got = volume[roi.to_slices(origin)]
    expected = volume[1:3, 2:5, 3:7]
    np.testing.assert_array_equal(got, expected)
    assert Roi((1, 2), (3, 4)).to_slices() == (slice(1, 4), slice(2, 6))


def test_nm_conversions():
    assert voxels_from_nm((80, 8, 12), (40, 4, 4)) == (2, 2, 3)
    assert nm_from_voxels((2, 2, 3), (40, 4, 4)) == (80.0, 8.0, 12.0)
    with pytest.raises(ValueError):
        voxels_from_nm((10, 0, 0), (40, 4, 4))
    roi = Roi.from_nm((40, 8, 8), (80, 16, 16), (40, 4, 4))
    assert roi == Roi((1, 2, 2), (2, 4, 4))
    assert roi.to_nm((40, 4, 4)) == ((40.0, 8.0, 8.0), (80.0, 16.0, 16.0))


@pytest.mark.parametrize("roi", [r for r in ROIS if not r.empty][:15])
@pytest.mark.parametrize("chunk", [(1, 2, 3), (3, 3, 3), (8, 8, 8)])
def test_chunk_grid_tiles_its_roi_exactly(roi, chunk):
    grid = ChunkGrid(roi, chunk)
    seen: list = []
    for index, c in grid.chunks():
        assert roi.contains(c) and not c.empty
        assert c == grid.chunk_roi(index)
        seen.extend(voxel_set(c))
    assert len(seen) == len(set(seen)) == roi.size
    assert grid.num_chunks == len(list(grid.indices()))


@pytest.mark.parametrize("seed", range(12))
def test_indices_overlapping_match_brute_force(seed):
    rng = random.Random(seed)
    total = Roi((rng.randint(-5, 5),) * 3, (rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)))
    grid = ChunkGrid(total, (2, 3, 4))
    query = random_roi(rng, lo=-8, span=12)
    expected = {i for i, c in grid.chunks() if not c.intersect(query).empty}
    assert set(grid.indices_overlapping(query)) == expected


def test_chunk_grid_errors():
    grid = ChunkGrid(Roi((0, 0), (4, 4)), (2, 2))
    with pytest.raises(IndexError):
        grid.chunk_roi((2, 0))
    with pytest.raises(ValueError):
        ChunkGrid(Roi((0, 0), (4, 4)), (0, 2))


def test_blocks_with_context_are_clipped_and_cover_total():
    total = Roi((0, 10, 10), (6, 13, 13))
    out = blocks(total, (2, 4, 4), context=(1, 2, 2))
    covered = set()
    for b in out:
        assert isinstance(b, Block)
        assert total.contains(b.read_roi) and b.read_roi.contains(b.write_roi)
        covered |= voxel_set(b.write_roi)
        before, after = b.context
        assert all(0 <= v <= c for v, c in zip(before, (1, 2, 2)))
        assert all(0 <= v <= c for v, c in zip(after, (1, 2, 2)))
    assert covered == voxel_set(total)
    inner = [b for b in out if b.write_roi.begin == (2, 14, 14)][0]
    assert inner.context == ((1, 2, 2), (1, 2, 2))
    unclipped = blocks(total, (2, 4, 4), context=1, clip=False)
    assert unclipped[0].read_roi == unclipped[0].write_roi.grow(1)


@pytest.mark.parametrize("size, window, stride", [(8, 8, 4), (9, 8, 4), (100, 16, 8), (257, 256, 128), (30, 7, 3)])
def test_tile_starts_cover_every_voxel_and_stay_inside(size, window, stride):
    starts = tile_starts(size, window, stride)
    assert len(starts) == 1 + -(-(size - window) // stride)
    assert starts[0] == 0 and starts[-1] == size - window
    assert all(0 <= s <= size - window for s in starts)
    covered = set()
    for s in starts:
        covered |= set(range(s, s + window))
    assert covered == set(range(size))


def test_tile_starts_errors():
    with pytest.raises(ValueError):
        tile_starts(4, 8, 2)
    with pytest.raises(ValueError):
        tile_starts(8, 4, 0)
