"""Sampling that never reads what it does not need (issue 24, items 2 and 3): cleft tables stored
beside the labels, computed block-wise and resumably; crops only from annotated space; a
terabyte volume with a few annotated cubes starts in seconds; S3 training volumes."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.io.tables import NOT_ANNOTATED, CleftCounts, cleft_table, count_in_memory, load_table, stored_unit_indices, table_spec
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.run.executor import BLOCK_DONE_HOOKS
from cleftchunk.run.options import RunOptions
from cleftchunk.train.augment import AugmentConfig
from cleftchunk.train.data import CropSampler, RejectionConfig, TrainingVolume
from cleftchunk.train.config import TrainConfig
from cleftchunk.train.sampling import CleftIndex, parse_train_rois

OUT = (4, 64, 64)
CHUNKS = (8, 64, 64)
#: A virtual terabyte: 4096 × 16384 × 16384 uint8 voxels, 1 MiB chunks (1,048,576 of them).
TB_SHAPE = (4096, 16384, 16384)
TB_CHUNKS = (16, 256, 256)
CUBES = [Roi((1024, 4096, 4096), (32, 512, 512)), Roi((3008, 12288, 512), (32, 512, 512))]


def blobs(shape, seed=0, clefts=12):
    """uint8 0/1 labels with a few cleft blobs."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for _ in range(clefts):
        z, y, x = (int(rng.integers(0, s - 4)) for s in (shape[0], shape[1] - 8, shape[2] - 8))
        out[z : z + 2, y : y + 8, x : x + 8] = 1
    return out


def zarr_labels(path, data, chunks=CHUNKS):
    volume = create_volume(str(path), data.shape, data.dtype, chunks=chunks, voxel_size=(40, 4, 4), attrs={"cleft_kind": "mask"})
    volume.write(Roi.from_shape(data.shape), data)
    return open_volume(str(path))


# -- the table ---------------------------------------------------------------------------------------
def test_table_counts_equal_an_in_memory_count_and_are_stored_beside_the_labels(tmp_path):
    data = blobs((32, 192, 128))
    labels = zarr_labels(tmp_path / "l.zarr/clefts", data)
    table = cleft_table(labels, "nonzero", CHUNKS, annotated="whole")
    assert table_spec(labels).endswith("clefts/s0_cleft_counts")
    expected = count_in_memory(data, "nonzero", CHUNKS)
    assert np.array_equal(table.counts, expected.counts) and table.clefts == int(data.sum())
    # reused: a second run reads it, counting nothing
    before = (tmp_path / "l.zarr/clefts/s0_cleft_counts").stat().st_mtime_ns
    assert np.array_equal(cleft_table(labels, "nonzero", CHUNKS, annotated="whole").counts, table.counts)
    assert (tmp_path / "l.zarr/clefts/s0_cleft_counts").stat().st_mtime_ns == before


def test_stored_annotation_is_found_by_listing_and_unwritten_chunks_are_not_annotated(tmp_path):
    labels = create_volume(str(tmp_path / "l.zarr/clefts"), (64, 256, 256), np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    cube = Roi((8, 64, 0), (16, 128, 64))
    data = np.zeros(cube.shape, np.uint8)
    data[::8, ::64, 5] = 1  # a cleft voxel in each chunk: Zarr stores no chunk that is all fill value
    labels.write(cube, data)
    labels = open_volume(str(tmp_path / "l.zarr/clefts"))
    assert stored_unit_indices(labels.array) == [(1, 1, 0), (1, 2, 0), (2, 1, 0), (2, 2, 0)]
    table = cleft_table(labels, "nonzero", CHUNKS)  # auto: another tool's labels -> stored
    annotated = {tuple(int(i) for i in ix) for ix in zip(*np.nonzero(table.counts != NOT_ANNOTATED))}
    assert annotated == {(1, 1, 0), (1, 2, 0), (2, 1, 0), (2, 2, 0)}
    assert table.clefts == int(np.asarray(labels[cube.to_slices()]).sum())


def test_counting_resumes_after_an_interruption_to_the_same_table(tmp_path):
    data = blobs((64, 256, 256), clefts=30)
    labels = zarr_labels(tmp_path / "l.zarr/clefts", data)
    op = CleftCounts(labels, "main", "whole")
    op.table_chunks = (1, 1, 2)  # several blocks, so that the run can stop after the first

    class Stop(Exception):
        pass

    def stop(task, block, report):
        raise Stop

    from cleftchunk.run.operation import run_operation

    BLOCK_DONE_HOOKS.append(stop)
    try:
        with pytest.raises(Stop):
            run_operation(op, RunOptions(threads=1))
    finally:
        BLOCK_DONE_HOOKS.remove(stop)
    assert not op.read_state()["complete"]
    report = run_operation(op, RunOptions(threads=1))
    assert report.already_done >= 1 and op.read_state()["complete"]
    assert np.array_equal(load_table(op.output, data.shape).counts, count_in_memory(data, "main", CHUNKS).counts)


def test_convert_and_segment_write_the_table_of_the_labels_they_write(tmp_path, run_cli):
    data = blobs((16, 128, 128), clefts=6)
    np.save(tmp_path / "clefts.npy", data)
    run_cli("convert", tmp_path / "clefts.npy", tmp_path / "out.zarr/clefts", "--voxel-size", "40,4,4", "--chunks", "8,64,64", "--mask", "--no-progress")
    labels = open_volume(str(tmp_path / "out.zarr/clefts"))
    table = load_table(table_spec(labels), labels.shape)
    assert table.everywhere and table.clefts == int(data.sum())
    # training finds that table (its label mode is another name for the same rule) and counts nothing
    stamp = sorted(p.stat().st_mtime_ns for p in (tmp_path / "out.zarr/clefts/s0_cleft_counts").rglob("*"))
    mode = TrainingVolume(np.zeros(labels.shape, np.uint8), labels).label_mode
    assert cleft_table(labels, mode, CHUNKS).clefts == int(data.sum())
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "out.zarr/clefts/s0_cleft_counts").rglob("*")) == stamp
    run_cli("segment", tmp_path / "out.zarr/clefts", "-o", tmp_path / "out.zarr/ids", "--no-progress")
    ids = open_volume(str(tmp_path / "out.zarr/ids"))
    assert load_table(table_spec(ids), ids.shape).clefts == int(data.sum())


# -- annotated space -----------------------------------------------------------------------------------
def test_train_roi_parsing_names_the_volume_and_refuses_bad_boxes():
    shapes = [(32, 256, 256), (16, 128, 128)]
    regions = parse_train_rois(["0:16,0:128,0:128", "1=0:8,:,64:"], shapes)
    assert regions[0] == [Roi((0, 0, 0), (16, 128, 128))] and regions[1] == [Roi((0, 0, 64), (8, 128, 64))]
    for bad, words in [("2=0:8,0:8,0:8", "names volume 2"), ("0:8,0:8", "z0:z1"), ("x=0:8,0:8,0:8", "position"),
                       ("100:200,0:8,0:8", "outside")]:
        with pytest.raises(CleftchunkError, match=words):
            parse_train_rois([bad], shapes)


def test_crops_come_only_from_the_regions_and_outside_voxels_are_invalid():
    image = np.zeros((32, 256, 256), np.uint8)
    labels = np.ones((32, 256, 256), np.uint8)
    region = Roi((8, 64, 64), (8, 96, 96))
    sampler = CropSampler([TrainingVolume(image, labels)], OUT, AugmentConfig.off(), RejectionConfig(keep_p=1.0, near_cleft=0.0),
                          regions=[[region]])
    for seed in range(40):
        s = sampler.sample(np.random.default_rng(seed))
        assert region.contains(Roi(s["offset"], OUT))
    # a region smaller than the crop: the crop covers it, and the voxels outside it are masked
    small = Roi((10, 100, 100), (4, 16, 16))
    sampler = CropSampler([TrainingVolume(image, labels)], OUT, AugmentConfig.off(), RejectionConfig(keep_p=1.0, near_cleft=0.0),
                          regions=[[small]])
    s = sampler.sample(np.random.default_rng(0))
    assert Roi(s["offset"], OUT).contains(small) and s["mask"].sum() == small.size == s["label"].sum()


def test_default_sampling_keeps_a_crop_in_at_most_1_2_tries():
    image = np.zeros((32, 512, 512), np.uint8)
    labels = blobs((32, 512, 512), clefts=10)
    rejection = RejectionConfig.from_dict(TrainConfig.from_dict({}).rejection)  # what `cleftchunk train` uses
    sampler = CropSampler([TrainingVolume(image, labels)], OUT, AugmentConfig.off(), rejection)
    tries = [sampler.sample(np.random.default_rng(seed))["tries"] for seed in range(200)]
    assert np.mean(tries) <= 1.2, np.mean(tries)


def test_known_empty_candidates_are_not_read_and_the_stream_is_unchanged():
    image = np.zeros((32, 512, 512), np.uint8)
    labels = blobs((32, 512, 512), clefts=4)
    volume = TrainingVolume(image, labels)
    table = count_in_memory(labels, "nonzero", (16, 256, 256))
    with_table = CropSampler([volume], OUT, AugmentConfig.off(), RejectionConfig(near_cleft=0.0), tables=[table], cache_mb=0)
    without = CropSampler([volume], OUT, AugmentConfig.off(), RejectionConfig(near_cleft=0.0), cache_mb=0)
    for seed in range(20):
        a, b = with_table.sample(np.random.default_rng(seed)), without.sample(np.random.default_rng(seed))
        assert a["offset"] == b["offset"] and a["tries"] == b["tries"] and np.array_equal(a["label"], b["label"])



def test_a_cleft_draw_sees_each_cleft_about_as_often_and_a_voxel_draw_sees_the_large_one():
    """One large cleft (4,096 voxels) and three small ones (32 voxels) in cells of their own: drawn
    by voxel the large one centres ~97 % of the crops, drawn by cleft a third (its cell's share)."""
    labels = np.zeros((16, 128, 128), np.uint8)
    labels[2:6, 8:40, 8:40] = 1  # large, cell (0, 0)
    labels[9:11, 10:14, 80:84] = 1  # small, cell (0, 1)
    labels[2:4, 80:84, 10:14] = 1  # two small clefts apart in cell (1, 0): pieces of one cell
    labels[12:14, 120:124, 60:64] = 1
    table = count_in_memory(labels, "nonzero", (16, 64, 64))
    size = ndimage_sizes(labels)
    for by, large_share in (("voxel", (0.93, 1.0)), ("cleft", (0.2, 0.45))):
        index = CleftIndex([table], by)
        rng = np.random.default_rng(0)
        drawn = [index.draw(rng, [labels]) for _ in range(2000)]
        assert all(labels[voxel] == 1 for _, voxel in drawn)
        hits = np.bincount([size[voxel] for _, voxel in drawn], minlength=size.max() + 1)
        share = hits[4096] / len(drawn)
        assert large_share[0] <= share <= large_share[1], (by, share)
    # by cleft: each cell with clefts a third of the draws, whatever its count; cell (1, 1) has none
    index = CleftIndex([table], "cleft")
    rng = np.random.default_rng(1)
    cells = np.bincount([int(v[1] >= 64) * 2 + int(v[2] >= 64) for _, v in (index.draw(rng, [labels]) for _ in range(3000))], minlength=4)
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in cells[[0, 1, 2]]) and cells[3] == 0, cells
    with pytest.raises(CleftchunkError, match="near_cleft_by='instance' is unknown: use voxel or cleft"):
        RejectionConfig.from_dict({"near_cleft_by": "instance"})


def ndimage_sizes(labels):
    """Per voxel, the size of the 26-connected cleft it belongs to (0 off clefts)."""
    from scipy import ndimage

    pieces, _ = ndimage.label(labels, structure=np.ones((3, 3, 3), bool))
    counts = np.bincount(pieces.ravel())
    counts[0] = 0
    return counts[pieces]


# -- a virtual terabyte ------------------------------------------------------------------------------------
def virtual_terabyte(tmp_path):
    """A 1 TB image and label volume; only two cubes of labels are written (by "another tool")."""
    image = create_volume(str(tmp_path / "tb.zarr/raw"), TB_SHAPE, np.uint8, chunks=TB_CHUNKS, voxel_size=(40, 4, 4))
    labels = create_volume(str(tmp_path / "tb.zarr/clefts"), TB_SHAPE, np.uint8, chunks=TB_CHUNKS, voxel_size=(40, 4, 4))
    for cube in CUBES:
        labels.write(cube, blobs(cube.shape, seed=cube.offset[0], clefts=40))
        image.write(cube, np.random.default_rng(cube.offset[0]).integers(0, 256, cube.shape, dtype=np.uint8))
    return str(tmp_path / "tb.zarr/raw"), str(tmp_path / "tb.zarr/clefts")


@pytest.mark.parametrize("near_cleft_by", ["voxel", "cleft"])
def test_a_terabyte_volume_with_a_few_cubes_starts_in_seconds_and_draws_only_inside_them(tmp_path, near_cleft_by):
    image, labels = virtual_terabyte(tmp_path)
    start = time.perf_counter()
    volume = TrainingVolume(open_volume(image), open_volume(labels), "nonzero")
    table = cleft_table(volume.labels, volume.label_mode, TB_CHUNKS)
    rejection = RejectionConfig.from_dict({**TrainConfig.from_dict({}).rejection, "near_cleft_by": near_cleft_by})
    sampler = CropSampler([volume], (8, 128, 128), AugmentConfig(), rejection, tables=[table], cache_mb=64)
    samples = [sampler.sample(np.random.default_rng(seed)) for seed in range(16)]
    elapsed = time.perf_counter() - start
    assert elapsed < 30, elapsed
    for s in samples:
        crop = Roi(s["offset"], (8, 128, 128))
        assert any(cube.contains(crop) for cube in CUBES), crop
        assert s["mask"].sum() > 0
    assert np.mean([s["tries"] for s in samples]) <= 1.5
    assert sampler.cache.hits + sampler.cache.misses > 0


@pytest.mark.slow
def test_training_on_a_terabyte_volume_takes_its_first_steps_from_the_cubes(tmp_path):
    from cleftchunk.train import train

    image, labels = virtual_terabyte(tmp_path)
    start = time.perf_counter()
    train({"images": [image], "labels": [labels], "output": str(tmp_path / "run"), "log_dir": str(tmp_path / "tb"),
           "iteration_total": 2, "iteration_save": 2, "input_size": [4, 64, 64], "batch_size": 2, "preset": "small",
           "loader_workers": 0, "progress": False, "image_every": 0, "label_mode": "nonzero"})
    assert time.perf_counter() - start < 120
    assert (tmp_path / "tb.zarr/clefts/s0_cleft_counts").exists()


# -- S3 --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_volumes_on_s3_are_sampled_and_get_their_table(tmp_path):
    pytest.importorskip("moto", reason="the S3 test server needs moto")
    import s3fs

    from s3_server import s3_server

    with s3_server():
        s3fs.S3FileSystem().mkdir("train")
        data = blobs((16, 128, 128), clefts=8)
        raw = create_volume("s3://train/v.zarr/raw", data.shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
        raw.write(Roi.from_shape(data.shape), (data * 200).astype(np.uint8))
        lab = create_volume("s3://train/v.zarr/clefts", data.shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
        lab.write(Roi((0, 0, 0), (8, 128, 128)), data[:8])  # half the volume annotated
        volume = TrainingVolume(open_volume("s3://train/v.zarr/raw"), open_volume("s3://train/v.zarr/clefts"), "nonzero")
        table = cleft_table(volume.labels, "nonzero", CHUNKS)
        assert s3fs.S3FileSystem().exists("train/v.zarr/clefts/s0_cleft_counts/zarr.json")
        assert table.clefts == int(data[:8].sum()) and (table.counts[1] == NOT_ANNOTATED).all()
        sampler = CropSampler([volume], OUT, AugmentConfig.off(), tables=[table]).reopen()
        for seed in range(6):
            s = sampler.sample(np.random.default_rng(seed))
            assert s["offset"][0] + OUT[0] <= 8
        # a training run whose spawned loader worker opens the bucket itself
        from cleftchunk.train import train

        last = train({"images": ["s3://train/v.zarr/raw"], "labels": ["s3://train/v.zarr/clefts"], "output": str(tmp_path / "run"),
                      "log_dir": str(tmp_path / "tb"), "iteration_total": 2, "iteration_save": 2, "input_size": [4, 64, 64],
                      "batch_size": 2, "preset": "small", "loader_workers": 1, "progress": False, "image_every": 0})
        assert last.is_file()


# -- the stream: exact whatever the workers, resumable by index ------------------------------------
def test_a_stream_from_tables_is_the_same_for_any_number_of_workers_and_resumes_by_index(tmp_path):
    from test_data import take

    from cleftchunk.train.data import CropStream

    shape = (32, 256, 256)
    image = create_volume(str(tmp_path / "d.zarr/raw"), shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    image.write(image.roi, np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
    labels = create_volume(str(tmp_path / "d.zarr/clefts"), shape, np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    cube = Roi((8, 0, 64), (16, 192, 128))
    data = blobs(cube.shape, clefts=20)
    data[::8, ::64, ::64] = 1  # every chunk of the cube is stored (Zarr keeps no chunk of fill value only)
    labels.write(cube, data)
    volume = TrainingVolume(open_volume(str(tmp_path / "d.zarr/raw")), open_volume(str(tmp_path / "d.zarr/clefts")), "nonzero")
    table = cleft_table(volume.labels, "nonzero", CHUNKS)
    rejection = RejectionConfig.from_dict(TrainConfig.from_dict({}).rejection)
    sampler = CropSampler([volume], OUT, AugmentConfig(), rejection, tables=[table], cache_mb=16)
    in_process = take(CropStream(sampler, batch_size=2, seed=5), 4, workers=0)
    two_workers = take(CropStream(sampler, batch_size=2, seed=5), 4, workers=2)
    resumed = take(CropStream(sampler, batch_size=2, seed=5, start=2), 2, workers=0)
    for a, b in itertools.chain(zip(in_process, two_workers), zip(in_process[2:], resumed)):
        for key in ("image", "label", "mask", "tries"):
            assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    # every voxel a crop learns from lies in the written cube (the rest is masked out)
    for batch in in_process:
        assert float(batch["mask"].sum()) > 0
    hits, misses, held = (int(v) for v in in_process[-1]["cache"])
    assert hits > 0 and misses > 0 and 0 < held <= 16 * 2**20


def test_train_takes_train_roi_regions_from_the_command_line(tmp_path, run_cli):
    from cleftchunk.train.config import resolve_config

    config = resolve_config({"train_roi": ("0:8,0:64,0:64", "1=0:4,:,:")})
    assert config.train_roi == ["0:8,0:64,0:64", "1=0:4,:,:"]
    with pytest.raises(CleftchunkError, match="annotated"):
        TrainConfig.from_dict({"annotated": "everything"})
    result = run_cli("train", "--help")
    assert "--train-roi" in result.output


def test_labels_on_a_store_that_cannot_be_written_are_counted_for_the_run_only(tmp_path, monkeypatch, capsys):
    import cleftchunk.io.tables as tables

    labels = create_volume(str(tmp_path / "l.zarr/clefts"), (32, 128, 128), np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    data = blobs((16, 64, 64), clefts=5)
    data[::8, ::64, ::64] = 1
    labels.write(Roi((8, 64, 0), data.shape), data)
    labels = open_volume(str(tmp_path / "l.zarr/clefts"))
    monkeypatch.setattr(tables, "writable_beside", lambda volume: False)  # root may write anywhere: say read-only
    table = cleft_table(labels, "nonzero", CHUNKS)
    assert not (tmp_path / "l.zarr/clefts/s0_cleft_counts").exists() and "not stored" in capsys.readouterr().err
    assert table.clefts == int(data.sum()) and int((table.counts >= 0).sum()) == 2  # the 2 chunks written


def test_labels_any_cleftchunk_stage_wrote_are_annotated_whole(tmp_path, run_cli):
    """synth stores no chunk of background only; its labels are annotated everywhere all the same."""
    from cleftchunk.io.tables import resolve_annotated

    run_cli("synth", tmp_path / "s.zarr", "--shape", "16,128,128", "--chunks", "8,64,64", "--no-progress")
    labels = open_volume(str(tmp_path / "s.zarr/clefts"))
    assert resolve_annotated(labels, "auto") == "whole"
    assert cleft_table(labels, "cremi", CHUNKS).everywhere


def test_voxels_outside_annotated_cells_read_as_invalid():
    from cleftchunk.io.tables import CleftTable
    from cleftchunk.labels import INVALID_BIT
    from cleftchunk.train.sampling import AnnotatedCodes, Space

    counts = np.full((4, 4, 4), NOT_ANNOTATED, np.int64)
    counts[1:3, 1:3, 1] = 5
    table = CleftTable(counts, (4, 8, 8), (16, 32, 30))  # the last cells are cut by the volume's end
    reference = np.repeat(np.repeat(np.repeat(counts >= 0, 4, 0), 8, 1), 8, 2)[:16, :32, :30]
    for roi in (Roi((0, 0, 0), (16, 32, 30)), Roi((3, 5, 7), (6, 20, 9)), Roi((4, 8, 8), (8, 16, 8))):
        mask = table.annotated_mask(roi)
        expect = reference[roi.to_slices()]
        assert (mask is None and expect.all()) or np.array_equal(mask, expect)
    codes = np.ones((16, 32, 30), np.uint8)
    space = Space((16, 32, 30), ((0, 12), (0, 24), (0, 22)), (4, 8, 8), table=table)
    read = AnnotatedCodes(codes, space)[0:16, 0:32, 0:30]
    assert np.array_equal(read, np.where(reference, 1, INVALID_BIT))


# -- the command ---------------------------------------------------------------------------------------
def test_count_clefts_command_dry_run_then_run_on_the_shared_run_options(tmp_path, run_cli):
    from test_run_vocabulary import SHARED, _options

    from cleftchunk_cli.options import RUN_HELP

    options = _options("count-clefts")
    assert all(options[key].help == RUN_HELP[key] for key in SHARED) and "gpus" not in options
    labels = create_volume(str(tmp_path / "l.zarr/clefts"), (32, 256, 256), np.uint8, chunks=CHUNKS, voxel_size=(40, 4, 4))
    data = blobs((16, 128, 128), clefts=6)
    data[::8, ::64, ::64] = 1
    labels.write(Roi((8, 64, 64), data.shape), data)
    spec = str(tmp_path / "l.zarr/clefts")
    dry = run_cli("count-clefts", spec, "--dry-run", "--no-progress")
    assert "count clefts" in dry.output and not (tmp_path / "l.zarr/clefts/s0_cleft_counts").exists()
    done = run_cli("count-clefts", spec, "--threads", "2", "--no-progress")
    assert f"{int(data.sum())} cleft voxels in 8 annotated chunks of 64 (stored)" in done.output
    again = run_cli("count-clefts", spec, "--annotated", "whole", "--block-shape", "32,256,256", "--no-progress")
    assert f"{int(data.sum())} cleft voxels in 64 annotated chunks of 64 (whole)" in again.output
    np.save(tmp_path / "l.npy", data)
    refused = run_cli("count-clefts", tmp_path / "l.npy", expect=None)
    assert refused.exit_code != 0 and "not a Zarr array" in refused.output and "Traceback" not in refused.output
