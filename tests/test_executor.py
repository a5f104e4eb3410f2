"""The block-wise executor: every block once, failures per block, batches of tiny blocks, the
completion record after real kills."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from cleftchunk.geometry import Roi
from cleftchunk.run.executor import BlockwiseTask, run_blockwise
from cleftchunk.run.layout import GridLayout
from cleftchunk.run.records import BlockRecord


def expected_of(shape):
    return (np.arange(np.prod(shape), dtype=np.int64).reshape(shape) * 7 % 251).astype(np.uint8)


def write_block(path, block, _prepared=None, delay=0.0, fail_at=None):
    """Writes expected_of's values into the block's region of the array at ``path``."""
    if fail_at is not None and block.index[1] == fail_at:
        raise ValueError(f"planned failure at {block.index}")
    time.sleep(delay)
    array = zarr.open_array(path, mode="r+")
    full = expected_of(array.shape)
    array[block.write_roi.to_slices()] = full[block.write_roi.to_slices()]
    return {"voxels": block.write_roi.size}


@pytest.fixture
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0", scheduler_port=0) as cluster:
        with Client(cluster) as c:
            yield c


def _task(tmp_path, shape, block_shape, batch=1, record_identity="a", **kw):
    import functools

    path = str(tmp_path / "out.zarr")
    if not (tmp_path / "out.zarr").exists():
        zarr.create_array(path, shape=shape, chunks=block_shape, dtype="uint8", fill_value=0)
    layout = GridLayout(Roi.from_shape(shape), block_shape)
    record, _ = BlockRecord.open(tmp_path / "record.zarr", len(layout), record_identity)
    return path, BlockwiseTask("test", layout, functools.partial(write_block, path, **kw), record=record, batch=batch)


@pytest.mark.parametrize("block_shape,batch", [((2, 4, 4), 1), ((3, 5, 4), 7), ((8, 16, 16), 300)])
def test_every_block_is_written_once_and_recorded(tmp_path, client, block_shape, batch):
    shape = (8, 16, 16)
    path, task = _task(tmp_path, shape, block_shape, batch)
    report = run_blockwise(client, task, progress=False)
    assert report.written == report.blocks == len(task.layout) and not report.failed
    assert report.counts["voxels"] == np.prod(shape)
    np.testing.assert_array_equal(zarr.open_array(path)[:], expected_of(shape))
    assert np.all(zarr.open_array(str(tmp_path / "record.zarr"))[:] == 1)
    _, again = _task(tmp_path, shape, block_shape, batch)
    report = run_blockwise(client, again, progress=False)
    assert report.already_done == report.blocks and report.written == 0


def test_failing_blocks_are_reported_with_their_region_and_the_rest_finishes(tmp_path, client):
    shape = (4, 16, 16)
    path, task = _task(tmp_path, shape, (4, 4, 16), fail_at=2)
    report = run_blockwise(client, task, retries=1, progress=False)
    assert len(report.failed) == 1 and report.written == 3
    roi, error = report.failed[0]
    assert roi == Roi((0, 8, 0), (4, 4, 16)) and "ValueError: planned failure at (0, 2, 0)" in error
    got = zarr.open_array(path)[:]
    np.testing.assert_array_equal(got[:, :8], expected_of(shape)[:, :8])
    assert not got[:, 8:12].any()
    assert list(zarr.open_array(str(tmp_path / "record.zarr"))[:]) == [1, 1, 0, 1]


def test_a_record_with_another_identity_is_not_trusted(tmp_path):
    record, trusted = BlockRecord.open(tmp_path / "r.zarr", 10, "one")
    record.mark_done(3)
    record.flush()
    assert not trusted and BlockRecord.open(tmp_path / "r.zarr", 10, "one")[0].is_done(3)
    other, trusted = BlockRecord.open(tmp_path / "r.zarr", 10, "two")
    assert not trusted and other.count_done() == 0
    assert not BlockRecord.open(tmp_path / "r.zarr", 11, "two")[1]


KILLED_RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from distributed import Client, LocalCluster
    from stop_at_block import install
    from test_executor import _task
    from cleftchunk.run.executor import run_blockwise
    if __name__ == "__main__":
        install({stop_after})
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0", scheduler_port=0) as cluster, Client(cluster) as c:
            _, task = _task(Path({tmp!r}), (4, 64, 64), (1, 16, 16))
            run_blockwise(c, task, progress=False)
    """
)


@pytest.mark.slow
def test_the_record_never_says_done_for_unwritten_data_and_resume_finishes_after_a_kill(tmp_path):
    """Killed (SIGKILL) after 8 blocks, then after 24 more, then run to the end: each kill leaves a
    record of exactly the blocks written so far, the data of every recorded block is there, and the
    last run does only what is left."""
    from pathlib import Path

    from stop_at_block import recorded, summary

    layout = GridLayout(Roi.from_shape((4, 64, 64)), (1, 16, 16))
    for stop_after, expect_done in ((8, 8), (24, 32), (0, 64)):
        code = KILLED_RUN.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), stop_after=stop_after)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, start_new_session=True)
        done = zarr.open_array(str(tmp_path / "record.zarr"))[:]
        got = zarr.open_array(str(tmp_path / "out.zarr"))[:]
        assert done.sum() == expect_done, proc.stdout + proc.stderr
        for block in layout.blocks():
            if done[layout.order(block.index)]:
                s = block.write_roi.to_slices()
                np.testing.assert_array_equal(got[s], expected_of((4, 64, 64))[s])
        if stop_after:
            assert proc.returncode == -signal.SIGKILL and recorded(proc.stdout) == expect_done, proc.stdout + proc.stderr
        else:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert summary(proc.stdout) == (32, 32, 64)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[:], expected_of((4, 64, 64)))


def _noop(block, _prepared=None):
    return {"voxels": block.write_roi.size}


@pytest.mark.slow
def test_tiny_blocks_go_through_fast_in_batches(tmp_path):
    """The executor's own cost per block: no-op blocks on 2 worker processes. Goal (idle machine)
    ≥ 500 blocks/s; asserted with room for a loaded shared machine."""
    from distributed import Client, LocalCluster

    layout = GridLayout(Roi.from_shape((20, 100, 100)), (1, 10, 10))  # 2,000 blocks
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster:
        with Client(cluster) as c:
            record, _ = BlockRecord.open(tmp_path / "r.zarr", len(layout), "noop")
            started = time.perf_counter()
            report = run_blockwise(c, BlockwiseTask("noop", layout, _noop, record=record, batch=layout.auto_batch()), progress=False)
            rate = report.written / (time.perf_counter() - started)
    assert report.written == 2000 and record.count_done() == 2000
    assert rate > 150, f"{rate:.0f} blocks/s"


# -- threads of this process (run/local.py) ----------------------------------------------------------
@pytest.mark.parametrize("threads,batch", [(1, 1), (3, 1), (2, 5)])
def test_a_thread_client_runs_every_block_once_with_records_and_failures(tmp_path, threads, batch):
    from cleftchunk.run.local import ThreadClient

    shape = (4, 16, 16)
    path, task = _task(tmp_path, shape, (1, 4, 16), batch=batch, fail_at=2)
    with ThreadClient(threads) as client:
        report = run_blockwise(client, task, retries=1, progress=False)
    assert report.written == 12 and len(report.failed) == 4
    assert all("planned failure" in error for _, error in report.failed)
    got = zarr.open_array(path)[:]
    np.testing.assert_array_equal(got[:, :8], expected_of(shape)[:, :8])
    assert not got[:, 8:12].any()
    done = zarr.open_array(str(tmp_path / "record.zarr"))[:].reshape(4, 4)
    assert (done[:, 2] == 0).all() and done[:, [0, 1, 3]].all()


def test_one_thread_runs_tasks_in_order_when_results_are_awaited_so_an_interrupt_keeps_what_came_before(tmp_path):
    """A Ctrl-C in the fourth block: the three before it were handed to ``collect`` already."""
    from cleftchunk.run.local import ThreadClient

    layout = GridLayout(Roi.from_shape((1, 1, 8)), (1, 1, 1))
    ran, collected = [], []

    def process(block, _prepared=None):
        if len(ran) == 3:
            raise KeyboardInterrupt
        ran.append(block.index)
        return block.index

    task = BlockwiseTask("order", layout, process, collect=lambda block, result: collected.append(result))
    with pytest.raises(KeyboardInterrupt), ThreadClient(1) as client:
        run_blockwise(client, task, progress=False)
    assert ran == collected == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_thread_client_hands_prepared_results_and_shared_arguments_to_process(threads):
    """The predict-like path (prepare, uses, users, release) and process_args, on threads."""
    from cleftchunk.run.local import ThreadClient

    layout = GridLayout(Roi.from_shape((1, 1, 6)), (1, 1, 1))
    released = []

    def prepare(block, own):
        return {"prepared": 1}, block.index[2] * 10

    def process(block, prepared, offset):
        counts, payload = prepared
        assert payload == block.index[2] * 10
        return {**counts, "sum": payload + offset}

    task = BlockwiseTask(
        "prepared", layout, process, prepare=prepare, process_args=(7,),
        uses=lambda i: [(0, 0, i[2] - 1)] if i[2] else [], users=lambda i: [(0, 0, i[2] + 1)] if i[2] < 5 else [],
        release=released.append,
    )
    with ThreadClient(threads) as client:
        report = run_blockwise(client, task, progress=False)
    assert report.written == 6 and not report.failed
    assert report.counts["prepared"] == 6 and report.counts["sum"] == sum(10 * i + 7 for i in range(6))
    assert sorted(released) == [(0, 0, i) for i in range(6)]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_thread_client_starts_queued_tasks_highest_priority_first(threads):
    """As on a Dask scheduler: a block's process (raster priority) goes before later blocks'
    prepare tasks queued earlier, so prepared payloads are not held while those run."""
    import threading

    from cleftchunk.run.local import ThreadClient

    started, gate = [], threading.Event()

    def job(name):
        started.append(name)
        if name.startswith("busy"):
            gate.wait(10)
        return name

    with ThreadClient(threads) as client:
        busy = [client.submit(job, f"busy{i}", priority=100) for i in range(threads if threads > 1 else 0)]
        queued = [client.submit(job, f"low{i}", priority=-i - 10) for i in range(3)]
        urgent = client.submit(job, "urgent", priority=-1)
        gate.set()
        queue = client.as_completed()
        for future in busy + queued + [urgent]:
            queue.add(future)
        while queue.pending:
            queue.next_batch()
        assert [f.result() for f in queued + [urgent]] == ["low0", "low1", "low2", "urgent"]
    assert started[len(busy):] == ["urgent", "low0", "low1", "low2"]


# -- where blocks run: GPUs and schedulers ----------------------------------------------------------
def test_a_broken_cuda_is_an_error_not_a_silent_cpu_run(monkeypatch):
    """torch only warns when CUDA is there but does not start, and reports no GPU; the run says so."""
    import warnings

    import torch

    from cleftchunk.errors import CleftchunkError
    from cleftchunk.run.cluster import resolve_gpus

    def broken() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).")
        return False

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    with pytest.raises(CleftchunkError, match=r"CUDA is installed but does not start \(CUDA initialization: The NVIDIA driver .* too old .*\): .* gpus=0"):
        resolve_gpus(None)
    assert resolve_gpus(0) == 0  # the CPU was asked for: CUDA is not consulted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no driver at all: no GPU, no error
    assert resolve_gpus(None) == 0


def test_a_malformed_scheduler_address_is_named_not_reported_as_a_bug():
    from cleftchunk.errors import CleftchunkError
    from cleftchunk.run.cluster import ClusterSpec, dask_client

    with pytest.raises(CleftchunkError, match=r"--scheduler nonsense::x is not a scheduler address \(invalid address"):
        with dask_client(ClusterSpec(scheduler="nonsense::x")):
            pass
