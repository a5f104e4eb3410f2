"""The operation base (run/operation.py) through its smallest operation, ``threshold``: the
lifecycle every block-wise stage shares — dry run, create, refuse, resume, complete, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.labels import DEFAULT_THRESHOLD
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.post.threshold import Threshold, threshold
from cleftchunk.run import executor
from cleftchunk.run.options import RunOptions, block_shape_for, check_scheduler_address


@pytest.fixture
def pred(tmp_path: Path) -> str:
    spec = str(tmp_path / "pred.zarr")
    volume = create_volume(spec, (20, 96, 80), np.uint8, chunks=(4, 32, 32), voxel_size=(40, 4, 4))
    volume.array[:] = np.random.default_rng(0).integers(0, 256, volume.shape, dtype=np.uint8)
    return spec


def _mask(spec: str) -> np.ndarray:
    return np.asarray(open_volume(spec)[:])


def _reference(pred: str, level: float = DEFAULT_THRESHOLD) -> np.ndarray:
    return (np.asarray(open_volume(pred)[:]) >= level).astype(np.uint8)


@pytest.mark.parametrize("block_shape", [(4, 32, 32), (8, 64, 32), (20, 96, 96)])
@pytest.mark.parametrize("workers_threads", [(0, 1), (0, 2)])
def test_result_equals_the_in_memory_reference_whatever_the_blocks(pred, tmp_path, block_shape, workers_threads):
    out = str(tmp_path / "mask.zarr")
    workers, threads = workers_threads
    threshold(pred, out, chunks=(4, 32, 32), run=RunOptions(workers=workers, threads=threads, block_shape=block_shape))
    np.testing.assert_array_equal(_mask(out), _reference(pred))
    assert open_volume(out).voxel_size == open_volume(pred).voxel_size


def test_dry_run_creates_nothing_not_even_a_folder_or_lock(pred, tmp_path):
    out = tmp_path / "new" / "deeper" / "mask.zarr"
    lines = []
    assert threshold(pred, str(out), run=RunOptions(dry_run=True), log=lines.append) is None
    assert "nothing was created" in lines[0]
    assert not (tmp_path / "new").exists()


def test_other_parameters_are_refused_naming_what_differs(pred, tmp_path):
    out = str(tmp_path / "mask.zarr")
    threshold(pred, out, 100)
    with pytest.raises(CleftchunkError, match=r"other parameters \(threshold differ\)"):
        threshold(pred, out, 200)
    threshold(pred, out, 200, run=RunOptions(overwrite=True))
    np.testing.assert_array_equal(_mask(out), _reference(pred, 200))


def test_something_else_at_the_output_is_refused_unless_overwritten(pred, tmp_path):
    out = str(tmp_path / "other.zarr")
    create_volume(out, (2, 2, 2), np.uint8)
    with pytest.raises(CleftchunkError, match="is not a cleftchunk threshold output: pass --overwrite"):
        threshold(pred, out)


def test_a_complete_output_is_not_redone(pred, tmp_path):
    out = str(tmp_path / "mask.zarr")
    threshold(pred, out)
    lines = []
    assert threshold(pred, out, log=lines.append) is None
    assert "already complete" in lines[0]


def test_an_interrupted_run_resumes_from_its_record_and_gives_the_same_bytes(pred, tmp_path):
    out = str(tmp_path / "mask.zarr")
    run = RunOptions(threads=1, block_shape=(4, 32, 32))

    def stop_after_five(task, block, report):
        if report.written == 5:
            task.record.flush()
            raise KeyboardInterrupt

    executor.BLOCK_DONE_HOOKS.append(stop_after_five)
    try:
        with pytest.raises(KeyboardInterrupt):
            threshold(pred, out, chunks=(4, 32, 32), run=run)
    finally:
        executor.BLOCK_DONE_HOOKS.remove(stop_after_five)
    assert open_volume(out).array.attrs["cleftchunk_threshold"]["complete"] is False
    report = threshold(pred, out, chunks=(4, 32, 32), run=run)
    assert report.already_done == 5 and report.written == report.blocks - 5
    np.testing.assert_array_equal(_mask(out), _reference(pred))


def test_failed_blocks_fail_the_command_after_the_others_are_written(pred, tmp_path, monkeypatch):
    out = str(tmp_path / "mask.zarr")
    original = Threshold.compute

    def broken(self, data, roi, block_roi):
        if block_roi.offset == (0, 0, 0):
            raise OSError("disk said no")
        return original(self, data, roi, block_roi)

    monkeypatch.setattr(Threshold, "compute", broken)
    with pytest.raises(CleftchunkError, match=r"1 of \d+ blocks of threshold failed .*disk said no.*re-run the same command"):
        threshold(pred, out, chunks=(4, 32, 32), run=RunOptions(threads=1, block_shape=(4, 32, 32), retries=0))
    monkeypatch.undo()
    report = threshold(pred, out, chunks=(4, 32, 32), run=RunOptions(threads=1, block_shape=(4, 32, 32)))
    assert report.written == 1
    np.testing.assert_array_equal(_mask(out), _reference(pred))


def test_the_output_may_not_be_an_input(pred):
    with pytest.raises(CleftchunkError, match="would destroy the source"):
        threshold(pred, pred + "/s0")


def test_the_block_shape_rule():
    assert block_shape_for(None, (16, 256, 256), (100, 1000, 1000), (32, 512, 512)) == (32, 512, 512)
    assert block_shape_for((48, 256, 768), (16, 256, 256), (100, 1000, 1000), (32, 512, 512)) == (48, 256, 768)
    # blocks never pass the volume's chunk-rounded end; a whole-axis block may be any length
    assert block_shape_for((200, 256, 256), (16, 256, 256), (100, 1000, 1000), (32, 512, 512)) == (112, 256, 256)
    with pytest.raises(CleftchunkError, match=r"not a multiple of the output chunks 16,256,256: use block_shape=16,256,512"):
        block_shape_for((20, 256, 500), (16, 256, 256), (100, 1000, 1000), (32, 512, 512))


@pytest.mark.parametrize("bad", [dict(workers=-1), dict(threads=0), dict(retries=-1), dict(gpus=1.5), dict(block_shape=(0, 1, 1))])
def test_run_options_refuse_invalid_values(bad):
    with pytest.raises(CleftchunkError):
        RunOptions(**bad)


@pytest.mark.parametrize("address", ["host:8786", "tcp://", "http://host:8786"])
def test_a_scheduler_is_an_address(address):
    with pytest.raises(CleftchunkError, match="is not the address of a Dask scheduler"):
        check_scheduler_address(address)


@pytest.mark.parametrize("place", ["threads", "processes"])
def test_the_old_local_scheduler_names_are_refused_naming_workers(place):
    with pytest.raises(CleftchunkError, match=r"is gone: threads of this process are workers=0 .* worker processes workers=N"):
        check_scheduler_address(place)
