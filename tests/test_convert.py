"""``cleftchunk convert``: every source format, exact round trips, metadata, levels, resume, verify, bad input."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cleftchunk.io.verify import verify
import tifffile
import zarr
from PIL import Image

from cleftchunk.run import chunks as chunkwrite
from cleftchunk.io import convert as conv
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.io.volumes import open_volume
from cleftchunk.run.options import RunOptions
from convert_helpers import CREMI_BG, ramp, write_cremi, write_n5

VS = ("--voxel-size", "40,4,4")


def stored(path: Path, name: str = "raw", level: str = "s0") -> np.ndarray:
    return zarr.open_array(str(path / name / level), mode="r")[...]


def ome_datasets(path: Path, name: str) -> list[dict]:
    return zarr.open_group(str(path / name), mode="r").attrs["ome"]["multiscales"][0]["datasets"]


# -- every source format, every voxel -----------------------------------------------------------
def make_source(kind: str, tmp: Path, data: np.ndarray) -> str:
    if kind == "hdf5":
        with h5py.File(tmp / "s.h5", "w") as f:
            f.create_dataset("volumes/raw", data=data, chunks=(2, 16, 16), compression="gzip")
        return f"{tmp / 's.h5'}:volumes/raw"
    if kind == "pytc-main":
        with h5py.File(tmp / "im.h5", "w") as f:
            f["main"] = data
        return str(tmp / "im.h5")
    if kind == "tiff":
        tifffile.imwrite(tmp / "s.tif", data, photometric="minisblack")
        return str(tmp / "s.tif")
    if kind == "folder":
        (tmp / "sections").mkdir()
        for z in range(data.shape[0]):
            Image.fromarray(data[z]).save(tmp / "sections" / f"{z}.png")
        return str(tmp / "sections")
    if kind == "npy":
        np.save(tmp / "s.npy", data)
        return str(tmp / "s.npy")
    if kind == "zarr2":
        arr = zarr.create_array(str(tmp / "v2.zarr"), shape=data.shape, chunks=(3, 10, 10), dtype=data.dtype, zarr_format=2)
        arr[...] = data
        return str(tmp / "v2.zarr")
    if kind == "zarr3":
        arr = zarr.create_array(str(tmp / "v3.zarr"), shape=data.shape, chunks=(5, 7, 9), dtype=data.dtype)
        arr[...] = data
        return str(tmp / "v3.zarr")
    if kind == "n5":
        write_n5(tmp / "s.n5", "raw", data, (2, 16, 16), "gzip")
        return str(tmp / "s.n5" / "raw")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["hdf5", "pytc-main", "tiff", "folder", "npy", "zarr2", "zarr3", "n5"])
def test_every_source_converts_exactly(tmp_path, run_cli, kind):
    data = ramp((7, 45, 38))
    src = make_source(kind, tmp_path, data)
    out = tmp_path / "out.zarr"
    result = run_cli("convert", src, out / "raw", *VS, "--chunks", "4,16,16", "--verify", "--no-progress")
    assert "verified" in result.output
    np.testing.assert_array_equal(stored(out), data)
    vol = open_volume(out / "raw")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.chunks == (4, 16, 16)


def test_frame_carried_from_source_and_overridden(tmp_path, run_cli):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["v"] = ramp((3, 8, 8))
        f["v"].attrs["resolution"] = (30.0, 6.0, 6.0)
        f["v"].attrs["offset"] = (60.0, 12.0, 0.0)
    run_cli("convert", tmp_path / "a.h5", tmp_path / "o.zarr/a", "--no-progress")
    vol = open_volume(tmp_path / "o.zarr/a")
    assert vol.voxel_size == (30.0, 6.0, 6.0) and vol.offset_nm == (60.0, 12.0, 0.0) and vol.offset == (2, 2, 0)
    ds = ome_datasets(tmp_path / "o.zarr", "a")[0]["coordinateTransformations"]
    assert ds[0]["scale"] == [30.0, 6.0, 6.0] and ds[1]["translation"] == [60.0, 12.0, 0.0]
    run_cli("convert", tmp_path / "a.h5", tmp_path / "o.zarr/b", "--voxel-size", "40,4,4", "--offset", "40,8,8", "--no-progress")
    vol = open_volume(tmp_path / "o.zarr/b")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset_nm == (40.0, 8.0, 8.0)


def test_whole_cremi_file(tmp_path, run_cli):
    arrays = write_cremi(tmp_path / "sample_A.hdf")
    out = tmp_path / "A.zarr"
    run_cli("convert", tmp_path / "sample_A.hdf", out, "--no-progress", "--verify")
    for name in ("raw", "clefts", "neuron_ids"):
        np.testing.assert_array_equal(stored(out, name), arrays[name])
    clefts = open_volume(out / "clefts")
    assert clefts.dtype == np.uint64 and clefts.offset_nm == (80.0, 8.0, 4.0) and clefts.voxel_size == (40.0, 4.0, 4.0)
    assert open_volume(out / "raw").offset_nm == (0.0, 0.0, 0.0)
    array = zarr.open_array(str(out / "clefts/s0"), mode="r")
    assert array.fill_value == CREMI_BG and array.attrs["background"] == int(CREMI_BG)
    annotations = zarr.open_group(str(out), mode="r").attrs["cremi_annotations"]
    assert annotations["ids"] == [7, 8] and annotations["types"][0] == "presynaptic_site"
    assert annotations["presynaptic_site/partners"] == [[7, 8]] and annotations["offset"] == [80.0, 8.0, 4.0]


def test_cremi_mask_and_pytc_mask(tmp_path, run_cli):
    arrays = write_cremi(tmp_path / "c.hdf", annotations=False)
    run_cli("convert", f"{tmp_path / 'c.hdf'}:volumes/labels/clefts", tmp_path / "o.zarr/mask", "--mask", "--no-progress")
    mask = stored(tmp_path / "o.zarr", "mask")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (arrays["clefts"] != CREMI_BG).astype(np.uint8))
    assert mask[-2, 30, 30] == 1  # id 0 is a cleft in CREMI files
    labels = np.zeros((4, 20, 20), np.uint16)
    labels[1:3, 4:9, 5:7] = 5
    with h5py.File(tmp_path / "syn.h5", "w") as f:
        f["main"] = labels
    run_cli("convert", tmp_path / "syn.h5", tmp_path / "o.zarr/pytc", "--mask", *VS, "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "pytc"), (labels != 0).astype(np.uint8))
    run_cli("convert", tmp_path / "syn.h5", tmp_path / "o.zarr/inv", "--mask", "--background", "5", *VS, "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "inv"), (labels != 5).astype(np.uint8))


def test_whole_cremi_file_with_mask_keeps_other_volumes(tmp_path, run_cli):
    arrays = write_cremi(tmp_path / "c.hdf", annotations=False)
    run_cli("convert", tmp_path / "c.hdf", tmp_path / "o.zarr", "--mask", "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "clefts"), (arrays["clefts"] != CREMI_BG).astype(np.uint8))
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "neuron_ids"), arrays["neuron_ids"])


def test_mask_of_a_converted_cremi_volume_uses_its_background(tmp_path, run_cli):
    arrays = write_cremi(tmp_path / "c.hdf", annotations=False)
    with h5py.File(tmp_path / "c.hdf", "a") as f:
        f["volumes/labels/clefts"][0, 0, 0] = np.uint64(0xFFFFFFFFFFFFFFFE)  # invalid: no cleft
    run_cli("convert", f"{tmp_path / 'c.hdf'}:volumes/labels/clefts", tmp_path / "o.zarr/gt", "--no-progress")
    # a volume without the CREMI path or name: the recorded background attribute decides
    run_cli("convert", tmp_path / "o.zarr/gt", tmp_path / "m.zarr/syn", "--mask", "--no-progress")
    expected = (arrays["clefts"] != CREMI_BG).astype(np.uint8)
    expected[0, 0, 0] = 0
    np.testing.assert_array_equal(stored(tmp_path / "m.zarr", "syn"), expected)


def test_labels_keep_dtype_and_values(tmp_path, run_cli):
    labels = ramp((4, 30, 30), np.uint64)
    labels[0] = CREMI_BG
    np.save(tmp_path / "l.npy", labels)
    run_cli("convert", tmp_path / "l.npy", tmp_path / "o.zarr/l", *VS, "--chunks", "2,8,8", "--no-progress")
    got = stored(tmp_path / "o.zarr", "l")
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, labels)


def test_shards_and_compressors(tmp_path, run_cli):
    data = ramp((8, 40, 40))
    np.save(tmp_path / "d.npy", data)
    run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/sh", *VS, "--chunks", "2,8,8", "--shards", "4,16,16", "--no-progress")
    arr = zarr.open_array(str(tmp_path / "o.zarr/sh/s0"), mode="r")
    assert arr.shards == (4, 16, 16) and arr.chunks == (2, 8, 8)
    np.testing.assert_array_equal(arr[...], data)
    for name in ("gzip", "lz4", "none"):
        run_cli("convert", tmp_path / "d.npy", tmp_path / f"o.zarr/{name}", *VS, "--compressor", name, "--no-progress")
        np.testing.assert_array_equal(stored(tmp_path / "o.zarr", name), data)
    result = run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/x", *VS, "--compressor", "brotli", expect=2)
    assert "unknown compressor" in result.output


def test_channel_option(tmp_path, run_cli):
    data = ramp((2, 5, 12, 12))
    np.save(tmp_path / "c.npy", data)
    result = run_cli("convert", tmp_path / "c.npy", tmp_path / "o.zarr/c", *VS, expect=2)
    assert "--channel K" in result.output
    run_cli("convert", tmp_path / "c.npy", tmp_path / "o.zarr/c", *VS, "--channel", "1", "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "c"), data[1])


# -- pyramids -----------------------------------------------------------------------------------
def reference_mean_2x2(data: np.ndarray) -> np.ndarray:
    z, y, x = data.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)))
    for j in range(out.shape[1]):
        for i in range(out.shape[2]):
            out[:, j, i] = data[:, 2 * j : 2 * j + 2, 2 * i : 2 * i + 2].astype(float).mean(axis=(1, 2))
    return np.floor(out + 0.5).astype(data.dtype)


def test_levels_mean_for_images_stride_for_labels(tmp_path, run_cli):
    arrays = write_cremi(tmp_path / "c.hdf", shape=(3, 37, 29), annotations=False)
    out = tmp_path / "o.zarr"
    run_cli("convert", tmp_path / "c.hdf", out, "--levels", "3", "--chunks", "2,8,8", "--no-progress")
    raw = arrays["raw"]
    s1 = reference_mean_2x2(raw)
    np.testing.assert_array_equal(stored(out, "raw", "s1"), s1)
    np.testing.assert_array_equal(stored(out, "raw", "s2"), reference_mean_2x2(s1))
    np.testing.assert_array_equal(stored(out, "clefts", "s1"), arrays["clefts"][:, ::2, ::2])
    np.testing.assert_array_equal(stored(out, "clefts", "s2"), arrays["clefts"][:, ::4, ::4])
    raw_levels = ome_datasets(out, "raw")
    assert [d["path"] for d in raw_levels] == ["s0", "s1", "s2"]
    assert raw_levels[2]["coordinateTransformations"] == [
        {"type": "scale", "scale": [40.0, 16.0, 16.0]},
        {"type": "translation", "translation": [0.0, 6.0, 6.0]},
    ]
    labels_s1 = ome_datasets(out, "clefts")[1]["coordinateTransformations"]
    assert labels_s1[1]["translation"] == [80.0, 8.0, 4.0]  # strided: no half-voxel shift
    # Asking for fewer levels later drops them and rewrites the metadata; s0 is kept.
    run_cli("convert", tmp_path / "c.hdf", out, "--levels", "1", "--chunks", "2,8,8", "--no-progress")
    assert [d["path"] for d in ome_datasets(out, "raw")] == ["s0"]
    assert "s1" not in zarr.open_group(str(out / "raw"), mode="r")


def reference_mode_2x2(data: np.ndarray) -> np.ndarray:
    z, y, x = data.shape
    out = np.zeros((z, -(-y // 2), -(-x // 2)), data.dtype)
    for k in range(z):
        for j in range(out.shape[1]):
            for i in range(out.shape[2]):
                patch = list(data[k, 2 * j : 2 * j + 2, 2 * i : 2 * i + 2].ravel())
                out[k, j, i] = max(patch, key=lambda v: (patch.count(v), -patch.index(v)))
    return out


def test_mode_downsampling_of_labels(tmp_path, run_cli):
    labels = (ramp((2, 13, 11), np.uint32) % 3).astype(np.uint32)
    np.save(tmp_path / "l.npy", labels)
    run_cli("convert", tmp_path / "l.npy", tmp_path / "o.zarr/l", *VS, "--levels", "2", "--downsample", "mode",
            "--chunks", "1,4,4", "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "l", "s1"), reference_mode_2x2(labels))
    translation = ome_datasets(tmp_path / "o.zarr", "l")[1]["coordinateTransformations"][1]["translation"]
    assert translation == [0.0, 2.0, 2.0]


# -- results independent of task size, workers and scheduler -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("workers, scheduler, task_bytes", [(1, "threads", 1), (3, "threads", 5000), (2, "processes", 10**9)])
def test_output_independent_of_workers_and_task_size(tmp_path, workers, scheduler, task_bytes):
    data = ramp((9, 33, 41), np.uint16)
    np.save(tmp_path / "d.npy", data)
    plan = conv.plan_conversion(tmp_path / "d.npy", tmp_path / "o.zarr/d", voxel_size=(40, 4, 4), chunks=(2, 8, 16))
    run = RunOptions(threads=workers) if scheduler == "threads" else RunOptions(workers=workers)
    result = conv.convert(plan, run, task_bytes=task_bytes)
    assert result.written == result.units == 5 * 5 * 3
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data)
    assert verify(plan, run) == []


def tasks_of(grid, itemsize, budget, align=None):
    return list(chunkwrite.task_layout(grid, itemsize, budget, align).blocks())


def units_of(grid, tasks):
    return [u for t in tasks for u in chunkwrite.units_in(grid, t.write_roi)]


def test_tasks_cover_every_unit_once(tmp_path):
    grid = ChunkGrid(Roi.from_shape((10, 50, 70)), (4, 16, 16))
    for budget in (1, 4 * 16 * 16 * 3, 4 * 16 * 16 * 5 * 2, 10**9):
        tasks = tasks_of(grid, 1, budget)
        units = units_of(grid, tasks)
        assert sorted(units) == sorted(grid.indices())
        for t in tasks:
            mine = list(chunkwrite.units_in(grid, t.write_roi))
            assert t.write_roi == grid.chunk_roi(mine[0]).union(grid.chunk_roi(mine[-1]))
            assert t.write_roi.size <= max(budget, 4 * 16 * 16)
    # units already stored are not written again
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 50, 70), chunks=(4, 16, 16), dtype="uint8")
    done = {(0, 0, 0), (0, 0, 1)}
    for index in done:
        array[grid.chunk_roi(index).to_slices()] = 7
    report = chunkwrite.fill(array, lambda roi: np.ones(roi.shape, np.uint8), RunOptions(threads=1), task_bytes=1)
    assert (report.already_stored, report.written) == (2, grid.num_chunks - 2)
    assert chunkwrite.stored_units(array) == set(grid.indices())
    for index in done:
        assert (array[grid.chunk_roi(index).to_slices()] == 7).all()


# -- existing outputs, resume, verify -------------------------------------------------------------
def test_existing_output_is_never_replaced_silently(tmp_path, run_cli):
    data = ramp((4, 16, 16))
    np.save(tmp_path / "d.npy", data)
    np.save(tmp_path / "e.npy", data + 1)
    out = tmp_path / "o.zarr/d"
    run_cli("convert", tmp_path / "d.npy", out, *VS, "--no-progress")
    again = run_cli("convert", tmp_path / "d.npy", out, *VS, "--no-progress")
    assert "already complete" in again.output
    other = run_cli("convert", tmp_path / "e.npy", out, *VS, "--no-progress", expect=2)
    assert "written by convert with other parameters (source differ)" in other.output and "--overwrite" in other.output
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data)
    run_cli("convert", tmp_path / "e.npy", out, *VS, "--overwrite", "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data + 1)
    # a foreign volume at DST (not written by convert) is refused too
    foreign = tmp_path / "f.zarr/raw"
    zarr.open_group(str(foreign), mode="w")
    result = run_cli("convert", tmp_path / "d.npy", foreign, *VS, expect=2)
    assert "is not a cleftchunk convert output" in result.output and "--overwrite" in result.output


def test_source_cannot_be_its_own_destination(tmp_path, run_cli):
    np.save(tmp_path / "d.npy", ramp((2, 8, 8)))
    run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--no-progress")
    result = run_cli("convert", tmp_path / "o.zarr/d", tmp_path / "o.zarr/d", "--overwrite", expect=2)
    assert "where the source lives" in result.output
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), ramp((2, 8, 8)))


def test_disk_full_then_resume_writes_only_missing_chunks(tmp_path, run_cli, monkeypatch):
    data = ramp((8, 32, 32))
    np.save(tmp_path / "d.npy", data)
    args = ("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--chunks", "2,16,16", "--task-mb", "0",
            "--threads", "1", "--no-progress")
    real_write = chunkwrite.write_box
    calls = []

    def failing_write(array, roi, box):
        calls.append(roi)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(roi))
        real_write(array, roi, box)

    monkeypatch.setattr(chunkwrite, "write_box", failing_write)
    result = run_cli(*args, expect=1)
    assert "free disk space, then re-run to resume" in result.output
    array = zarr.open_array(str(tmp_path / "o.zarr/d/s0"), mode="r")
    assert len(chunkwrite.stored_units(array)) == 5
    record = tmp_path / ".o.zarr.d.convert-done.zarr"  # the tasks' completion record, beside the output
    assert 0 < zarr.open_array(str(record), mode="r")[:].sum() <= 5
    # what a write killed mid-way leaves: a temporary file, which must not count as the chunk
    leftover = tmp_path / "o.zarr/d/s0/c/3/1/1.0123abcd.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    assert len(chunkwrite.stored_units(array)) == 5
    monkeypatch.setattr(chunkwrite, "write_box", real_write)
    written = []
    monkeypatch.setattr(chunkwrite, "write_box", lambda a, r, b: (written.append(r), real_write(a, r, b)))
    result = run_cli(*args)
    assert "resumed" in result.output and "11 were already stored" not in result.output
    assert len(written) == 16 - 5  # only the missing chunks
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data)
    assert not leftover.exists()
    assert not record.exists()  # removed once every unit is written


#: Runs the command line like ``cleftchunk``, but kills itself (SIGKILL: no cleanup, no flush)
#: right after the executor has recorded the N-th block of level 0: a kill at a known place.
KILLER = """
import os, signal, sys
from cleftchunk.run.executor import BLOCK_DONE_HOOKS
from cleftchunk_cli.main import main

after = int(sys.argv.pop(1))
done = []

def kill(task, block, report):
    done.append(block.index)
    if len(done) == after:
        os.kill(os.getpid(), signal.SIGKILL)

BLOCK_DONE_HOOKS.append(kill)
main()
"""


def test_killed_conversion_resumes_and_is_exact(tmp_path):
    data = ramp((12, 32, 32))
    np.save(tmp_path / "d.npy", data)
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "o.zarr"
    args = ["convert", str(tmp_path / "d.npy"), str(out / "d"), *VS, "--chunks", "1,8,8", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), "40", *args, "--block-shape", "1,8,8"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    array = zarr.open_array(str(out / "d/s0"), mode="r")
    before = len(chunkwrite.stored_units(array))
    assert 40 <= before < 12 * 4 * 4  # every recorded block was written; the run stopped there
    # The resumed run may use other task sizes: tasks then mix stored and missing chunks.
    resume = args + ["--task-mb", "0", "--verify"]
    resumed = subprocess.run([sys.executable, "-m", "cleftchunk_cli.main", *resume], capture_output=True, text=True,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and f"{before} were already stored" in resumed.stdout
    assert "verified" in resumed.stdout
    np.testing.assert_array_equal(stored(out, "d"), data)
    assert not list(out.rglob("*.partial"))
    # the same bytes as a run never interrupted
    fresh = tmp_path / "fresh.zarr"
    subprocess.run([sys.executable, "-m", "cleftchunk_cli.main", *[str(fresh / "d") if a == str(out / "d") else a for a in args]],
                   check=True, capture_output=True, timeout=300, env=env)
    chunks = sorted(p.relative_to(out / "d/s0") for p in (out / "d/s0/c").rglob("*") if p.is_file())
    assert chunks == sorted(p.relative_to(fresh / "d/s0") for p in (fresh / "d/s0/c").rglob("*") if p.is_file())
    assert all((out / "d/s0" / c).read_bytes() == (fresh / "d/s0" / c).read_bytes() for c in chunks)


def test_verify_reports_damaged_chunks(tmp_path, run_cli):
    data = ramp((4, 32, 32))
    np.save(tmp_path / "d.npy", data)
    args = ("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--chunks", "2,16,16", "--no-progress")
    run_cli(*args)
    array = zarr.open_array(str(tmp_path / "o.zarr/d/s0"), mode="r+")
    array[2:4, 16:32, 0:16] = 0  # chunk (1, 1, 0) now differs from the source
    result = run_cli(*args, "--verify", expect=2)
    assert "1 chunks differ" in result.output
    assert "mismatch: " in result.output and "chunk (1, 1, 0)" in result.output
    plan = conv.plan_conversion(tmp_path / "d.npy", tmp_path / "o.zarr/d", voxel_size=(40, 4, 4), chunks=(2, 16, 16))
    [m] = verify(plan)
    assert m.chunk == (1, 1, 0) and m.roi == Roi((2, 16, 0), (2, 16, 16)) and m.voxels == np.count_nonzero(data[2:4, 16:32, 0:16])


# -- bad input: one line, non-zero exit -------------------------------------------------------------
def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_inputs(tmp_path, run_cli):
    out = str(tmp_path / "o.zarr/x")
    assert "does not exist" in one_line_error(run_cli("convert", tmp_path / "missing.h5", out, expect=2))
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = np.zeros((2, 2, 2), np.uint8)
        f["b/c"] = np.zeros((2, 2, 2), np.uint8)
    msg = one_line_error(run_cli("convert", tmp_path / "two.h5", out, expect=2))
    assert "several datasets (a, b/c)" in msg and "--dataset" in msg
    msg = one_line_error(run_cli("convert", tmp_path / "two.h5", out, "--dataset", "volumes/raw", expect=2))
    assert "no dataset 'volumes/raw'" in msg and "a, b/c" in msg
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.uint8))
    assert "2-D" in one_line_error(run_cli("convert", tmp_path / "flat.npy", out, *VS, expect=2))
    np.save(tmp_path / "cplx.npy", np.zeros((2, 2, 2), np.complex128))
    assert "complex128" in one_line_error(run_cli("convert", tmp_path / "cplx.npy", out, *VS, expect=2))
    np.save(tmp_path / "nov.npy", np.zeros((2, 2, 2), np.uint8))
    assert "--voxel-size" in one_line_error(run_cli("convert", tmp_path / "nov.npy", out, expect=2))
    assert "Z,Y,X" in one_line_error(run_cli("convert", tmp_path / "nov.npy", out, "--voxel-size", "4,4", expect=2))
    # o.zarr alone is an image now (issue 15); a path that is neither form names both.
    msg = one_line_error(run_cli("convert", tmp_path / "nov.npy", tmp_path / "o.txt", *VS, expect=2))
    assert "out.zarr" in msg and "out.zarr/name" in msg
    assert ".zarr" in one_line_error(run_cli("convert", tmp_path / "nov.npy", tmp_path / "o.h5", *VS, expect=2))


def test_corrupt_and_truncated_sources(tmp_path, run_cli):
    out = str(tmp_path / "o.zarr/x")
    with h5py.File(tmp_path / "good.h5", "w") as f:
        f.create_dataset("raw", data=ramp((8, 64, 64)), chunks=(1, 64, 64))
    whole = (tmp_path / "good.h5").read_bytes()
    (tmp_path / "trunc.h5").write_bytes(whole[: len(whole) // 2])
    assert "check that it is complete" in one_line_error(run_cli("convert", tmp_path / "trunc.h5", out, *VS, expect=2))
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    assert "HDF5" in one_line_error(run_cli("convert", tmp_path / "junk.h5", out, *VS, expect=2))
    np.save(tmp_path / "d.npy", ramp((4, 64, 64)))
    whole = (tmp_path / "d.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(whole[: len(whole) // 2])
    assert "npy" in one_line_error(run_cli("convert", tmp_path / "t.npy", out, *VS, expect=2))
    tifffile.imwrite(tmp_path / "t.tif", ramp((6, 64, 64)), compression="zlib", photometric="minisblack")
    whole = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(whole[: len(whole) * 2 // 3])
    msg = one_line_error(run_cli("convert", tmp_path / "trunc.tif", out + "t", *VS, expect=2))
    assert "corrupt" in msg or "truncated" in msg
    # a damaged chunk inside an otherwise valid Zarr source
    src = zarr.create_array(str(tmp_path / "s.zarr"), shape=(4, 16, 16), chunks=(2, 16, 16), dtype="uint8")
    src[...] = ramp((4, 16, 16))
    (tmp_path / "s.zarr" / "c" / "1" / "0" / "0").write_bytes(b"garbage")
    msg = one_line_error(run_cli("convert", tmp_path / "s.zarr", out + "z", *VS, "--no-progress", expect=2))
    assert "corrupt or truncated" in msg


def test_big_endian_source_is_stored_native(tmp_path, run_cli):
    data = ramp((3, 10, 12), np.uint16).astype(">u2")
    np.save(tmp_path / "be.npy", data)
    run_cli("convert", tmp_path / "be.npy", tmp_path / "o.zarr/be", *VS, "--verify", "--no-progress")
    got = stored(tmp_path / "o.zarr", "be")
    assert got.dtype == np.dtype("uint16") and got.dtype.isnative
    np.testing.assert_array_equal(got, data)


def test_resume_when_killed_right_after_creating_the_output(tmp_path, run_cli, monkeypatch):
    data = ramp((4, 16, 16))
    np.save(tmp_path / "d.npy", data)

    def killed(self, roi):  # as if killed once the output exists, before any data is written
        raise KeyboardInterrupt

    monkeypatch.setattr(conv.SourceReader, "__call__", killed)
    assert run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--no-progress", expect=None).exit_code != 0
    assert not chunkwrite.stored_units(zarr.open_array(str(tmp_path / "o.zarr/d/s0"), mode="r"))
    monkeypatch.undo()
    result = run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--no-progress")
    assert "resumed" in result.output
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data)


def test_tasks_align_to_source_chunks():
    grid = ChunkGrid(Roi.from_shape((128, 512, 512)), (16, 256, 256))
    # HDF5 chunks of 64³: each task covers whole source chunks in z (4 output chunks thick)
    tasks = tasks_of(grid, 1, 8 * 2**20, align=(64, 64, 64))
    assert all(t.write_roi.shape[0] == 64 and t.write_roi.offset[0] % 64 == 0 for t in tasks)
    assert sorted(units_of(grid, tasks)) == sorted(grid.indices())
    # a source chunk as deep as the volume is still not cut (it would be decompressed per task)
    deep = tasks_of(grid, 1, 8 * 2**20, align=(128, 64, 64))
    assert all(t.write_roi.shape[0] == 128 for t in deep)
    plain = tasks_of(grid, 1, 8 * 2**20)
    assert all(t.write_roi.shape[0] == 16 for t in plain)
    # alignment that would need a box far over the budget is given up
    huge = tasks_of(grid, 1, 2**19, align=(64, 1, 1))  # 4 MiB needed, 2 MiB allowed
    assert all(t.write_roi.shape[0] == 16 for t in huge)


def test_only_chunked_sources_are_aligned_to(tmp_path):
    data = ramp((8, 16, 16))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["contiguous"] = data
        f.create_dataset("chunked", data=data, chunks=(8, 4, 4))
    assert conv.source_chunking(open_volume(f"{tmp_path / 'a.h5'}:contiguous")) is None
    assert conv.source_chunking(open_volume(f"{tmp_path / 'a.h5'}:chunked")) == (8, 4, 4)


def test_chunked_hdf5_source_with_misaligned_chunks(tmp_path, run_cli):
    data = ramp((20, 40, 50))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(6, 7, 9), compression="gzip")
    run_cli("convert", tmp_path / "c.h5", tmp_path / "o.zarr/raw", *VS, "--chunks", "4,8,8", "--task-mb", "0",
            "--verify", "--no-progress")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr"), data)


def test_dry_run_creates_nothing_at_all(tmp_path, run_cli):
    np.save(tmp_path / "d.npy", ramp((4, 16, 16)))
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("convert", tmp_path / "d.npy", tmp_path / "new/deeper/o.zarr/d", *VS, "--levels", "2", "--dry-run")
    assert "plan: convert" in result.output and "nothing was run" in result.output
    assert sorted(tmp_path.rglob("*")) == before  # no folder, no lock file, no record


def test_block_shape_must_be_a_multiple_of_the_chunks(tmp_path, run_cli):
    data = ramp((4, 32, 32))
    np.save(tmp_path / "d.npy", data)
    args = ("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", *VS, "--chunks", "2,16,16", "--levels", "2", "--no-progress")
    msg = one_line_error(run_cli(*args, "--block-shape", "3,16,16", expect=2))
    assert "--block-shape 3,16,16 is not a multiple of the output chunks 2,16,16: use --block-shape 4,16,16" in msg
    assert not (tmp_path / "o.zarr").exists()
    run_cli(*args, "--block-shape", "2,32,16", "--verify")
    np.testing.assert_array_equal(stored(tmp_path / "o.zarr", "d"), data)


def test_a_failing_block_is_reported_after_every_other_block_is_written(tmp_path):
    from cleftchunk.errors import CleftchunkError

    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(4, 16, 16), chunks=(2, 8, 8), dtype="uint8")
    bad = Roi((2, 8, 0), (2, 8, 8))

    def produce(roi):
        if roi == bad:
            raise ValueError("this block cannot be made")
        return np.ones(roi.shape, np.uint8)

    with pytest.raises(CleftchunkError, match=r"1 of 8 blocks of fill failed \(.*ValueError: this block cannot be made\)"):
        chunkwrite.fill(array, produce, RunOptions(threads=2, retries=0), task_bytes=1)
    grid = chunkwrite.unit_grid(array)
    assert chunkwrite.stored_units(array) == set(grid.indices()) - {(1, 1, 0)}


@pytest.mark.parametrize("error, reported", [
    (PermissionError(errno.EACCES, "Permission denied", "s.h5"), PermissionError),
    (MemoryError(), MemoryError),
    (OSError("Can't read data (inflate() failed)"), conv.CleftchunkError),  # h5py on a damaged chunk: no errno
    (RuntimeError("Error during decompression"), conv.CleftchunkError),  # a codec on a damaged chunk
])
def test_only_damaged_data_is_called_corrupt(error, reported):
    class Source:
        def __getitem__(self, key):
            raise error

    with pytest.raises(reported) as caught:
        conv.SourceReader(Source())(Roi((0, 0, 0), (1, 2, 2)))
    assert ("corrupt or truncated" in str(caught.value)) == (reported is conv.CleftchunkError)
