"""One label rule: every stage reads a label volume the same way (cleftchunk.labels)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.labels import (
    CREMI_BACKGROUND,
    CREMI_INVALID,
    KIND_ATTRIBUTE,
    SAMPLE_CHUNKS,
    cleft_mask,
    label_codes,
    resolve_kind,
    resolve_label_kind,
)

SHAPE = (8, 32, 32)


def write(path, array, **options):
    volume = create_volume(path, array.shape, array.dtype, chunks=(4, 16, 16), **options)
    volume.write(volume.roi, array)
    return open_volume(path)


@pytest.fixture
def zero_background_clefts(tmp_path):
    """The issue's case: uint64 labels at t.zarr/clefts, 0 = background, 200 voxels of id 5."""
    labels = np.zeros(SHAPE, np.uint64)
    labels[2:4, 5:15, 10:20] = 5  # 2 x 10 x 10 = 200 voxels
    write(tmp_path / "t.zarr/clefts", labels)
    image = np.full(SHAPE, 150, np.uint8)
    image[labels != 0] = 40
    write(tmp_path / "t.zarr/raw", image)
    return tmp_path


def test_every_stage_sees_the_same_200_cleft_voxels(zero_background_clefts, tmp_path):
    from cleftchunk.io.convert import convert, plan_conversion
    from cleftchunk.post.export import export_cremi
    from cleftchunk.post.metrics import evaluate
    from cleftchunk.post.segment import segment
    from cleftchunk.train.data import TrainingVolume, resolve_label_mode

    spec = zero_background_clefts / "t.zarr/clefts"
    labels = open_volume(spec)
    assert resolve_kind(labels) == "main"
    # training
    mode = resolve_label_mode("auto", labels)
    assert int((label_codes(labels[:], mode) & 1).sum()) == 200
    assert TrainingVolume(open_volume(zero_background_clefts / "t.zarr/raw"), labels).label_mode == mode
    # segment
    assert segment(spec, str(tmp_path / "s.zarr/ids")).voxels == 200
    # evaluate: the labels as ground truth, against themselves as a prediction
    metrics = evaluate(spec, spec)
    assert metrics["fn"] == 0 and metrics["fp"] == 0
    assert metrics["inputs"]["gt_kind"] == metrics["inputs"]["pred_kind"] == "main"
    # export to CREMI ids
    export_cremi(spec, tmp_path / "e.hdf")
    with h5py.File(tmp_path / "e.hdf", "r") as f:
        assert int((f["volumes/labels/clefts"][:] != CREMI_BACKGROUND).sum()) == 200
    # convert --mask, and a plain convert records the kind
    convert(plan_conversion(str(spec), str(tmp_path / "c.zarr/mask"), mask=True))
    assert int(open_volume(tmp_path / "c.zarr/mask")[:].sum()) == 200
    convert(plan_conversion(str(spec), str(tmp_path / "c.zarr/copy")))
    assert open_volume(tmp_path / "c.zarr/copy").attrs[KIND_ATTRIBUTE] == "main"


def test_cremi_ids_with_background_are_ids_and_zero_is_a_cleft(tmp_path):
    labels = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    labels[1, 2:4, 2:4] = 0  # id 0 is a valid CREMI cleft id
    labels[3, 5, 5] = CREMI_INVALID
    volume = write(tmp_path / "x.zarr/anything", labels)
    assert resolve_kind(volume) == "ids"
    assert int(cleft_mask(labels, "ids").sum()) == 5
    codes = label_codes(labels, "ids")
    assert int((codes & 1).sum()) == 4 and int((codes & 2).sum()) == 2


def test_undecidable_uint64_labels_are_an_error_that_names_the_override(tmp_path):
    labels = np.full(SHAPE, 7, np.uint64)  # neither 0 nor 0xFF..FF anywhere
    volume = write(tmp_path / "x.zarr/clefts", labels)
    with pytest.raises(CleftchunkError, match="--kind ids"):
        resolve_kind(volume)
    assert resolve_kind(volume, "zero-background") == "main"  # the override decides
    assert resolve_kind(volume, "cremi") == "ids"


def test_a_stated_kind_wins_over_the_values(tmp_path):
    labels = np.zeros(SHAPE, np.uint64)  # would be read as 0-background
    volume = write(tmp_path / "x.zarr/clefts", labels, attrs={KIND_ATTRIBUTE: "ids"})
    assert resolve_kind(volume) == "ids"


def test_images_and_neuron_ids_are_refused_as_labels(tmp_path):
    from cleftchunk.synth import synthesize

    synthesize(tmp_path / "s.zarr", (8, 64, 64), seed=0)
    for name, what in (("raw", "EM image"), ("neuron_ids", "neuron ids")):
        with pytest.raises(CleftchunkError, match=what):
            resolve_label_kind(open_volume(tmp_path / f"s.zarr/{name}"))
    assert resolve_label_kind(open_volume(tmp_path / "s.zarr/clefts")) == "ids"


def test_tutorial_main_datasets_are_zero_background_whatever_their_dtype(tmp_path):
    path = tmp_path / "syn.h5"
    with h5py.File(path, "w") as f:
        f["main"] = np.zeros(SHAPE, np.uint64)
        f["main"][1, 1, 1] = 3
    volume = open_volume(f"{path}:main", voxel_size=(40, 4, 4))
    assert resolve_kind(volume) == "main"


def test_uint8_masks_and_probabilities_are_told_apart_by_their_values(tmp_path):
    mask = np.zeros(SHAPE, np.uint8)
    mask[1, 1, 1] = 1
    prob = mask * 200
    assert resolve_kind(write(tmp_path / "m.zarr/m", mask)) == "mask"
    assert resolve_kind(write(tmp_path / "p.zarr/p", prob)) == "prob"
    assert int(cleft_mask(prob, "prob").sum()) == 1


def test_an_unknown_kind_lists_the_valid_ones():
    with pytest.raises(CleftchunkError, match="use one of auto, ids, main, mask, prob"):
        resolve_kind(np.zeros(SHAPE, np.uint8), "clefts")


# -- deciding a kind reads a bounded number of chunks, and a dry run reads none -----------------------
class CountingReads:
    """A volume that counts the voxels read from it."""

    def __init__(self, data, chunks):
        self.data, self.chunks, self.read = data, chunks, 0
        self.shape, self.dtype, self.attrs, self.spec = data.shape, data.dtype, {}, "counting"

    def __getitem__(self, box):
        out = self.data[box]
        self.read += out.size
        return out


def test_a_large_volume_is_told_from_sampled_chunks_not_read_whole():
    data = np.zeros((64, 64, 64), np.uint8)  # 512 chunks of 4 x 8 x 8
    data[::2, ::2, ::2] = 200  # probabilities wherever one looks
    volume = CountingReads(data, (4, 8, 8))
    assert resolve_kind(volume) == "prob"
    assert volume.read == SAMPLE_CHUNKS * 4 * 8 * 8  # 64 chunks of 512, not 262144 voxels
    mask = CountingReads((data > 0).astype(np.uint8), (4, 8, 8))
    assert resolve_kind(mask) == "mask" and mask.read == volume.read
    floats = CountingReads(data.astype(np.float32) / 255, (4, 8, 8))
    assert resolve_kind(floats) == "prob" and floats.read == volume.read


def test_a_small_volume_is_read_whole_so_one_voxel_decides():
    data = np.zeros((8, 16, 16), np.uint8)  # 8 chunks: all of them are read
    data[7, 15, 15] = 200
    volume = CountingReads(data, (4, 8, 8))
    assert resolve_kind(volume) == "prob" and volume.read == data.size


def test_sampled_chunks_holding_only_zeros_are_an_error_that_names_the_override():
    data = np.zeros((64, 64, 64), np.uint8)
    with pytest.raises(CleftchunkError, match="--kind mask .* --kind prob"):
        resolve_kind(CountingReads(data, (4, 8, 8)))
    assert resolve_kind(CountingReads(data[:8, :16, :16], (4, 8, 8))) == "mask"  # read whole: all 0 is a mask
    assert resolve_kind(CountingReads(data, (4, 8, 8)), "prob") == "prob"


def test_a_dry_run_reads_no_voxel_to_decide_a_kind():
    for dtype in (np.uint8, np.float32, np.uint64):
        volume = CountingReads(np.zeros((64, 64, 64), dtype), (4, 8, 8))
        assert resolve_kind(volume, read=False) is None and volume.read == 0, dtype
    assert resolve_kind(CountingReads(np.zeros((4, 4, 4), np.uint16), (4, 4, 4)), read=False) == "main"
    with pytest.raises(CleftchunkError, match="int16"):
        resolve_kind(CountingReads(np.zeros((4, 4, 4), np.int16), (4, 4, 4)), read=False)


def test_a_float_volume_with_nan_is_not_probabilities():
    data = np.full((8, 16, 16), 0.5, np.float32)
    data[3, 3, 3] = np.nan
    with pytest.raises(CleftchunkError, match="nan"):
        resolve_kind(CountingReads(data, (4, 8, 8)))


@pytest.fixture
def virtual_tb(tmp_path):
    """A 1 TB uint8 Zarr array with no chunk stored (every voxel is the fill value) and no metadata."""
    import zarr

    zarr.create_array(str(tmp_path / "tb.zarr"), shape=(1000, 32768, 32768), chunks=(16, 256, 256), dtype="uint8", fill_value=0)
    return tmp_path / "tb.zarr"


@pytest.mark.timeout(60)
def test_segment_dry_run_of_a_virtual_terabyte_returns_at_once_and_creates_nothing(virtual_tb, tmp_path, run_cli):
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("segment", virtual_tb, "-o", tmp_path / "out/s.zarr/ids", "--dry-run")
    assert "plan: segment" in result.output and "nothing was run" in result.output
    assert "input kind: decided when run" in result.output
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.timeout(60)
def test_evaluate_dry_run_of_a_virtual_terabyte_returns_at_once_and_creates_nothing(virtual_tb, tmp_path, run_cli):
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("evaluate", virtual_tb, virtual_tb, "--voxel-size", "40,4,4", "--json", tmp_path / "m.json", "--dry-run")
    assert "plan: evaluate" in result.output and "nothing was run" in result.output
    assert "prediction decided when run" in result.output
    assert sorted(tmp_path.rglob("*")) == before
