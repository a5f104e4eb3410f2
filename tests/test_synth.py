"""Synthetic CREMI-like volumes: determinism, chunk independence, labels, statistics, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi, blocks
from cleftchunk.synth.generate import VOXEL_SIZE, generate_region, make_params, section_shifts
from cleftchunk.synth.write import read_sample, synthesize
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID
from cleftchunk.io.volumes import open_volume
from cleftchunk.run.options import RunOptions

ONE = RunOptions(threads=1)  # one thread of this process: blocks in raster order

# Defects switched up so that the chunk tests also cover misaligned and missing sections.
DEFECTS = dict(missing_rate=0.1, misalign_rate=0.15, misalign_step_rate=0.1)


def _equal(a: dict, b: dict) -> bool:
    return all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in ("raw", "clefts", "neuron_ids"))


@pytest.fixture(scope="module")
def sample():
    """One 40 × 512 × 512 sample (1.6 × 2 × 2 µm) at the default parameters, shared by the statistics tests."""
    return generate_region((40, 512, 512), seed=7)


def test_same_seed_same_bytes_other_seed_other_volume():
    roi = Roi((3, -20, 40), (6, 64, 80))
    a = generate_region(roi, seed=1)
    assert _equal(a, generate_region(roi, seed=1))
    b = generate_region(roi, seed=2)
    assert not np.array_equal(a["raw"], b["raw"])
    assert not np.array_equal(a["neuron_ids"], b["neuron_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("block_shape", [(7, 64, 50), (1, 40, 110), (5, 96, 9), (16, 20, 20)])
def test_blockwise_equals_whole_region(block_shape):
    roi = Roi((-3, 17, -40), (16, 96, 110))  # negative and odd offsets on purpose
    whole = generate_region(roi, seed=11, difficulty=0.9, **DEFECTS)
    assert (whole["clefts"] != CREMI_BACKGROUND).sum() > 1000  # synapses cross the block borders
    for block in blocks(roi, block_shape):
        part = generate_region(block.write_roi, seed=11, difficulty=0.9, **DEFECTS)
        window = block.write_roi.to_slices(roi.begin)
        for name in whole:
            assert np.array_equal(whole[name][window], part[name]), (block_shape, block.write_roi, name)


def test_defect_rates_take_effect_and_misalignment_moves_labels_with_raw():
    params = make_params(0.5, misalign_rate=0.5, misalign_step_rate=0.0, missing_rate=0.0)
    z = np.arange(40)
    dy, dx = section_shifts(0, z, params)
    moved = np.flatnonzero((dy != 0) | (dx != 0))
    assert 8 < len(moved) < 32
    plain = generate_region((40, 64, 64), seed=0, misalign_rate=0.0, misalign_step_rate=0.0, missing_rate=0.0)
    shifted = generate_region((40, 64, 64), seed=0, misalign_rate=0.5, misalign_step_rate=0.0, missing_rate=0.0)
    z0 = int(moved[0])
    sy, sx = int(dy[z0]), int(dx[z0])
    # A shifted section shows the content at (y + sy, x + sx), labels included.
    expect = generate_region(Roi((z0, sy, sx), (1, 64, 64)), seed=0, misalign_rate=0.0, misalign_step_rate=0.0, missing_rate=0.0)
    assert np.array_equal(shifted["neuron_ids"][z0], expect["neuron_ids"][0])
    assert np.array_equal(shifted["raw"][z0], expect["raw"][0])
    still = np.setdiff1d(z, moved)
    assert np.array_equal(shifted["neuron_ids"][still], plain["neuron_ids"][still])
    gone = generate_region((30, 32, 32), seed=0, missing_rate=0.5)
    flat = [z for z in range(30) if gone["raw"][z].min() == gone["raw"][z].max()]
    assert 5 < len(flat) < 25


@pytest.mark.slow
def test_label_conventions(sample):
    clefts, neurons = sample["clefts"], sample["neuron_ids"]
    assert clefts.dtype == np.uint64 and neurons.dtype == np.uint64 and sample["raw"].dtype == np.uint8
    is_cleft = clefts != CREMI_BACKGROUND
    assert is_cleft.any() and not (clefts == CREMI_INVALID).any()
    assert (neurons != 0).all() and (neurons != CREMI_BACKGROUND).all()
    # Clefts lie on membranes: (a sample of) cleft voxels are all within ~50 nm of a change of
    # neuron id, in-plane or in the next sections.
    zz, yy, xx = np.nonzero(is_cleft)
    pick = np.random.default_rng(0).choice(len(zz), size=min(2000, len(zz)), replace=False)
    for z, y, x in zip(zz[pick], yy[pick], xx[pick]):
        window = neurons[max(z - 3, 0) : z + 4, max(y - 12, 0) : y + 13, max(x - 12, 0) : x + 13]
        assert (window != neurons[z, y, x]).any(), (z, y, x)
    # One id per synapse: each cleft touches exactly two neurons, and ids are unique per synapse.
    for cleft_id in np.unique(clefts[is_cleft])[:10]:
        touched = np.unique(neurons[clefts == cleft_id])
        assert len(touched) == 2, (cleft_id, touched)


@pytest.mark.slow
def test_statistics_inside_documented_ranges(sample):
    """Documented in cleftchunk.synth: 0.05–0.8 % cleft voxels, 0.5–4 clefts per µm³."""
    is_cleft = sample["clefts"] != CREMI_BACKGROUND
    fraction = is_cleft.mean()
    assert 0.0005 <= fraction <= 0.008
    volume_um3 = math.prod(s * v / 1000 for s, v in zip(is_cleft.shape, VOXEL_SIZE))
    per_um3 = len(np.unique(sample["clefts"][is_cleft])) / volume_um3
    assert 0.5 <= per_um3 <= 4.0
    neurons = len(np.unique(sample["neuron_ids"]))
    assert 60 <= neurons <= 600  # documented: ~100–300 neurite pieces
    raw = sample["raw"]
    assert 60 < raw.mean() < 200 and raw.std() > 20


@pytest.mark.slow
def test_a_global_intensity_threshold_cannot_find_the_clefts(sample):
    """Clefts are as dark as membranes, PSDs, mitochondria: even the best threshold scores badly."""
    is_cleft = (sample["clefts"] != CREMI_BACKGROUND).ravel()
    raw = sample["raw"].ravel().astype(np.int64)
    # F1 of "raw <= t" for every t at once, from histograms; then also "raw >= t".
    pos = np.bincount(raw[is_cleft], minlength=256)
    everything = np.bincount(raw, minlength=256)
    best = 0.0
    for tp, predicted in ((np.cumsum(pos), np.cumsum(everything)), (np.cumsum(pos[::-1]), np.cumsum(everything[::-1]))):
        f1 = 2 * tp / (predicted + is_cleft.sum())
        best = max(best, float(f1.max()))
    assert best < 0.2
    # ...while the clefts are darker than average, so the test is not trivially passed.
    assert raw[is_cleft].mean() < raw.mean() - 20


def test_difficulty_scales_noise():
    easy = generate_region((4, 96, 96), seed=5, difficulty=0.0)["raw"].astype(np.float64)
    hard = generate_region((4, 96, 96), seed=5, difficulty=1.0)["raw"].astype(np.float64)

    def roughness(a):  # pixel-to-pixel differences grow with noise
        return np.abs(np.diff(a, axis=2)).mean()

    assert roughness(hard) > roughness(easy) * 1.2


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(CleftchunkError, match="difficulty"):
        make_params(1.5)
    with pytest.raises(CleftchunkError, match="unknown synth parameter"):
        make_params(0.5, colour=3)
    with pytest.raises(CleftchunkError, match="non-negative"):
        make_params(0.5, noise=-1)


@pytest.mark.slow
def test_synthesize_zarr_is_independent_of_workers_and_chunks(tmp_path):
    shape = (12, 70, 90)
    one = synthesize(tmp_path / "one.zarr", shape, seed=10, run=ONE, chunks=(5, 32, 64), **DEFECTS)
    assert one["blocks"] == 3 * 3 * 2
    synthesize(tmp_path / "two.zarr", shape, seed=10, run=RunOptions(workers=2), chunks=(4, 64, 40), **DEFECTS)
    synthesize(tmp_path / "three.zarr", shape, seed=10, run=RunOptions(threads=2), chunks=(12, 20, 90), **DEFECTS)
    a, b = read_sample(tmp_path / "one.zarr"), read_sample(tmp_path / "two.zarr")
    assert _equal(a, b) and _equal(a, read_sample(tmp_path / "three.zarr"))
    assert _equal(a, generate_region(shape, seed=10, **DEFECTS))
    assert (a["clefts"] != CREMI_BACKGROUND).any()
    raw = open_volume(tmp_path / "one.zarr" / "raw")
    assert raw.voxel_size == (40.0, 4.0, 4.0) and raw.chunks == (5, 32, 64)


def test_synthesize_resumes_an_interrupted_run(tmp_path):
    import zarr

    dst = tmp_path / "s.zarr"
    shape = (8, 64, 64)
    synthesize(dst, shape, seed=1, run=ONE, chunks=(4, 32, 32))
    reference = read_sample(dst)
    # Simulate an interruption: some blocks lost (raw chunk missing), run not marked complete.
    for key in ("0/0/1", "1/1/0"):
        (dst / "raw" / "s0" / "c" / key).unlink()
    root = zarr.open_group(str(dst), mode="a")
    root.attrs["cleftchunk_synth"] = {**root.attrs["cleftchunk_synth"], "complete": False}
    summary = synthesize(dst, shape, seed=1, run=ONE, chunks=(4, 32, 32))
    assert summary["skipped"] == summary["blocks"] - 2
    resumed = read_sample(dst)
    assert np.array_equal(resumed["raw"], reference["raw"])
    # A different sample is not "resumed" over it.
    root.attrs["cleftchunk_synth"] = {**root.attrs["cleftchunk_synth"], "complete": False}
    with pytest.raises(CleftchunkError, match="exists"):
        synthesize(dst, shape, seed=2, run=ONE, chunks=(4, 32, 32))


def test_synthesize_cremi_layout(tmp_path):
    import h5py

    dst = tmp_path / "sample.hdf"
    synthesize(dst, (6, 48, 40), seed=2, run=ONE, chunks=(4, 32, 32), format="cremi")
    with h5py.File(dst, "r") as f:
        assert f.attrs["file_format"] == "0.2"
        for path in ("volumes/raw", "volumes/labels/clefts", "volumes/labels/neuron_ids"):
            assert tuple(f[path].attrs["resolution"]) == (40, 4, 4)
            assert tuple(f[path].attrs["offset"]) == (0, 0, 0)
        assert "synth_progress" not in f
        assert f["volumes/labels/clefts"].dtype == np.uint64
    assert _equal(read_sample(dst), generate_region((6, 48, 40), seed=2))


@pytest.mark.slow
def test_cli_writes_sample_and_preview(tmp_path, run_cli):
    from PIL import Image

    dst = tmp_path / "demo.zarr"
    png = tmp_path / "p.png"
    result = run_cli("synth", dst, "--shape", "16,256,256", "--seed", "3", "--threads", "1", "--no-progress", "--preview", png)
    assert "wrote" in result.output
    written = read_sample(dst)
    assert _equal(written, generate_region((16, 256, 256), seed=3))
    assert (written["clefts"] != CREMI_BACKGROUND).any()
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape[1] > image.shape[0]  # sections side by side
    colour = np.abs(image[..., 0] - image[..., 1]) + np.abs(image[..., 1] - image[..., 2])
    assert (colour > 60).any()  # clefts overlaid in colour
    again = run_cli("synth", dst, "--shape", "16,160,160", "--threads", "1", "--no-progress", expect=2)
    assert "exists" in again.output and "--overwrite" in again.output
    run_cli("synth", dst, "--shape", "8,32,32", "--threads", "1", "--no-progress", "--overwrite")
    assert open_volume(dst / "raw").shape == (8, 32, 32)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "0,10,10"], "positive"),
        (["--shape", "10,10"], "3 values"),
        (["--shape", "a,b,c"], "integers"),
        (["--shape", "100000,100000,100000"], "limit"),
        (["--format", "tiff"], "unknown format"),
        (["--difficulty", "1.5"], "difficulty"),
        (["--chunks", "0,5,5"], "chunks"),
        (["--seed", "-1"], "seed"),
        (["--missing-rate", "-0.5"], "non-negative"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, run_cli, args, message):
    result = run_cli("synth", tmp_path / "x.zarr", "--shape", "4,16,16", *args, "--no-progress", expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "x.zarr").exists()


def test_cli_format_follows_the_name_or_must_match_it(tmp_path, run_cli):
    result = run_cli("synth", tmp_path / "x.zarr", "--shape", "4,16,16", "--format", "cremi", "--no-progress", expect=2)
    assert "HDF5" in result.output
    result = run_cli("synth", tmp_path / "x.h5", "--shape", "4,16,16", "--format", "zarr", "--no-progress", expect=2)
    assert ".zarr" in result.output
    result = run_cli("synth", tmp_path / "x.h5", "--shape", "4,16,16", "--threads", "1", "--no-progress")
    assert "cremi" in result.output
    assert open_volume(f"{tmp_path / 'x.h5'}:volumes/labels/clefts").dtype == np.uint64


@pytest.mark.parametrize("fmt", ["zarr", "cremi"])
def test_an_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, fmt):
    import cleftchunk.synth.write as sw

    dst = tmp_path / ("s.zarr" if fmt == "zarr" else "s.hdf")
    shape, chunks = (8, 64, 64), (4, 32, 32)
    done = []
    real_zarr_block, real_region_block = sw._zarr_block, sw._region_block

    def dies_after_three(real):
        def task(index, **kwargs):
            if len(done) == 3:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle
            done.append(index)
            return real(index, **kwargs)

        return task

    monkeypatch.setattr(sw, "_zarr_block", dies_after_three(real_zarr_block))
    monkeypatch.setattr(sw, "_region_block", dies_after_three(real_region_block))
    with pytest.raises(KeyboardInterrupt):
        synthesize(dst, shape, seed=6, run=ONE, chunks=chunks, **DEFECTS)
    monkeypatch.setattr(sw, "_zarr_block", real_zarr_block)
    monkeypatch.setattr(sw, "_region_block", real_region_block)
    summary = synthesize(dst, shape, seed=6, run=ONE, chunks=chunks, **DEFECTS)
    assert summary["skipped"] == 3 and summary["blocks"] == 8
    assert _equal(read_sample(dst), generate_region(shape, seed=6, **DEFECTS))
    # finished now: the same command is not run again (nothing is rewritten), other parameters are refused
    stamp = {p: p.stat().st_mtime_ns for p in dst.rglob("*")} if fmt == "zarr" else dst.stat().st_mtime_ns
    logged = []
    again = synthesize(dst, shape, seed=6, run=ONE, chunks=chunks, log=logged.append, **DEFECTS)
    assert again["skipped"] == again["blocks"] == 8 and "already complete" in logged[0]
    assert stamp == ({p: p.stat().st_mtime_ns for p in dst.rglob("*")} if fmt == "zarr" else dst.stat().st_mtime_ns)
    with pytest.raises(CleftchunkError, match=r"exists, written by synth with other parameters \(seed differ\)"):
        synthesize(dst, shape, seed=7, run=ONE, chunks=chunks, **DEFECTS)


def test_summary_round_trips_through_json(tmp_path):
    summary = synthesize(tmp_path / "j.zarr", (4, 16, 40), chunks=(4, 16, 16), run=ONE)
    back = json.loads(json.dumps(summary))  # what the demo stores in its report
    assert back["path"] == str(tmp_path / "j.zarr") and back["format"] == "zarr"
    assert back["shape"] == [4, 16, 40] and back["chunks"] == [4, 16, 16]
    assert (back["blocks"], back["skipped"]) == (3, 0) and back["seconds"] >= 0


def test_an_interrupted_synth_resumes_from_its_completion_record_and_gives_the_same_bytes(tmp_path, monkeypatch):
    import zarr

    import cleftchunk.synth.write as w

    shape, chunks = (8, 64, 64), (2, 16, 16)  # 64 blocks, 8 per task on one thread
    out, record = tmp_path / "s.zarr", tmp_path / ".s.zarr..synth-done.zarr"
    real, calls = w._zarr_block, []

    def crashing(index, **kw):
        if len(calls) == 20:
            raise RuntimeError("simulated crash")
        calls.append(index)
        return real(index, **kw)

    monkeypatch.setattr(w, "_zarr_block", crashing)
    with pytest.raises(Exception, match="simulated crash"):
        synthesize(out, shape, seed=3, chunks=chunks, run=ONE, log=lambda _: None)
    marks = zarr.open_array(str(record), mode="r")[:]
    written = {tuple(i) for i in calls}
    order = list(np.ndindex(4, 4, 4))
    assert 0 < marks.sum() < len(written) <= 20  # the failed task's finished blocks are not marked
    assert all(order[i] in written for i in np.flatnonzero(marks))  # a mark only where data was written

    calls.clear()
    monkeypatch.setattr(w, "_zarr_block", lambda index, **kw: (calls.append(tuple(index)), real(index, **kw))[1])
    synthesize(out, shape, seed=3, chunks=chunks, run=ONE, log=lambda _: None)
    assert set(calls) == set(order) - written  # marked blocks skipped by the record, the rest by their raw chunk
    assert not record.exists()
    synthesize(tmp_path / "fresh.zarr", shape, seed=3, chunks=chunks, run=RunOptions(threads=2), log=lambda _: None)
    for name in ("raw", "clefts", "neuron_ids"):
        np.testing.assert_array_equal(open_volume(str(out / name))[:], open_volume(str(tmp_path / "fresh.zarr" / name))[:])


@pytest.mark.parametrize("fmt", ["zarr", "cremi"])
def test_stopped_at_a_known_block_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, fmt):
    from cleftchunk.run.executor import BLOCK_DONE_HOOKS

    suffix = ".zarr" if fmt == "zarr" else ".hdf"
    shape, chunks = (8, 64, 64), (2, 16, 16)
    run = RunOptions(threads=2, block_shape=(2, 32, 16))  # blocks of two chunks: 32 blocks
    done = []

    def stop(task, block, report):
        done.append(block.index)
        if len(done) == 10:
            raise KeyboardInterrupt  # what Ctrl-C does, at a known block

    BLOCK_DONE_HOOKS.append(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            synthesize(tmp_path / f"cut{suffix}", shape, seed=5, chunks=chunks, run=run, log=lambda _: None)
    finally:
        BLOCK_DONE_HOOKS.remove(stop)
    summary = synthesize(tmp_path / f"cut{suffix}", shape, seed=5, chunks=chunks, run=run, log=lambda _: None)
    assert summary["blocks"] == 32 and summary["skipped"] >= 10  # every recorded block kept
    synthesize(tmp_path / f"whole{suffix}", shape, seed=5, chunks=chunks, run=ONE, log=lambda _: None)
    cut, whole = read_sample(tmp_path / f"cut{suffix}"), read_sample(tmp_path / f"whole{suffix}")
    assert _equal(cut, whole)
    if fmt == "zarr":  # the same stored bytes, chunk by chunk
        files = sorted(p.relative_to(tmp_path / "whole.zarr") for p in (tmp_path / "whole.zarr").rglob("c/*/*/*"))
        assert files and all((tmp_path / "cut.zarr" / f).read_bytes() == (tmp_path / "whole.zarr" / f).read_bytes() for f in files)


@pytest.mark.parametrize("name", ["new/deeper/s.zarr", "new/deeper/s.hdf"])
def test_dry_run_creates_nothing_at_all(tmp_path, run_cli, name):
    result = run_cli("synth", tmp_path / name, "--shape", "8,64,64", "--chunks", "4,64,64", "--block-shape", "4,256,256",
                     "--dry-run")
    assert "plan: synth" in result.output and "nothing was run" in result.output
    assert "2 blocks of (4, 64, 64)" in result.output  # clipped to the volume
    assert list(tmp_path.iterdir()) == []  # no folder, no lock file, no record


def test_block_shape_must_be_a_multiple_of_the_chunks(tmp_path, run_cli):
    result = run_cli("synth", tmp_path / "s.zarr", "--shape", "8,64,64", "--chunks", "2,16,16", "--block-shape", "3,16,16",
                     "--no-progress", expect=2)
    assert "--block-shape 3,16,16 is not a multiple of the output chunks 2,16,16: use --block-shape 4,16,16" in result.output
    assert not (tmp_path / "s.zarr").exists()
