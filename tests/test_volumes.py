"""The volume layer: Zarr/HDF5 volumes, read-only sources (TIFF, folders, npy, N5), frames, errors."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.io.sources import N5Array, decode_n5_block, natural_key
from cleftchunk.io.ome import ome_multiscales
from cleftchunk.io.volumes import create_volume, open_volume, split_spec
from convert_helpers import ramp, write_n5


# -- Zarr and HDF5 ------------------------------------------------------------------------
def test_create_write_read_in_world_coordinates(tmp_path):
    spec = tmp_path / "out.zarr" / "raw"
    vol = create_volume(spec, (4, 20, 30), "uint16", chunks=(2, 8, 8), voxel_size=(40, 4, 4), offset_nm=(80, 40, 8))
    assert vol.offset == (2, 10, 2) and vol.roi == Roi((2, 10, 2), (4, 20, 30))
    data = ramp((4, 20, 30), np.uint16)
    vol.write(vol.roi, data)
    again = open_volume(spec)
    assert again.voxel_size == (40.0, 4.0, 4.0) and again.offset_nm == (80.0, 40.0, 8.0)
    assert again.chunks == (2, 8, 8) and again.dtype == np.uint16
    np.testing.assert_array_equal(again.read(Roi((3, 12, 5), (2, 3, 4))), data[1:3, 2:5, 3:7])
    np.testing.assert_array_equal(again.read_nm((120, 48, 20), (80, 12, 16)), data[1:3, 2:5, 3:7])
    with pytest.raises(ValueError):
        again.read(Roi((0, 0, 0), (1, 1, 1)))  # outside the volume


def test_ome_zarr_metadata_is_ngff_05(tmp_path):
    import zarr

    create_volume(tmp_path / "o.zarr" / "img", (2, 8, 8), "uint8", voxel_size=(40, 4, 4), offset_nm=(40, 8, 8))
    group = zarr.open_group(str(tmp_path / "o.zarr" / "img"), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    transforms = ms["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [40.0, 4.0, 4.0]}, {"type": "translation", "translation": [40.0, 8.0, 8.0]}]
    assert group["s0"].metadata.zarr_format == 3


def test_ome_multiscales_translation_of_levels():
    ms = ome_multiscales("x", (40, 4, 4), (0, 0, 0), [("s0", (1, 1, 1)), ("s1", (1, 2, 2))])
    mean_level = ms["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert mean_level[0]["scale"] == [40.0, 8.0, 8.0] and mean_level[1]["translation"] == [0.0, 2.0, 2.0]
    strided = ome_multiscales("x", (40, 4, 4), (0, 0, 0), [("s0", (1, 1, 1)), ("s1", (1, 2, 2))], centered=False)
    assert strided["multiscales"][0]["datasets"][1]["coordinateTransformations"][1]["translation"] == [0.0, 0.0, 0.0]


def test_create_volume_refuses_existing_without_overwrite(tmp_path):
    spec = tmp_path / "o.zarr" / "raw"
    create_volume(spec, (2, 4, 4), "uint8")
    with pytest.raises(CleftchunkError, match="--overwrite"):
        create_volume(spec, (2, 4, 4), "uint8")
    assert create_volume(spec, (2, 4, 4), "uint8", exist_ok=True).shape == (2, 4, 4)
    assert create_volume(spec, (3, 4, 4), "uint8", overwrite=True).shape == (3, 4, 4)


def test_hdf5_frame_and_dataset_choice(tmp_path):
    path = tmp_path / "a.h5"
    data = ramp((3, 5, 7))
    with h5py.File(path, "w") as f:
        f["volumes/raw"] = data
        f["volumes/raw"].attrs["resolution"] = (40, 4, 4)
        f["volumes/raw"].attrs["offset"] = (40, 0, 8)
        f["other"] = data
    vol = open_volume(f"{path}:volumes/raw")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (1, 0, 2)
    np.testing.assert_array_equal(vol.read(vol.roi), data)
    with pytest.raises(CleftchunkError, match="several datasets"):
        open_volume(path)
    with pytest.raises(CleftchunkError, match="other, volumes/raw"):
        open_volume(path, dataset="volumes/nope")
    assert open_volume(path, dataset="other").voxel_size_known is False


def test_split_spec():
    assert split_spec("a/b.h5:volumes/raw") == (__import__("pathlib").Path("a/b.h5"), "volumes/raw")
    assert split_spec("x/out.zarr/raw/s0")[1] == "raw/s0"
    assert split_spec("d.n5/raw")[1] == "raw"
    assert split_spec("out.zarr", dataset="raw")[1] == "raw"
    with pytest.raises(CleftchunkError):
        split_spec("a.h5:x", dataset="y")


# -- TIFF, folders, npy ---------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_stack_reads_regions(tmp_path, compression):
    data = ramp((6, 20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", data, compression=compression)
    vol = open_volume(tmp_path / "s.tif")
    assert vol.kind == "tiff" and vol.shape == (6, 20, 30) and vol.chunks == (1, 20, 30)
    np.testing.assert_array_equal(vol[2:5, 3:9, 10:11], data[2:5, 3:9, 10:11])
    np.testing.assert_array_equal(vol[4], data[4])
    assert vol.array.contiguous == (compression is None)  # uncompressed stacks are memory-mapped


def test_tiff_voxel_size_from_imagej_metadata(tmp_path):
    data = ramp((4, 8, 8))
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.04, "unit": "um", "axes": "ZYX"})
    vol = open_volume(tmp_path / "ij.tif")
    assert vol.voxel_size_known and vol.voxel_size == (40.0, 4.0, 4.0)
    tifffile.imwrite(tmp_path / "plain.tif", data, photometric="minisblack", resolution=(250, 250))
    assert not open_volume(tmp_path / "plain.tif").voxel_size_known  # no unit, no spacing: unknown


def test_image_folder_sorted_naturally(tmp_path):
    data = ramp((11, 9, 7))
    for z in range(11):
        Image.fromarray(data[z]).save(tmp_path / f"sec_{z}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    vol = open_volume(tmp_path)
    assert vol.kind == "folder" and vol.shape == (11, 9, 7)
    np.testing.assert_array_equal(vol[:, :, :], data)  # sec_10 after sec_9, not after sec_1
    assert natural_key("s2.png") < natural_key("s10.png")


def test_image_folder_with_mismatched_section(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "0.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "1.png")
    with pytest.raises(CleftchunkError, match="must match"):  # now found when the folder is opened
        vol = open_volume(tmp_path)
        vol[:, :, :]


def test_npy_is_memory_mapped(tmp_path):
    data = ramp((4, 5, 6), np.float32)
    np.save(tmp_path / "v.npy", data)
    vol = open_volume(tmp_path / "v.npy")
    assert isinstance(vol.array._mapped(), np.memmap)
    np.testing.assert_array_equal(vol[1:3, :, 2:4], data[1:3, :, 2:4])


# -- N5 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["raw", "gzip", "zlib", "zstd", "blosc", "bzip2", "xz"])
def test_n5_roundtrip_every_compression(tmp_path, compression):
    data = ramp((5, 13, 11), np.uint16)
    write_n5(tmp_path / "d.n5", "vol/raw", data, (2, 4, 3), compression,
             attrs={"resolution": [4, 4, 40], "offset": [8, 4, 80]})
    vol = open_volume(tmp_path / "d.n5" / "vol" / "raw")
    assert vol.kind == "n5" and vol.shape == (5, 13, 11) and vol.chunks == (2, 4, 3)
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset_nm == (80.0, 4.0, 8.0)  # reversed to z, y, x
    np.testing.assert_array_equal(vol[:, :, :], data)
    np.testing.assert_array_equal(vol[1:4, 5:12, 2:9], data[1:4, 5:12, 2:9])


def test_n5_missing_blocks_read_as_zero_and_pixel_resolution(tmp_path):
    data = ramp((4, 8, 8), np.uint8) | 1
    write_n5(tmp_path / "d.n5", "raw", data, (2, 4, 4), attrs={"pixelResolution": {"dimensions": [4, 4, 40], "unit": "nm"}},
             skip_blocks={(1, 0, 1)})
    vol = open_volume(f"{tmp_path / 'd.n5'}:raw")
    assert vol.voxel_size == (40.0, 4.0, 4.0)
    got = vol[:, :, :]
    assert not got[2:4, 0:4, 4:8].any()
    expected = data.copy()
    expected[2:4, 0:4, 4:8] = 0
    np.testing.assert_array_equal(got, expected)


def test_n5_block_bytes_follow_the_spec():
    # A 1×2×3 (z, y, x) uint16 block: header says x=3, y=2, z=1; data big-endian, x fastest.
    values = np.arange(6, dtype=">u2")
    raw = struct.pack(">HHIII", 0, 3, 3, 2, 1) + gzip.compress(values.tobytes())
    block = decode_n5_block(raw, np.dtype("uint16"), {"type": "gzip"}, (1, 2, 3))
    np.testing.assert_array_equal(block, np.arange(6, dtype=np.uint16).reshape(1, 2, 3))
    assert block.dtype == np.uint16 and block[0, 1, 0] == 3


def test_n5_container_without_dataset_lists_them(tmp_path):
    write_n5(tmp_path / "d.n5", "raw", ramp((2, 4, 4)), (2, 4, 4))
    with pytest.raises(CleftchunkError, match="raw"):
        N5Array(tmp_path / "d.n5", None)


def test_n5_corrupt_block(tmp_path):
    ds = write_n5(tmp_path / "d.n5", "raw", ramp((2, 4, 4)), (2, 4, 4))
    (ds / "0" / "0" / "0").write_bytes(b"\x00\x00\x00\x03garbage")
    with pytest.raises(CleftchunkError, match="corrupt"):
        open_volume(ds)[:, :, :]


# -- channels, dimensions, dtypes, pickling ---------------------------------------------------
def test_channel_axis_first_and_last(tmp_path):
    first = ramp((3, 4, 5, 6))  # c, z, y, x
    np.save(tmp_path / "first.npy", first)
    vol = open_volume(tmp_path / "first.npy", channel=2)
    assert vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol[:, :, :], first[2])
    np.testing.assert_array_equal(vol[1:3, 2, :], first[2, 1:3, 2, :])
    rgb = ramp((6, 5, 4, 3))  # z, y, x, c
    np.save(tmp_path / "rgb.npy", rgb)
    np.testing.assert_array_equal(open_volume(tmp_path / "rgb.npy", channel=1)[:, :, :], rgb[..., 1])
    with pytest.raises(CleftchunkError, match="--channel 0..2"):
        open_volume(tmp_path / "rgb.npy", channel=3)


def test_channel_of_a_zarr_array_reads_and_goes_to_dask(tmp_path):
    import zarr

    data = ramp((2, 4, 6, 8))
    arr = zarr.create_array(str(tmp_path / "c.zarr"), shape=data.shape, chunks=(1, 2, 3, 4), dtype=data.dtype)
    arr[...] = data
    vol = open_volume(tmp_path / "c.zarr", channel=1)
    assert vol.shape == (4, 6, 8) and vol.chunks == (2, 3, 4)
    np.testing.assert_array_equal(vol.to_dask().compute(), data[1])


@pytest.mark.parametrize(
    "shape, message", [((5, 6), "2-D"), ((2, 3, 4, 5), "--channel K"), ((1, 2, 3, 4, 5), "5-D")]
)
def test_wrong_dimensions_are_refused(tmp_path, shape, message):
    np.save(tmp_path / "v.npy", np.zeros(shape, np.uint8))
    with pytest.raises(CleftchunkError, match=message):
        open_volume(tmp_path / "v.npy")


def test_unsupported_dtype_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 2, 2), np.complex64))
    with pytest.raises(CleftchunkError, match="complex64"):
        open_volume(tmp_path / "c.npy")


def test_read_only_sources_refuse_write_mode(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(CleftchunkError, match="read-only"):
        open_volume(tmp_path / "v.npy", mode="r+")


def test_volumes_of_every_kind_pickle_and_reopen(tmp_path):
    data = ramp((3, 8, 8))
    np.save(tmp_path / "v.npy", data)
    tifffile.imwrite(tmp_path / "v.tif", data, compression="zlib", photometric="minisblack")
    write_n5(tmp_path / "v.n5", "raw", data, (2, 4, 4))
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = data
    create_volume(tmp_path / "v.zarr" / "raw", data.shape, data.dtype).write(Roi.from_shape(data.shape), data)
    for spec in ("v.npy", "v.tif", "v.n5/raw", "v.h5", "v.zarr/raw"):
        vol = open_volume(tmp_path / spec)
        vol[0:1, 0:1, 0:1]  # opened
        again = pickle.loads(pickle.dumps(vol))
        np.testing.assert_array_equal(again[:, :, :], data)
        np.testing.assert_array_equal(vol.to_dask(chunks=(2, 4, 4)).compute(), data)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CleftchunkError, match="does not exist"):
        open_volume(tmp_path / "nope.h5")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CleftchunkError, match="not a readable HDF5"):
        open_volume(tmp_path / "bad.h5")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CleftchunkError, match="npy"):
        open_volume(tmp_path / "bad.npy")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(CleftchunkError, match="TIFF"):
        open_volume(tmp_path / "bad.tif")
    (tmp_path / "bad.n5").mkdir()
    (tmp_path / "bad.n5" / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    with pytest.raises(CleftchunkError, match="not an N5 dataset"):
        open_volume(tmp_path / "bad.n5")


def test_damaged_frame_metadata_is_an_error_not_an_unknown_voxel_size(tmp_path):
    """An image's level read directly takes its frame from the image group's multiscales: when that
    metadata cannot be read, the voxel size is not silently unknown (1,1,1) but an error naming it."""
    create_volume(tmp_path / "o.zarr" / "raw", (2, 8, 8), "uint8", chunks=(2, 8, 8), voxel_size=(40, 4, 4))
    level = tmp_path / "o.zarr" / "raw" / "s0"
    array_meta = json.loads((level / "zarr.json").read_text())
    array_meta["attributes"] = {}  # as other OME-Zarr writers do: the frame only in the multiscales
    (level / "zarr.json").write_text(json.dumps(array_meta))
    assert open_volume(level).voxel_size == (40.0, 4.0, 4.0)
    group = tmp_path / "o.zarr" / "raw" / "zarr.json"
    meta = json.loads(group.read_text())
    for transform in meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]:
        del transform["type"]  # NGFF requires it
    group.write_text(json.dumps(meta))
    with pytest.raises(CleftchunkError, match="malformed OME multiscales metadata .*repair the metadata"):
        open_volume(level)
    group.write_text("{not json")
    with pytest.raises(CleftchunkError, match=r"o.zarr/raw: unreadable Zarr metadata \(JSONDecodeError"):
        open_volume(level)


def test_a_file_that_cannot_be_read_is_not_called_corrupt(tmp_path, monkeypatch):
    """Permission and memory errors are what they are, not "corrupt or truncated"."""
    np.save(tmp_path / "d.npy", ramp((2, 4, 4)))

    def refuse(error):
        def load(*args, **kwargs):
            raise error
        return load

    monkeypatch.setattr(np, "load", refuse(PermissionError(13, "Permission denied")))
    with pytest.raises(CleftchunkError, match="d.npy: permission denied: give this user read access") as caught:
        open_volume(tmp_path / "d.npy")
    assert "corrupt" not in str(caught.value)
    monkeypatch.setattr(np, "load", refuse(MemoryError()))
    with pytest.raises(MemoryError):
        open_volume(tmp_path / "d.npy")
    monkeypatch.setattr(np, "load", refuse(ValueError("cannot reshape array")))
    with pytest.raises(CleftchunkError, match=r"cannot read .npy array .*d.npy \(ValueError: cannot reshape array\): the file is corrupt or truncated"):
        open_volume(tmp_path / "d.npy")
