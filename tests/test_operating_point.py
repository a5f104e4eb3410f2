"""The model's operating point: chosen on validation data, stored in the checkpoint, recorded by
predict, used by segment by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cleftchunk import open_volume
from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.model import (
    arch_spec,
    build_model,
    checkpoint_postprocess,
    load_checkpoint,
    save_checkpoint,
)
from cleftchunk.train.operating_point import choose_operating_point, sweep

VOXEL = (40.0, 4.0, 4.0)


def blob_and_probabilities():
    gt = np.zeros((4, 200, 200), bool)
    gt[1:3, 95:105, 95:105] = True  # one cleft of 200 voxels
    prob = np.full(gt.shape, 10, np.uint8)
    prob[0:4, 30:170, 30:170] = 150  # a halo (partly > 200 nm from the cleft) the model is unsure about: false positives at low thresholds
    prob[gt] = 220
    prob[1, 5:7, 5:7] = prob[2, 190:192, 190:192] = 240  # confident specks far (> 200 nm) from the cleft
    return prob, gt


def test_sweep_picks_the_threshold_between_halo_and_cleft_and_drops_specks():
    prob, gt = blob_and_probabilities()
    point = sweep(prob, gt, np.zeros_like(gt), VOXEL)
    assert 150 < point["threshold"] <= 220
    assert point["min_size"] == 100  # removes the 4-voxel specks, keeps the 200-voxel cleft
    assert point["validation"]["f1"] == pytest.approx(1.0)
    low = next(r for r in point["thresholds"] if r["threshold"] <= 144)
    assert low["precision"] < point["validation"]["precision"]  # the curve shows the trade-off
    assert [r["min_size"] for r in point["min_sizes"]] == [0, 100, 500, 2000]


def test_a_tolerance_takes_the_middle_of_the_near_best_band_and_the_edge_is_said():
    """A flat curve of CREMI scores: the lowest point is at the top edge, the band's middle is not."""
    prob, gt = blob_and_probabilities()
    prob[1, 5:7, 5:7] = prob[2, 190:192, 190:192] = 10  # no specks: every threshold above the halo is perfect
    exact = sweep(prob, gt, np.zeros_like(gt), VOXEL, thresholds=(144, 168, 192, 216), min_sizes=(0,))
    assert exact["validation"]["cremi_score"] == 0 and exact["at_edge"] is False
    flat = sweep(prob, gt, np.zeros_like(gt), VOXEL, thresholds=(168, 192, 216), min_sizes=(0,), tolerance=0.05)
    assert flat["near_best"] == [168, 192, 216] and flat["threshold"] == 192 and not flat["at_edge"]
    edge = sweep(prob, gt, np.zeros_like(gt), VOXEL, thresholds=(96, 120, 144, 168), min_sizes=(0,), tolerance=0.05)
    assert edge["near_best"] == [168] and edge["threshold"] == 168 and edge["at_edge"]
    with pytest.raises(CleftchunkError, match="tolerance 1.0"):
        sweep(prob, gt, np.zeros_like(gt), VOXEL, tolerance=1.0)


def test_ground_truth_distances_computed_once_give_the_same_metrics():
    from cleftchunk.post.metrics import cremi_metrics_reference, distances_to_gt

    prob, gt = blob_and_probabilities()
    invalid = np.zeros_like(gt)
    invalid[3] = True
    distances = distances_to_gt(gt, VOXEL, invalid)
    for t in (100, 150, 230):
        assert cremi_metrics_reference(prob >= t, gt, VOXEL, invalid_mask=invalid, gt_distances=distances) == \
            cremi_metrics_reference(prob >= t, gt, VOXEL, invalid_mask=invalid)


def write(path, data, chunks=(4, 32, 32)):
    volume = create_volume(path, data.shape, data.dtype, chunks=chunks, voxel_size=VOXEL)
    volume.array[...] = data
    return str(path)


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    ckpt = save_checkpoint(tmp_path / "m.pth", net, arch_spec(net), (4, 32, 32))
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (8, 64, 64)).astype(np.uint8)
    labels = np.full(raw.shape, CREMI_BACKGROUND, np.uint64)
    labels[5:7, 20:30, 20:30] = 3
    return ckpt, write(tmp_path / "s.zarr/raw", raw), write(tmp_path / "s.zarr/clefts", labels)


def test_the_chosen_point_travels_from_checkpoint_to_predict_to_segment(tmp_path, trained):
    from cleftchunk.post.segment import segment
    from cleftchunk.predict import OutputOptions, predict
    from cleftchunk.run.options import RunOptions
    from cleftchunk.predict.params import ATTR

    ckpt, raw, labels = trained
    entry = choose_operating_point(ckpt, raw, labels, "4:8,:,:", batch_size=1, thresholds=(64, 128, 192), min_sizes=(0, 7))
    stored = load_checkpoint(ckpt)
    assert stored["postprocess"]["threshold"] == entry["threshold"] in (64, 128, 192)
    assert stored["postprocess"]["chosen_on"]["roi"] == "4:8,:,:"
    assert "model" in stored and stored["iteration"] == 0  # the rest of the checkpoint is kept
    chosen = checkpoint_postprocess(stored)

    out = str(tmp_path / "r.zarr/pred")
    predict(ckpt, raw, out, run=RunOptions(workers=0, progress=False), out=OutputOptions(chunks=(4, 32, 32)))
    assert dict(open_volume(out).array.attrs)[ATTR]["postprocess"] == chosen
    default = segment(out, str(tmp_path / "r.zarr/clefts"))
    assert (default.threshold, default.min_size) == (chosen["threshold"], chosen["min_size"])
    given = segment(out, str(tmp_path / "r.zarr/clefts2"), threshold=200, min_size=3)
    assert (given.threshold, given.min_size) == (200, 3)


def test_a_validation_region_without_clefts_is_refused(trained):
    ckpt, raw, labels = trained
    with pytest.raises(CleftchunkError, match="holds no clefts"):
        choose_operating_point(ckpt, raw, labels, "0:4,:,:")
