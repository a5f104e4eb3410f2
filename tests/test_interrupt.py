"""Interruption at scale: a predict with several worker processes killed twice (the whole process
group, workers included) and resumed each time gives the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_predict import CHUNKS, WINDOW, make_slow_model, read, tissue, write_volume

from cleftchunk.predict import predict_reference

RUN = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_predict import make_slow_model
    from test_predict import predict
    if __name__ == "__main__":
        r = predict(make_slow_model({delay}), {spec!r}, {out!r}, window={window!r}, chunks={chunks!r}, block_shape=(4, 16, 16),
                    workers=2, cores=2, progress=False)
        print("SUMMARY", r.blocks_already_done, r.blocks_written, r.blocks)
    """
)


def done_count(tmp_path: Path) -> int:
    """Blocks the completion record says are done (0 until it exists)."""
    from test_predict import recorded_blocks

    return recorded_blocks(tmp_path)


def run_until(script: Path, tmp_path: Path, at_least: int, seconds: float = 180) -> int:
    """Start the run, SIGKILL its whole process group once ``at_least`` blocks are done."""
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and done_count(tmp_path) < at_least:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return done_count(tmp_path)


@pytest.mark.slow
def test_two_kills_of_a_multi_worker_predict_resume_to_the_same_bytes(tmp_path):
    raw = tissue((8, 64, 64), seed=5)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw)
    out = str(tmp_path / "out.zarr" / "pred")
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(Path(__file__).parent), delay=0.08, spec=spec, out=out, window=WINDOW, chunks=CHUNKS))
    first = run_until(script, tmp_path, 3)
    second = run_until(script, tmp_path, first + 3)
    assert 3 <= first < second < 32
    final = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "taking over the lock" in final.stderr  # the killed run's lock, left behind
    already, now, total = map(int, final.stdout.split("SUMMARY")[1].split())
    assert total == 32 and already >= second and already + now == total
    np.testing.assert_array_equal(read(out), predict_reference(make_slow_model(0.0), raw, WINDOW))
