"""Block-wise prediction: equal to the in-memory reference whatever the cut, each tile run once,
resumable after a real kill, robust to a killed Dask worker; and the command line's errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.predict import GpuOutOfMemory, OutputOptions, PredictParams, TileRunner, WindowOptions, predict_reference
from cleftchunk.predict import predict as predict_grouped
from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.run.options import RunOptions

WINDOW = (4, 16, 16)
CHUNKS = (4, 16, 16)
QUIET = dict(progress=False, log=lambda message: None)


# -- helpers ------------------------------------------------------------------------------
def predict(model, spec, out, *, log=None, architecture=None, **options):
    """``cleftchunk.predict.predict`` with each option given by its name: it goes to its group
    (WindowOptions, RunOptions, OutputOptions); a name of no group is an error."""
    import dataclasses

    groups = []
    for group in (WindowOptions, RunOptions, OutputOptions):
        names = {f.name for f in dataclasses.fields(group)}
        groups.append(group(**{k: options.pop(k) for k in list(options) if k in names}))
    assert not options, f"not an option of predict: {sorted(options)}"
    return predict_grouped(model, spec, out, *groups, architecture=architecture, log=log)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """Not flip-symmetric (random kernels), cheap, probabilities out."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.ELU(), torch.nn.Conv3d(3, 1, 3, padding=1), torch.nn.Sigmoid()
    ).eval()


class Counting(torch.nn.Module):
    """Counts the samples it really sees (batch size 1: no padding samples)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return self.inner(x)


def make_slow_model(delay: float, fail_flag: str | None = None) -> torch.nn.Module:
    """A tiny model that sleeps per forward (so runs can be interrupted), optionally failing on
    tiles brighter than 200 on average while ``fail_flag`` exists. Defined inside a function so
    that it is pickled by value for worker processes."""

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model(3)

        def forward(self, x):
            time.sleep(delay)
            if fail_flag is not None and os.path.exists(fail_flag) and float(x.mean()) * 255 > 200:
                raise RuntimeError("bright tile")
            return self.inner(x)

    return Slow().eval()


def write_volume(path: Path, data: np.ndarray, offset_nm=(0, 0, 0), chunks=CHUNKS) -> str:
    spec = f"{path}"
    volume = create_volume(spec, data.shape, data.dtype, chunks=chunks, offset_nm=offset_nm, overwrite=True)
    volume.write(volume.roi, data)
    return spec


def tissue(shape=(10, 50, 45), seed=0) -> np.ndarray:
    """Random EM-like data with an empty (constant) corner larger than a window."""
    raw = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    raw[:, :24, :24] = 0
    return raw


def read(spec) -> np.ndarray:
    return open_volume(spec)[:]


@pytest.fixture
def raw_spec(tmp_path):
    raw = tissue()
    return raw, write_volume(tmp_path / "in.zarr" / "raw", raw, offset_nm=(80, 8, 12))


# -- the answer does not depend on how the work is cut ----------------------------------------
@pytest.mark.parametrize("block_shape", [(4, 16, 16), (8, 32, 16), (12, 48, 48)])
@pytest.mark.parametrize("workers", [1, 2])
def test_blockwise_equals_reference(tmp_path, raw_spec, block_shape, workers):
    raw, spec = raw_spec
    model = tiny_model()
    expected = predict_reference(model, raw, WINDOW, pad=True)
    out = str(tmp_path / "out.zarr" / "pred")
    result = predict(
        model, spec, out, window=WINDOW, pad=True, chunks=CHUNKS, block_shape=block_shape, threads=workers, memory_spills=0, **QUIET
    )
    np.testing.assert_array_equal(read(out), expected)
    assert result.tiles_ratio == 1 and result.failed == []
    pred = open_volume(out)
    assert pred.voxel_size == (40.0, 4.0, 4.0) and pred.offset_nm == (80.0, 8.0, 12.0)
    assert pred.dtype == np.uint8 and pred.chunks == CHUNKS


@pytest.mark.parametrize(
    "options",
    [
        dict(tta=4, batch_size=3),
        dict(blend="constant", overlap=0.25),
        dict(overlap=0.75, pad=True, batch_size=2),
    ],
)
@pytest.mark.slow
def test_options_equal_reference(tmp_path, raw_spec, options):
    raw, spec = raw_spec
    model = tiny_model(1)
    expected = predict_reference(model, raw, WINDOW, **options)
    out = str(tmp_path / "out.zarr" / "pred")
    predict(model, spec, out, window=WINDOW, chunks=CHUNKS, block_shape=(4, 32, 16), threads=2, memory_spills=0, **options, **QUIET)
    np.testing.assert_array_equal(read(out), expected)


def test_mask_excludes_voxels_and_tiles(tmp_path, raw_spec):
    raw, spec = raw_spec
    mask = np.ones(raw.shape, dtype=np.uint8)
    mask[:, 30:, 28:] = 0
    mask_spec = write_volume(tmp_path / "in.zarr" / "mask", mask, offset_nm=(80, 8, 12))
    model = Counting(tiny_model())
    expected = predict_reference(tiny_model(), raw, WINDOW, mask=mask)
    out = str(tmp_path / "out.zarr" / "pred")
    result = predict(model, spec, out, window=WINDOW, chunks=CHUNKS, mask=mask_spec, **QUIET)
    got = read(out)
    np.testing.assert_array_equal(got, expected)
    assert (got[mask == 0] == 0).all() and got[mask == 1].any()
    assert model.calls == result.tiles_run < result.tiles_in_grid


@pytest.mark.slow
def test_process_workers_and_checkpoint_give_the_same_bytes(tmp_path, run_cli):
    from cleftchunk.model import arch_spec, build_model, load_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    ckpt = tmp_path / "small.pth"
    save_checkpoint(ckpt, net, arch_spec(net), (4, 32, 32))
    raw = tissue((8, 64, 60), seed=2)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(4, 32, 32))
    out = tmp_path / "out.zarr" / "pred"
    result = run_cli(
        "predict", spec, out, "--checkpoint", ckpt, "--workers", "2", "--chunks", "4,32,32", "--block-shape", "4,32,32", "--no-progress"
    )
    assert "ratio 1" in result.output
    expected = predict_reference(load_model(ckpt), raw, (4, 32, 32))
    np.testing.assert_array_equal(read(out), expected)
    attrs = dict(zarr.open_array(str(out / "s0")).attrs)["cleftchunk_predict"]
    assert attrs["complete"] and len(attrs["identity"]["model_sha256"]) == 64
    assert attrs["identity"]["overlap"] == 0.5 and "torch" in attrs["versions"]
    # no scratch directory is left behind
    assert not list(tmp_path.glob(".out.zarr.*"))


# -- every tile exactly once, empty tiles never ------------------------------------------------
@pytest.mark.slow
def test_each_tile_runs_exactly_once_with_blocks_smaller_than_tiles(tmp_path, raw_spec):
    raw, spec = raw_spec
    model = Counting(tiny_model())
    out = str(tmp_path / "out.zarr" / "pred")
    result = predict(
        model, spec, out, window=WINDOW, pad=True, chunks=(2, 8, 8), block_shape=(2, 8, 8), threads=2, memory_spills=0, **QUIET
    )
    reference_model = Counting(tiny_model())
    expected = predict_reference(reference_model, raw, WINDOW, pad=True)
    np.testing.assert_array_equal(read(out), expected)
    assert model.calls == reference_model.calls == result.tiles_run
    assert result.tiles_run + result.tiles_skipped == result.tiles_in_grid == result.tiles_needed
    assert result.tiles_ratio == 1.0


@pytest.mark.slow
def test_empty_blocks_are_skipped_without_changing_neighbours(tmp_path):
    raw = np.zeros((12, 64, 64), dtype=np.uint8)
    cube = Roi((4, 40, 36), (5, 20, 20))
    raw[cube.to_slices()] = np.random.default_rng(5).integers(1, 256, cube.shape, dtype=np.uint8)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    model = Counting(tiny_model())
    out = str(tmp_path / "out.zarr" / "pred")
    result = predict(model, spec, out, window=WINDOW, chunks=CHUNKS, block_shape=(4, 16, 16), **QUIET)
    np.testing.assert_array_equal(read(out), predict_reference(tiny_model(), raw, WINDOW))
    from cleftchunk.predict.tiling import TileGrid

    grid = TileGrid.over(Roi((0, 0, 0), raw.shape), WINDOW, 0.5, pad=False)
    touching = sum(1 for _, t in grid.tiles() if not t.intersect(cube).empty)
    assert model.calls == result.tiles_run == touching
    assert result.tiles_skipped == grid.count - touching > 0
    far = read(out)[:, :24, :24]
    assert (far == 0).all()


def test_flip_tta_on_a_symmetric_input_is_symmetric(tmp_path):
    z, y, x = np.meshgrid(np.arange(10), np.arange(48), np.arange(48), indexing="ij")
    raw = (40 * np.cos(np.abs(z - 4.5)) + 60 * np.cos(np.abs(y - 23.5) / 3) * np.cos(np.abs(x - 23.5) / 3) + 120).astype(np.uint8)
    for check in (lambda a: a[::-1], lambda a: a[:, ::-1], lambda a: a[:, :, ::-1], lambda a: a.transpose(0, 2, 1)):
        np.testing.assert_array_equal(check(raw), raw)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    model = tiny_model(4)
    plain = predict_reference(model, raw, WINDOW)
    assert np.abs(plain.astype(int) - plain[:, :, ::-1]).max() > 2  # the model alone is not symmetric
    out = str(tmp_path / "out.zarr" / "pred")
    predict(model, spec, out, window=WINDOW, chunks=CHUNKS, block_shape=(4, 32, 16), tta=16, **QUIET)
    got = read(out).astype(int)
    np.testing.assert_array_equal(got, predict_reference(model, raw, WINDOW, tta=16))
    for flipped in (got[::-1], got[:, ::-1], got[:, :, ::-1], got.transpose(0, 2, 1)):
        assert np.abs(got - flipped).max() <= 1  # equal up to float rounding of the TTA mean


# -- the option groups and what a worker keeps ------------------------------------------------------
def test_option_groups_check_their_values_before_anything_runs():
    for make, message in [
        (lambda: WindowOptions(overlap=1.5), r"overlap 1.5 must be in \[0, 1\)"),
        (lambda: WindowOptions(tta=3), r"--tta 3: use one of"),
        (lambda: WindowOptions(batch_size=0), r"batch size 0 must be at least 1"),
        (lambda: WindowOptions(window=(4, 0, 16)), r"must be positive"),
        (lambda: WindowOptions(precision="fp8"), r"precision 'fp8'"),
        (lambda: OutputOptions(cores=0), r"cores=0 must be a whole number >= 1"),
        (lambda: OutputOptions(chunks=(0, 16, 16)), r"chunks=0,16,16 must be 3 positive extents"),
    ]:
        with pytest.raises(CleftchunkError, match=message):
            make()
    # "auto" and an unset batch size resolve per device
    assert WindowOptions().resolve((4, 16, 16), "cpu") == PredictParams((4, 16, 16), batch_size=1, precision="fp32")
    assert WindowOptions().resolve((4, 16, 16), "cuda") == PredictParams((4, 16, 16), batch_size=4, precision="bf16", device="cuda")


def test_a_workers_state_and_in_memory_spills_stay_in_their_process(tmp_path):
    import pickle

    from cleftchunk.predict.scratch import Scratch
    from cleftchunk.predict.worker import WorkerState

    scratch = Scratch(str(tmp_path / "scratch"))
    scratch.ensure()
    with scratch.in_memory(budget=1 << 20):
        scratch.save_spill((0, 0, 0), {(0, 0, 1): np.ones((2, 2, 2), np.int32)}, {"tiles": 1})
        copy = pickle.loads(pickle.dumps(scratch))  # what a worker process would get: the folder only
        assert scratch.spill_stats((0, 0, 0)) == {"tiles": 1}
        assert copy.root == scratch.root and copy.spill_stats((0, 0, 0)) is None
    assert pickle.loads(pickle.dumps(WorkerState())) is None  # a worker process keeps its own
    state = WorkerState()
    first = state.workspace("sums", (2, 3, 4), np.int32)
    assert state.workspace("sums", (2, 3, 4), np.int32) is first  # reused by the thread's next task
    assert state.workspace("sums", (2, 3, 5), np.int32).shape == (2, 3, 5)  # another shape: replaced


# -- failures, resume, killed processes -------------------------------------------------------------
def test_failing_blocks_are_reported_and_the_rest_finishes(tmp_path):
    raw = np.random.default_rng(0).integers(0, 150, (8, 48, 48), dtype=np.uint8)
    raw[:, 32:, 32:] = np.random.default_rng(1).integers(230, 256, (8, 16, 16), dtype=np.uint8)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    flag = tmp_path / "fail"
    flag.touch()
    model = make_slow_model(0.0, str(flag))
    out = str(tmp_path / "out.zarr" / "pred")
    options = dict(window=WINDOW, chunks=CHUNKS, block_shape=(4, 16, 16), retries=1, overlap=0.0, **QUIET)
    with pytest.raises(CleftchunkError, match=r"blocks failed \(Roi\[.*RuntimeError: bright tile"):
        predict(model, spec, out, **options)
    partial = read(out)
    assert partial[:, :32, :32].any() and not partial[:, 32:, 32:].any()
    flag.unlink()
    result = predict(model, spec, out, **options)  # same model and parameters: resumes the rest
    assert 0 < result.blocks_written < result.blocks
    np.testing.assert_array_equal(read(out), predict_reference(model, raw, WINDOW, overlap=0.0))


SLOW_RUN = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_predict import make_slow_model
    from test_predict import predict
    r = predict(make_slow_model({delay}), {spec!r}, {out!r}, window={window!r}, chunks={chunks!r}, block_shape=(4, 16, 16),
                workers=0, progress=False)
    print("SUMMARY", r.blocks_already_done, r.blocks_written, r.blocks)
    """
)

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_predict import make_slow_model, predict
    from cleftchunk.run import executor

    def kill_after_block(task, block, report):
        # a deterministic kill -9: once {stop_after} blocks are recorded done and the record is on disk
        if report.written == {stop_after}:
            task.record.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if {stop_after}:
        executor.BLOCK_DONE_HOOKS.append(kill_after_block)
    r = predict(make_slow_model(0.0), {spec!r}, {out!r}, window={window!r}, chunks={chunks!r}, block_shape=(4, 16, 16),
                workers=0, progress=False)
    print("SUMMARY", r.blocks_already_done, r.blocks_written, r.blocks)
    """
)


def recorded_blocks(tmp_path) -> int:
    """Blocks the completion record of ``tmp_path/out.zarr/pred`` says are done."""
    return recorded(tmp_path / ".out.zarr.pred.predict-done.zarr")


def recorded(path) -> int:
    """Blocks the completion record at ``path`` says are done (0 while it does not exist yet)."""
    import zarr

    try:
        return int(np.count_nonzero(zarr.open_array(str(path), mode="r")[:]))
    except Exception:  # not created yet, or being replaced
        return 0


def test_resume_after_killing_the_process(tmp_path):
    raw = tissue((8, 48, 48), seed=3)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = str(tmp_path / "out.zarr" / "pred")
    run = dict(tests=str(Path(__file__).parent), spec=spec, out=out, window=WINDOW, chunks=CHUNKS)
    # the process kills itself (SIGKILL) right after its third block is recorded: no race with the clock
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(stop_after=3, **run)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    written = recorded_blocks(tmp_path)
    assert 3 <= written < 18
    again = subprocess.run([sys.executable, "-c", KILLED_RUN.format(stop_after=0, **run)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    already, now, total = map(int, again.stdout.split("SUMMARY")[1].split())
    assert already >= written and already + now == total
    np.testing.assert_array_equal(read(out), predict_reference(make_slow_model(0.0), raw, WINDOW))


@pytest.mark.slow
def test_a_killed_dask_worker_does_not_change_the_result(tmp_path):
    from cleftchunk.run.cluster import ClusterSpec, dask_client

    raw = tissue((8, 48, 48), seed=4)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = str(tmp_path / "out.zarr" / "pred")
    model = make_slow_model(0.05)
    with dask_client(ClusterSpec(workers=2, cores=2)) as client:
        pids = list(client.run(os.getpid).values())
        outcome = {}

        def run():
            try:
                outcome["result"] = predict(model, spec, out, window=WINDOW, chunks=CHUNKS, block_shape=(4, 16, 16), scheduler=client.scheduler.address, **QUIET)
            except BaseException as e:  # reported below
                outcome["error"] = e

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 60
        while time.time() < deadline and thread.is_alive():
            if recorded_blocks(tmp_path) >= 2:
                break
            time.sleep(0.05)
        assert thread.is_alive(), "the run finished before a worker could be killed"
        os.kill(pids[0], signal.SIGKILL)
        thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.blocks_written == result.blocks and not result.failed
    np.testing.assert_array_equal(read(out), predict_reference(make_slow_model(0.0), raw, WINDOW))


def test_runs_on_an_existing_scheduler(tmp_path, raw_spec):
    from distributed import LocalCluster

    raw, spec = raw_spec
    out = str(tmp_path / "out.zarr" / "pred")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0", scheduler_port=0) as cluster:
        result = predict(tiny_model(), spec, out, window=WINDOW, chunks=CHUNKS, block_shape=(4, 32, 32), scheduler=cluster.scheduler_address, **QUIET)
    assert result.blocks_written == result.blocks
    np.testing.assert_array_equal(read(out), predict_reference(tiny_model(), raw, WINDOW))


def test_out_of_gpu_memory_names_a_smaller_batch():
    class Oom(torch.nn.Module):
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    runner = TileRunner(Oom(), PredictParams(WINDOW, batch_size=8))
    with pytest.raises(GpuOutOfMemory, match=r"batch size 8.*try -b 4"):
        list(runner.run([np.zeros(WINDOW, np.uint8)]))


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    return save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (4, 32, 32))


@pytest.fixture
def small_input(tmp_path):
    raw = tissue((6, 40, 40), seed=6)
    return raw, write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(2, 32, 32))


def test_cli_resumes_same_parameters_and_refuses_others(tmp_path, run_cli, checkpoint, small_input):
    raw, spec = small_input
    out = tmp_path / "out.zarr" / "pred"
    base = ("predict", spec, out, "-pm", checkpoint, "--workers", "0", "--chunks", "2,32,32", "--no-progress")
    run_cli(*base)
    first = read(out)
    again = run_cli(*base)
    assert "already complete" in again.output
    refused = run_cli(*base, "--overlap", "0.75", expect=2)
    assert "exists, predicted with other parameters (overlap differ)" in refused.output
    assert refused.output.count("\n") == 1
    np.testing.assert_array_equal(read(out), first)  # nothing lost
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    torch.manual_seed(1)
    net = build_model("unetv0", preset="small")
    other = save_checkpoint(tmp_path / "other.pth", net, arch_spec(net), (4, 32, 32))
    refused = run_cli("predict", spec, out, "-pm", other, "--workers", "0", "--chunks", "2,32,32", expect=2)
    assert "other parameters (model_sha256 differ)" in refused.output
    run_cli(*base, "--overlap", "0.75", "--overwrite")
    assert (read(out) != first).any()


def test_cli_small_input_is_padded_with_a_warning(tmp_path, run_cli, checkpoint):
    raw = np.random.default_rng(0).integers(0, 256, (3, 20, 40), dtype=np.uint8)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(2, 16, 16))
    out = tmp_path / "out.zarr" / "pred"
    result = run_cli("predict", spec, out, "-pm", checkpoint, "--workers", "0", "--chunks", "2,16,16", "--no-progress")
    assert "warning: input (3, 20, 40) is smaller than the model window (4, 32, 32) along z, y" in result.output
    from cleftchunk.model import load_model

    np.testing.assert_array_equal(read(out), predict_reference(load_model(checkpoint), raw, (4, 32, 32)))


def test_cli_tutorial_options(tmp_path, run_cli, checkpoint):
    root = tmp_path / "cremi"
    for name, seed in (("a", 1), ("b", 2)):
        write_volume(root / "images" / f"{name}.zarr" / "raw", tissue((4, 32, 32), seed=seed), chunks=(2, 32, 32))
    run_cli(
        "predict", "-t", root, "-dn", "images/a.zarr/raw@images/b.zarr/raw", "-o", tmp_path / "outputs",
        "-mi", "4,32,32", "-g", "0", "-c", "1", "-b", "2", "-ac", "unetv0", "-lm", "True", "-pm", checkpoint,
        "--workers", "0", "--no-progress",
    )
    a, b = read(tmp_path / "outputs" / "a.zarr" / "pred"), read(tmp_path / "outputs" / "b.zarr" / "pred")
    assert a.shape == b.shape == (4, 32, 32) and (a != b).any()


def _ckpt_with(tmp_path, name, mutate):
    ckpt = torch.load(tmp_path / "small.pth", weights_only=True)
    mutate(ckpt)
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad-window", "4,30,32 is not a valid model input: .* nearest valid: 4,32,32"),
        ("missing", "does not exist"),
        ("corrupt", "is not a readable cleftchunk checkpoint"),
        ("other-arch", "unknown architecture 'rsunet'"),
        ("wrong-weights", "do not fit its architecture"),
        ("ac-mismatch", "holds a unetv0 model, not rsunet"),
        ("not-3d", "(2-D|has 2 axes).*3-D"),
        ("not-prediction", "exists and is not a cleftchunk prediction: pass --overwrite"),
        ("no-checkpoint", "no model given: pass --checkpoint"),
        ("bad-block", "not a multiple of the output chunks .*: use --block-shape 4,32,32"),
    ],
)
def test_cli_one_line_errors(tmp_path, run_cli, checkpoint, small_input, case, message):
    _, spec = small_input
    ckpt, inp, extra = checkpoint, spec, []
    out = tmp_path / "out.zarr" / "pred"
    if case == "bad-window":
        extra = ["-mi", "4,30,32"]
    elif case == "missing":
        ckpt = tmp_path / "nope.pth"
    elif case == "corrupt":
        ckpt = tmp_path / "corrupt.pth"
        ckpt.write_bytes(random.Random(3).randbytes(2000))  # seeded: CI must not draw its own
    elif case == "other-arch":
        ckpt = _ckpt_with(tmp_path, "other.pth", lambda c: c["arch"].update(name="rsunet"))
    elif case == "wrong-weights":
        ckpt = _ckpt_with(tmp_path, "wrong.pth", lambda c: c["arch"].update(filters=[32, 64, 128, 256, 256]))
    elif case == "ac-mismatch":
        extra = ["-ac", "rsunet"]
    elif case == "not-3d":
        zarr.create_array(str(tmp_path / "flat.zarr"), shape=(40, 40), dtype="uint8")
        inp = str(tmp_path / "flat.zarr")
    elif case == "not-prediction":
        write_volume(out, np.zeros((6, 40, 40), np.uint8))
    elif case == "bad-block":
        extra = ["--chunks", "2,32,32", "--block-shape", "3,32,32"]
    args = ["predict", inp, out] + ([] if case == "no-checkpoint" else ["--checkpoint", ckpt]) + extra + ["--workers", "0"]
    result = run_cli(*args, expect=2)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    import re

    assert re.search(message, result.output), result.output
    if case == "not-prediction":
        assert not read(out).any()  # left as it was


# -- the engine: dry run, completion record, existing scheduler -------------------------------------
def test_cli_dry_run_prints_the_plan_and_creates_nothing(tmp_path, run_cli, checkpoint, small_input):
    _, spec = small_input
    out = tmp_path / "out.zarr" / "pred"
    result = run_cli("predict", spec, out, "-pm", checkpoint, "--chunks", "2,32,32", "--block-shape", "2,32,32", "--dry-run")
    text = result.output
    for word in ("blocks of (2, 32, 32)", "tasks:", "tiles:", "scratch:", "memory per worker", "output uint8", "nothing was run"):
        assert word in text, text
    assert not (tmp_path / "out.zarr").exists() and not list(tmp_path.glob(".out.zarr*"))


def test_a_record_of_another_block_layout_is_not_trusted(tmp_path, raw_spec):
    raw, spec = raw_spec
    out = str(tmp_path / "out.zarr" / "pred")
    model = tiny_model()
    options = dict(window=WINDOW, pad=True, chunks=CHUNKS, **QUIET)
    # a first run that fails half-way leaves a record and spills of blocks 4,16,16
    flag = tmp_path / "fail"
    flag.touch()
    with pytest.raises(CleftchunkError):
        predict(FailingAfter(model, 6, str(flag)), spec, out, block_shape=(4, 16, 16), retries=0, **options)
    assert 0 < recorded_blocks(tmp_path)
    flag.unlink()  # the same model (and hash) now never fails; another layout: everything is redone
    result = predict(FailingAfter(model, 6, str(flag)), spec, out, block_shape=(8, 32, 16), **options)
    assert result.blocks_already_done == 0 and result.blocks_written == result.blocks
    np.testing.assert_array_equal(read(out), predict_reference(model, raw, WINDOW, pad=True))


class FailingAfter(torch.nn.Module):
    """Runs ``inner``, but fails every call after the first ``n`` while ``flag`` exists."""

    def __init__(self, inner, n, flag):
        super().__init__()
        self.inner, self.n, self.flag, self.calls = inner, n, flag, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.n and os.path.exists(self.flag):
            raise RuntimeError("planned failure")
        return self.inner(x)


def test_cli_on_an_existing_scheduler_gives_the_bytes_of_a_local_run(tmp_path, run_cli, checkpoint, small_input):
    from distributed import LocalCluster

    _, spec = small_input
    common = ("-pm", checkpoint, "--chunks", "2,32,32", "--block-shape", "2,32,32", "--no-progress")
    run_cli("predict", spec, tmp_path / "local.zarr" / "pred", "--workers", "0", *common)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster:
        run_cli("predict", spec, tmp_path / "remote.zarr" / "pred", "--scheduler", cluster.scheduler_address, *common)
    np.testing.assert_array_equal(read(tmp_path / "remote.zarr" / "pred"), read(tmp_path / "local.zarr" / "pred"))


# -- the default path of a local CPU job: task threads in this process -------------------------------
class Where(torch.nn.Module):
    """Records the process and thread of every call, and torch's thread count there."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, set()

    def forward(self, x):
        self.seen.add((os.getpid(), threading.get_ident(), torch.get_num_threads()))
        return self.inner(x)


def test_a_local_cpu_job_runs_in_task_threads_of_this_process(tmp_path, raw_spec):
    raw, spec = raw_spec
    model = Where(tiny_model())
    out = str(tmp_path / "out.zarr" / "pred")
    before = torch.get_num_threads()
    result = predict(model, spec, out, window=WINDOW, pad=True, chunks=CHUNKS, block_shape=(4, 16, 16), gpus=0, cores=2, **QUIET)
    np.testing.assert_array_equal(read(out), predict_reference(tiny_model(), raw, WINDOW, pad=True))
    assert result.tiles_ratio == 1 and result.failed == []
    assert {pid for pid, _, _ in model.seen} == {os.getpid()}  # no worker process
    assert threading.get_ident() not in {t for _, t, _ in model.seen}  # task threads, not the caller's
    assert {n for _, _, n in model.seen} == {1}  # one torch thread per task thread (2 cores, 2 threads)
    assert torch.get_num_threads() == before  # the caller's setting is given back


def test_a_one_block_cpu_job_gives_its_task_thread_every_core(tmp_path, raw_spec):
    raw, spec = raw_spec
    model = Where(tiny_model())
    out = str(tmp_path / "out.zarr" / "pred")
    result = predict(model, spec, out, window=WINDOW, pad=True, chunks=CHUNKS, block_shape=raw.shape, gpus=0, cores=2, **QUIET)
    assert result.blocks == 1
    np.testing.assert_array_equal(read(out), predict_reference(tiny_model(), raw, WINDOW, pad=True))
    assert {n for _, _, n in model.seen} == {2}  # one block: its one task thread runs torch on both cores


@pytest.mark.parametrize("in_memory", [True, False])
def test_int64_sums_give_the_same_bytes(tmp_path, raw_spec, monkeypatch, in_memory):
    """Sums in int64 (as with overlap above 0.75), spilled in memory or to files: the reference's bytes."""
    import cleftchunk.predict.plan as plan_module
    import cleftchunk.predict.tasks as tasks
    import cleftchunk.predict.tiling as tiling

    raw, spec = raw_spec
    model = tiny_model()
    for module in (tasks, tiling, plan_module):
        monkeypatch.setattr(module, "sums_dtype", lambda grid: np.dtype(np.int64))
    out = str(tmp_path / "out.zarr" / "pred")
    where = dict(gpus=0) if in_memory else dict(threads=2, memory_spills=0)
    result = predict(model, spec, out, window=WINDOW, pad=True, chunks=CHUNKS, block_shape=(4, 16, 16), **where, **QUIET)
    np.testing.assert_array_equal(read(out), predict_reference(model, raw, WINDOW, pad=True))
    assert (result.spill_memory_bytes if in_memory else result.spill_bytes) > 0


def test_a_local_cpu_job_hands_spills_over_in_memory_and_resumes_without_them(tmp_path, raw_spec):
    raw, spec = raw_spec
    model = tiny_model()
    out = str(tmp_path / "out.zarr" / "pred")
    options = dict(window=WINDOW, pad=True, chunks=CHUNKS, block_shape=(4, 16, 16), gpus=0, **QUIET)
    expected = predict_reference(model, raw, WINDOW, pad=True)
    result = predict(model, spec, out, **options)
    np.testing.assert_array_equal(read(out), expected)
    assert result.spill_bytes == 0 and result.spill_memory_bytes > 0
    # a run that fails half-way: its spills were in memory only, so the resumed run reruns the
    # tiles of done blocks that remaining blocks need, and gives the same bytes
    flag = tmp_path / "fail"
    flag.touch()
    with pytest.raises(CleftchunkError):
        predict(FailingAfter(model, 6, str(flag)), spec, out, overwrite=True, retries=0, **options)
    assert 0 < recorded_blocks(tmp_path)
    flag.unlink()
    resumed = predict(FailingAfter(model, 6, str(flag)), spec, out, **options)
    assert resumed.blocks_already_done > 0 and resumed.failed == []
    np.testing.assert_array_equal(read(out), expected)


def test_spills_over_the_memory_budget_go_to_disk(tmp_path):
    from cleftchunk.predict.scratch import Scratch

    scratch = Scratch(str(tmp_path / "scratch"))
    scratch.ensure()
    piece = np.arange(1, 25, dtype=np.int64).reshape(2, 3, 4)
    with scratch.in_memory(budget=piece.nbytes):
        assert scratch.save_spill((0, 0, 0), {(0, 0, 1): piece}, {"tiles": 3}) == {"spill_bytes": 0, "spill_memory_bytes": piece.nbytes}
        spilled = scratch.save_spill((0, 0, 1), {(0, 0, 2): piece}, {"tiles": 2})  # over the budget: a file
        assert spilled["spill_bytes"] > 0 and spilled["spill_memory_bytes"] == 0
        assert not list((tmp_path / "scratch" / "spill").glob("0_0_0*"))
        for index, user in (((0, 0, 0), (0, 0, 1)), ((0, 0, 1), (0, 0, 2))):
            np.testing.assert_array_equal(scratch.load_piece(index, user, piece.shape), piece)
        assert scratch.spill_stats((0, 0, 0)) == {"tiles": 3}
        scratch.drop_spill((0, 0, 0))
        assert scratch.spill_stats((0, 0, 0)) is None
        assert scratch.save_spill((0, 0, 2), {(0, 0, 3): piece}, {"tiles": 1})["spill_memory_bytes"] == piece.nbytes  # room again
    assert scratch.spill_stats((0, 0, 2)) is None  # forgotten with the run


@pytest.mark.parametrize("where", ["threads", "processes-free cluster"])
def test_the_device_path_keeps_sums_as_tensors_and_blends_them_to_the_same_bytes(tmp_path, raw_spec, monkeypatch, where):
    """The GPU code path — own sums kept as torch tensors, the blend in torch, only uint8 back —
    run on the CPU (no GPU here): the reference's bytes, spills in memory or through files."""
    import torch

    import cleftchunk.predict.tasks as tasks

    raw, spec = raw_spec
    model = tiny_model()
    from cleftchunk.predict import Predict

    monkeypatch.setattr(Predict, "sums_as_tensors_on_cpu", True)
    seen = []
    blended = tasks.blended_uint8_of_parts_torch
    monkeypatch.setattr(tasks, "blended_uint8_of_parts_torch", lambda parts, den, device: seen.append(device) or blended(parts, den, device))
    out = str(tmp_path / "out.zarr" / "pred")
    options = dict(gpus=0) if where == "threads" else dict(threads=2, memory_spills=0)
    result = predict(model, spec, out, window=WINDOW, pad=True, chunks=CHUNKS, block_shape=(4, 16, 16), **options, **QUIET)
    np.testing.assert_array_equal(read(out), predict_reference(model, raw, WINDOW, pad=True))
    # every block whose own tiles ran went through the torch blend (those owning none have no sums to keep)
    assert seen and all(d == torch.device("cpu") for d in seen)
    assert result.blocks // 2 < len(seen) <= result.blocks
