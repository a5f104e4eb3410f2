"""Neuroglancer precomputed volumes: read (a scale, a box) from files written by tensorstore, a
third-party writer; predict and segment into them with the bytes of a Zarr run, block-aligned and
resumable; ``info`` lists the scales; s3:// through the S3 server on 127.0.0.1; and N5 written by
tensorstore read by cleftchunk's N5 reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.io import precomputed
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.post.segment import connected_components_reference, segment
from cleftchunk.predict import OutputOptions, WindowOptions, predict
from cleftchunk.run.options import RunOptions

ts = pytest.importorskip("tensorstore", reason="precomputed volumes are read through tensorstore (pip install tensorstore)")

WINDOW = (4, 16, 16)
QUIET = dict(log=lambda message: None)


def write_precomputed(path: Path, scales: list[tuple[np.ndarray, tuple, tuple, tuple]], kind: str = "image") -> str:
    """A precomputed volume written by tensorstore alone: one scale per (data z,y,x, resolution
    z,y,x nm, voxel_offset z,y,x, chunk z,y,x)."""
    for data, resolution, offset, chunk in scales:
        spec = {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(path) + "/"},
            "multiscale_metadata": {"type": kind, "data_type": str(data.dtype), "num_channels": 1},
            "scale_metadata": {"size": list(reversed(data.shape)), "voxel_offset": list(reversed(offset)),
                               "resolution": list(reversed(resolution)), "chunk_size": list(reversed(chunk)), "encoding": "raw"},
        }
        store = ts.open(spec, create=True).result()
        store[ts.d["channel"][0]].write(data.transpose(2, 1, 0)).result()
    return f"precomputed://file://{path}"


def tissue(shape=(10, 50, 45), seed=0) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    raw[:, :24, :24] = 0
    return raw


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ELU(), torch.nn.Conv3d(2, 1, 3, padding=1), torch.nn.Sigmoid()).eval()


@pytest.fixture
def pyramid(tmp_path):
    full = tissue((12, 64, 48))
    half = full[:, ::2, ::2].copy()
    spec = write_precomputed(tmp_path / "em", [(full, (40, 4, 4), (3, 20, 10), (4, 16, 16)), (half, (40, 8, 8), (3, 10, 5), (4, 16, 16))])
    return spec, full, half


# -- reading ----------------------------------------------------------------------------------------
def test_a_scale_and_a_box_read_with_their_frame(pyramid):
    spec, full, half = pyramid
    volume = open_volume(spec)
    assert volume.kind == "precomputed" and volume.shape == full.shape and volume.chunks == (4, 16, 16)
    assert volume.voxel_size == (40.0, 4.0, 4.0) and volume.offset_nm == (120.0, 80.0, 40.0)
    np.testing.assert_array_equal(volume[...], full)
    np.testing.assert_array_equal(volume[2:5, 7:40, 3], full[2:5, 7:40, 3])  # an int index drops its axis
    for mip in ("1", "40,8,8", "40x8x8"):
        coarse = open_volume(f"{spec}#mip={mip}")
        assert coarse.voxel_size == (40.0, 8.0, 8.0) and coarse.offset_nm == (120.0, 80.0, 40.0)
        np.testing.assert_array_equal(coarse[...], half)
    # a box in the scale's own voxels (voxel_offset included), its frame moved with it
    box = open_volume(f"{spec}#mip=1&roi=5:9,12:30,6:20")
    assert box.shape == (4, 18, 14) and box.offset_nm == (200.0, 96.0, 48.0)
    np.testing.assert_array_equal(box[...], half[2:6, 2:20, 1:15])
    # the same place in the world as the full volume's matching voxels
    assert box.read(box.roi).shape == box.shape
    plain = open_volume(f"precomputed://{spec[len('precomputed://file://'):]}")  # a plain local path
    np.testing.assert_array_equal(plain[...], full)


@pytest.mark.parametrize("selection, message", [
    ("#mip=2", "has 2 scales, no mip 2: mip 0: 40,4,4 nm"),
    ("#mip=30,8,8", "no scale of voxel size 30,8,8 nm: choose one of mip 0"),
    ("#mip=fine", "neither a scale index nor a voxel size"),
    ("#roi=0:4,20:40,10:20", "is not inside mip 0's bounds 3:15,20:84,10:58"),
    ("#roi=4:4,20:40,10:20", "each end must be above its begin"),
    ("#roi=4:8,20:40", "is not Z0:Z1,Y0:Y1,X0:X1"),
    ("#level=1", "unknown selection level"),
])
def test_a_bad_selection_is_refused_naming_what_there_is(pyramid, selection, message):
    spec, _, _ = pyramid
    with pytest.raises(CleftchunkError, match=message.replace("(", r"\(")):
        open_volume(spec + selection)


def test_missing_volumes_and_read_only_places_are_one_line_errors(tmp_path):
    with pytest.raises(CleftchunkError, match="no precomputed volume there"):
        open_volume(f"precomputed://file://{tmp_path}/nothing")
    with pytest.raises(CleftchunkError, match="unknown storage scheme ftp://"):
        open_volume("precomputed://ftp://host/em")
    with pytest.raises(CleftchunkError, match="https:// is read-only"):
        create_volume("precomputed://https://example.org/em", (4, 8, 8), np.uint8, voxel_size=(40, 4, 4))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder of other files is never written into, nor removed
        with pytest.raises(CleftchunkError, match="holds files but no precomputed volume"):
            create_volume(f"precomputed://{tmp_path}/notes", (4, 8, 8), np.uint8, voxel_size=(40, 4, 4), overwrite=overwrite)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(CleftchunkError, match="drop the #mip"):
        create_volume(f"precomputed://{tmp_path}/out#mip=1", (4, 8, 8), np.uint8, voxel_size=(40, 4, 4))


def test_a_damaged_info_file_is_a_one_line_error(pyramid, tmp_path):
    spec, _, _ = pyramid
    info_file = Path(spec[len("precomputed://file://"):]) / "info"
    info = json.loads(info_file.read_text())
    del info["scales"][0]["resolution"]
    info_file.write_text(json.dumps(info))
    with pytest.raises(CleftchunkError, match="its info file is not a precomputed volume's .KeyError: 'resolution'"):
        open_volume(spec)
    info_file.write_text("{not json")
    with pytest.raises(CleftchunkError, match="its info file is not JSON"):
        open_volume(spec)


def test_cloud_urls_name_the_right_stores():
    assert precomputed.kvstore("precomputed://gs://bucket/a/em#mip=1") == {"driver": "gcs", "bucket": "bucket", "path": "a/em/"}
    assert precomputed.kvstore("precomputed://https://host/data/em/") == {"driver": "http", "base_url": "https://host/data/em/"}
    assert precomputed.kvstore("precomputed://s3://bucket/em")["driver"] == "s3"


# -- writing: predict and segment ---------------------------------------------------------------------
def test_predict_from_and_into_precomputed_gives_the_zarr_bytes(tmp_path, pyramid):
    spec, full, _ = pyramid
    zarr_in = create_volume(str(tmp_path / "in.zarr/raw"), full.shape, np.uint8, chunks=(4, 16, 16), voxel_size=(40, 4, 4),
                            offset_nm=(120, 80, 40))
    zarr_in.write(zarr_in.roi, full)
    model, window, out = tiny_model(), WindowOptions(WINDOW), OutputOptions(chunks=(4, 16, 16))
    run = RunOptions(block_shape=(4, 32, 32), threads=2)
    predict(model, zarr_in.spec, str(tmp_path / "z.zarr/pred"), window, run, out, **QUIET)
    predict(model, spec, str(tmp_path / "p.zarr/pred"), window, run, out, **QUIET)
    target = f"precomputed://file://{tmp_path}/pred"
    result = predict(model, spec, target, window, run, out, **QUIET)
    expected = open_volume(str(tmp_path / "z.zarr/pred"))[...]
    np.testing.assert_array_equal(open_volume(str(tmp_path / "p.zarr/pred"))[...], expected)
    written = open_volume(target)
    np.testing.assert_array_equal(written[...], expected)
    assert written.offset_nm == (120.0, 80.0, 40.0) and written.chunks == (4, 16, 16)
    info = json.loads((tmp_path / "pred" / "info").read_text())
    assert info["type"] == "image" and info["scales"][0]["encoding"] == "raw" and info["scales"][0]["voxel_offset"] == [10, 20, 3]
    assert result.blocks_written == result.blocks
    again = predict(model, spec, target, window, run, out, **QUIET)  # the completion record: nothing is redone
    assert again.blocks_already_done == again.blocks
    with pytest.raises(CleftchunkError, match="not a multiple of the output chunks"):
        predict(model, spec, f"precomputed://file://{tmp_path}/other", window, run.but(block_shape=(4, 24, 16)), out, **QUIET)
    with pytest.raises(CleftchunkError, match="overwrite"):  # another model: refused, not mixed in
        predict(tiny_model(1), spec, target, window, run, out, **QUIET)
    # the input's own place, spelt otherwise and without its #selection: never written, even with --overwrite
    plain = f"precomputed://{spec[len('precomputed://file://'):]}/"
    with pytest.raises(CleftchunkError, match="is where the source lives"):
        predict(model, spec + "#mip=1", plain, window, run.but(overwrite=True), out, **QUIET)
    assert open_volume(spec)[...].tobytes() == full.tobytes()


def test_an_interrupted_precomputed_prediction_resumes_to_the_same_bytes(tmp_path, pyramid):
    from cleftchunk.run.executor import BLOCK_DONE_HOOKS

    spec, _, _ = pyramid
    model, window, out = tiny_model(), WindowOptions(WINDOW), OutputOptions(chunks=(4, 16, 16))
    run = RunOptions(block_shape=(4, 16, 16), threads=1)
    whole = f"precomputed://file://{tmp_path}/whole"
    predict(model, spec, whole, window, run, out, **QUIET)

    class Stop(BaseException):
        pass

    done = []

    def stop_after_three(*_args, **_kwargs):
        done.append(1)
        if len(done) == 3:
            raise Stop

    target = f"precomputed://file://{tmp_path}/cut"
    BLOCK_DONE_HOOKS.append(stop_after_three)
    try:
        with pytest.raises(Stop):
            predict(model, spec, target, window, run, out, **QUIET)
    finally:
        BLOCK_DONE_HOOKS.remove(stop_after_three)
    resumed = predict(model, spec, target, window, run, out, **QUIET)
    assert resumed.blocks_already_done >= 3 and resumed.blocks_written == resumed.blocks - resumed.blocks_already_done > 0
    np.testing.assert_array_equal(open_volume(target)[...], open_volume(whole)[...])


def test_segment_into_precomputed_is_compressed_segmentation_with_the_zarr_ids(tmp_path, run_cli):
    rng = np.random.default_rng(3)
    pred = np.where(rng.random((8, 32, 32)) < 0.2, 250, 10).astype(np.uint8)
    source = write_precomputed(tmp_path / "pred", [(pred, (40, 4, 4), (0, 0, 0), (4, 8, 8))])
    target = f"precomputed://file://{tmp_path}/clefts"
    planned = run_cli("segment", source, "-o", target, "--chunks", "4,8,8", "--dry-run")
    assert "nothing was created" in planned.output and not (tmp_path / "clefts").exists()
    result = run_cli("segment", source, "-o", target, "--threshold", "200", "--connectivity", "6", "--chunks", "4,8,8", "--block-shape", "4,16,16")
    assert "clefts" in result.output
    zarr_out = str(tmp_path / "s.zarr/clefts")
    segment(source, zarr_out, threshold=200, connectivity=6, chunks=(4, 8, 8), run=RunOptions(block_shape=(4, 16, 16)))
    ids = open_volume(target)
    np.testing.assert_array_equal(ids[...], open_volume(zarr_out)[...])
    assert len(np.unique(ids[...])) == len(np.unique(connected_components_reference(pred >= 200, 6)))
    refused = run_cli("segment", source, "-o", f"precomputed://file://{tmp_path}/other", "--block-shape", "4,12,16", expect=2)
    assert "not a multiple of the output chunks" in refused.output  # blocks never share a chunk
    info = json.loads((tmp_path / "clefts" / "info").read_text())
    assert info["type"] == "segmentation" and info["data_type"] == "uint64"
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    again = run_cli("segment", source, "-o", target, "--threshold", "200", "--connectivity", "6", "--chunks", "4,8,8", "--block-shape", "4,16,16")
    assert "complete" in again.output
    # the CLI's --mip/--roi choose a box of the source: the ids of that box alone
    box = f"precomputed://file://{tmp_path}/box"
    run_cli("segment", source, "-o", box, "--threshold", "200", "--connectivity", "6", "--chunks", "4,8,8", "--mip", "0", "--roi", "0:4,0:16,0:16")
    boxed_zarr = str(tmp_path / "s.zarr/box")
    segment(f"{source}#roi=0:4,0:16,0:16", boxed_zarr, threshold=200, connectivity=6, chunks=(4, 8, 8), run=RunOptions())
    assert open_volume(box).shape == (4, 16, 16)
    np.testing.assert_array_equal(open_volume(box)[...], open_volume(boxed_zarr)[...])


def test_evaluate_view_and_train_read_precomputed_specs(tmp_path, run_cli):
    from cleftchunk.train.data import under_root
    from cleftchunk.view import ViewLayers, build_viewer

    pytest.importorskip("neuroglancer", reason="cleftchunk view needs neuroglancer")
    labels = np.zeros((8, 32, 32), np.uint64)
    labels[2:5, 4:12, 4:12], labels[5:7, 20:30, 18:26] = 1, 2
    spec = f"precomputed://file://{tmp_path}/clefts"
    volume = create_volume(spec, labels.shape, np.uint64, chunks=(4, 16, 16), voxel_size=(40, 4, 4))
    volume.write(volume.roi, labels)
    result = run_cli("evaluate", spec, spec, "--pred-kind", "main", "--gt-kind", "main")
    rows = dict(line.rsplit(None, 1) for line in result.output.splitlines()[:8])  # a volume against itself
    assert float(rows["CREMI score (nm)"]) == 0 and float(rows["F1"]) == 1
    viewer = build_viewer(ViewLayers(spec + "#roi=0:8,0:32,0:32", None, spec), port=0)
    assert viewer is not None
    assert under_root(spec, "/data") == spec  # -t ROOT never goes in front of a URL


def test_info_lists_scales_voxel_sizes_and_bounds(pyramid, run_cli):
    spec, _, _ = pyramid
    text = run_cli("info", spec).output
    assert "[precomputed]" in text and "(12, 64, 48) (z, y, x)" in text
    assert "mip 0: 40,4,4 nm, shape 12,64,48, offset 3,20,10, chunks 4,16,16, raw" in text
    assert "mip 1: 40,8,8 nm, shape 12,32,24, offset 3,10,5" in text
    boxed = run_cli("info", spec, "--mip", "40,8,8", "--roi", "5:9,12:30,6:20").output
    assert "(4, 18, 14) (z, y, x)" in boxed and "(40, 8, 8) nm" in boxed
    bad = run_cli("info", spec, "--roi", "5:9", expect=2).output
    assert bad.strip().splitlines() == ["error: --roi '5:9' is not Z0:Z1,Y0:Y1,X0:X1 (voxels): e.g. --roi 0:64,1024:2048,1024:2048"]
    assert "--mip 7" not in run_cli("info", spec, "--mip", "7", expect=2).output  # the spec's own #mip=7 stays as written


# -- object stores and N5 ----------------------------------------------------------------------------
def test_s3_through_the_local_server(tmp_path):
    import boto3
    from s3_server import s3_server

    data = tissue((8, 32, 32), seed=4)
    with s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="em-data")
        target = "precomputed://s3://em-data/a/pred"
        volume = create_volume(target, data.shape, np.uint8, chunks=(4, 16, 16), voxel_size=(40, 4, 4), offset_nm=(0, 16, 16),
                               attrs={"note": "hello"})
        volume.write(volume.roi, data)
        again = open_volume(target + "#roi=2:6,4:20,4:36")
        np.testing.assert_array_equal(again[...], data[2:6, :16, :])
        whole = open_volume(target)
        # chunks all zero (the empty corner) are not stored: they read as 0
        stored = sum(4 * 16 * 16 for z in (0, 4) for y in (0, 16) for x in (0, 16) if data[z:z + 4, y:y + 16, x:x + 16].any())
        assert whole.attrs["note"] == "hello" and whole.array.stored_bytes() == stored < data.size
        assert precomputed.exists(target) and not precomputed.exists("precomputed://s3://em-data/other")
    from s3_server import environment, free_port

    # a dead endpoint: a one-line error after the connect timeout, not a hang
    with environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "CLEFTCHUNK_CONNECT_TIMEOUT": "1"}):
        with pytest.raises(CleftchunkError, match="cannot"):
            open_volume(target)


def test_n5_written_by_tensorstore_reads_the_same(tmp_path):
    data = tissue((9, 40, 33), seed=5).astype(np.uint16) * 7
    for compression in ({"type": "raw"}, {"type": "gzip"}, {"type": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}):
        path = tmp_path / f"{compression['type']}.n5" / "raw"
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
                "metadata": {"dimensions": list(reversed(data.shape)), "blockSize": [16, 16, 4], "dataType": "uint16",
                             "compression": compression}}
        store = ts.open(spec, create=True).result()
        store.write(data.transpose(2, 1, 0)).result()  # N5 lists axes x first
        volume = open_volume(str(path))
        assert volume.kind == "n5" and volume.shape == data.shape and volume.chunks == (4, 16, 16)
        np.testing.assert_array_equal(volume[...], data)
        np.testing.assert_array_equal(volume[3:8, 10:37, 5], data[3:8, 10:37, 5])
