"""One writer per output (two real processes), stale locks taken over, and outputs that would
destroy an input refused whatever --overwrite says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import (
    CHUNKS,
    SLOW_RUN,
    WINDOW,
    make_slow_model,
    read,
    tissue,
    write_volume,
)

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import lock_path, output_lock, refuse_overlap
from cleftchunk.predict import predict_reference

# servers, clusters and subprocesses: part of the full suite, not of the quick loop
pytestmark = pytest.mark.slow


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.05)
    assert path.exists(), "the first run never took its lock: " + (proc.stdout.read() if proc.poll() is not None else "")


def make_held_model(hold: str):
    """The tiny model of test_predict, whose every forward waits while the file ``hold`` exists:
    the first run is still writing, whatever the machine's load, until the test lets it go."""
    inner = make_slow_model(0.0)

    class Held(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            while os.path.exists(hold):
                time.sleep(0.02)
            return self.inner(x)

    return Held().eval()


HELD_RUN = SLOW_RUN.replace("from test_predict import make_slow_model", "from test_guard import make_held_model").replace(
    "make_slow_model({delay})", "make_held_model({hold!r})"
)


def test_a_second_predict_on_the_same_output_refuses_and_the_first_finishes_exactly(tmp_path):
    raw = tissue((8, 48, 48), seed=3)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = str(tmp_path / "out.zarr" / "pred")
    hold = tmp_path / "hold"
    hold.touch()
    code = HELD_RUN.format(tests=str(Path(__file__).parent), hold=str(hold), spec=spec, out=out, window=WINDOW, chunks=CHUNKS)
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lock_path(out), first)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    still_running = first.poll() is None
    hold.unlink()  # let the first run go before any assertion can fail
    assert still_running, "the first run ended before the second started"
    assert second.returncode != 0
    message = second.stderr.strip().splitlines()[-1]
    assert "is being written by another cleftchunk process" in message and f"PID {first.pid} on {socket.gethostname()}" in message
    assert first.wait(120) == 0, first.stdout.read()
    assert not lock_path(out).exists()
    np.testing.assert_array_equal(read(out), predict_reference(make_slow_model(0.0), raw, WINDOW))


def test_two_converts_on_one_output_do_not_interleave(tmp_path, run_cli):
    data = np.random.default_rng(0).integers(0, 256, (32, 256, 256), dtype=np.uint8)
    src = write_volume(tmp_path / "src.zarr" / "raw", data, chunks=(4, 64, 64))
    dst = tmp_path / "dst.zarr" / "raw"
    args = [sys.executable, "-m", "cleftchunk_cli.main", "convert", src, str(dst), "--chunks", "1,32,32", "--threads", "1", "--no-progress"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lock_path(dst), first)
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finished_first = first.wait(120)
    assert second.returncode != 0, "the second conversion ran alongside the first"
    assert "is being written by another cleftchunk process" in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert finished_first == 0, first.stdout.read()
    single = tmp_path / "single.zarr" / "raw"
    run_cli("convert", src, single, "--chunks", "1,32,32", "--threads", "1", "--no-progress")
    np.testing.assert_array_equal(read(dst), read(single))
    np.testing.assert_array_equal(read(dst), data)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "out.zarr" / "pred"
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "then", "command": "predict"}))
    warnings = []
    with output_lock(out, "predict", warnings.append) as held:
        assert held == lock and json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and "taking over the lock" in warnings[0]
    assert not lock.exists()


def test_a_live_lock_is_respected_and_one_of_another_host_is_never_taken(tmp_path):
    out = tmp_path / "out.zarr" / "pred"
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for record in ({"host": socket.gethostname(), "pid": os.getppid()}, {"host": "elsewhere", "pid": dead_pid()}):
        lock.write_text(json.dumps(record))
        with pytest.raises(CleftchunkError, match=f"PID {record['pid']} on {record['host']}.*delete {lock}"):
            with output_lock(out, "predict"):
                pass
        assert json.loads(lock.read_text()) == record  # untouched


@pytest.mark.parametrize(
    "output, relation",
    [("in.zarr/raw", "is where the source lives"), ("in.zarr/raw/s0", "lies inside the source"), ("in.zarr", "contains the source")],
)
def test_outputs_on_inputs_are_refused(tmp_path, output, relation):
    with pytest.raises(CleftchunkError, match=f"{relation}.*would destroy the source"):
        refuse_overlap(tmp_path / output, [tmp_path / "in.zarr" / "raw"])
    refuse_overlap(tmp_path / "in.zarr" / "pred", [tmp_path / "in.zarr" / "raw"])  # a sibling is fine


def test_an_output_reached_through_a_symlink_is_still_the_input(tmp_path):
    (tmp_path / "in.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "in.zarr")
    with pytest.raises(CleftchunkError, match="is where the source lives"):
        refuse_overlap(tmp_path / "link.zarr" / "raw", [tmp_path / "in.zarr" / "raw"])


def test_an_output_killed_between_its_group_and_its_array_is_created_again(tmp_path):
    """What a kill right after ``require_group`` leaves (the group's zarr.json, no s0) resumes."""
    import shutil

    from test_predict import QUIET, predict, tiny_model

    from cleftchunk.io.volumes import create_volume, exists

    raw = tissue((4, 32, 32), seed=2)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = tmp_path / "out.zarr" / "pred"
    create_volume(out, raw.shape, np.uint8, chunks=CHUNKS)
    shutil.rmtree(out / "s0")
    assert not exists(out) and exists(tmp_path / "in.zarr" / "raw")
    predict(tiny_model(), spec, str(out), window=WINDOW, chunks=CHUNKS, workers=0, **QUIET)
    np.testing.assert_array_equal(read(out), predict_reference(tiny_model(), raw, WINDOW))
