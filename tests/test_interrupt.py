"""Interruption at scale: a predict with several worker processes killed twice (the whole process
group, workers included) and resumed each time gives the bytes of an uninterrupted run.

The kills come at known blocks (tests/stop_at_block.py hooks the executor), not after a guessed
time, so the test neither depends on the machine's speed nor races the run's end."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cleftchunk.io.volumes import create_volume, open_volume
from stop_at_block import recorded, summary

STOP = Path(__file__).parent / "stop_at_block.py"
SHAPE, CHUNKS = (8, 64, 64), "4,16,16"


def predict_args(tmp_path: Path, out: str, workers: int) -> list[str]:
    return ["predict", str(tmp_path / "in.zarr" / "raw"), out, "--checkpoint", str(tmp_path / "small.pth"),
            "--chunks", CHUNKS, "--block-shape", CHUNKS, "--workers", str(workers), "--no-progress"]


def run_stopped(tmp_path: Path, out: str, stop_after: int) -> subprocess.CompletedProcess:
    """Run predict with 2 worker processes; with ``stop_after``, SIGKILL its process group then."""
    return subprocess.run([sys.executable, str(STOP), str(stop_after), *predict_args(tmp_path, out, 2)],
                          capture_output=True, text=True, timeout=300, start_new_session=True)


@pytest.mark.slow
def test_two_kills_of_a_multi_worker_predict_resume_to_the_same_bytes(tmp_path):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (4, 32, 32))
    raw = np.random.default_rng(5).integers(0, 256, SHAPE, dtype=np.uint8)
    volume = create_volume(tmp_path / "in.zarr" / "raw", SHAPE, np.uint8, chunks=(4, 16, 16))
    volume.write(volume.roi, raw)
    out = str(tmp_path / "out.zarr" / "pred")

    first = run_stopped(tmp_path, out, 3)
    assert first.returncode == -signal.SIGKILL and recorded(first.stdout) == 3, first.stdout + first.stderr
    second = run_stopped(tmp_path, out, 3)
    assert second.returncode == -signal.SIGKILL and recorded(second.stdout) == 6, second.stdout + second.stderr
    final = run_stopped(tmp_path, out, 0)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "taking over the lock" in final.stderr  # the killed run's lock, left behind
    assert summary(final.stdout) == (6, 26, 32)

    from cleftchunk_cli.main import main

    with pytest.raises(SystemExit) as done:  # the same command, uninterrupted, in this process's threads
        main(predict_args(tmp_path, str(tmp_path / "whole.zarr" / "pred"), 0))
    assert done.value.code == 0
    np.testing.assert_array_equal(open_volume(out)[:], open_volume(tmp_path / "whole.zarr" / "pred")[:])
