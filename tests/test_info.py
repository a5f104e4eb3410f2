"""``cleftchunk info``: facts about volumes of every format, and listings of containers."""

from __future__ import annotations

import json

import h5py
import numpy as np
import tifffile

from cleftchunk.io.info import describe, sample_range
from cleftchunk.io.volumes import create_volume, open_volume
from convert_helpers import ramp, write_cremi, write_n5


def test_info_of_a_converted_zarr_volume(tmp_path, run_cli):
    data = np.zeros((8, 64, 64), np.uint8)
    data[2:5, 10:20, 10:20] = 200
    data[7, 63, 63] = 3
    np.save(tmp_path / "d.npy", data)
    run_cli("convert", tmp_path / "d.npy", tmp_path / "o.zarr/d", "--voxel-size", "40,4,4", "--offset", "40,0,8",
            "--chunks", "4,32,32", "--levels", "2", "--no-progress")
    result = run_cli("info", tmp_path / "o.zarr/d")
    text = result.output
    assert "(8, 64, 64)" in text and "uint8" in text and "(4, 32, 32)" in text
    assert "voxel size  (40, 4, 4) nm" in text and "offset      (40, 0, 8) nm" in text
    assert "OME-Zarr levels s0 s1" in text
    [info] = json.loads(run_cli("info", tmp_path / "o.zarr/d", "--json").output)
    assert info["shape"] == [8, 64, 64] and info["value_min"] == 0 and info["value_max"] == 200
    assert info["sampled_chunks"] == 8 and info["total_chunks"] == 8
    assert info["raw_bytes"] == data.nbytes
    assert 0 < info["compression_ratio"] < 0.2  # mostly zeros: compresses well
    assert info["stored_bytes"] == sum(p.stat().st_size for p in (tmp_path / "o.zarr/d/s0/c").rglob("*") if p.is_file())


def test_info_lists_every_volume_of_a_cremi_file_and_a_zarr_group(tmp_path, run_cli):
    write_cremi(tmp_path / "c.hdf")
    text = run_cli("info", tmp_path / "c.hdf").output
    for name in ("volumes/raw", "volumes/labels/clefts", "volumes/labels/neuron_ids"):
        assert f"c.hdf:{name} [hdf5]" in text
    assert "annotations/ids (2,) uint64: not a volume" in text
    assert "0xffffffffffffffff" in text  # CREMI background shown readably
    run_cli("convert", tmp_path / "c.hdf", tmp_path / "c.zarr", "--no-progress")
    infos = describe(tmp_path / "c.zarr")
    assert sorted(i.spec.rsplit("/", 2)[-2] for i in infos) == ["clefts", "neuron_ids", "raw"]
    clefts = [i for i in infos if "clefts" in i.spec][0]
    assert clefts.offset_nm == (80.0, 8.0, 4.0) and clefts.dtype == "uint64"


def test_info_of_hdf5_tiff_npy_n5(tmp_path, run_cli):
    data = ramp((5, 20, 24), np.uint16)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(1, 20, 24), compression="gzip")
        f["raw"].attrs["resolution"] = (40, 4, 4)
    [h5] = describe(tmp_path / "a.h5")
    assert h5.kind == "hdf5" and h5.chunks == (1, 20, 24) and h5.voxel_size == (40.0, 4.0, 4.0)
    assert h5.stored_bytes == h5py.File(tmp_path / "a.h5")["raw"].id.get_storage_size()
    assert (h5.value_min, h5.value_max) == (data.min(), data.max())  # 5 chunks: all sampled
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    text = run_cli("info", tmp_path / "a.tif").output
    assert "[tiff]" in text and "unknown (pass --voxel-size" in text and "(5, 20, 24)" in text
    np.save(tmp_path / "a.npy", data)
    [npy] = describe(tmp_path / "a.npy")
    assert npy.kind == "npy" and npy.shape == (5, 20, 24) and npy.value_max == data.max()
    write_n5(tmp_path / "a.n5", "volumes/raw", data, (2, 8, 8), attrs={"resolution": [4, 4, 40]})
    [n5] = describe(tmp_path / "a.n5")  # the container lists its one dataset
    assert n5.kind == "n5" and n5.spec.endswith("a.n5/volumes/raw") and n5.voxel_size == (40.0, 4.0, 4.0)


def test_sampling_reads_at_most_a_few_chunks(tmp_path):
    vol = create_volume(tmp_path / "o.zarr/big", (40, 64, 64), "uint8", chunks=(2, 16, 16))
    data = ramp((40, 64, 64))
    vol.write(vol.roi, data)
    reads = []
    volume = open_volume(tmp_path / "o.zarr/big")
    original = type(volume).__getitem__
    type(volume).__getitem__ = lambda self, key: (reads.append(key), original(self, key))[1]
    try:
        lo, hi, sampled, total = sample_range(volume)
    finally:
        type(volume).__getitem__ = original
    assert sampled == len(reads) == 8 and total == 20 * 4 * 4
    assert data.min() <= lo <= hi <= data.max()


def test_info_errors(tmp_path, run_cli):
    result = run_cli("info", tmp_path / "nope.zarr", expect=2)
    assert "does not exist" in result.output
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["raw"] = np.zeros((2, 2, 2), np.uint8)
    result = run_cli("info", tmp_path / "a.h5", "--dataset", "missing", expect=2)
    assert "no dataset 'missing'" in result.output


def test_info_of_a_volume_with_no_stored_chunk(tmp_path, run_cli):
    create_volume(tmp_path / "o.zarr/empty", (4, 32, 32), "uint64", chunks=(2, 16, 16), fill_value=7)
    [info] = describe(tmp_path / "o.zarr/empty")
    assert info.stored_bytes == 0 and info.ratio == 0 and info.value_min == info.value_max == 7
    assert "no chunk stored" in run_cli("info", tmp_path / "o.zarr/empty").output


def test_info_says_when_the_levels_metadata_is_unreadable(tmp_path, run_cli):
    """The levels beside an image level come from its group: damaged, that is an error, not "no levels"."""
    create_volume(tmp_path / "o.zarr/raw", (2, 8, 8), "uint8", chunks=(2, 8, 8), voxel_size=(40, 4, 4))
    [info] = describe(tmp_path / "o.zarr/raw/s0")
    assert info.levels == ["s0"]
    (tmp_path / "o.zarr/raw/zarr.json").write_text("{not json")  # the level keeps its own voxel_size
    result = run_cli("info", tmp_path / "o.zarr/raw/s0", expect=2)
    assert "unreadable Zarr metadata" in result.output and result.output.count("\n") == 1
