"""The arithmetic of predict's hot path, each against the plain formula it replaces: separable
denominators, in-place fixed-point accumulation, slab-wise and device blending, the model cache,
the one place that sets torch's backend flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleftchunk.backend import configure_torch
from cleftchunk.geometry import Roi
from cleftchunk.predict import PredictParams, TileRunner
from cleftchunk.predict.runner import ModelSource
from cleftchunk.predict.worker import ModelCache
from cleftchunk.predict.tiling import (
    FIXED_BITS,
    FLOAT_EXACT_TILES,
    INT32_TILES,
    TileGrid,
    block_denominator,
    blended_uint8,
    blended_uint8_torch,
    fixed_weights,
    separable_denominator,
    sums_dtype,
    to_fixed,
    weights_for,
)


def brute_force_denominator(grid: TileGrid, blend: str, roi: Roi) -> np.ndarray:
    """Σ q(w) tile by tile: what the blend task computed before."""
    q = to_fixed(weights_for(grid.window, blend))
    out = np.zeros(roi.shape, dtype=np.int64)
    for _, tile in grid.tiles_overlapping(roi):
        common = tile.intersect(roi)
        out[common.relative_to(roi).to_slices()] += q[common.relative_to(tile).to_slices()]
    return out


@pytest.mark.parametrize("seed", range(12))
def test_separable_denominator_equals_tile_by_tile_sums(seed):
    rng = np.random.default_rng(seed)
    window = tuple(int(w) for w in rng.integers(2, 12, 3))
    shape = tuple(int(s) for s in rng.integers(1, 40, 3))
    overlap = float(rng.choice([0.0, 0.25, 0.5, 0.75, 0.9]))
    blend = str(rng.choice(["gaussian", "constant"]))
    grid = TileGrid.over(Roi((3, -2, 5), shape), window, overlap, pad=bool(rng.integers(2)))
    for _ in range(6):  # random regions, inside and across the frame's edges
        begin = tuple(int(rng.integers(f - 3, f + s)) for f, s in zip(grid.frame.begin, grid.frame.shape))
        roi = Roi(begin, tuple(int(n) for n in rng.integers(1, 30, 3)))
        got = block_denominator(grid, blend, roi)
        np.testing.assert_array_equal(got, brute_force_denominator(grid, blend, roi))
        assert got.dtype == sums_dtype(grid) and not got.planes.flags.writeable


def test_denominators_of_interior_blocks_are_shared():
    grid = TileGrid.over(Roi((0, 0, 0), (64, 256, 256)), (8, 32, 32), 0.5, pad=True)
    a = block_denominator(grid, "gaussian", Roi((16, 64, 64), (16, 64, 64)))
    b = block_denominator(grid, "gaussian", Roi((32, 128, 64), (16, 64, 64)))  # same phase: same offsets
    assert a.planes is b.planes
    np.testing.assert_array_equal(a, brute_force_denominator(grid, "gaussian", Roi((32, 128, 64), (16, 64, 64))))


def test_separable_denominator_with_no_tiles_is_zero():
    q = fixed_weights((2, 3, 4), "gaussian")
    assert not separable_denominator(q, ((), (0,), (0,)), (5, 5, 5)).any()


def test_fixed_weights_are_to_fixed_of_the_importance_map_and_read_only():
    np.testing.assert_array_equal(fixed_weights((4, 8, 8), "gaussian"), to_fixed(weights_for((4, 8, 8), "gaussian")))
    with pytest.raises(ValueError):
        fixed_weights((4, 8, 8), "gaussian")[0, 0, 0] = 1


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_accumulate_equals_sum_of_to_fixed(dtype):
    """The runner's in-place sums — a rounded float64 product added into the integer sums — equal
    Σ to_fixed(w·p) exactly, in either integer type, on the numpy path and the device path."""
    window = (2, 6, 6)
    model = torch.nn.Sigmoid()
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (5, 14, 14), dtype=np.uint8)
    where = [tuple(slice(o, o + w) for o, w in zip(off, window)) for off in [(0, 0, 0), (1, 3, 2), (3, 8, 8), (0, 2, 5), (2, 4, 4)]]
    weights = weights_for(window, "gaussian")
    runner = TileRunner(model, PredictParams(window, batch_size=2))
    got = runner.accumulate((raw[s] for s in where), where, raw.shape, weights, dtype=dtype)
    expected = np.zeros(raw.shape, dtype=np.int64)
    probabilities = list(TileRunner(model, PredictParams(window, batch_size=2)).run(raw[s] for s in where))
    for s, p in zip(where, probabilities):
        expected[s] += to_fixed(weights * p)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    assert runner.tiles_run == len(where)
    # the device code path (torch ops, used on CUDA), run here on the CPU: the same integers
    on_device = TileRunner(model, PredictParams(window, batch_size=2))._accumulate_torch(
        (raw[s] for s in where), where, raw.shape, weights, dtype)
    assert on_device.numpy().dtype == dtype
    np.testing.assert_array_equal(on_device.numpy(), expected)


def test_sums_fit_their_integer_type_and_float64():
    top = 2**FIXED_BITS  # the largest contribution: w = p = 1
    assert INT32_TILES * top <= 2**31 - 1 < (INT32_TILES + 1) * top
    assert FLOAT_EXACT_TILES * top < 2**53  # every sum is an integer float64 holds exactly


def test_sums_are_int32_up_to_overlap_three_quarters_and_int64_beyond():
    roi = Roi((0, 0, 0), (64, 512, 512))
    for overlap in (0.0, 0.25, 0.5, 0.75):
        grid = TileGrid.over(roi, (8, 256, 256), overlap, pad=True)
        assert grid.max_cover() <= INT32_TILES and sums_dtype(grid) == np.int32
    high = TileGrid.over(roi, (8, 256, 256), 0.9, pad=True)
    assert high.max_cover() > INT32_TILES and sums_dtype(high) == np.int64


def test_int32_sums_at_the_largest_cover_do_not_overflow():
    """127 contributions of the largest size (w = p = 1) added into int32 sums: exact, no wrap."""
    from cleftchunk.predict.runner import add_fixed, cache_slabs

    scaled = np.full((2, 3, 4), float(2**FIXED_BITS))
    target = np.zeros((2, 3, 4), dtype=np.int32)
    buffer = np.empty(24)
    for _ in range(INT32_TILES):
        add_fixed(target, np.ones((2, 3, 4), np.float32), scaled, cache_slabs(scaled.shape), buffer)
    assert (target == INT32_TILES * 2**FIXED_BITS).all()


def test_input_buffers_are_reused_and_short_batches_zero_padded():
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x  # aliases the input buffer: the runner must copy it before reusing the buffer

    rng = np.random.default_rng(2)
    tiles = [rng.integers(0, 256, (2, 4, 4), dtype=np.uint8) for _ in range(3)]
    runner = TileRunner(Record(), PredictParams((2, 4, 4), batch_size=2))
    out = [p.clone() for p in runner.run_tensors(tiles)]
    for tile, p in zip(tiles, out):
        np.testing.assert_array_equal(p.numpy(), torch.from_numpy(tile).float().div_(255.0).numpy())
    assert not seen[1][1].any()  # the padding sample of the short last batch is zeros
    assert len(runner._inputs) == 1


def test_blended_uint8_slabs_and_torch_equal_the_plain_formula():
    rng = np.random.default_rng(3)
    den = rng.integers(0, 2**44, (9, 70, 80), dtype=np.int64)
    den[0, 0, :5] = 0
    num = (den * rng.random(den.shape)).astype(np.int64)
    num[1, 1, :3] = [0, den[1, 1, 1], den[1, 1, 2] // 2]
    plain = np.clip(np.floor(num.astype(np.float64) / np.where(den > 0, den, 1).astype(np.float64) * 255.0 + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(blended_uint8(num, den), plain)
    np.testing.assert_array_equal(blended_uint8_torch(torch.from_numpy(num), torch.from_numpy(den)).numpy(), plain)
    runner = TileRunner(torch.nn.Sigmoid(), PredictParams((2, 2, 2)))
    np.testing.assert_array_equal(runner.blend(num, den), plain)


def test_model_cache_is_bounded_and_keyed_by_model_and_settings():
    loads = []

    class Source(ModelSource):
        def load(self, device):
            loads.append(self.sha256)
            return torch.nn.Identity()

    cache = ModelCache(size=2)
    params = PredictParams((2, 2, 2))
    a, b, c = Source("a"), Source("b"), Source("c")
    first = cache.get(a, "cpu", params)
    assert cache.get(a, "cpu", params) is first and loads == ["a"]
    cache.get(a, "cpu", PredictParams((2, 2, 2), precision="bf16"))  # another precision: another entry
    cache.get(b, "cpu", params)
    cache.get(c, "cpu", params)
    assert len(cache) == 2
    cache.get(a, "cpu", params)  # dropped (least recently used): loaded again
    assert loads == ["a", "a", "b", "c", "a"]


def test_configure_torch_sets_threads_and_cudnn_flags():
    threads = torch.get_num_threads()
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        configure_torch(1, cudnn_deterministic=True)
        assert torch.get_num_threads() == 1
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        configure_torch(cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


# -- the hot path of this issue: cache-sized slabs, exact float64 sums, reused workspaces, threads --
@pytest.mark.parametrize("shape", [(8, 256, 256), (2, 6, 6), (1, 1, 70000), (3, 300, 200), (5,)])
def test_cache_slabs_cover_every_voxel_once(shape):
    from cleftchunk.predict.runner import cache_slabs

    seen = np.zeros(shape, dtype=np.int64)
    slabs = cache_slabs(shape, voxels=1000)
    for slab in slabs:
        seen[slab] += 1
        assert seen[slab].size <= max(1000, shape[-1])
    assert (seen == 1).all()


@pytest.mark.parametrize("reuse", [False, True])
def test_int32_sums_equal_the_int64_sums_and_a_reused_workspace_is_cleared(reuse):
    window = (2, 6, 6)
    model = torch.nn.Sigmoid()
    raw = np.random.default_rng(4).integers(0, 256, (5, 14, 14), dtype=np.uint8)
    where = [tuple(slice(o, o + w) for o, w in zip(off, window)) for off in [(0, 0, 0), (1, 3, 2), (3, 8, 8), (2, 4, 4)]]
    weights = weights_for(window, "gaussian")
    exact = TileRunner(model, PredictParams(window)).accumulate((raw[s] for s in where), where, raw.shape, weights)
    out = np.full(raw.shape, 12345, dtype=np.int32) if reuse else None  # garbage left by an earlier task
    sums = TileRunner(model, PredictParams(window)).accumulate((raw[s] for s in where), where, raw.shape, weights, dtype=np.int32, out=out)
    assert sums.dtype == np.int32 and (out is None or sums is out)
    np.testing.assert_array_equal(sums, exact)


def test_fixed_headroom_refuses_sums_float64_could_not_hold(monkeypatch):
    import cleftchunk.predict.tiling as tiling
    from cleftchunk.errors import CleftchunkError

    grid = TileGrid.over(Roi((0, 0, 0), (30, 30, 30)), (20, 20, 20), 0.96, pad=False)  # 9261 tiles cover a voxel
    tiling.check_fixed_headroom(grid)
    monkeypatch.setattr(tiling, "FLOAT_EXACT_TILES", grid.max_cover() - 1)
    with pytest.raises(CleftchunkError, match="overlap too high"):
        tiling.check_fixed_headroom(grid)


def test_blended_uint8_in_place_equals_the_copying_version():
    rng = np.random.default_rng(5)
    den = rng.integers(0, 2**44, (6, 40, 50), dtype=np.int64)
    num = (den * rng.random(den.shape)).astype(np.int64)
    expected = blended_uint8(num, den)
    scratch = num.astype(np.float64)
    np.testing.assert_array_equal(blended_uint8(scratch, den, in_place=True), expected)
    untouched = num.astype(np.float64)
    np.testing.assert_array_equal(blended_uint8(untouched, den), expected)
    np.testing.assert_array_equal(untouched, num.astype(np.float64))  # not in place unless asked


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_blending_the_parts_slab_by_slab_equals_blending_their_sum(dtype, monkeypatch):
    import cleftchunk.predict.tiling as tiling

    monkeypatch.setattr(tiling, "_BLEND_SLAB", 3 * 40 * 50)  # several slabs, parts crossing them
    rng = np.random.default_rng(6)
    den = rng.integers(1, 2**44, (10, 40, 50), dtype=np.int64)
    parts, total = [], np.zeros(den.shape, dtype=np.int64)
    for _ in range(6):
        lo = rng.integers(0, den.shape, 3)
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, den.shape)]
        where = tuple(slice(int(a), b) for a, b in zip(lo, hi))
        part = rng.integers(0, 2**40, tuple(b - int(a) for a, b in zip(lo, hi)), dtype=np.int64)
        total[where] += part
        parts.append((where, part.astype(np.float64) if dtype == np.float64 and rng.integers(2) else part))
    got = tiling.blended_uint8_of_parts(parts, den, dtype)
    np.testing.assert_array_equal(got, blended_uint8(total, den))


def test_blending_with_the_denominator_summed_slab_by_slab_equals_the_whole_denominator(monkeypatch):
    """The blend sums each z-slab of Σ q(w) from the cached y–x planes: the bytes of blending with
    the whole block's denominator, for blocks at the volume's edges and inside, slabs of any depth."""
    import cleftchunk.predict.tiling as tiling

    grid = TileGrid.over(Roi((0, 0, 0), (40, 60, 50)), (8, 16, 16), 0.5, pad=True)
    rng = np.random.default_rng(7)
    for slab in (1, 3, 7):
        monkeypatch.setattr(tiling, "_BLEND_SLAB", slab * 20 * 30)
        for begin in ((0, 0, 0), (12, 20, 10), (28, 40, 30)):
            roi = Roi(begin, (12, 20, 20))
            den = block_denominator(grid, "gaussian", roi)
            whole = np.asarray(den)
            np.testing.assert_array_equal(whole, brute_force_denominator(grid, "gaussian", roi))
            part = (whole * rng.random(whole.shape)).astype(np.int64)
            parts = [((slice(0, 12), slice(0, 20), slice(0, 20)), part)]
            np.testing.assert_array_equal(tiling.blended_uint8_of_parts(parts, den), blended_uint8(part, whole))


def test_tune_malloc_sets_glibcs_options_on_linux_and_nothing_elsewhere(monkeypatch):
    import sys

    from cleftchunk.backend import tune_malloc

    if sys.platform.startswith("linux"):
        assert tune_malloc() is True  # glibc accepted both options (mallopt returns 1)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_malloc() is False
