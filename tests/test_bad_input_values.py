"""Bad input of three classes, through the command line: frames that do not line up, probabilities
in another dtype, and numeric options out of range.

The same case format as tests/test_bad_input.py, whose helpers it uses: (id, arguments, expected
message regex); each case asserts a one-line ``error: ...``, a non-zero exit, no "unexpected" and
no traceback, and that every file the user had is byte-for-byte as it was, with nothing created.
Below the table, the inputs each class refuses are shown to work once said right.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from cleftchunk.io.volumes import open_volume
from cleftchunk.labels import CREMI_BACKGROUND
from test_bad_input import check_refusal, put, snapshot

SHAPE = (4, 32, 32)
SHIFT_400 = (0, 0, 400)  # 100 voxels of 4 nm along x: no overlap with a 32-voxel-wide volume
SHIFT_40 = (0, 0, 40)  # 10 voxels: an overlap, but not the same region
FRACTION = (0, 0, 2)  # half a voxel


@pytest.fixture(scope="module")
def wv(tmp_path_factory):
    """A workspace: an image with its clefts and prediction, the same volumes in other frames, and
    probabilities stored as uint16, 0..255 floats and dense label-like volumes."""
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("wv")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[1:3, 4:12, 4:12] = 7
    prob = np.zeros(SHAPE, np.uint8)
    prob[1:3, 4:12, 4:12] = 250
    ids = {"fill_value": int(CREMI_BACKGROUND)}
    for name, options in {"in": {}, "shifted": {"offset_nm": SHIFT_400}, "near": {"offset_nm": SHIFT_40},
                          "coarse": {"voxel_size": (40, 8, 8)}}.items():
        put(root / f"{name}.zarr/raw", raw, attrs={"cleft_kind": "image"}, **options)
        put(root / f"{name}.zarr/clefts", clefts, **ids, **options)
        put(root / f"{name}.zarr/pred", prob, attrs={"cleft_kind": "prob"}, **options)
        put(root / f"{name}.zarr/mask", np.ones(SHAPE, np.uint8), attrs={"cleft_kind": "mask"}, **options)
    with h5py.File(root / "frac.h5", "w") as f:  # cleftchunk writes offsets on the grid; other tools may not
        for name, data, kind in (("raw", raw, "image"), ("clefts", clefts, None), ("pred", prob, "prob"), ("mask", np.ones(SHAPE, np.uint8), "mask")):
            f[name] = data
            f[name].attrs["resolution"], f[name].attrs["offset"] = (40.0, 4.0, 4.0), FRACTION
            if kind:
                f[name].attrs["cleft_kind"] = kind
    noisy = rng.random(SHAPE)
    noisy[1:3, 4:12, 4:12] = 0.98
    put(root / "u16.zarr/pred", np.round(noisy * 65535).astype(np.uint16))  # no kind stated: as a user's file
    put(root / "f255.zarr/pred", (noisy * 255).astype(np.float32))
    put(root / "u8prob.zarr/pred", np.round(noisy * 255).astype(np.uint8))
    put(root / "u32.zarr/labels", rng.integers(1, 1000, SHAPE).astype(np.uint32))
    neurons = rng.integers(1, 50, SHAPE).astype(np.uint64)
    neurons[0, 0, :4] = 0
    put(root / "ids.zarr/segments", neurons)  # neuron ids under a name that does not say so
    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    save_checkpoint(root / "model.pth", net, arch_spec(net), (4, 32, 32))
    return root


T = ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "-mi", "4,32,32", "--iteration-total", "1"]
P = ["predict", "{ws}/in.zarr/raw", "{tmp}/out.zarr/pred", "-pm", "{ws}/model.pth", "--workers", "0", "--no-progress"]
E = ["evaluate", "{ws}/in.zarr/pred", "{ws}/in.zarr/clefts"]
S = ["segment", "{ws}/in.zarr/pred", "-o", "{tmp}/s.zarr/ids"]
X = ["export", "{ws}/in.zarr/clefts", "{tmp}/o.hdf"]
C = ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw"]
V = ["view", "{ws}/in.zarr/raw"]


def train_with(*extra, labels=None, image=None):
    args = list(T)
    if labels:
        args[4] = labels
    if image:
        args[2] = image
    return args + list(extra)


def evaluate_with(pred, gt="{ws}/in.zarr/clefts", *extra):
    return ["evaluate", pred, gt, *extra]


def with_(base, *extra):
    return list(base) + list(extra)


VOXEL_SIZES_DIFFER = r"voxel sizes differ: .*\(40.0, 4.0, 4.0\) nm.*\(40.0, 8.0, 8.0\) nm.*--ignore-frame"
FRACTION_MESSAGE = r"a fraction of a voxel.*--ignore-frame"
LOOKS_LIKE_PROB = (r"of the sampled voxels would be clefts: it looks like probabilities: "
                   r"(--kind prob|--pred-kind prob|--gt-kind prob|give cleft labels as --labels)")

CASES = [
    # -- frames that do not line up: train (image and labels) -------------------------------------
    ("train-labels-400nm-off", train_with(labels="{ws}/shifted.zarr/clefts"), r"offsets differ: image .* does not overlap labels .*\(0.0, 0.0, 400.0\) nm"),
    ("train-labels-coarser", train_with(labels="{ws}/coarse.zarr/clefts"), VOXEL_SIZES_DIFFER),
    ("train-labels-half-a-voxel-off", train_with(labels="{ws}/frac.h5:clefts"), FRACTION_MESSAGE),
    ("train-image-400nm-off", train_with(image="{ws}/shifted.zarr/raw"), r"offsets differ: image .*shifted.*does not overlap"),
    ("train-image-coarser", train_with(image="{ws}/coarse.zarr/raw"), r"voxel sizes differ: image .*\(40.0, 8.0, 8.0\) nm, labels .*\(40.0, 4.0, 4.0\) nm.*--ignore-frame"),
    ("train-validation-labels-40nm-off", train_with("--validate-image", "{ws}/in.zarr/raw", "--validate-labels", "{ws}/near.zarr/clefts",
                                                    "--validate-roi", "0:4,0:32,0:32"), r"offsets differ: validation image .* do not cover the same region"),
    ("train-validation-labels-coarser", train_with("--validate-image", "{ws}/in.zarr/raw", "--validate-labels", "{ws}/coarse.zarr/clefts",
                                                   "--validate-roi", "0:4,0:32,0:32"), VOXEL_SIZES_DIFFER),
    # evaluate (prediction and ground truth)
    ("evaluate-pred-400nm-off", evaluate_with("{ws}/shifted.zarr/pred"), r"offsets differ: prediction .* does not cover ground truth"),
    ("evaluate-pred-40nm-off", evaluate_with("{ws}/near.zarr/pred"), r"offsets differ: prediction .*\(0.0, 0.0, 40.0\) nm.* does not cover"),
    ("evaluate-gt-40nm-off", evaluate_with("{ws}/in.zarr/pred", "{ws}/near.zarr/clefts"), r"offsets differ: .* does not cover ground truth .*near"),
    ("evaluate-pred-half-a-voxel-off", evaluate_with("{ws}/frac.h5:pred"), FRACTION_MESSAGE),
    ("evaluate-gt-coarser", evaluate_with("{ws}/in.zarr/pred", "{ws}/coarse.zarr/clefts"), VOXEL_SIZES_DIFFER),
    ("evaluate-shifted-dry-run", evaluate_with("{ws}/shifted.zarr/pred", "{ws}/in.zarr/clefts", "--dry-run"), r"does not cover"),
    # export (clefts and raw)
    ("export-raw-400nm-off", with_(X, "--raw", "{ws}/shifted.zarr/raw"), r"offsets differ: clefts .* does not overlap raw"),
    ("export-raw-coarser", with_(X, "--raw", "{ws}/coarse.zarr/raw"), VOXEL_SIZES_DIFFER),
    ("export-raw-half-a-voxel-off", with_(X, "--raw", "{ws}/frac.h5:raw"), FRACTION_MESSAGE),
    # predict (input and mask)
    ("predict-mask-400nm-off", with_(P, "--mask", "{ws}/shifted.zarr/mask"), r"offsets differ: mask .* does not cover the input"),
    ("predict-mask-40nm-off", with_(P, "--mask", "{ws}/near.zarr/mask"), r"does not cover the input"),
    ("predict-mask-coarser", with_(P, "--mask", "{ws}/coarse.zarr/mask"), r"voxel sizes differ: mask .*give a mask at the input's resolution, or pass --ignore-frame"),
    ("predict-mask-half-a-voxel-off", with_(P, "--mask", "{ws}/frac.h5:mask"), FRACTION_MESSAGE),
    # view (the layers and the image)
    ("view-prediction-400nm-off", with_(V, "--prediction", "{ws}/shifted.zarr/pred"), r"offsets differ: image .* does not overlap prediction"),
    ("view-clefts-coarser", with_(V, "--clefts", "{ws}/coarse.zarr/clefts"), r"voxel sizes differ: image .* clefts .*one resolution"),
    ("view-clefts-half-a-voxel-off", with_(V, "--clefts", "{ws}/frac.h5:clefts"), FRACTION_MESSAGE),
    # -- probabilities in another dtype, read as labels -----------------------------------------------
    ("segment-uint16-probabilities", ["segment", "{ws}/u16.zarr/pred", "-o", "{tmp}/s.zarr/ids"], LOOKS_LIKE_PROB),
    ("segment-float-0-255", ["segment", "{ws}/f255.zarr/pred", "-o", "{tmp}/s.zarr/ids"], r"values span \[.*\], neither probabilities in \[0, 1\].*prob_max"),
    ("segment-dense-uint32", ["segment", "{ws}/u32.zarr/labels", "-o", "{tmp}/s.zarr/ids"], LOOKS_LIKE_PROB),
    ("segment-neuron-ids-unnamed", ["segment", "{ws}/ids.zarr/segments", "-o", "{tmp}/s.zarr/ids"], r"would be clefts.*neuron ids"),
    ("evaluate-uint16-prob-as-gt", evaluate_with("{ws}/in.zarr/pred", "{ws}/u16.zarr/pred"), LOOKS_LIKE_PROB),
    ("evaluate-uint16-prob-as-pred", evaluate_with("{ws}/u16.zarr/pred"), LOOKS_LIKE_PROB),
    ("evaluate-dense-uint32-gt", evaluate_with("{ws}/in.zarr/pred", "{ws}/u32.zarr/labels"), LOOKS_LIKE_PROB),
    ("evaluate-float-0-255-pred", evaluate_with("{ws}/f255.zarr/pred"), r"neither probabilities in \[0, 1\]"),
    ("evaluate-neuron-ids-unnamed-gt", evaluate_with("{ws}/in.zarr/pred", "{ws}/ids.zarr/segments"), r"would be clefts"),
    ("threshold-float-0-255", ["threshold", "{ws}/f255.zarr/pred", "-o", "{tmp}/m.zarr/mask"], r"float values span \[.*\], not probabilities in \[0, 1\]"),
    ("threshold-uint64-ids", ["threshold", "{ws}/in.zarr/clefts", "-o", "{tmp}/m.zarr/mask"], r"holds uint64, not probabilities"),
    ("train-labels-uint16-prob", train_with(labels="{ws}/u16.zarr/pred"), LOOKS_LIKE_PROB),
    ("train-labels-uint8-prob", train_with(labels="{ws}/u8prob.zarr/pred"), LOOKS_LIKE_PROB),
    ("export-uint16-prob", ["export", "{ws}/u16.zarr/pred", "{tmp}/o.hdf"], LOOKS_LIKE_PROB),
    ("segment-ids-as-prob", ["segment", "{ws}/in.zarr/clefts", "-o", "{tmp}/s.zarr/ids", "--kind", "prob"], r"dtype uint64 cannot hold 'prob' data"),
    # -- invalid values: every numeric option has a range -------------------------------------------
    ("convert-levels-50", with_(C, "--levels", "50"), r"--levels 50: .* is down to 1 voxel in y or x at level s5: give --levels 6 or fewer"),
    ("convert-levels-0", with_(C, "--levels", "0"), r"--levels 0: must be at least 1"),
    ("convert-levels-text", with_(C, "--levels", "many"), r"--levels 'many' must be a whole number"),
    ("convert-task-mb-fraction", with_(C, "--task-mb", "0.5"), r"--task-mb '0.5' must be a whole number"),
    ("convert-task-mb-negative", with_(C, "--task-mb", "-5"), r"--task-mb -5: must be non-negative"),
    ("convert-channel-negative", with_(C, "--channel", "-1"), r"--channel -1: must be non-negative"),
    ("convert-retries-negative", with_(C, "--retries", "-1"), r"--retries"),
    ("train-iteration-save-0", train_with("--iteration-save", "0"), r"--iteration-save 0: must be at least 1"),
    ("train-iteration-total-0", train_with("--iteration-total", "0"), r"--iteration-total 0: must be at least 1"),
    ("train-threads-0", train_with("--threads", "0"), r"--threads 0: must be at least 1"),
    ("train-cache-mb-negative", train_with("--cache-mb", "-5"), r"--cache-mb -5: must be non-negative"),
    ("train-cache-mb-nan", train_with("--cache-mb", "nan"), r"--cache-mb nan: must be non-negative"),
    ("train-lr-0", train_with("--lr", "0"), r"--lr 0: must be positive"),
    ("train-lr-inf", train_with("--lr", "inf"), r"--lr inf: must be positive"),
    ("train-batch-0", train_with("--batch-size", "0"), r"--batch-size 0: must be at least 1"),
    ("train-loader-workers-negative", train_with("--loader-workers", "-1"), r"--loader-workers -1: must be non-negative"),
    ("train-gpus-negative", train_with("--gpus", "-1"), r"--gpus -1: must be non-negative"),
    ("train-ema-1", train_with("--ema", "1"), r"--ema 1: must be non-negative and below 1"),
    ("train-dice-negative", train_with("--dice", "-1"), r"--dice -1: must be non-negative"),
    ("train-output-prior-0", train_with("--output-prior", "0"), r"--output-prior 0: must be positive and below 1"),
    ("train-output-prior-1", train_with("--output-prior", "1"), r"--output-prior 1: must be positive and below 1"),
    ("train-max-weight-0", train_with("--max-weight", "0"), r"--max-weight 0: must be positive"),
    ("train-validate-every-negative", train_with("--validate-every", "-1"), r"--validate-every -1: must be non-negative"),
    ("train-seed-negative", train_with("--seed", "-1"), r"--seed -1: must be non-negative"),
    ("train-seed-fraction", train_with("--seed", "1.5"), r"--seed '1.5' must be a whole number"),
    ("predict-batch-size-text", with_(P, "--batch-size", "four"), r"--batch-size 'four' must be a whole number"),
    ("evaluate-theta-inf", with_(E, "--theta", "inf"), r"θ = inf nm must be a finite distance"),
    ("predict-retries-negative", with_(P, "--retries", "-1"), r"--retries"),
    ("predict-threads-0", with_(P, "--threads", "0"), r"--threads"),
    ("predict-cpus-0", with_(P, "--cpus", "0"), r"--cpus 0: must be at least 1"),
    ("predict-overlap-1", with_(P, "--overlap", "1"), r"--overlap 1: must be non-negative and below 1"),
    ("predict-overlap-nan", with_(P, "--overlap", "nan"), r"--overlap nan: must be"),
    ("segment-threshold-0", with_(S, "--threshold", "0"), r"--threshold 0: must be positive and at most 255"),
    ("segment-threshold-nan", with_(S, "--threshold", "nan"), r"--threshold nan: must be"),
    ("segment-min-size-text", with_(S, "--min-size", "big"), r"--min-size 'big' must be a whole number"),
    ("threshold-threshold-256", ["threshold", "{ws}/in.zarr/pred", "-o", "{tmp}/m.zarr/mask", "--threshold", "256"], r"--threshold 256: must be"),
    ("threshold-threshold-inf", ["threshold", "{ws}/in.zarr/pred", "-o", "{tmp}/m.zarr/mask", "--threshold", "inf"], r"--threshold inf: must be"),
    ("evaluate-threshold-0", with_(E, "--threshold", "0"), r"--threshold 0: must be positive"),
    ("evaluate-threshold-300", with_(E, "--threshold", "300"), r"--threshold 300: must be"),
    ("export-offset-negative", with_(X, "--offset", "-5,0,0"), r"--offset '-5,0,0': every value must be at least 0"),
    ("export-offset-negative-x", with_(X, "--offset", "0,0,-1"), r"--offset '0,0,-1': every value must be at least 0"),
    ("synth-difficulty-negative", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--difficulty", "-0.1"], r"--difficulty -0.1: must be non-negative and at most 1"),
    ("synth-difficulty-nan", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--difficulty", "nan"], r"--difficulty nan"),
    ("synth-missing-rate-1.5", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--missing-rate", "1.5"], r"--missing-rate 1.5: must be"),
    ("synth-misalign-rate-nan", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--misalign-rate", "nan"], r"--misalign-rate nan"),
    ("synth-seed-negative", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--seed", "-1"], r"--seed -1: must be non-negative"),
    ("view-port-negative", with_(V, "--port", "-1"), r"--port -1: must be non-negative and at most 65535"),
    ("view-port-too-big", with_(V, "--port", "70000"), r"--port 70000: must be"),
    ("demo-seed-negative", ["demo", "{tmp}/d", "--seed", "-1"], r"--seed -1: must be non-negative"),
    ("demo-iterations-0", ["demo", "{tmp}/d", "--iterations", "0"], r"--iterations 0: must be at least 1"),
]


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_value_is_one_clear_line_and_changes_nothing(wv, tmp_path, run_cli, monkeypatch, case, args, message):
    """The assertions of tests/test_bad_input.py's table, for these cases."""
    monkeypatch.chdir(tmp_path)
    args = [a.format(ws=wv, tmp=tmp_path) for a in args]
    before = snapshot(wv, tmp_path)
    check_refusal(run_cli(*args, expect=None), args[0], message)
    after = snapshot(wv, tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file the user had was changed or deleted"
    assert set(after) == set(before), f"files were created: {sorted(set(after) - set(before))}"


def test_there_are_enough_cases_of_each_class():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


# -- said right, the same inputs work -------------------------------------------------------------
def test_evaluate_with_ignore_frame_compares_voxel_for_voxel(wv, run_cli, tmp_path):
    aligned = tmp_path / "a.json"
    ignored = tmp_path / "b.json"
    run_cli("evaluate", wv / "in.zarr/pred", wv / "in.zarr/clefts", "--json", aligned, "--no-progress")
    run_cli("evaluate", wv / "shifted.zarr/pred", wv / "in.zarr/clefts", "--json", ignored, "--ignore-frame", "--no-progress")
    a, b = json.loads(aligned.read_text()), json.loads(ignored.read_text())
    assert a["fp"] == b["fp"] == 0 and a["fn"] == b["fn"] == 0 and a["inputs"]["shape"] == b["inputs"]["shape"]


def test_a_larger_prediction_is_cropped_to_the_ground_truth_and_says_so(wv, run_cli, tmp_path):
    prob = np.zeros((4, 32, 48), np.uint8)
    prob[1:3, 4:12, 14:22] = 250  # the clefts, 10 voxels further along x
    pred = put(tmp_path / "p.zarr/pred", prob, attrs={"cleft_kind": "prob"}, offset_nm=(0, 0, -40))
    out = run_cli("evaluate", pred, wv / "in.zarr/clefts", "--no-progress").output
    assert "placed by their offsets: using prediction" in out and "[0:4,0:32,10:42]" in out
    result = run_cli("evaluate", pred, wv / "in.zarr/clefts", "--json", tmp_path / "m.json", "--no-progress")
    assert json.loads((tmp_path / "m.json").read_text())["fn"] == 0, result.output


def test_training_uses_the_overlap_of_labels_placed_by_their_offsets(run_cli, tmp_path):
    rng = np.random.default_rng(1)
    image = put(tmp_path / "t.zarr/raw", rng.integers(0, 256, (4, 32, 64), dtype=np.uint8), attrs={"cleft_kind": "image"})
    clefts = np.full((4, 32, 64), CREMI_BACKGROUND, np.uint64)
    clefts[1:3, 4:12, 4:12] = 7
    labels = put(tmp_path / "t.zarr/clefts", clefts, fill_value=int(CREMI_BACKGROUND), offset_nm=SHIFT_40)
    result = run_cli("train", "-dn", image, "-ln", labels, "-o", tmp_path / "run", "-mi", "4,32,32", "--iteration-total", "1",
                     "--iteration-save", "1", "-c", "0", "--no-progress")
    assert "placed by their offsets: using image" in result.output and "[0:4,0:32,10:64]" in result.output, result.output
    assert (tmp_path / "run/last.pth").exists()


def probabilities(tmp_path):
    """The same probabilities as uint8 (p*255), uint16 (p*65535) and 0..255 floats with prob_max."""
    p8 = np.random.default_rng(2).integers(0, 256, SHAPE, dtype=np.uint8)
    p8[p8 >= 128] //= 8  # sparse clefts: values >= 128 only in a box
    p8[1:3, 4:12, 4:12] = 230
    put(tmp_path / "u8.zarr/pred", p8, attrs={"cleft_kind": "prob"})
    put(tmp_path / "u16.zarr/pred", p8.astype(np.uint16) * 257)  # 257 * v / 65535 == v / 255
    put(tmp_path / "f.zarr/pred", p8.astype(np.float32), attrs={"prob_max": 255})
    return p8


def test_uint16_probabilities_with_kind_prob_segment_as_their_uint8_original(run_cli, tmp_path):
    probabilities(tmp_path)
    run_cli("segment", tmp_path / "u8.zarr/pred", "-o", tmp_path / "a.zarr/ids", "--no-progress")
    run_cli("segment", tmp_path / "u16.zarr/pred", "-o", tmp_path / "b.zarr/ids", "--kind", "prob", "--no-progress")
    run_cli("segment", tmp_path / "f.zarr/pred", "-o", tmp_path / "c.zarr/ids", "--no-progress")
    a, b, c = (open_volume(tmp_path / f"{n}.zarr/ids")[:] for n in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert (a != CREMI_BACKGROUND).sum() == 2 * 8 * 8  # the one box, not one cleft over everything


def test_uint16_and_scaled_float_probabilities_threshold_and_evaluate_like_uint8(wv, run_cli, tmp_path):
    p8 = probabilities(tmp_path)
    put(tmp_path / "u16k.zarr/pred", p8.astype(np.uint16) * 257, attrs={"cleft_kind": "prob"})
    results = {}
    for name in ("u8", "u16k", "f"):
        run_cli("threshold", tmp_path / f"{name}.zarr/pred", "-o", tmp_path / f"{name}.zarr/mask", "--threshold", "200", "--no-progress")
        np.testing.assert_array_equal(open_volume(tmp_path / f"{name}.zarr/mask")[:], (p8 >= 200).astype(np.uint8), name)
        run_cli("evaluate", tmp_path / f"{name}.zarr/pred", wv / "in.zarr/clefts", "--json", tmp_path / f"{name}.json", "--no-progress")
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["inputs"]["pred_kind"] == "prob", name
        results[name] = {k: v for k, v in report.items() if k != "inputs"}
    assert results["u8"] == results["u16k"] == results["f"]
    run_cli("evaluate", tmp_path / "u16.zarr/pred", wv / "in.zarr/clefts", "--pred-kind", "prob", "--no-progress")


def test_info_prints_each_frame(wv, run_cli):
    out = run_cli("info", wv / "shifted.zarr").output
    assert out.count("frame ") >= 4 and "(0, 0, 400) nm to (160, 128, 528) nm" in out


def test_convert_accepts_the_most_levels_it_names(wv, run_cli, tmp_path):
    run_cli("convert", wv / "in.zarr/raw", tmp_path / "o.zarr/raw", "--levels", "6", "--no-progress")
    assert "s5" in run_cli("info", tmp_path / "o.zarr/raw").output


def test_predict_places_a_mask_by_its_offset_or_takes_it_voxel_for_voxel(wv, run_cli, tmp_path):
    base = ("-pm", wv / "model.pth", "--workers", "0", "--no-progress")
    run_cli("predict", wv / "in.zarr/raw", tmp_path / "plain.zarr/pred", *base)
    run_cli("predict", wv / "in.zarr/raw", tmp_path / "coarse.zarr/pred", *base, "--mask", wv / "coarse.zarr/mask", "--ignore-frame")
    mask = np.zeros((4, 32, 48), np.uint8)
    mask[:, :, 16:] = 1  # the input's voxels: it starts 16 voxels (64 nm) before the input along x
    put(tmp_path / "m.zarr/mask", mask, attrs={"cleft_kind": "mask"}, offset_nm=(0, 0, -64))
    run_cli("predict", wv / "in.zarr/raw", tmp_path / "placed.zarr/pred", *base, "--mask", tmp_path / "m.zarr/mask")
    plain = open_volume(tmp_path / "plain.zarr/pred")[:]
    np.testing.assert_array_equal(open_volume(tmp_path / "coarse.zarr/pred")[:], plain)
    np.testing.assert_array_equal(open_volume(tmp_path / "placed.zarr/pred")[:], plain)
    # the test can tell: the same mask without its offset blanks 16 columns
    put(tmp_path / "n.zarr/mask", mask[:, :, :32], attrs={"cleft_kind": "mask"})
    run_cli("predict", wv / "in.zarr/raw", tmp_path / "unplaced.zarr/pred", *base, "--mask", tmp_path / "n.zarr/mask")
    unplaced = open_volume(tmp_path / "unplaced.zarr/pred")[:]
    assert (unplaced[:, :, :16] == 0).all() and plain[:, :, :16].any()


@pytest.mark.parametrize("command", ["threshold", "segment"])
def test_float_probabilities_holding_nan_are_refused_not_taken_as_background(tmp_path, run_cli, command):
    from cleftchunk.io.volumes import create_volume

    spec = str(tmp_path / "p.zarr")
    data = np.full((4, 32, 32), 0.9, np.float32)
    data[2, 5, 5] = np.nan
    create_volume(spec, data.shape, np.float32, chunks=(4, 32, 32)).array[:] = data
    out = tmp_path / "o.zarr"
    args = (command, spec, "-o", out, "--kind", "prob") if command == "segment" else (command, spec, "-o", out)
    result = run_cli(*args, expect=None)
    assert result.exit_code != 0 and "NaN or infinite" in result.output, result.output
