"""Block-wise connected components: equal to the whole-array labelling, whatever the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from cleftchunk import open_volume
from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.labels import resolve_kind
from cleftchunk.post.segment import connected_components_reference, segment
from cleftchunk.run.options import RunOptions
from cleftchunk.synth.generate import generate_region
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import create_volume

BG = CREMI_BACKGROUND


def write(path, data, chunks=(4, 8, 8), voxel_size=(40, 4, 4), offset_nm=None, **kw):
    volume = create_volume(path, data.shape, data.dtype, chunks=chunks, voxel_size=voxel_size, offset_nm=offset_nm, **kw)
    volume.array[...] = data
    return str(path)


def ids(spec):
    return open_volume(spec)[...]


def random_probabilities(shape, density, seed):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < density, rng.integers(128, 256, shape), rng.integers(0, 128, shape)).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("connectivity", [6, 26])
def test_blockwise_equals_whole_array_for_any_block_shape(tmp_path, connectivity):
    # densities below the percolation threshold of each connectivity: many components
    pred = random_probabilities((12, 30, 28), {6: 0.25, 26: 0.07}[connectivity], seed=connectivity)
    spec = write(tmp_path / "p.zarr/pred", pred, chunks=(4, 8, 4))
    expected = connected_components_reference(pred >= 128, connectivity, min_size=2)
    assert (expected != BG).any() and len(np.unique(expected)) > 10  # a non-trivial case
    for block_shape in [(4, 8, 4), (8, 16, 12), (12, 32, 28)]:
        out = str(tmp_path / f"s.zarr/{'_'.join(map(str, block_shape))}")
        result = segment(spec, out, connectivity=connectivity, min_size=2, chunks=(4, 8, 4), run=RunOptions(block_shape=block_shape, threads=2))
        got = ids(out)
        assert got.dtype == np.uint64
        np.testing.assert_array_equal(got, expected)
        assert result.components == len(np.unique(expected)) - 1
        assert result.blocks == np.prod([-(-s // b) for s, b in zip(pred.shape, block_shape)])
    stored = [chunk_files(tmp_path / "s.zarr" / name / "s0") for name in ("4_8_4", "8_16_12", "12_32_28")]
    assert stored[0] and stored[0] == stored[1] == stored[2]  # byte-identical chunks


def chunk_files(array_dir):
    return {p.relative_to(array_dir): p.read_bytes() for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"}


@pytest.mark.slow
def test_synthetic_clefts_get_the_same_ids_for_any_block_shape(tmp_path):
    clefts = generate_region(Roi((0, 0, 0), (16, 96, 96)), seed=1)["clefts"]
    spec = write(tmp_path / "p.zarr/clefts", clefts, chunks=(4, 16, 16), fill_value=int(BG))
    expected = connected_components_reference(clefts != BG, 26)
    z, y, x = np.nonzero(expected != BG)
    assert len({(a // 4, b // 16, c // 16) for a, b, c in zip(z, y, x)}) > 4  # the cleft spans many blocks
    for block_shape in [(4, 16, 16), (8, 48, 32)]:
        out = str(tmp_path / f"s.zarr/{block_shape[0]}")
        segment(spec, out, chunks=(4, 16, 16), run=RunOptions(block_shape=block_shape))
        np.testing.assert_array_equal(ids(out), expected)


def test_cleft_cut_by_block_borders_gets_one_id(tmp_path):
    mask = np.zeros((8, 16, 16), dtype=bool)
    mask[1, 3, 2:14] = True  # crosses the x border of 8-voxel blocks
    mask[1:7, 12, 12] = True  # crosses the z border of 4-voxel blocks
    spec = write(tmp_path / "p.zarr/m", mask, chunks=(4, 8, 8))
    out = str(tmp_path / "s.zarr/c")
    result = segment(spec, out, chunks=(4, 8, 8), connectivity=6, run=RunOptions(block_shape=(4, 8, 8)))
    got = ids(out)
    assert (result.components, result.blocks) == (2, 8)
    assert set(np.unique(got[mask])) == {1, 2}
    assert len(np.unique(got[1, 3, 2:14])) == 1 and len(np.unique(got[1:7, 12, 12])) == 1
    assert (got[~mask] == BG).all()


def test_corner_contact_across_blocks_joins_only_with_26_connectivity(tmp_path):
    mask = np.zeros((8, 16, 16), dtype=bool)
    mask[3, 7, 7] = True  # last voxel of block (0, 0, 0)
    mask[4, 8, 8] = True  # first voxel of block (1, 1, 1): they touch at a corner only
    mask[3, 7, 9] = True  # edge contact with (4, 8, 8), in the block (0, 0, 1)
    spec = write(tmp_path / "p.zarr/m", mask, chunks=(4, 8, 8))
    s26 = segment(spec, str(tmp_path / "s.zarr/a"), chunks=(4, 8, 8), connectivity=26, run=RunOptions(block_shape=(4, 8, 8)))
    s6 = segment(spec, str(tmp_path / "s.zarr/b"), chunks=(4, 8, 8), connectivity=6, run=RunOptions(block_shape=(4, 8, 8)))
    assert (s26.components, s6.components) == (1, 3)
    got6 = ids(str(tmp_path / "s.zarr/b"))
    # canonical order: by first voxel in C order
    assert (got6[3, 7, 7], got6[3, 7, 9], got6[4, 8, 8]) == (1, 2, 3)


def test_min_size_counts_voxels_across_blocks(tmp_path):
    mask = np.zeros((4, 8, 16), dtype=bool)
    mask[1, 2, 5:11] = True  # 6 voxels, 3 on each side of the x border at 8
    mask[2, 6, 0:4] = True  # 4 voxels in one block
    spec = write(tmp_path / "p.zarr/m", mask, chunks=(4, 8, 8))
    out = str(tmp_path / "s.zarr/c")
    result = segment(spec, out, chunks=(4, 8, 8), min_size=5, run=RunOptions(block_shape=(4, 8, 8)))
    got = ids(out)
    assert (result.components, result.removed, result.voxels) == (1, 1, 6)
    assert (got[1, 2, 5:11] == 1).all() and (got[2, 6, 0:4] == BG).all()


def test_output_keeps_frame_and_refuses_to_overwrite(tmp_path, run_cli):
    pred = random_probabilities((4, 16, 16), 0.2, seed=3)
    spec = write(tmp_path / "p.zarr/pred", pred, voxel_size=(40, 4, 4), offset_nm=(80, 40, 8))
    out = str(tmp_path / "s.zarr/clefts")
    result = run_cli("segment", spec, "-o", out, "--threshold", "200", "--connectivity", "6")
    assert "clefts" in result.output
    volume = open_volume(out)
    assert volume.voxel_size == (40.0, 4.0, 4.0) and volume.offset_nm == (80.0, 40.0, 8.0)
    np.testing.assert_array_equal(volume[...], connected_components_reference(pred >= 200, 6))
    again = run_cli("segment", spec, "-o", out, expect=2)
    assert "--overwrite" in again.output
    run_cli("segment", spec, "-o", out, "--overwrite")


def test_unfinished_output_is_redone_without_overwrite(tmp_path):
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[1, 1, 1:3] = True
    spec = write(tmp_path / "p.zarr/m", mask)
    out = str(tmp_path / "s.zarr/c")
    segment(spec, out)
    mark_unfinished(out)  # as if interrupted
    segment(spec, out)
    assert state(out)["complete"] is True
    with pytest.raises(CleftchunkError, match="--overwrite"):
        segment(spec, out, min_size=1)  # other parameters: refused (the same ones: "already complete")


def state(spec):
    return open_volume(spec).array.attrs["cleftchunk_segment"]


def mark_unfinished(spec):
    attrs = open_volume(spec, mode="r+").array.attrs
    attrs["cleftchunk_segment"] = {**attrs["cleftchunk_segment"], "complete": False}


def test_an_unfinished_output_with_other_parameters_is_refused_naming_them(tmp_path):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((4, 16, 16), 0.2, seed=3))
    out = str(tmp_path / "s.zarr/c")
    segment(spec, out)
    mark_unfinished(out)
    before = chunk_files(tmp_path / "s.zarr/c/s0")
    with pytest.raises(CleftchunkError, match=r"other parameters \(min_size, threshold differ\).*--overwrite"):
        segment(spec, out, threshold=200, min_size=3)
    assert chunk_files(tmp_path / "s.zarr/c/s0") == before and state(out)["complete"] is False  # untouched
    segment(spec, out, threshold=200, min_size=3, run=RunOptions(overwrite=True))
    assert state(out)["identity"]["threshold"] == 200.0 and state(out)["complete"] is True


def test_a_complete_output_is_not_redone(tmp_path, run_cli):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((4, 16, 16), 0.2, seed=3))
    out = tmp_path / "s.zarr/c"
    run_cli("segment", spec, "-o", out, "--no-progress")
    before = chunk_files(out / "s0")
    written = {p: p.stat().st_mtime_ns for p in (out / "s0").rglob("*") if p.is_file()}
    again = run_cli("segment", spec, "-o", out, "--no-progress")
    assert "already complete" in again.output and "clefts (" not in again.output
    assert chunk_files(out / "s0") == before and {p: p.stat().st_mtime_ns for p in written} == written
    messages = []
    assert segment(str(spec), str(out), log=messages.append) is None and "already complete" in messages[0]


def test_a_block_shape_that_is_not_whole_chunks_is_refused_with_the_fix(tmp_path, run_cli):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((8, 24, 24), 0.07, seed=9), chunks=(4, 8, 8))
    result = run_cli("segment", spec, "-o", tmp_path / "s.zarr/ids", "--chunks", "4,8,8", "--block-shape", "6,8,8", expect=2)
    assert "not a multiple of the output chunks 4,8,8" in result.output and "--block-shape 8,8,8" in result.output
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(CleftchunkError, match="block_shape=8,8,8"):
        segment(spec, str(tmp_path / "s.zarr/ids"), chunks=(4, 8, 8), run=RunOptions(block_shape=(6, 8, 8)))


def test_kind_detection(tmp_path):
    cases = {
        "bool": (np.zeros((2, 4, 4), bool), "mask"),
        "ids": (np.full((2, 4, 4), BG, np.uint64), "ids"),
        "mask01": (np.eye(4, dtype=np.uint8)[None].repeat(2, 0), "mask"),
        "prob": (np.full((2, 4, 4), 200, np.uint8), "prob"),
        "labels16": (np.arange(32, dtype=np.uint16).reshape(2, 4, 4), "main"),
        "floatprob": (np.linspace(0, 1, 32).reshape(2, 4, 4), "prob"),
    }
    for name, (data, kind) in cases.items():
        assert resolve_kind(open_volume(write(tmp_path / f"k.zarr/{name}", data))) == kind, name
    predicted = write(tmp_path / "k.zarr/predicted", np.ones((2, 4, 4), np.uint8), attrs={"cleftchunk_predict": {}})
    assert resolve_kind(open_volume(predicted)) == "prob"  # 0/1 values, but probabilities by provenance
    for name, data in {"int16": np.zeros((2, 4, 4), np.int16), "float": np.full((2, 4, 4), 3.0)}.items():
        with pytest.raises(CleftchunkError, match="convert"):
            resolve_kind(open_volume(write(tmp_path / f"k.zarr/{name}", data)))
    with pytest.raises(CleftchunkError, match="cannot hold"):
        resolve_kind(open_volume(str(tmp_path / "k.zarr/labels16")), "ids")


def test_bad_options_are_one_line_errors(tmp_path, run_cli):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((4, 8, 8), 0.2, seed=1))
    out = str(tmp_path / "s.zarr/c")
    assert "--threshold" in run_cli("segment", spec, "-o", out, "--threshold", "300", expect=2).output
    assert "--min-size" in run_cli("segment", spec, "-o", out, "--min-size", "-1", expect=2).output
    assert "Z,Y,X" in run_cli("segment", spec, "-o", out, "--block-shape", "4,8", expect=2).output
    assert "does not exist" in run_cli("segment", str(tmp_path / "nope.zarr/p"), "-o", out, expect=2).output


@pytest.fixture(scope="module")
def scheduler_address():
    """A cluster of 2 worker processes on 127.0.0.1, started by the test, as a user's would be."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster:
        yield cluster.scheduler_address


def test_an_existing_scheduler_and_worker_processes_give_the_bytes_of_a_local_run(tmp_path, run_cli, scheduler_address):
    pred = random_probabilities((8, 24, 24), 0.07, seed=9)
    spec = write(tmp_path / "p.zarr/pred", pred, chunks=(4, 8, 8))
    common = ("--block-shape", "4,8,8", "--chunks", "4,8,8", "--no-progress")
    run_cli("segment", spec, "-o", tmp_path / "local.zarr/ids", "--threads", "1", *common)
    run_cli("segment", spec, "-o", tmp_path / "remote.zarr/ids", "--scheduler", scheduler_address, *common)
    run_cli("segment", spec, "-o", tmp_path / "procs.zarr/ids", "--workers", "2", *common)
    local = chunk_files(tmp_path / "local.zarr/ids/s0")
    assert local and chunk_files(tmp_path / "remote.zarr/ids/s0") == local == chunk_files(tmp_path / "procs.zarr/ids/s0")


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, run_cli):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((8, 24, 24), 0.07, seed=9), chunks=(4, 8, 8))
    result = run_cli("segment", spec, "-o", tmp_path / "s.zarr/ids", "--block-shape", "4,8,8", "--chunks", "4,8,8", "--dry-run")
    assert "18 blocks of (4, 8, 8)" in result.output and "nothing was run" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_dry_run_creates_no_folder_lock_or_record(tmp_path, run_cli):
    spec = write(tmp_path / "p.zarr/pred", random_probabilities((8, 24, 24), 0.07, seed=9), chunks=(4, 8, 8))
    before = sorted(tmp_path.rglob("*"))
    result = run_cli("segment", spec, "-o", tmp_path / "new/s.zarr/ids", "--dry-run")
    assert "plan: segment" in result.output and "input kind: decided when run" in result.output
    assert sorted(tmp_path.rglob("*")) == before


# -- resume after a run stopped at a known block ------------------------------------------------------
def stop_after(blocks, stage="segment-write"):
    """A BLOCK_DONE_HOOKS hook that interrupts the run once ``blocks`` blocks of ``stage`` are recorded."""
    done = []

    def hook(task, block, report):
        if task.name == stage:
            done.append(block.index)
            if len(done) == blocks:
                raise KeyboardInterrupt

    return hook


def test_an_interrupted_segment_resumes_from_its_record_without_rewriting_blocks_and_gives_the_same_bytes(tmp_path, monkeypatch):
    import cleftchunk.post.segment as seg
    from cleftchunk.run import executor

    pred = random_probabilities((8, 32, 32), 0.07, seed=5)
    spec = write(tmp_path / "p.zarr/pred", pred, chunks=(2, 8, 8))
    out = str(tmp_path / "s.zarr/ids")
    record = tmp_path / ".s.zarr.ids.segment-done.zarr"
    options = RunOptions(block_shape=(2, 8, 8), threads=1)
    monkeypatch.setattr(executor, "BLOCK_DONE_HOOKS", [stop_after(24)])
    with pytest.raises(KeyboardInterrupt):
        segment(spec, out, chunks=(2, 8, 8), min_size=2, run=options)
    done = zarr_array(record)
    assert done.sum() == 24 and state(out)["complete"] is False
    expected = connected_components_reference(pred >= 128, 26, min_size=2)
    got = ids(out)
    for number, (z, y, x) in enumerate(np.ndindex(4, 4, 4)):  # every block the record says is done is final
        if done[number]:
            s = np.s_[2 * z : 2 * z + 2, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8]
            np.testing.assert_array_equal(got[s], expected[s])
    monkeypatch.setattr(executor, "BLOCK_DONE_HOOKS", [])
    rewritten, real_relabel = [], seg.relabel_block
    monkeypatch.setattr(seg, "relabel_block", lambda *args: (rewritten.append(args[1]), real_relabel(*args))[1])
    result = segment(spec, out, chunks=(2, 8, 8), min_size=2, run=options)
    assert result.already_done == 24 and len(rewritten) == 64 - 24
    np.testing.assert_array_equal(ids(out), expected)
    assert state(out)["complete"] is True and not record.exists()
    segment(spec, str(tmp_path / "fresh.zarr/ids"), chunks=(2, 8, 8), min_size=2, run=RunOptions(block_shape=(2, 8, 8), threads=2))
    assert chunk_files(tmp_path / "s.zarr/ids/s0") == chunk_files(tmp_path / "fresh.zarr/ids/s0")


#: A command killed (os._exit, no clean-up: its lock file stays) once a known block is recorded.
KILLED_COMMAND = """
import os, sys
from cleftchunk.run import executor
def kill(task, block, report):
    if task.name == "segment-write" and report.written == {blocks}:
        task.record.flush()
        os._exit(9)
executor.BLOCK_DONE_HOOKS.append(kill)
from cleftchunk_cli.main import main
main({argv!r})
"""


@pytest.mark.slow
def test_a_killed_segment_command_resumes_with_the_same_command_and_gives_the_bytes_of_an_uninterrupted_run(tmp_path, run_cli):
    import os
    import subprocess
    import sys

    pred = random_probabilities((8, 32, 32), 0.07, seed=6)
    spec = write(tmp_path / "p.zarr/pred", pred, chunks=(2, 8, 8))
    argv = ["segment", spec, "-o", str(tmp_path / "s.zarr/ids"), "--chunks", "2,8,8", "--block-shape", "2,8,8",
            "--min-size", "2", "--threads", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    killed = subprocess.run([sys.executable, "-c", KILLED_COMMAND.format(blocks=40, argv=argv)], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stdout + killed.stderr
    assert zarr_array(tmp_path / ".s.zarr.ids.segment-done.zarr").sum() == 40
    assert (tmp_path / ".s.zarr.ids.lock").exists()  # left by the killed process, taken over below
    resumed = run_cli(*argv)
    assert "written already by an interrupted run, kept" in resumed.output
    run_cli(*argv[:3], str(tmp_path / "fresh.zarr/ids"), *argv[4:])
    np.testing.assert_array_equal(ids(str(tmp_path / "s.zarr/ids")), connected_components_reference(pred >= 128, 26, min_size=2))
    assert chunk_files(tmp_path / "s.zarr/ids/s0") == chunk_files(tmp_path / "fresh.zarr/ids/s0")


def zarr_array(path):
    import zarr

    return zarr.open_array(str(path), mode="r")[:]
