"""The two ways of naming a Zarr image (issue 15): ``out.zarr`` (the root is the image, NGFF as
napari-ome-zarr reads it) and ``container.zarr/name`` (funlib/daisy style). Every command writes
and reads both, and a path of the wrong form says which form was expected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume, open_volume
from test_predict import WINDOW, tiny_model, tissue

VS = ("--voxel-size", "40,4,4")


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_every_stage_writes_and_reads_a_root_image(tmp_path, run_cli):
    from cleftchunk.predict import OutputOptions, WindowOptions, predict, predict_reference
    from cleftchunk.run.options import RunOptions

    raw = tissue((4, 32, 32), seed=2)
    np.save(tmp_path / "raw.npy", raw)
    run_cli("convert", tmp_path / "raw.npy", tmp_path / "raw.zarr", *VS, "--no-progress")
    assert (tmp_path / "raw.zarr" / "s0" / "zarr.json").exists()
    torch.manual_seed(0)
    model = tiny_model()
    predict(model, str(tmp_path / "raw.zarr"), str(tmp_path / "pred.zarr"), WindowOptions(WINDOW), RunOptions(workers=0, progress=False),
            OutputOptions(chunks=(4, 16, 16)), log=lambda m: None)
    np.testing.assert_array_equal(open_volume(tmp_path / "pred.zarr")[:], predict_reference(model, raw, WINDOW))
    run_cli("segment", tmp_path / "pred.zarr", "-o", tmp_path / "clefts.zarr", "--no-progress")
    ids = open_volume(tmp_path / "clefts.zarr")
    assert ids.dtype == np.uint64 and ids.shape == raw.shape
    info = json.loads(run_cli("info", tmp_path / "clefts.zarr", "--json").output)
    assert len(info) == 1 and info[0]["spec"].endswith("clefts.zarr/s0")
    assert not list(tmp_path.glob(".*predict-*")), "scratch removed after a complete run"


def test_a_container_and_an_image_are_told_apart(tmp_path, run_cli):
    for name in ("a", "b"):
        create_volume(f"{tmp_path}/c.zarr/{name}", (2, 4, 4), "uint8")
    listed = json.loads(run_cli("info", tmp_path / "c.zarr", "--json").output)
    assert [i["spec"].rpartition("c.zarr/")[2] for i in listed] == ["a/s0", "b/s0"]
    with pytest.raises(CleftchunkError, match=r"container of images, not an image.*e\.g\. .*c\.zarr/a"):
        open_volume(tmp_path / "c.zarr")
    with pytest.raises(CleftchunkError, match=r"container holding a, b, not an image.*--overwrite"):
        create_volume(tmp_path / "c.zarr", (2, 4, 4), "uint8")
    create_volume(tmp_path / "img.zarr", (2, 4, 4), "uint8")
    with pytest.raises(CleftchunkError, match=r"img\.zarr is an image itself.*another container"):
        create_volume(tmp_path / "img.zarr" / "more", (2, 4, 4), "uint8")
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 2), np.uint8))
    msg = one_line_error(run_cli("convert", tmp_path / "x.npy", tmp_path / "c.zarr", *VS, expect=2))
    assert "name a new image inside it" in msg
    # --overwrite replaces the whole container by the image, as asked
    run_cli("convert", tmp_path / "x.npy", tmp_path / "c.zarr", *VS, "--overwrite", "--no-progress")
    assert open_volume(tmp_path / "c.zarr").shape == (2, 2, 2) and not (tmp_path / "c.zarr" / "a").exists()


def test_a_path_that_is_neither_form_says_what_was_expected(tmp_path, run_cli):
    (tmp_path / "empty.zarr").mkdir()
    msg = one_line_error(run_cli("info", tmp_path / "empty.zarr", expect=2))
    assert "neither an image (out.zarr" in msg and "container of images (out.zarr/name)" in msg
