"""The CPU layout for training (torch threads, loader workers) is chosen by timing both layouts."""

from __future__ import annotations

import numpy as np

from cleftchunk.io.volumes import create_volume
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.train import calibrate
from cleftchunk.train.config import TrainConfig


def write(path, data):
    volume = create_volume(path, data.shape, data.dtype, chunks=(4, 32, 32), voxel_size=(40, 4, 4))
    volume.array[...] = data
    return str(path)


def config(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (8, 96, 96)).astype(np.uint8)
    labels = np.full(raw.shape, CREMI_BACKGROUND, np.uint64)
    labels[2:6, 40:60, 40:60] = 1
    return TrainConfig.from_dict({
        "images": [write(tmp_path / "s.zarr/raw", raw)], "labels": [write(tmp_path / "s.zarr/clefts", labels)],
        "output": str(tmp_path / "out"), "preset": "small", "input_size": [4, 32, 32], "batch_size": 2, "gpus": 0,
        "rejection": {"near_cleft": 0.5},
    })


def test_the_faster_measured_layout_is_chosen(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "available_cores", lambda: 2)
    layout = calibrate.measure_cpu_layout(config(tmp_path), steps=1)
    measured = layout["measured"]
    assert set(measured["step_s"]) == {"1", "2"} and measured["batch_s"] > 0
    options = measured["layouts_s"]
    assert options["2 threads + 0 workers"] == measured["step_s"]["2"] + measured["batch_s"]
    assert options["1 threads + 1 workers"] == max(measured["step_s"]["1"], measured["batch_s"])
    assert layout["seconds_per_iteration"] == min(options.values())
    assert options[f"{layout['threads']} threads + {layout['workers']} workers"] == layout["seconds_per_iteration"]
    assert not (tmp_path / "out").exists()  # measuring writes nothing


def test_one_core_has_one_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "available_cores", lambda: 1)
    layout = calibrate.measure_cpu_layout(config(tmp_path), steps=1)
    assert (layout["threads"], layout["workers"]) == (1, 0)
