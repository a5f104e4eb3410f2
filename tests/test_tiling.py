"""The tile grid, importance maps, fixed-point sums and reflect reads, each tested alone."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.predict.tiling import (
    FIXED_BITS,
    TileGrid,
    blended_uint8,
    check_fixed_headroom,
    frame_padding,
    gaussian_importance,
    importance_map,
    reflect_index,
    reflect_read,
    stride_for,
    to_fixed,
)


def test_stride_is_monai_rule_and_overlap_is_checked():
    assert stride_for((8, 256, 256), 0.5) == (4, 128, 128)
    assert stride_for((8, 256, 256), 0.25) == (6, 192, 192)
    assert stride_for((3, 5, 7), 0.9) == (1, 1, 1)  # never 0
    with pytest.raises(CleftchunkError, match="overlap"):
        stride_for((8, 8, 8), 1.0)


def test_grid_follows_the_original_formula_per_axis():
    grid = TileGrid.over(Roi((2, 0, 5), (10, 50, 45)), (4, 16, 16), 0.5, pad=False)
    # n = 1 + ceil((S - W) / T), start_i = min(i T, S - W), shifted by the volume offset
    assert grid.starts == ([2, 4, 6, 8], [0, 8, 16, 24, 32, 34], [5, 13, 21, 29, 34])
    assert grid.count == 4 * 6 * 5
    order = [index for index, _ in grid.tiles()]
    assert order == sorted(order)  # global C order


def test_every_voxel_of_the_frame_is_covered():
    grid = TileGrid.over(Roi((0, 0, 0), (7, 29, 31)), (4, 8, 8), 0.3, pad=True)
    cover = np.zeros(grid.frame.shape, dtype=int)
    for _, tile in grid.tiles():
        assert grid.frame.contains(tile)
        cover[tile.to_slices(grid.frame.offset)] += 1
    assert cover.min() >= 1
    assert cover.max() <= grid.max_cover()


def test_tiles_overlapping_matches_brute_force():
    grid = TileGrid.over(Roi((1, 2, 3), (9, 40, 33)), (4, 16, 8), 0.5, pad=True)
    for roi in (Roi((3, 10, 7), (2, 5, 9)), Roi((0, 0, 0), (1, 1, 1)), Roi((9, 41, 35), (3, 3, 3))):
        expected = [i for i, t in grid.tiles() if not t.intersect(roi).empty]
        assert [i for i, _ in grid.tiles_overlapping(roi)] == expected


def test_padding_half_window_and_small_axes():
    assert frame_padding((10, 50, 50), (8, 32, 32), pad=True) == ((4, 16, 16), (4, 16, 16))
    assert frame_padding((10, 50, 50), (8, 32, 32), pad=False) == ((0, 0, 0), (0, 0, 0))
    # an axis shorter than the window is padded after it up to one window
    assert frame_padding((3, 50, 20), (8, 32, 32), pad=False) == ((0, 0, 0), (5, 0, 12))
    # with pad, S + 2·(W//2) ≥ W always: half a window each side is enough
    assert frame_padding((1, 50, 20), (8, 32, 64), pad=True) == ((4, 16, 32), (4, 16, 32))


def test_gaussian_importance_formula():
    w = gaussian_importance((4, 16, 10))
    assert w.shape == (4, 16, 10) and w.dtype == np.float32
    # separable product of exp(-x^2 / (2 sigma^2)), x centred, sigma = W / 8
    def g(n, i):
        x = i - (n - 1) / 2
        return math.exp(-(x**2) / (2 * (n / 8) ** 2))

    for z, y, x in [(1, 7, 4), (2, 8, 5), (0, 3, 2)]:
        expected = max(g(4, z) * g(16, y) * g(10, x), 1e-3)
        assert w[z, y, x] == pytest.approx(expected, rel=1e-6)
    # symmetric under every flip, clamped from below at max(min, 1e-3), peak in the middle
    for axis in range(3):
        np.testing.assert_array_equal(w, np.flip(w, axis))
    assert w.min() == pytest.approx(1e-3)
    assert w.argmax() == np.ravel_multi_index((1, 7, 4), w.shape)
    assert np.all(importance_map((2, 3, 4), "constant") == 1)
    with pytest.raises(CleftchunkError, match="blend"):
        importance_map((2, 3, 4), "bump")


def test_fixed_point_sums_do_not_depend_on_order():
    rng = np.random.default_rng(0)
    w = gaussian_importance((4, 8, 8)).astype(np.float64)
    parts = [to_fixed(w * rng.random((4, 8, 8), dtype=np.float32)) for _ in range(9)]
    totals = {tuple(np.sum([parts[i] for i in perm], axis=0).ravel()[:50]) for perm in itertools.permutations(range(9), 9) if perm[0] < 2}
    assert len(totals) == 1
    # while float32 sums in different orders do differ somewhere (the reason for fixed point)
    floats = [(w * rng.random((4, 8, 8))).astype(np.float32) for _ in range(9)]
    a = floats[0].copy()
    for f in floats[1:]:
        a += f
    b = floats[-1].copy()
    for f in floats[-2::-1]:
        b += f
    assert (a != b).any()


def test_blended_uint8_rounds_half_up_and_handles_zero_weight():
    one = 2**FIXED_BITS
    num = np.array([0, one // 2, one, one * 3, 0], dtype=np.int64)
    den = np.array([one, one, one, one * 3, 0], dtype=np.int64)
    np.testing.assert_array_equal(blended_uint8(num, den), [0, 128, 255, 255, 0])
    # 0.5/255 sits exactly on the rounding boundary: it goes up
    num2 = to_fixed(np.array([0.5 / 255, 0.49 / 255]))
    np.testing.assert_array_equal(blended_uint8(num2, np.full(2, one, dtype=np.int64)), [1, 0])


def test_fixed_headroom_is_checked():
    # stride 1 on this window: up to 513·1025·1025 > 2^29 tiles per voxel, sums float64 could not hold
    grid = TileGrid.over(Roi((0, 0, 0), (512, 1024, 1024)), (512, 1024, 1024), 0.999, pad=False)
    with pytest.raises(CleftchunkError, match="overlap"):
        check_fixed_headroom(grid)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_reflect_index_equals_numpy_pad(size):
    for pad in (0, 1, 4, 15):
        expected = np.pad(np.arange(size), pad, mode="reflect")
        np.testing.assert_array_equal(reflect_index(np.arange(-pad, size + pad), size), expected)


def test_reflect_read_equals_numpy_pad_for_any_roi():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (5, 9, 6), dtype=np.uint8)
    volume = Roi((10, 20, 30), data.shape)
    pad = 7
    padded = np.pad(data, pad, mode="reflect")
    reads = []

    def read(roi):
        assert volume.contains(roi)
        reads.append(roi)
        return data[roi.to_slices(volume.offset)]

    for _ in range(30):
        begin = [int(rng.integers(o - pad, o + s)) for o, s in zip(volume.offset, volume.shape)]
        shape = [int(rng.integers(1, 8)) for _ in range(3)]
        end = [min(b + s, o + s_ + pad) for b, s, o, s_ in zip(begin, shape, volume.offset, volume.shape)]
        roi = Roi.from_bounds(begin, end)
        got = reflect_read(read, volume, roi)
        np.testing.assert_array_equal(got, padded[roi.to_slices(np.subtract(volume.offset, pad))])
    assert all(r.size <= volume.size for r in reads)
