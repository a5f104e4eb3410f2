"""CREMI cleft metrics: block-wise equals the whole-volume definition; hand-computed cases; edges."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.post import metrics
from cleftchunk.post.metrics import cremi_metrics_reference, evaluate
from cleftchunk.run.options import RunOptions
from cleftchunk.synth.generate import generate_region
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID
from cleftchunk.io.volumes import create_volume

BG, INV = CREMI_BACKGROUND, CREMI_INVALID
VS = (40.0, 4.0, 4.0)
METRIC_KEYS = ["pred_voxels", "gt_voxels", "fp", "fn", "tp", "adgt", "adf", "cremi_score", "precision", "recall", "f1"]


def write(path, data, chunks=(4, 8, 8), voxel_size=VS, **kw):
    volume = create_volume(path, data.shape, data.dtype, chunks=chunks, voxel_size=voxel_size, **kw)
    volume.array[...] = data
    return str(path)


def cremi_ids(mask, invalid=None):
    out = np.full(mask.shape, BG, dtype=np.uint64)
    out[mask] = 0  # 0 is a cleft id in CREMI files
    if invalid is not None:
        out[invalid] = INV
    return out


def assert_same(got, want):
    """Equal up to floating-point rounding (block-wise sums run in another order)."""
    for key in METRIC_KEYS:
        assert _close(got[key], want[key]), (key, got[key], want[key])
    for direction in ("pred_to_gt", "gt_to_pred"):
        for key, value in want[direction].items():
            assert _close(got[direction][key], value), (direction, key, got[direction][key], value)


def _close(a, b):
    if a is None or b is None:
        return a is b
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("kd_fraction", [0.0, 1.0], ids=["edt", "kdtree"])
def test_blockwise_equals_reference_on_random_volumes(tmp_path, monkeypatch, kd_fraction):
    monkeypatch.setattr(metrics, "KDTREE_MAX_FRACTION", kd_fraction)  # one nearest-target method each
    rng = np.random.default_rng(7)
    shape = (10, 40, 36)
    pred = np.where(rng.random(shape) < 0.01, 255, rng.integers(0, 128, shape)).astype(np.uint8)
    gt_mask = rng.random(shape) < 0.005
    invalid = rng.random(shape) < 0.02
    p = write(tmp_path / "v.zarr/pred", pred)
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt_mask, invalid), fill_value=int(BG))
    want = cremi_metrics_reference(pred >= 128, gt_mask | invalid, VS, invalid_mask=invalid)
    assert want["fp"] > 0 or want["fn"] > 0 or want["pred_voxels"] > 100
    for block_shape, halo in [((4, 8, 8), (0, 0, 0)), ((5, 16, 12), (1, 4, 4)), ((10, 40, 36), None)]:
        got = evaluate(p, g, halo=halo, run=RunOptions(block_shape=block_shape, threads=2))
        assert_same(got, want)
        assert got["inputs"]["invalid_voxels"] == int(invalid.sum())


@pytest.mark.slow
def test_blockwise_equals_reference_on_structured_clefts_far_apart(tmp_path):
    """Flat clefts (discs in y-x) many blocks apart, so most distances come from the far search."""
    shape = (12, 64, 64)
    zz, yy, xx = np.indices(shape)
    gt_mask = ((zz == 2) & ((yy - 8) ** 2 + (xx - 8) ** 2 < 20)) | ((zz == 10) & ((yy - 56) ** 2 + (xx - 12) ** 2 < 9))
    pred_mask = ((zz == 3) & ((yy - 10) ** 2 + (xx - 9) ** 2 < 16)) | ((zz == 7) & ((yy - 40) ** 2 + (xx - 60) ** 2 < 25))
    pred = np.where(pred_mask, 230, 10).astype(np.uint8)
    p = write(tmp_path / "v.zarr/pred", pred)
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt_mask), fill_value=int(BG))
    want = cremi_metrics_reference(pred_mask, gt_mask, VS)
    assert want["fp"] > 0 and want["fn"] > 0  # the far cleft and the missed one count
    for block_shape, halo in [((2, 8, 8), (0, 1, 1)), ((4, 16, 32), (1, 3, 3)), ((3, 64, 7), (2, 0, 5))]:
        got = evaluate(p, g, halo=halo, run=RunOptions(block_shape=block_shape, threads=2))
        assert_same(got, want)
        assert got["inputs"]["far_voxels"] > 0


def test_blockwise_equals_reference_on_synthetic_clefts(tmp_path):
    region = generate_region(Roi((0, 0, 0), (16, 96, 96)), seed=1)
    gt = region["clefts"]
    gt_mask = gt != BG
    # a prediction: the clefts moved by 2 px in y, one section lost, and a false cleft far away
    pred_mask = np.roll(gt_mask, 2, axis=1)
    pred_mask[5] = False
    pred_mask[14, 90:94, 2:6] = True
    p = write(tmp_path / "v.zarr/pred", np.where(pred_mask, 180, 40).astype(np.uint8), chunks=(4, 32, 32))
    g = write(tmp_path / "v.zarr/gt", gt, chunks=(4, 32, 32), fill_value=int(BG))
    want = cremi_metrics_reference(pred_mask, gt_mask, VS)
    assert want["gt_voxels"] > 500 and want["fp"] > 0
    got = evaluate(p, g, halo=(1, 8, 8), run=RunOptions(block_shape=(4, 32, 32), threads=2))
    assert_same(got, want)


def test_single_predicted_voxel_far_from_the_only_cleft(tmp_path):
    shape = (16, 96, 96)
    gt_mask = np.zeros(shape, bool)
    gt_mask[1, 2, 3:5] = True
    pred_mask = np.zeros(shape, bool)
    pred_mask[14, 90, 93] = True
    p = write(tmp_path / "v.zarr/pred", pred_mask)
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt_mask), fill_value=int(BG))
    got = evaluate(p, g, halo=(1, 2, 2), run=RunOptions(block_shape=(4, 16, 16), threads=1))
    d_pred = math.sqrt((13 * 40) ** 2 + (88 * 4) ** 2 + (89 * 4) ** 2)  # nearest true voxel (1, 2, 4)
    d_gt = [math.sqrt((13 * 40) ** 2 + (88 * 4) ** 2 + (dx * 4) ** 2) for dx in (90, 89)]
    assert got["adgt"] == pytest.approx(d_pred, rel=1e-12)
    assert got["adf"] == pytest.approx(sum(d_gt) / 2, rel=1e-12)
    assert (got["fp"], got["fn"], got["tp"]) == (1, 2, 0)
    assert got["gt_to_pred"]["max"] == pytest.approx(d_gt[0], rel=1e-12)
    assert_same(got, cremi_metrics_reference(pred_mask, gt_mask, VS))


def hand_case():
    """GT clefts at x = 0, 1 of row (0, 0); predictions at x = 1, at x = 4 and one section below x = 0."""
    gt = np.zeros((3, 1, 5), bool)
    gt[0, 0, 0:2] = True
    pred = np.zeros((3, 1, 5), bool)
    pred[0, 0, 1] = pred[0, 0, 4] = pred[2, 0, 0] = True
    return pred, gt


def test_hand_computed_anisotropic_case(tmp_path):
    pred, gt = hand_case()
    # d_Q over P: x=1 -> 0; x=4 -> 3 px * 4 nm = 12; (2, 0, 0) -> 2 sections * 40 nm = 80
    d_q = [0.0, 12.0, 80.0]
    # d_P over Q: x=0 -> 4 (to x=1), x=1 -> 0
    d_p = [4.0, 0.0]
    mean_q = sum(d_q) / 3
    mean_p = sum(d_p) / 2
    std_q = math.sqrt(sum((d - mean_q) ** 2 for d in d_q) / 3)
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8), chunks=(1, 1, 2))
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt), chunks=(1, 1, 2), fill_value=int(BG))
    for got in (
        cremi_metrics_reference(pred, gt, VS, theta=50),
        evaluate(p, g, theta=50, halo=(0, 0, 0), run=RunOptions(block_shape=(1, 1, 2))),
    ):
        assert (got["fp"], got["fn"], got["tp"]) == (1, 0, 2)  # 80 > 50
        assert got["adgt"] == pytest.approx(mean_q) and got["adf"] == pytest.approx(mean_p)
        assert got["cremi_score"] == pytest.approx((mean_q + mean_p) / 2)
        assert got["pred_to_gt"] == pytest.approx({"count": 3, "mean": mean_q, "std": std_q, "max": 80.0, "median": 12.0})
        assert got["gt_to_pred"] == pytest.approx({"count": 2, "mean": 2.0, "std": 2.0, "max": 4.0, "median": 2.0})
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((2 / 3, 1.0, 4 / 5))
    # the threshold is strict: a distance of exactly θ is not a false positive
    assert evaluate(p, g, theta=80, run=RunOptions(block_shape=(1, 1, 2)))["fp"] == 0


def test_invalid_voxels_leave_the_sets_but_not_the_distances(tmp_path):
    pred, gt = hand_case()
    invalid = np.zeros_like(gt)
    invalid[0, 0, 2:5] = True  # hides the prediction at x=4, lies between the others
    invalid[1, 0, 0] = True  # between (0, 0, 0) and the prediction (2, 0, 0)
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt, invalid), chunks=(1, 1, 2), fill_value=int(BG))
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8), chunks=(1, 1, 2))
    got = evaluate(p, g, theta=50, halo=(0, 0, 0), run=RunOptions(block_shape=(1, 1, 2)))
    assert (got["pred_voxels"], got["gt_voxels"], got["fp"]) == (2, 2, 1)
    assert got["pred_to_gt"]["max"] == 80.0 and got["adgt"] == pytest.approx(40.0)
    assert_same(got, cremi_metrics_reference(pred, gt, VS, theta=50, invalid_mask=invalid))


@pytest.mark.parametrize("which", ["pred", "gt", "both"])
def test_empty_sets_give_documented_values(tmp_path, which):
    pred, gt = hand_case()
    if which in ("pred", "both"):
        pred[:] = False
    if which in ("gt", "both"):
        gt[:] = False
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8), chunks=(1, 1, 2))
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt), chunks=(1, 1, 2), fill_value=int(BG))
    for got in (cremi_metrics_reference(pred, gt, VS), evaluate(p, g, run=RunOptions(block_shape=(1, 1, 2)))):
        if which == "pred":
            assert got["adgt"] is None and got["adf"] == math.inf and got["cremi_score"] == math.inf
            assert (got["fp"], got["fn"], got["precision"], got["recall"], got["f1"]) == (0, 2, None, 0.0, 0.0)
            assert got["gt_to_pred"] == {"count": 2, "mean": math.inf, "std": None, "max": math.inf, "median": math.inf}
        elif which == "gt":
            assert got["adf"] is None and got["adgt"] == math.inf and got["cremi_score"] == math.inf
            assert (got["fp"], got["fn"], got["precision"], got["recall"], got["f1"]) == (3, 0, 0.0, None, 0.0)
        else:
            assert got["adgt"] is None and got["adf"] is None and got["cremi_score"] is None
            assert (got["fp"], got["fn"], got["f1"]) == (0, 0, None)
            assert got["pred_to_gt"]["count"] == 0 and got["pred_to_gt"]["median"] is None


def test_input_kinds_agree(tmp_path):
    """CREMI ids (0 is a cleft), PyTC `main` labels (0 is background) and thresholded probabilities."""
    pred, gt = hand_case()
    want = cremi_metrics_reference(pred, gt, VS)
    ids = write(tmp_path / "v.zarr/gt", cremi_ids(gt), chunks=(1, 1, 5), fill_value=int(BG))
    with h5py.File(tmp_path / "syn.h5", "w") as f:
        f["main"] = gt.astype(np.uint8) * 7
    probs = write(tmp_path / "v.zarr/prob", np.where(pred, 128, 127).astype(np.uint8), chunks=(1, 1, 5))
    assert_same(evaluate(probs, ids), want)
    assert_same(evaluate(probs, f"{tmp_path}/syn.h5:main", voxel_size=VS), want)
    assert evaluate(probs, ids, threshold=129)["pred_voxels"] == 0
    assert evaluate(probs, ids, pred_kind="mask")["pred_voxels"] == 15  # 127 and 128 are both non-zero


def test_ground_truth_region_is_placed_in_a_larger_prediction_by_offsets(tmp_path):
    """As with the padded CREMI samples: labels cover a region of the raw, at an offset."""
    rng = np.random.default_rng(5)
    pred = (rng.random((4, 12, 12)) < 0.05).astype(np.uint8)
    gt_mask = rng.random((2, 6, 6)) < 0.05
    p = write(tmp_path / "v.zarr/pred", pred)
    g = write(tmp_path / "v.zarr/gt", cremi_ids(gt_mask), fill_value=int(BG), offset_nm=(40, 12, 16))
    got = evaluate(p, g, halo=(0, 1, 1), run=RunOptions(block_shape=(1, 4, 4)))
    assert_same(got, cremi_metrics_reference(pred[1:3, 3:9, 4:10].astype(bool), gt_mask, VS))
    assert got["inputs"]["pred_region"] == ["1:3", "3:9", "4:10"]
    outside = write(tmp_path / "v.zarr/far", cremi_ids(gt_mask), fill_value=int(BG), offset_nm=(120, 12, 16))
    with pytest.raises(CleftchunkError, match="shapes differ"):
        evaluate(p, outside)


def test_result_does_not_depend_on_workers(tmp_path):
    rng = np.random.default_rng(3)
    pred = (rng.random((8, 24, 24)) < 0.02).astype(np.uint8)
    gt = cremi_ids(rng.random((8, 24, 24)) < 0.01)
    p, g = write(tmp_path / "v.zarr/p", pred), write(tmp_path / "v.zarr/g", gt, fill_value=int(BG))
    one = evaluate(p, g, halo=(1, 1, 1), run=RunOptions(block_shape=(4, 8, 8), threads=1))
    two = evaluate(p, g, halo=(1, 1, 1), run=RunOptions(block_shape=(4, 8, 8), threads=2))
    assert {k: one[k] for k in METRIC_KEYS} == {k: two[k] for k in METRIC_KEYS}


def test_cli_table_and_json(tmp_path, run_cli):
    pred, gt = hand_case()
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8) * 255, chunks=(1, 1, 5))
    g = write(tmp_path / "v.zarr/gt", np.where(gt, 1, 0).astype(np.uint8), chunks=(1, 1, 5))
    out = tmp_path / "m.json"
    result = run_cli("evaluate", p, g, "--theta", "50", "--json", out)
    assert "CREMI score" in result.output and "ADGT" in result.output
    report = json.loads(out.read_text())
    assert (report["fp"], report["fn"], report["inputs"]["gt_kind"]) == (1, 0, "mask")
    assert "--overwrite" in run_cli("evaluate", p, g, "--json", out, expect=2).output
    empty = write(tmp_path / "v.zarr/empty", np.zeros_like(pred, dtype=np.uint8), chunks=(1, 1, 5))
    run_cli("evaluate", empty, g, "--json", out, "--overwrite")
    report = json.loads(out.read_text())
    assert report["adgt"] is None and report["adf"] == "inf"


def test_bad_inputs_are_one_line_errors(tmp_path, run_cli):
    good = write(tmp_path / "v.zarr/a", np.zeros((2, 4, 4), np.uint8))

    def error(*args):
        output = run_cli("evaluate", *args, expect=2).output
        assert output.startswith("error: ") and output.count("\n") == 1, output
        return output

    other_shape = write(tmp_path / "v.zarr/b", np.zeros((2, 4, 5), np.uint8))
    message = error(good, other_shape)
    assert "(2, 4, 4)" in message and "(2, 4, 5)" in message
    other_vs = write(tmp_path / "v.zarr/c", np.zeros((2, 4, 4), np.uint8), voxel_size=(40, 8, 8))
    message = error(good, other_vs)
    assert "(40.0, 4.0, 4.0)" in message and "(40.0, 8.0, 8.0)" in message
    assert "int16" in error(good, write(tmp_path / "v.zarr/d", np.zeros((2, 4, 4), np.int16)))
    assert "float64" in error(good, write(tmp_path / "v.zarr/e", np.full((2, 4, 4), 2.5)))
    assert "does not exist" in error(good, tmp_path / "missing.zarr/gt")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["volumes/raw"] = np.zeros((2, 4, 4), np.uint8)
    assert "no dataset" in error(good, f"{tmp_path}/f.h5:volumes/labels/clefts")
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.uint8))  # no voxel size anywhere
    assert "--voxel-size" in error(tmp_path / "x.npy", tmp_path / "x.npy")
    run_cli("evaluate", tmp_path / "x.npy", tmp_path / "x.npy", "--voxel-size", "40,4,4")


def test_an_existing_scheduler_gives_the_metrics_of_a_local_run(tmp_path, run_cli):
    from distributed import LocalCluster

    rng = np.random.default_rng(4)
    p = write(tmp_path / "v.zarr/p", (rng.random((8, 24, 24)) < 0.02).astype(np.uint8))
    g = write(tmp_path / "v.zarr/g", cremi_ids(rng.random((8, 24, 24)) < 0.01), fill_value=int(BG))
    local = evaluate(p, g, halo=(1, 1, 1), run=RunOptions(block_shape=(4, 8, 8), threads=1))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster:
        remote = evaluate(p, g, halo=(1, 1, 1), run=RunOptions(block_shape=(4, 8, 8), scheduler=cluster.scheduler_address))
        dry = run_cli("evaluate", p, g, "--block-shape", "4,8,8", "--scheduler", cluster.scheduler_address, "--dry-run")
    assert {k: local[k] for k in METRIC_KEYS} == {k: remote[k] for k in METRIC_KEYS}
    assert "18 blocks of (4, 8, 8)" in dry.output and "CREMI score" not in dry.output


def test_the_json_file_is_never_overwritten_without_overwrite_and_a_dry_run_writes_nothing(tmp_path, run_cli):
    pred, gt = hand_case()
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8) * 255, chunks=(1, 1, 5))
    g = write(tmp_path / "v.zarr/gt", np.where(gt, 1, 0).astype(np.uint8), chunks=(1, 1, 5))
    out = tmp_path / "m.json"
    dry = run_cli("evaluate", p, g, "--json", out, "--dry-run")
    assert "plan: evaluate" in dry.output and not out.exists()
    out.write_text("the user's notes\n")
    assert "--overwrite" in run_cli("evaluate", p, g, "--json", out, expect=2).output
    assert "--overwrite" in run_cli("evaluate", p, g, "--json", out, "--dry-run", expect=2).output
    run_cli("evaluate", p, g, "--json", out, "--dry-run", "--overwrite")
    assert out.read_text() == "the user's notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "v.zarr"]  # no lock, record or temporary file
    run_cli("evaluate", p, g, "--json", out, "--overwrite")
    assert json.loads(out.read_text())["inputs"]["gt_kind"] == "mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "v.zarr"]


def test_evaluate_takes_the_run_vocabulary(tmp_path, run_cli):
    pred, gt = hand_case()
    p = write(tmp_path / "v.zarr/pred", pred.astype(np.uint8) * 255, chunks=(1, 1, 5))
    g = write(tmp_path / "v.zarr/gt", np.where(gt, 1, 0).astype(np.uint8), chunks=(1, 1, 5))
    one = run_cli("evaluate", p, g, "--threads", "1", "--block-shape", "1,1,2", "--no-progress", "--retries", "0")
    two = run_cli("evaluate", p, g, "--threads", "2", "--block-shape", "1,2,3", "--no-progress")
    assert one.output == two.output and "CREMI score" in one.output
    assert "--processes" in run_cli("evaluate", p, g, "--processes", expect=2).output  # the old flag is gone
