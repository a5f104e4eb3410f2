"""CREMI HDF5 export: layout and attributes the CREMI tools read, placement in a sample's frame."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cleftchunk import open_volume

from cleftchunk.post import export
from cleftchunk.errors import CleftchunkError
from cleftchunk.post.export import export_cremi, parse_crop
from cleftchunk.geometry import Roi
from cleftchunk.post.metrics import evaluate
from cleftchunk.run.options import RunOptions
from cleftchunk.post.segment import segment
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import create_volume

BG = CREMI_BACKGROUND


def write(path, data, chunks=(2, 8, 8), voxel_size=(40, 4, 4), **kw):
    volume = create_volume(path, data.shape, data.dtype, chunks=chunks, voxel_size=voxel_size, **kw)
    volume.array[...] = data
    return str(path)


def clefts_volume(shape=(5, 12, 10)):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4, shape).astype(np.uint64)
    data[rng.random(shape) >= 0.1] = BG
    return data


def test_export_layout_and_attributes(tmp_path, run_cli):
    data = clefts_volume()
    spec = write(tmp_path / "s.zarr/clefts", data, offset_nm=(40, 8, 0), fill_value=int(BG))
    raw = write(tmp_path / "s.zarr/raw", np.arange(600, dtype=np.uint8).reshape(5, 12, 10))
    out = tmp_path / "sample.hdf"
    run_cli("export", spec, out, "--raw", raw)
    with h5py.File(out, "r") as f:
        assert f.attrs["file_format"] == "0.2"
        clefts = f["volumes/labels/clefts"]
        assert clefts.dtype == np.uint64
        np.testing.assert_array_equal(clefts[...], data)
        np.testing.assert_array_equal(clefts.attrs["resolution"], [40.0, 4.0, 4.0])
        np.testing.assert_array_equal(clefts.attrs["offset"], [40.0, 8.0, 0.0])
        np.testing.assert_array_equal(f["volumes/raw"][...], np.arange(600, dtype=np.uint8).reshape(5, 12, 10))
        np.testing.assert_array_equal(f["volumes/raw"].attrs["resolution"], [40.0, 4.0, 4.0])
    assert "--overwrite" in run_cli("export", spec, out, expect=2).output
    run_cli("export", spec, out, "--overwrite")
    with h5py.File(out, "r") as f:
        assert "volumes/raw" not in f  # replaced as a whole


def test_export_dry_run_describes_the_slabs_and_writes_nothing(tmp_path, run_cli):
    spec = write(tmp_path / "s.zarr/clefts", clefts_volume(), fill_value=int(BG))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("export", spec, tmp_path / "sample.hdf", "--dry-run")
    assert "plan: export" in result.output and "nothing was run and nothing was created" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no file, no partial, no lock left
    assert "crop" in run_cli("export", spec, tmp_path / "x.hdf", "--dry-run", "--crop", "0:9,0:1,0:1", expect=2).output


def test_crop_and_offset_place_the_region_in_the_sample_frame(tmp_path):
    data = clefts_volume()
    spec = write(tmp_path / "s.zarr/clefts", data, fill_value=int(BG))
    crop = parse_crop("1:4,2:11,3:10")
    info = export_cremi(spec, tmp_path / "a.hdf", crop=crop)
    with h5py.File(tmp_path / "a.hdf", "r") as f:
        np.testing.assert_array_equal(f["volumes/labels/clefts"][...], data[1:4, 2:11, 3:10])
        np.testing.assert_array_equal(f["volumes/labels/clefts"].attrs["offset"], [40.0, 8.0, 12.0])
    assert info["offset_voxels"] == [1, 2, 3]
    export_cremi(spec, tmp_path / "b.hdf", offset=(37, 911, 911))  # the padded samples' labelled region
    with h5py.File(tmp_path / "b.hdf", "r") as f:
        np.testing.assert_array_equal(f["volumes/labels/clefts"].attrs["offset"], [37 * 40.0, 911 * 4.0, 911 * 4.0])


def test_pytc_labels_are_converted_and_masks_refused(tmp_path, monkeypatch):
    labels = np.zeros((3, 4, 4), np.uint16)
    labels[1, 1, 1:3] = 5
    labels[2, 0, 0] = 1
    with h5py.File(tmp_path / "syn.h5", "w") as f:
        f["main"] = labels  # unchunked: one "chunk" of the whole shape
    monkeypatch.setattr(export, "SLAB_BYTES", 2 * 16 * 8)  # two sections per slab
    assert export.slab_depth(open_volume(f"{tmp_path}/syn.h5:main"), Roi.from_shape(labels.shape)) == 2
    export_cremi(f"{tmp_path}/syn.h5:main", tmp_path / "c.hdf")
    with h5py.File(tmp_path / "c.hdf", "r") as f:
        got = f["volumes/labels/clefts"][...]
    assert (got[1, 1, 1:3] == 5).all() and got[2, 0, 0] == 1 and (got[labels == 0] == BG).all()
    mask = write(tmp_path / "s.zarr/mask", np.ones((2, 4, 4), bool))
    with pytest.raises(CleftchunkError, match="segment"):
        export_cremi(mask, tmp_path / "d.hdf")


def test_bad_export_arguments(tmp_path, run_cli):
    spec = write(tmp_path / "s.zarr/clefts", clefts_volume(), fill_value=int(BG))
    assert ".hdf" in run_cli("export", spec, tmp_path / "x.zarr", expect=2).output
    assert "Z0:Z1" in run_cli("export", spec, tmp_path / "x.hdf", "--crop", "1:2,3", expect=2).output
    assert "--crop" in run_cli("export", spec, tmp_path / "x.hdf", "--crop", "0:9,0:4,0:4", expect=2).output
    other = write(tmp_path / "s.zarr/raw", np.zeros((5, 12, 10), np.uint8), voxel_size=(40, 8, 8))
    assert "voxel sizes differ" in run_cli("export", spec, tmp_path / "x.hdf", "--raw", other, expect=2).output
    assert not (tmp_path / "x.hdf").exists()


def test_segment_export_evaluate_round_trip(tmp_path):
    pred = np.zeros((4, 16, 16), np.uint8)
    pred[1, 2:5, 2:5] = 200
    pred[2, 10:12, 9:14] = 250
    spec = write(tmp_path / "s.zarr/pred", pred)
    segment(spec, str(tmp_path / "s.zarr/clefts"), chunks=(2, 8, 8), run=RunOptions(block_shape=(2, 8, 8)))
    export_cremi(str(tmp_path / "s.zarr/clefts"), tmp_path / "out.hdf")
    result = evaluate(f"{tmp_path}/out.hdf:volumes/labels/clefts", spec)
    assert result["inputs"]["pred_kind"] == "ids" and result["inputs"]["gt_kind"] == "prob"
    assert (result["pred_voxels"], result["cremi_score"], result["f1"]) == (19, 0.0, 1.0)


def test_dry_run_creates_nothing_at_all(tmp_path, run_cli):
    spec = write(tmp_path / "s.zarr/clefts", clefts_volume(), fill_value=int(BG))
    raw = write(tmp_path / "s.zarr/raw", np.zeros((5, 12, 10), np.uint8))
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("export", spec, tmp_path / "new/deeper/sample.hdf", "--raw", raw, "--workers", "2", "--dry-run")
    assert "plan: export" in result.output and "on 2 local worker processes" in result.output
    assert "and volumes/raw: 600 voxels" in result.output
    assert sorted(tmp_path.rglob("*")) == before  # no folder, no file, no lock


def test_stopped_export_resumes_to_the_same_file(tmp_path, monkeypatch):
    from cleftchunk.run.executor import BLOCK_DONE_HOOKS
    from cleftchunk.run.options import RunOptions

    data = clefts_volume((6, 12, 10))
    spec = write(tmp_path / "s.zarr/clefts", data, fill_value=int(BG))
    raw = write(tmp_path / "s.zarr/raw", np.arange(720, dtype=np.uint8).reshape(6, 12, 10))
    monkeypatch.setattr(export, "SLAB_BYTES", 2 * 12 * 10 * 8)  # two sections a slab: three slabs
    run = RunOptions(threads=1)
    out, done = tmp_path / "cut.hdf", []

    def stop(task, block, report):
        done.append(task.name)
        if len(done) == 2:
            raise KeyboardInterrupt  # after two of the clefts' three slabs

    BLOCK_DONE_HOOKS.append(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_cremi(spec, out, raw=raw, run=run)
    finally:
        BLOCK_DONE_HOOKS.remove(stop)
    assert not out.exists() and (tmp_path / "cut.hdf.partial").exists()  # no half file at OUT
    with pytest.raises(CleftchunkError, match=r"written by export with other parameters \(raw differ\)"):
        export_cremi(spec, out, run=run)
    calls = []
    real = export._read_slab
    monkeypatch.setattr(export, "_read_slab", lambda source, convert, block, _=None: (calls.append(block.index), real(source, convert, block))[1])
    export_cremi(spec, out, raw=raw, run=run)
    assert len(calls) == 1 + 3  # the clefts' last slab, then every raw slab
    assert not (tmp_path / "cut.hdf.partial").exists()
    export_cremi(spec, tmp_path / "whole.hdf", raw=raw, run=run)
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "whole.hdf", "r") as b:
        for name in ("volumes/labels/clefts", "volumes/raw"):
            np.testing.assert_array_equal(a[name][...], b[name][...])
            assert {k: list(np.atleast_1d(v)) for k, v in a[name].attrs.items()} == {k: list(np.atleast_1d(v)) for k, v in b[name].attrs.items()}
        np.testing.assert_array_equal(a["volumes/labels/clefts"][...], data)


def test_block_shape_is_the_work_block_and_a_multiple_of_the_file_chunks(tmp_path, run_cli):
    data = clefts_volume((6, 12, 10))
    spec = write(tmp_path / "s.zarr/clefts", data, fill_value=int(BG))
    plan = run_cli("export", spec, tmp_path / "a.hdf", "--block-shape", "2,12,10", "--dry-run").output
    assert "3 blocks of (2, 12, 10)" in plan
    assert "--block-shape 2,5,10 is not a multiple of the output chunks 1,12,10: use --block-shape 2,12,10" in run_cli(
        "export", spec, tmp_path / "a.hdf", "--block-shape", "2,5,10", expect=2).output
    run_cli("export", spec, tmp_path / "a.hdf", "--block-shape", "3,12,10", "--no-progress")
    with h5py.File(tmp_path / "a.hdf", "r") as f:
        np.testing.assert_array_equal(f["volumes/labels/clefts"][...], data)
