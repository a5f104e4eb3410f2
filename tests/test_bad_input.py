"""Bad input, as a new user would give it, through the command line of every stage.

Each case asserts: a one-line ``error: ...`` (the problem and what to do), a non-zero exit, no
"unexpected" (that word is for bugs), and that every file the user had is byte-for-byte as it was
(nothing deleted, nothing rewritten). docs/troubleshooting.md lists the cases and their messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cleftchunk.io.volumes import create_volume
from cleftchunk.labels import CREMI_BACKGROUND

SHAPE = (4, 32, 32)


# -- the user's files ---------------------------------------------------------------------------
def put(spec, data, chunks=(2, 32, 32), **options):
    volume = create_volume(str(spec), data.shape, data.dtype, chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape)) if data.ndim == 3 else None, overwrite=True, **options)
    volume.array[...] = data
    return str(spec)


def plain_zarr(path, data):
    """An array cleftchunk would never write (2-D, 4-D, empty): plain Zarr."""
    import zarr

    array = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=tuple(max(1, s) for s in data.shape))
    if data.size:
        array[...] = data


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: images, labels, a prediction, a checkpoint, and odd files."""
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("ws")
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    put(root / "in.zarr/raw", raw, attrs={"cleft_kind": "image"})  # as convert and synth write it
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[1:3, 4:12, 4:12] = 7
    put(root / "in.zarr/clefts", clefts, fill_value=int(CREMI_BACKGROUND))
    put(root / "in.zarr/neuron_ids", rng.integers(1, 50, SHAPE).astype(np.uint64))
    prob = np.zeros(SHAPE, np.uint8)
    prob[1:3, 4:12, 4:12] = 250
    put(root / "pred.zarr/pred", prob, attrs={"cleft_kind": "prob"})
    put(root / "other.zarr/pred", np.zeros((4, 32, 16), np.uint8), attrs={"cleft_kind": "prob"})
    put(root / "coarse.zarr/pred", prob, voxel_size=(40, 8, 8), attrs={"cleft_kind": "prob"})
    put(root / "small.zarr/raw", raw[:, :16])
    plain_zarr(root / "flat.zarr", raw[0])
    plain_zarr(root / "four.zarr", np.stack([raw, raw]))
    plain_zarr(root / "empty.zarr", np.zeros((0, 32, 32), np.uint8))
    put(root / "int64.zarr/raw", raw.astype(np.int64))
    put(root / "f255.zarr/raw", raw.astype(np.float32))
    nan = raw.astype(np.float32) / 255
    nan[2:4] = np.nan
    put(root / "nan.zarr/raw", nan)
    inf = raw.astype(np.float32) / 255
    inf[0, 0, 0] = np.inf
    put(root / "inf.zarr/raw", inf)
    put(root / "u16.zarr/raw", raw.astype(np.uint16) * 257)
    with h5py.File(root / "two.h5", "w") as f:
        f["a"], f["b"] = raw, raw
    with h5py.File(root / "emptyds.h5", "w") as f:
        f.create_dataset("raw", shape=(0, 4, 4), dtype="uint8")
    full = (root / "two.h5").read_bytes()
    (root / "truncated.h5").write_bytes(full[: len(full) // 3])
    (root / "random.h5").write_bytes(random.Random(1).randbytes(4096))  # seeded: CI must not draw its own
    (root / "notjson.zarr").mkdir()
    (root / "notjson.zarr/zarr.json").write_text("{ this is not json")
    (root / "afile").write_text("a file, not a folder")
    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    ckpt = save_checkpoint(root / "model.pth", net, arch_spec(net), (4, 32, 32))
    state = torch.load(ckpt, weights_only=True)
    (root / "truncated.pth").write_bytes(ckpt.read_bytes()[:5000])
    (root / "random.pth").write_bytes(random.Random(2).randbytes(5000))
    (root / "empty.pth").write_bytes(b"")
    nan_state = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    first = next(k for k, v in nan_state["model"].items() if v.is_floating_point())
    nan_state["model"][first].fill_(float("nan"))
    torch.save(nan_state, root / "nan.pth")
    shapes = {**state, "model": {k: (v[..., :1].clone() if v.ndim == 5 else v) for k, v in state["model"].items()}}
    torch.save(shapes, root / "shapes.pth")
    torch.save({**state, "arch": {**state["arch"], "name": "rsunet"}}, root / "otherarch.pth")
    torch.save({**state, "model": _Evil(root / "ran")}, root / "evil.pth")
    (root / "loop.pth").symlink_to(root / "loop.pth")
    (root / "folders").mkdir()
    (root / "loop.zarr").symlink_to(root / "loop.zarr")
    (root / "damaged.zarr/raw").mkdir(parents=True)
    (root / "damaged.zarr/raw/zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    (root / "noblock.n5/raw").mkdir(parents=True)
    (root / "noblock.n5/attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    (root / "noblock.n5/raw/attributes.json").write_text(json.dumps({"dimensions": [32, 32, 4], "dataType": "uint8", "compression": {"type": "raw"}}))
    from PIL import Image

    (root / "sizes").mkdir()
    Image.fromarray(raw[0]).save(root / "sizes/0.png")
    Image.fromarray(raw[1, :16]).save(root / "sizes/1.png")
    (root / "config.yaml").write_text("lr: fast\n")
    (root / "notyaml.yaml").write_text("lr: [1, 2\n")
    return root


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def snapshot(*roots: Path) -> dict[str, str]:
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


# -- the cases: (id, arguments, expected message regex) -------------------------------------------
P = ["predict", "{ws}/in.zarr/raw", "{tmp}/out.zarr/pred", "-pm", "{ws}/model.pth", "--workers", "0", "--no-progress"]


def predict_with(*extra, input=None, output=None, ckpt=None):
    args = list(P)
    if input:
        args[1] = input
    if output:
        args[2] = output
    if ckpt:
        args[4] = ckpt
    return args + list(extra)


CASES = [
    # predict: flags
    ("predict-mi-not-a-number", predict_with("-mi", "8,abc,64"), r"--model-input '8,abc,64' must be integers"),
    ("predict-mi-two-values", predict_with("-mi", "8,64"), r"has 2 values"),
    ("predict-mi-invalid", predict_with("-mi", "4,30,32"), r"not a valid model input.*nearest valid: 4,32,32"),
    ("predict-overlap-1.5", predict_with("--overlap", "1.5"), r"overlap"),
    ("predict-overlap-negative", predict_with("--overlap", "-0.5"), r"overlap"),
    ("predict-batch-0", predict_with("-b", "0"), r"batch size 0 must be at least 1"),
    ("predict-tta-3", predict_with("--tta", "3"), r"--tta.*'3' is not one of"),
    ("predict-workers-negative", predict_with("--workers", "-2"), r"--workers"),
    ("predict-chunks-zero", predict_with("--chunks", "0,0,0"), r"--chunks '0,0,0': every value must be positive"),
    ("predict-block-negative", predict_with("--block-shape", "-8,64,64"), r"--block-shape '-8,64,64': every value must be positive"),
    ("predict-scale-text", predict_with("--scale", "a lot"), r"--scale 'a lot' must be a number"),
    ("predict-scale-zero", predict_with("--scale", "0"), r"--scale '0' must be positive"),
    ("predict-listen-url", predict_with("--listen", "tcp://0.0.0.0"), r"--listen 'tcp://0.0.0.0' must be a host name"),
    ("predict-tls-alone", predict_with("--tls-cert", "{ws}/model.pth"), r"use them with --scheduler tls://"),
    ("predict-no-checkpoint", P[:3] + P[5:], r"no model given: pass --checkpoint"),
    ("predict-gpus-too-many", predict_with("--gpus", "64"), r"--gpus 64 asked"),
    # predict: checkpoints
    ("ckpt-missing", predict_with(ckpt="{ws}/nope.pth"), r"does not exist"),
    ("ckpt-directory", predict_with(ckpt="{ws}/folders"), r"is a directory"),
    ("ckpt-symlink-loop", predict_with(ckpt="{ws}/loop.pth"), r"symbolic link loop"),
    ("ckpt-empty", predict_with(ckpt="{ws}/empty.pth"), r"is empty \(0 bytes\)"),
    ("ckpt-truncated", predict_with(ckpt="{ws}/truncated.pth"), r"not a readable cleftchunk checkpoint \(the file is (truncated or )?damaged"),
    ("ckpt-random-bytes", predict_with(ckpt="{ws}/random.pth"), r"not a readable cleftchunk checkpoint \(the file is damaged or of another format\)"),
    ("ckpt-runs-code", predict_with(ckpt="{ws}/evil.pth"), r"holds Python objects other than tensors.*never loaded"),
    ("ckpt-nan-weights", predict_with(ckpt="{ws}/nan.pth"), r"hold NaN or inf \(training diverged\)"),
    ("ckpt-wrong-shapes", predict_with(ckpt="{ws}/shapes.pth"), r"do not fit its architecture .*size mismatch"),
    ("ckpt-other-arch", predict_with(ckpt="{ws}/otherarch.pth"), r"unknown architecture 'rsunet'"),
    ("ckpt-is-a-volume", predict_with(ckpt="{ws}/two.h5"), r"not a readable cleftchunk checkpoint"),
    # predict: inputs
    ("predict-input-missing", predict_with(input="{ws}/nope.zarr/raw"), r"nope.zarr"),
    ("predict-input-2d", predict_with(input="{ws}/flat.zarr"), r"(2 axes|2-D).*3-D"),
    ("predict-input-4d", predict_with(input="{ws}/four.zarr"), r"(4 axes|4-D|channel)"),
    ("predict-input-zero-sized", predict_with(input="{ws}/empty.zarr"), r"(empty|zero|0 voxels|extent 0)"),
    ("predict-input-int64", predict_with(input="{ws}/int64.zarr/raw"), r"int64, which is not supported"),
    ("predict-input-float-0-255", predict_with(input="{ws}/f255.zarr/raw"), r"outside \[0, 1\]: pass --scale 1/255"),
    ("predict-input-nan-sections", predict_with("--chunks", "2,32,32", "--block-shape", "2,32,32", input="{ws}/nan.zarr/raw"), r"blocks failed.*holds NaN or inf"),
    ("predict-input-inf-first-chunk", predict_with(input="{ws}/inf.zarr/raw"), r"holds NaN or inf"),
    ("predict-input-labels", predict_with(input="{ws}/in.zarr/clefts"), r"uint64, which is not supported"),
    ("predict-hdf5-several-datasets", predict_with(input="{ws}/two.h5"), r"\ba\b.*\bb\b"),
    ("predict-truncated-hdf5", predict_with(input="{ws}/truncated.h5"), r"truncated.h5"),
    ("predict-random-bytes-hdf5", predict_with(input="{ws}/random.h5"), r"random.h5"),
    ("predict-corrupt-zarr-metadata", predict_with(input="{ws}/notjson.zarr"), r"notjson.zarr"),
    ("predict-mask-other-resolution", predict_with("--mask", "{ws}/coarse.zarr/pred"), r"voxel size .* give a mask at the input's resolution"),
    ("predict-mask-too-small", predict_with("--mask", "{ws}/small.zarr/raw"), r"does not cover the input"),
    # predict: outputs
    ("predict-output-is-input", predict_with("--overwrite", output="{ws}/in.zarr/raw"), r"is where the source lives"),
    ("predict-output-contains-input", predict_with("--overwrite", output="{ws}/in.zarr"), r"contains the source"),
    ("predict-output-inside-s0", predict_with("--overwrite", output="{ws}/in.zarr/raw/s0/pred"), r"lies inside the source"),
    ("predict-output-in-mask", predict_with("--mask", "{ws}/pred.zarr/pred", "--overwrite", output="{ws}/pred.zarr/pred"), r"is where the source lives"),
    ("predict-output-under-a-file", predict_with(output="{ws}/afile/out.zarr/pred"), r"afile"),
    ("predict-output-not-writable", predict_with(output="/sys/cleftchunk-bad-input.zarr/pred"), r"(permitted|permission|writable)"),
    ("predict-output-not-a-prediction", predict_with(output="{ws}/pred.zarr/pred"), r"exists and is not a cleftchunk prediction: pass --overwrite"),
    ("predict-dn-without-o", ["predict", "-dn", "{ws}/in.zarr/raw", "-pm", "{ws}/model.pth"], r"-dn needs -o OUTDIR"),
    # convert
    ("convert-missing-source", ["convert", "{ws}/nope.h5", "{tmp}/o.zarr"], r"nope.h5"),
    ("convert-truncated-hdf5", ["convert", "{ws}/truncated.h5:a", "{tmp}/o.zarr/a"], r"truncated.h5"),
    ("convert-random-bytes", ["convert", "{ws}/random.h5:a", "{tmp}/o.zarr/a"], r"random.h5"),
    ("convert-several-datasets", ["convert", "{ws}/two.h5", "{tmp}/o.zarr/raw"], r"\ba\b.*\bb\b"),
    ("convert-dataset-not-there", ["convert", "{ws}/two.h5:c", "{tmp}/o.zarr/c"], r"\bc\b"),
    ("convert-images-of-different-sizes", ["convert", "{ws}/sizes", "{tmp}/o.zarr/raw", "--voxel-size", "40,4,4"], r"(size|shape)"),
    ("convert-voxel-size-zero", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--voxel-size", "0,4,4"], r"--voxel-size '0,4,4': every value must be positive"),
    ("convert-voxel-size-negative", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--voxel-size", "-40,4,4"], r"must be positive"),
    ("convert-voxel-size-nan", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--voxel-size", "nan,4,4"], r"finite"),
    ("convert-voxel-size-inf", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--voxel-size", "inf,4,4"], r"finite"),
    ("convert-voxel-size-absurd", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--voxel-size", "1e300,4,4"], r"voxel size"),
    ("convert-offset-nan", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--offset", "nan,0,0"], r"finite"),
    ("convert-offset-off-grid", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--offset", "20,0,0"], r"multiple of the voxel size"),
    ("convert-chunks-zero", ["convert", "{ws}/in.zarr/raw", "{tmp}/o.zarr/raw", "--chunks", "0,0,0"], r"every value must be positive"),
    ("convert-onto-itself", ["convert", "{ws}/in.zarr/raw", "{ws}/in.zarr/raw", "--overwrite"], r"where the source lives"),
    ("convert-into-its-container", ["convert", "{ws}/in.zarr/raw", "{ws}/in.zarr", "--overwrite"], r"contains the source"),
    ("convert-4d-without-channel", ["convert", "{ws}/four.zarr", "{tmp}/o.zarr/raw"], r"--channel"),
    ("convert-url-scheme", ["convert", "{ws}/in.zarr/raw", "ftp://host/o.zarr/raw"], r"ftp://"),
    # info
    ("info-missing", ["info", "{ws}/nope.zarr"], r"nope.zarr"),
    ("convert-empty-hdf5-dataset", ["convert", "{ws}/emptyds.h5:raw", "{tmp}/o.zarr/raw", "--voxel-size", "40,4,4"], r"axis of length 0: there is nothing to convert"),
    ("info-random-bytes", ["info", "{ws}/random.h5"], r"random.h5"),
    # synth
    ("synth-missing-rate-2", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--missing-rate", "2"], r"missing.rate"),
    ("synth-misalign-rate-negative", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--misalign-rate", "-1"], r"misalign.rate"),
    ("synth-difficulty-2", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--difficulty", "2"], r"difficulty"),
    ("synth-shape-zero", ["synth", "{tmp}/s.zarr", "--shape", "0,32,32"], r"--shape"),
    ("synth-shape-text", ["synth", "{tmp}/s.zarr", "--shape", "big"], r"--shape 'big' must be integers"),
    ("synth-onto-existing", ["synth", "{ws}/in.zarr", "--shape", "4,32,32"], r"(exists|--overwrite)"),
    # segment
    ("segment-output-is-input", ["segment", "{ws}/pred.zarr/pred", "-o", "{ws}/pred.zarr/pred", "--overwrite"], r"is where the source lives"),
    ("segment-output-contains-input", ["segment", "{ws}/pred.zarr/pred", "-o", "{ws}/pred.zarr", "--overwrite"], r"contains the source"),
    ("segment-neurons-as-clefts", ["segment", "{ws}/in.zarr/neuron_ids", "-o", "{tmp}/s.zarr/ids"], r"neuron"),
    ("segment-image-as-clefts", ["segment", "{ws}/in.zarr/raw", "-o", "{tmp}/s.zarr/ids"], r"image"),
    ("segment-min-size-negative", ["segment", "{ws}/pred.zarr/pred", "-o", "{tmp}/s.zarr/ids", "--min-size", "-1"], r"--min-size -1"),
    ("segment-threshold-300", ["segment", "{ws}/pred.zarr/pred", "-o", "{tmp}/s.zarr/ids", "--threshold", "300"], r"--threshold 300"),
    ("segment-block-zero", ["segment", "{ws}/pred.zarr/pred", "-o", "{tmp}/s.zarr/ids", "--block-shape", "0,32,32"], r"must be positive"),
    # export
    ("export-raw-of-another-shape", ["export", "{ws}/in.zarr/clefts", "{tmp}/o.hdf", "--raw", "{ws}/small.zarr/raw"], r"shape"),
    ("export-not-hdf5", ["export", "{ws}/in.zarr/clefts", "{tmp}/o.zarr"], r"give an output ending in .hdf"),
    ("export-probabilities", ["export", "{ws}/pred.zarr/pred", "{tmp}/o.hdf"], r"run `cleftchunk segment` on it first"),
    ("export-crop-malformed", ["export", "{ws}/in.zarr/clefts", "{tmp}/o.hdf", "--crop", "1:2,x"], r"--crop"),
    ("export-onto-input", ["export", "{ws}/in.zarr/clefts", "{ws}/two.h5", "--raw", "{ws}/two.h5:a", "--overwrite"], r"(is where the source lives|contains the source)"),
    # evaluate
    ("evaluate-json-into-input", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/in.zarr/clefts/zarr.json", "--overwrite"], r"--json file .* lies inside the source"),
    ("evaluate-shapes-differ", ["evaluate", "{ws}/other.zarr/pred", "{ws}/in.zarr/clefts"], r"(shape|contain)"),
    ("evaluate-voxel-sizes-differ", ["evaluate", "{ws}/coarse.zarr/pred", "{ws}/in.zarr/clefts"], r"voxel size"),
    ("evaluate-neurons-as-gt", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/neuron_ids"], r"neuron"),
    ("evaluate-image-as-gt", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/raw"], r"image"),
    ("evaluate-theta-nan", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--theta", "nan"], r"θ = nan nm must be a finite distance"),
    ("evaluate-theta-negative", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--theta", "-1"], r"θ = -1.0 nm must be a finite distance"),
    ("evaluate-halo-negative", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--halo", "-4"], r"--halo '-4': every value must be at least 0"),
    ("evaluate-voxel-size-zero", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--voxel-size", "0"], r"must be positive"),
    # train
    ("train-labels-are-an-image", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/raw", "-o", "{tmp}/run", "-mi", "4,32,32", "--iteration-total", "1"], r"image"),
    ("train-labels-are-neurons", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/neuron_ids", "-o", "{tmp}/run", "-mi", "4,32,32", "--iteration-total", "1"], r"neuron"),
    ("train-augment-not-a-number", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "-mi", "4,32,32", "--augment", "flip_p=abc"], r"flip_p"),
    ("train-config-not-a-number", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "--config", "{ws}/config.yaml"], r"wrong type \(could not convert string to float: 'fast'\)"),
    ("train-config-not-yaml", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "--config", "{ws}/notyaml.yaml"], r"notyaml.yaml"),
    ("train-mi-not-a-number", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "-mi", "8,abc,64"], r"must be integers"),
    ("train-output-is-input", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{ws}/in.zarr", "-mi", "4,32,32", "--overwrite"], r"(contains the source|input)"),
    ("demo-size-unknown", ["demo", "{tmp}/d", "--size", "huge"], r"--size.*'huge' is not one of"),
    # malformed URLs: parsed as URLs or refused, never a local folder named "s3:" (one rule, io/stores.parse_location)
    ("url-predict-input-one-slash", predict_with(input="s3:/bucket/in.zarr/raw"), r"starts like a s3:// URL but is not one: write s3://bucket/in.zarr/raw"),
    ("url-predict-output-one-slash", predict_with(output="s3:/bucket/o.zarr/pred"), r"s3:/bucket/o.zarr/pred starts like a s3:// URL"),
    ("url-predict-output-no-slash", predict_with(output="gs:bucket/o.zarr/pred"), r"starts like a gs:// URL but is not one: write gs://bucket/o.zarr/pred"),
    ("url-predict-no-bucket", predict_with(output="s3://"), r"names no bucket or host"),
    ("url-predict-unknown-scheme", predict_with(input="ftp://host/in.zarr/raw"), r"unknown storage scheme ftp://"),
    ("url-convert-dst-one-slash", ["convert", "{ws}/in.zarr/raw", "s3:/bucket/o.zarr/raw"], r"starts like a s3:// URL"),
    ("url-segment-output-one-slash", ["segment", "{ws}/pred.zarr/pred", "-o", "s3:/bucket/o.zarr/ids"], r"starts like a s3:// URL"),
    ("url-threshold-output-one-slash", ["threshold", "{ws}/pred.zarr/pred", "-o", "gs:/bucket/o.zarr/mask"], r"starts like a gs:// URL"),
    ("url-synth-dst-one-slash", ["synth", "s3:/bucket/s.zarr", "--shape", "4,32,32"], r"starts like a s3:// URL"),
    ("url-export-out-one-slash", ["export", "{ws}/in.zarr/clefts", "s3:/bucket/o.hdf"], r"starts like a s3:// URL"),
    ("url-export-out-s3", ["export", "{ws}/in.zarr/clefts", "s3://bucket/o.hdf"], r"local file only"),
    ("url-evaluate-json-one-slash", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "s3:/bucket/m.json"], r"starts like a s3:// URL"),
    ("url-evaluate-json-s3", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "s3://bucket/m.json"], r"--json file s3://bucket/m.json: this is a local file only"),
    ("url-evaluate-pred-one-slash", ["evaluate", "gs:/bucket/p.zarr/pred", "{ws}/in.zarr/clefts"], r"starts like a gs:// URL"),
    ("url-checkpoint-s3", predict_with(ckpt="s3://bucket/model.pth"), r"checkpoint s3://bucket/model.pth: this is a local file only"),
    ("url-checkpoint-one-slash", predict_with(ckpt="s3:/bucket/model.pth"), r"checkpoint s3:/bucket/model.pth starts like a s3:// URL"),
    ("url-info-one-slash", ["info", "s3:/bucket/x.zarr"], r"starts like a s3:// URL"),
    ("url-info-unknown-scheme", ["info", "ftp://host/x.zarr"], r"unknown storage scheme ftp://"),
    ("url-train-image-one-slash", ["train", "-dn", "s3:/bucket/x.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run"], r"starts like a s3:// URL"),
    ("url-train-output-s3", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "s3://bucket/run", "-mi", "4,32,32"], r"output folder s3://bucket/run: this is a local file only"),
    ("url-train-output-one-slash", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "s3:/bucket/run", "-mi", "4,32,32"], r"starts like a s3:// URL"),
    ("url-synth-preview-one-slash", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--preview", "s3:/bucket/p.png"], r"starts like a s3:// URL"),
    ("url-predict-scratch-one-slash", predict_with("--scratch", "s3:/bucket/scratch"), r"starts like a s3:// URL"),
    ("url-train-config-one-slash", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "--config", "s3:/bucket/c.yaml"], r"--config file s3:/bucket/c.yaml starts like a s3:// URL"),
    ("url-predict-root-s3", ["predict", "-dn", "in.zarr/raw", "-t", "s3://bucket/data", "-o", "{tmp}/o", "-pm", "{ws}/model.pth"], r"--root folder s3://bucket/data: this is a local file only"),
    ("url-demo-folder-one-slash", ["demo", "s3:/bucket/demo"], r"demo folder s3:/bucket/demo starts like a s3:// URL"),
    ("url-tls-cert-s3", predict_with("--scheduler", "tls://127.0.0.1:8786", "--tls-ca-file", "s3://bucket/ca.pem", "--tls-cert", "{ws}/model.pth", "--tls-key", "{ws}/model.pth"), r"--tls-ca-file s3://bucket/ca.pem: this is a local file only"),
    # outputs inside an existing volume: refused whatever --overwrite says (io/guard.refuse_inside_container)
    ("inside-evaluate-json-in-array-metadata", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/in.zarr/raw/s0/zarr.json", "--overwrite"], r"--json file .* lies inside the Zarr store .*in.zarr/raw/s0"),
    ("inside-evaluate-json-in-container", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/small.zarr/m.json"], r"lies inside the Zarr store"),
    ("inside-evaluate-json-in-hdf5", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/two.h5/m.json"], r"lies inside the HDF5 file"),
    ("inside-evaluate-json-is-hdf5", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/two.h5", "--overwrite"], r"is the HDF5 file"),
    ("inside-evaluate-json-in-n5", ["evaluate", "{ws}/pred.zarr/pred", "{ws}/in.zarr/clefts", "--json", "{ws}/noblock.n5/raw/m.json"], r"lies inside the N5 container .*noblock.n5/raw"),
    ("inside-train-output-in-store", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{ws}/pred.zarr/run", "-mi", "4,32,32"], r"output folder .* lies inside the Zarr store"),
    ("inside-train-output-is-store", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{ws}/pred.zarr", "-mi", "4,32,32", "--overwrite"], r"is the Zarr store"),
    ("inside-export-in-store", ["export", "{ws}/in.zarr/clefts", "{ws}/pred.zarr/o.hdf"], r"lies inside the Zarr store"),
    ("inside-predict-output-in-image", predict_with("--overwrite", output="{ws}/pred.zarr/pred/s0/p"), r"lies inside the Zarr image .*pred.zarr/pred/s0"),
    ("inside-segment-output-in-image", ["segment", "{ws}/pred.zarr/pred", "-o", "{ws}/in.zarr/raw/s0/ids", "--overwrite"], r"lies inside the Zarr image"),
    ("inside-threshold-output-in-image", ["threshold", "{ws}/pred.zarr/pred", "-o", "{ws}/in.zarr/clefts/s0/mask"], r"lies inside the Zarr image"),
    ("inside-convert-dst-in-image", ["convert", "{ws}/in.zarr/raw", "{ws}/pred.zarr/pred/s0/raw"], r"lies inside the Zarr image"),
    ("inside-synth-in-image", ["synth", "{ws}/in.zarr/raw/s0/s.zarr", "--shape", "4,32,32"], r"(lies inside the Zarr image|container ending in .zarr)"),
    ("inside-synth-preview-in-store", ["synth", "{tmp}/s.zarr", "--shape", "4,32,32", "--preview", "{ws}/in.zarr/p.png"], r"--preview file .* lies inside the Zarr store"),
    ("inside-view-screenshot-in-store", ["view", "{ws}/pred.zarr/pred", "--screenshot", "{ws}/in.zarr/view.png"], r"--screenshot file .* lies inside the Zarr store"),
    # scheduler addresses: a clear line, never a hang
    ("scheduler-host-unknown", predict_with("--scheduler", "tcp://nohost.invalid:8786"), r"the host nohost.invalid cannot be resolved"),
    ("scheduler-nothing-listens", ["threshold", "{ws}/pred.zarr/pred", "-o", "{tmp}/o.zarr/m", "--scheduler", "tcp://127.0.0.1:1"], r"cannot connect to the Dask scheduler at tcp://127.0.0.1:1"),
    ("scheduler-no-port", ["segment", "{ws}/pred.zarr/pred", "-o", "{tmp}/s.zarr/ids", "--scheduler", "tcp://127.0.0.1"], r"--scheduler tcp://127.0.0.1"),
    # damaged metadata and links: what is wrong with which file
    ("info-symlink-loop", ["info", "{ws}/loop.zarr"], r"loop.zarr is a symbolic link loop"),
    ("convert-symlink-loop", ["convert", "{ws}/loop.zarr", "{tmp}/o.zarr/raw"], r"loop.zarr is a symbolic link loop"),
    ("predict-input-below-symlink-loop", predict_with(input="{ws}/loop.zarr/raw"), r"loop.zarr is a symbolic link loop"),
    ("info-zarr-metadata-incomplete", ["info", "{ws}/damaged.zarr/raw"], r"damaged.zarr/raw/zarr.json is damaged"),
    ("predict-zarr-metadata-incomplete", predict_with(input="{ws}/damaged.zarr/raw"), r"zarr.json is damaged"),
    ("info-n5-without-blocksize", ["info", "{ws}/noblock.n5/raw"], r"attributes.json lacks blockSize"),
    ("convert-n5-without-blocksize", ["convert", "{ws}/noblock.n5/raw", "{tmp}/o.zarr/raw"], r"attributes.json lacks blockSize"),
    ("info-n5-dataset-not-there", ["info", "{ws}/noblock.n5/other"], r"not an N5 dataset; the container has: raw"),
    # hints in the printing command's own flags
    ("evaluate-hdf5-several-datasets", ["evaluate", "{ws}/two.h5", "{ws}/in.zarr/clefts"], r"pick one with FILE:DATASET"),
    ("evaluate-4d-prediction", ["evaluate", "{ws}/four.zarr", "{ws}/in.zarr/clefts"], r"cleftchunk convert --channel"),
    ("segment-4d-input", ["segment", "{ws}/four.zarr", "-o", "{tmp}/s.zarr/ids"], r"cleftchunk convert --channel"),
    ("evaluate-image-as-prediction", ["evaluate", "{ws}/in.zarr/raw", "{ws}/in.zarr/clefts"], r"(image|--pred-kind)"),
    ("train-labels-neurons-label-mode", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/in.zarr/neuron_ids", "-o", "{tmp}/run", "-mi", "4,32,32"], r"--label-mode cremi"),
    ("train-labels-4d", ["train", "-dn", "{ws}/in.zarr/raw", "-ln", "{ws}/four.zarr", "-o", "{tmp}/run", "-mi", "4,32,32"], r"(4-D|channel)"),
    # non-finite float images
    ("train-image-nan", ["train", "-dn", "{ws}/nan.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "-mi", "4,32,32", "--iteration-total", "2"], r"the loss became nan at iteration 1, so training stopped: a training crop holds NaN or inf \(.*nan.zarr/raw/s0 at voxel"),
    ("train-image-inf", ["train", "-dn", "{ws}/inf.zarr/raw", "-ln", "{ws}/in.zarr/clefts", "-o", "{tmp}/run", "-mi", "4,32,32", "--iteration-total", "2"], r"a training crop holds NaN or inf"),
]


#: Found while blocks run (a later section holds NaN): the output so far stays, to be resumed.
FAILS_DURING_WORK = {"predict-input-nan-sections", "train-image-nan", "train-image-inf"}


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(ws, tmp_path, run_cli, monkeypatch, case, args, message):
    monkeypatch.chdir(tmp_path)  # a relative folder a command might create lands here, not in the repository
    args = [a.format(ws=ws, tmp=tmp_path) for a in args]
    before = snapshot(ws, tmp_path)
    out = check_refusal(run_cli(*args, expect=None), args[0], message)
    assert "weights_only" not in out, out
    after = snapshot(ws, tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file the user had was changed or deleted"
    if case not in FAILS_DURING_WORK:  # refused before any work: nothing written at all
        assert set(after) == set(before), f"files were created: {sorted(set(after) - set(before))}"
    assert not (ws / "ran").exists()  # the malicious checkpoint ran nothing
    assert not (tmp_path / "s3:").exists()


def check_refusal(result, command: str, message: str) -> str:
    """What every refusal prints: a non-zero exit and one line ``error: ...``, the last (progress
    bars, the dashboard link and warnings may come first), no traceback, the expected message,
    naming only flags ``command`` has. Returns the output."""
    out = result.output
    assert result.exit_code != 0, out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and out.rstrip("\n").endswith(errors[0]) and errors[0].startswith("error: "), out
    assert "unexpected" not in out and "Traceback" not in out, out
    assert re.search(message, out), out
    assert_flags_exist(command, errors[0])
    return out


def assert_flags_exist(command: str, message: str) -> None:
    """The message catalogue's rule: a hint names flags of the command that printed it."""
    from cleftchunk_cli.main import cli
    from cleftchunk_cli.messages import unknown_flags

    missing = unknown_flags(message.split("(see ", 1)[0], cli.commands[command])  # click's "(see cleftchunk X --help)" aside
    assert not missing, f"{command}: the message names {sorted(missing)}, which `{command}` does not have: {message}"


# -- what must work --------------------------------------------------------------------------------
def test_unicode_and_spaces_in_paths_work(ws, tmp_path, run_cli):
    folder = tmp_path / "my data ünïcødé"
    spec = put(folder / "Probe 1 – ä.zarr/raw", np.asarray(np.random.default_rng(1).integers(0, 256, SHAPE), np.uint8))
    out = folder / "résultat.zarr/pred"
    run_cli("predict", spec, out, "-pm", ws / "model.pth", "--workers", "0", "--no-progress")
    run_cli("segment", out, "-o", folder / "résultat.zarr/ids", "--no-progress")
    run_cli("export", folder / "résultat.zarr/ids", folder / "clefts é.hdf")
    result = run_cli("evaluate", out, ws / "in.zarr/clefts", "--json", folder / "métriques.json", "--no-progress")
    assert "metrics written" in result.output and json.loads((folder / "métriques.json").read_text())


def test_uint16_and_scaled_float_images_predict_as_their_uint8_original(ws, tmp_path, run_cli):
    base = ("-pm", ws / "model.pth", "--workers", "0", "--no-progress")
    run_cli("predict", ws / "in.zarr/raw", tmp_path / "u8.zarr/pred", *base)
    run_cli("predict", ws / "f255.zarr/raw", tmp_path / "f.zarr/pred", *base, "--scale", "1/255")
    run_cli("predict", ws / "u16.zarr/raw", tmp_path / "u16.zarr/pred", *base)
    from cleftchunk.io.volumes import open_volume

    u8, f, u16 = (open_volume(tmp_path / f"{n}.zarr/pred")[:] for n in ("u8", "f", "u16"))
    # 257·v / 65535 == v / 255 exactly; v · float32(1/255) may differ from v / 255 in the last bit
    np.testing.assert_array_equal(u16, u8)
    assert np.abs(f.astype(int) - u8.astype(int)).max() <= 1


def test_an_unsupported_url_scheme_creates_no_local_folder(ws, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("predict", "s3://bucket/in.zarr/raw", "s3://bucket/out.zarr/pred", "-pm", ws / "model.pth", "--workers", "0", expect=None)
    assert not (tmp_path / "s3:").exists() and list(tmp_path.iterdir()) == []
    assert result.exit_code != 0 and "unexpected" not in result.output, result.output


def test_info_describes_an_empty_dataset_instead_of_failing(ws, run_cli):
    result = run_cli("info", ws / "emptyds.h5:raw")
    assert "(0, 4, 4)" in result.output and "unexpected" not in result.output


def test_the_library_refuses_what_the_command_line_refuses(ws):
    """The rules live in the library; the command line only names the flags."""
    from cleftchunk.errors import CleftchunkError
    from cleftchunk.geometry import check_voxel_size
    from cleftchunk.post.metrics import evaluate

    with pytest.raises(CleftchunkError, match="halo .* must be 3 whole numbers of voxels >= 0"):
        evaluate(str(ws / "pred.zarr/pred"), str(ws / "in.zarr/clefts"), halo=(-4, 0, 0))
    for bad in ((0, 4, 4), (-40, 4, 4), (float("nan"), 4, 4), (float("inf"), 4, 4), (1e300, 4, 4)):
        with pytest.raises(CleftchunkError, match="voxel size"):
            check_voxel_size(bad)
    with pytest.raises(CleftchunkError, match="offset .* must be finite"):
        check_voxel_size((40, 4, 4), (float("nan"), 0, 0))
