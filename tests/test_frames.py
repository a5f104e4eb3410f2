"""cleftchunk.frames: the one rule for volumes used together, and what follows from it."""

from __future__ import annotations

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.frames import Alignment, Cropped, Frame, align, crop, paired
from cleftchunk.geometry import Roi
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.labels import CREMI_BACKGROUND

VS = (40.0, 4.0, 4.0)


def frame(offset=(0, 0, 0), shape=(4, 32, 32), vs=VS, name="v", known=True):
    return Frame(vs, offset, shape, name, known)


# -- align --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["same", "cover", "overlap"])
def test_one_frame_is_voxel_for_voxel_in_every_mode(mode):
    got = align(frame(name="a"), frame(name="b"), mode=mode)
    assert got == Alignment(Roi.from_shape((4, 32, 32)), Roi.from_shape((4, 32, 32))) and got.whole


@pytest.mark.parametrize("mode", ["same", "cover", "overlap"])
def test_different_voxel_sizes_are_refused_naming_both_and_the_fixes(mode):
    with pytest.raises(CleftchunkError, match=r"voxel sizes differ: a has voxel size \(40.0, 4.0, 4.0\) nm, b \(40.0, 8.0, 8.0\) nm: .*--ignore-frame"):
        align(frame(name="a"), frame(vs=(40, 8, 8), name="b"), mode=mode)


@pytest.mark.parametrize("mode", ["same", "cover", "overlap"])
def test_offsets_a_fraction_of_a_voxel_apart_are_refused(mode):
    with pytest.raises(CleftchunkError, match="fraction of a voxel"):
        align(frame(name="a"), frame(offset=(0, 0, 2), name="b"), mode=mode)


def test_overlap_places_by_offsets_and_says_which_part_in_one_line():
    a, b = frame(name="image"), frame(offset=(40, 0, 40), name="labels")  # one section, 10 voxels along x
    got = align(a, b, mode="overlap")
    assert got.a == Roi((1, 0, 10), (3, 32, 22)) and got.b == Roi((0, 0, 0), (3, 32, 22))
    assert got.note == "placed by their offsets: using image [1:4,0:32,10:32] with labels [0:3,0:32,0:22]"
    assert "\n" not in got.note


def test_a_negative_difference_places_the_other_way():
    got = align(frame(offset=(0, 0, 40), name="a"), frame(name="b"), mode="overlap")
    assert got.a == Roi((0, 0, 0), (4, 32, 22)) and got.b == Roi((0, 0, 10), (4, 32, 22))


def test_400_nm_apart_do_not_overlap_and_are_refused():
    with pytest.raises(CleftchunkError, match=r"offsets differ: a .* does not overlap b .*--ignore-frame"):
        align(frame(name="a"), frame(offset=(0, 0, 400), name="b"), mode="overlap")


def test_cover_crops_the_first_to_the_second_and_refuses_a_part():
    big, small = frame(shape=(8, 64, 64), name="pred"), frame(offset=(80, 40, 16), shape=(2, 8, 8), name="gt")
    got = align(big, small, mode="cover")
    assert got.a == Roi((2, 10, 4), (2, 8, 8)) and got.b == Roi.from_shape((2, 8, 8)) and got.note
    with pytest.raises(CleftchunkError, match="shapes differ: .* does not cover"):
        align(small, big, mode="cover")
    with pytest.raises(CleftchunkError, match="offsets differ: .* does not cover"):  # same shape, shifted: not scored as aligned
        align(frame(name="pred"), frame(offset=(0, 0, 400), name="gt"), mode="cover")


def test_other_shapes_at_one_offset_are_refused_where_the_offsets_must_place_them():
    big, small = frame(shape=(8, 64, 64), name="pred"), frame(shape=(2, 8, 8), name="gt")
    assert align(big, small, mode="cover").a == Roi.from_shape((2, 8, 8))  # a mask may start where the input does
    with pytest.raises(CleftchunkError, match="same offset, which places neither inside the other: record it, or pass --ignore-frame"):
        align(big, small, mode="cover", placed="record it")
    assert align(big, frame(offset=(40, 0, 0), shape=(2, 8, 8)), mode="cover", placed="record it").a == Roi((1, 0, 0), (2, 8, 8))


def test_same_refuses_any_shift_or_other_shape():
    with pytest.raises(CleftchunkError, match="offsets differ: .* do not cover the same region"):
        align(frame(), frame(offset=(40, 0, 0)))
    with pytest.raises(CleftchunkError, match="shapes differ"):
        align(frame(), frame(shape=(4, 32, 16)))


def test_ignore_uses_first_voxels_whatever_the_metadata():
    shifted = frame(offset=(0, 0, 400), vs=(40, 8, 8), name="b")
    assert align(frame(name="a"), shifted, ignore=True).whole
    with pytest.raises(CleftchunkError, match="shapes differ.*--ignore-frame"):
        align(frame(name="a"), frame(shape=(4, 32, 16), vs=(40, 8, 8)), ignore=True)
    part = align(frame(name="a"), frame(shape=(4, 32, 16), vs=(40, 8, 8), name="b"), ignore=True, mode="overlap")
    assert part.a == part.b == Roi.from_shape((4, 32, 16)) and "--ignore-frame" in part.note
    with pytest.raises(CleftchunkError, match="smaller"):
        align(frame(shape=(4, 32, 16)), frame(), ignore=True, mode="cover")


def test_a_volume_without_a_voxel_size_is_voxel_for_voxel_and_needs_the_shape():
    unknown = frame(vs=(1, 1, 1), name="x.npy", known=False)
    assert align(frame(offset=(400, 0, 0)), unknown, mode="overlap").whole
    with pytest.raises(CleftchunkError, match="x.npy records no voxel size"):
        align(frame(shape=(4, 32, 16)), unknown, mode="overlap")


def test_other_dimensionality_and_modes_are_refused():
    with pytest.raises(CleftchunkError, match="axes"):
        align(frame(), Frame((4, 4), (0, 0), (32, 32)))
    with pytest.raises(ValueError):
        align(frame(), frame(), mode="nearest")
    with pytest.raises(ValueError):
        Frame((40, 4, 4), (0, 0), (1, 2, 3))


def test_frame_of_a_volume_and_its_description(tmp_path):
    volume = create_volume(tmp_path / "v.zarr/raw", (4, 8, 8), "uint8", chunks=(2, 8, 8), offset_nm=(80, 8, 12))
    f = Frame.of(volume, "raw")
    assert (f.voxel_size, f.offset_nm, f.shape, f.known) == (VS, (80.0, 8.0, 12.0), (4, 8, 8), True)
    assert f.end_nm == (240.0, 40.0, 44.0) and f.extent() == "(80, 8, 12) nm to (240, 40, 44) nm"
    assert str(f) == "raw (shape (4, 8, 8), voxel size (40.0, 4.0, 4.0) nm, offset (80.0, 8.0, 12.0) nm)"
    assert Frame.of(volume, voxel_size=(10, 1, 1)).voxel_size == (10.0, 1.0, 1.0)
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), np.uint8))
    assert not Frame.of(open_volume(tmp_path / "x.npy")).known


# -- crops ---------------------------------------------------------------------------------------
def test_cropped_reads_the_box_like_numpy():
    data = np.arange(4 * 6 * 8).reshape(4, 6, 8)
    view = crop(data, Roi((1, 2, 3), (2, 3, 4)))
    assert isinstance(view, Cropped) and view.shape == (2, 3, 4) and view.dtype == data.dtype
    part = data[1:3, 2:5, 3:7]
    np.testing.assert_array_equal(view[:, :, :], part)
    np.testing.assert_array_equal(view[0:1, 1:, :-1], part[0:1, 1:, :-1])
    np.testing.assert_array_equal(view[1], part[1])
    np.testing.assert_array_equal(view[-1, 0], part[-1, 0])
    np.testing.assert_array_equal(view[0:99], part)  # clipped to the box, not to the array
    with pytest.raises(IndexError):
        view[2]
    with pytest.raises(IndexError):
        view[::2]
    np.testing.assert_array_equal(view[..., 1], part[..., 1])
    assert crop(data, Roi.from_shape(data.shape)) is data


def test_cropped_pickles_and_keeps_the_volume_attributes(tmp_path):
    import pickle

    volume = create_volume(tmp_path / "v.zarr/raw", (4, 8, 8), "uint8", chunks=(2, 8, 8), attrs={"cleft_kind": "image"})
    volume.array[...] = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    view = pickle.loads(pickle.dumps(Cropped(volume, Roi((1, 2, 0), (2, 4, 8)))))
    assert view.attrs["cleft_kind"] == "image" and view.chunks == (2, 8, 8) and view.shape == (2, 4, 8)
    np.testing.assert_array_equal(view[:], volume[1:3, 2:6, :])


def test_paired_crops_image_and_labels_to_their_overlap_and_logs_it(tmp_path):
    image = create_volume(tmp_path / "v.zarr/raw", (4, 8, 8), "uint8", chunks=(2, 8, 8))
    image.array[...] = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    labels = create_volume(tmp_path / "v.zarr/clefts", (4, 8, 8), "uint64", chunks=(2, 8, 8), offset_nm=(40, 0, 8),
                           fill_value=int(CREMI_BACKGROUND))
    lines = []
    a, b = paired(image, labels, log=lines.append)
    assert a.shape == b.shape == (3, 8, 6)
    np.testing.assert_array_equal(a[:], image[1:4, :, 2:8])
    assert len(lines) == 1 and lines[0].startswith("placed by their offsets: using image ")
    same_a, same_b = paired(image, image, log=lines.append)
    assert same_a is image and same_b is image and len(lines) == 1
