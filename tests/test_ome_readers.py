"""cleftchunk's images as other projects read them (issue 15): ome-zarr-py's reader, the
ome-zarr-models NGFF 0.5 schema, and plain zarr-python — for `out.zarr` and `container.zarr/name`."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

DATA = np.random.default_rng(0).integers(0, 256, (6, 64, 48), dtype=np.uint8)
OFFSET = (80.0, 8.0, 12.0)


@pytest.fixture(params=["img.zarr", "container.zarr/img"])
def image(request, tmp_path, run_cli):
    np.save(tmp_path / "src.npy", DATA)
    run_cli(
        "convert", tmp_path / "src.npy", tmp_path / request.param, "--voxel-size", "40,4,4",
        "--offset", ",".join(map(str, OFFSET)), "--levels", "3", "--chunks", "2,32,32", "--no-progress",
    )
    return tmp_path / request.param


def test_ome_zarr_py_reads_axes_scale_translation_and_levels(image):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    location = parse_url(str(image))
    assert location is not None and location.version == "0.5"
    node = next(iter(Reader(location)()))
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    axes = node.metadata["axes"]
    assert [(a["name"], a["type"], a["unit"]) for a in axes] == [(n, "space", "nanometer") for n in "zyx"]
    transforms = node.metadata["coordinateTransformations"]
    assert len(node.data) == len(transforms) == 3
    for level, (data, (scale, translation)) in enumerate(zip(node.data, transforms)):
        factor = (1, 2**level, 2**level)  # the pyramid halves y and x (z is already 10x coarser)
        assert scale == {"type": "scale", "scale": [40.0, 4.0 * factor[1], 4.0 * factor[2]]}
        # A level's first voxel is the mean of `factor` voxels: centred (factor - 1) / 2 voxels later.
        expected = [o + (f - 1) * v / 2 for o, f, v in zip(OFFSET, factor, (40.0, 4.0, 4.0))]
        assert translation == {"type": "translation", "translation": expected}
        assert data.shape == tuple(-(-s // f) for s, f in zip(DATA.shape, factor))
    np.testing.assert_array_equal(np.asarray(node.data[0]), DATA)


def test_ngff_schema_validates(image):
    from ome_zarr_models.v05.image import Image

    parsed = Image.from_zarr(zarr.open_group(str(image), mode="r"))
    datasets = parsed.attributes.ome.multiscales[0].datasets
    assert [d.path for d in datasets] == ["s0", "s1", "s2"]


def test_plain_zarr_python_reads_a_v3_array(image):
    array = zarr.open_array(str(image / "s0"), mode="r")
    assert array.metadata.zarr_format == 3
    assert array.metadata.dimension_names == ("z", "y", "x")
    assert array.chunks == (2, 32, 32) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[...], DATA)
    assert dict(array.attrs)["voxel_size"] == [40.0, 4.0, 4.0] and dict(array.attrs)["offset"] == list(OFFSET)
