"""A full disk, then the same command again: every writing command resumes, to the bytes of a run
that never failed (never "not a cleftchunk output: pass --overwrite" about its own leftovers).

The disk is "filled" by making a write raise ENOSPC after a number of successful ones: zarr's
local store for Zarr outputs, h5py for HDF5 ones. Each command is tried with the failure at its
first write (the output created, its state not yet written) and at a later one (mid-run).
"""

from __future__ import annotations

import errno
import hashlib

import h5py
import numpy as np
import pytest
import zarr.storage._local as zarr_local

from cleftchunk.io.volumes import create_volume
from cleftchunk.labels import CREMI_BACKGROUND

SHAPE = (4, 32, 32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint
    import torch

    root = tmp_path_factory.mktemp("disk")
    rng = np.random.default_rng(3)
    raw = create_volume(str(root / "in.zarr/raw"), SHAPE, np.uint8, chunks=(2, 16, 16), attrs={"cleft_kind": "image"})
    raw.array[...] = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    prob = np.zeros(SHAPE, np.uint8)
    prob[1:3, 4:12, 4:12] = 250
    prob[0:2, 20:30, 20:30] = 200
    pred = create_volume(str(root / "in.zarr/pred"), SHAPE, np.uint8, chunks=(2, 16, 16), attrs={"cleft_kind": "prob"})
    pred.array[...] = prob
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[1:3, 4:12, 4:12] = 7
    ids = create_volume(str(root / "in.zarr/clefts"), SHAPE, np.uint64, chunks=(2, 16, 16), fill_value=int(CREMI_BACKGROUND))
    ids.array[...] = clefts
    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    save_checkpoint(root / "model.pth", net, arch_spec(net), (4, 32, 32))
    return root


def commands(root, out):
    small = ("--block-shape", "2,16,16", "--no-progress")
    return {
        "predict": ["predict", root / "in.zarr/raw", out / "o.zarr/pred", "-pm", root / "model.pth", "--workers", "0", "--chunks", "2,16,16", *small],
        "segment": ["segment", root / "in.zarr/pred", "-o", out / "o.zarr/ids", "--no-progress"],
        "threshold": ["threshold", root / "in.zarr/pred", "-o", out / "o.zarr/mask", "--no-progress"],
        "convert": ["convert", root / "in.zarr/raw", out / "o.zarr/raw", "--chunks", "2,16,16", *small],
        "synth": ["synth", out / "s.zarr", "--shape", "4,32,32", "--chunks", "2,16,16", *small],
        "synth-cremi": ["synth", out / "s.hdf", "--shape", "4,32,32", "--chunks", "2,16,16", *small],
        "export": ["export", root / "in.zarr/clefts", out / "o.hdf", "--no-progress"],
    }


def digest(folder):
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.suffix not in (".hdf", ".partial") and path.name != "zarr.json":
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_file() and path.suffix == ".hdf":
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, node: files.__setitem__(f"{path.name}:{name}", hashlib.sha256(node[()].tobytes()).hexdigest()) if isinstance(node, h5py.Dataset) else None)
    return files


def fill_disk_after(monkeypatch, writes: int):
    """Every write after the first ``writes`` fails with ENOSPC, as on a full disk."""
    count = {"n": 0}
    put = zarr_local._put

    def full(path, value, exclusive=False):
        count["n"] += 1
        if count["n"] > writes:
            path.parent.mkdir(parents=True, exist_ok=True)  # as the real one does before writing
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", full)
    h5_file = h5py.File

    def full_h5(name, mode="r", *args, **kwargs):
        if mode != "r":
            count["n"] += 1
            if count["n"] > writes:
                open(name, "ab").close()  # the file is created, nothing fits in it
                raise OSError(errno.ENOSPC, "No space left on device", str(name))
        return h5_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", full_h5)


ZARR_WRITES = (0, 1, 2, 3, 6)  # the first writes create the output's groups and arrays, later ones its chunks
HDF5_WRITES = (0, 1)  # opens of the file for writing: creating it, then each pass


@pytest.mark.parametrize("name, writes", [
    *((name, n) for name in ("predict", "segment", "threshold", "convert", "synth") for n in ZARR_WRITES),
    *((name, n) for name in ("synth-cremi", "export") for n in HDF5_WRITES),
])
def test_a_full_disk_then_the_same_command_resumes_to_the_same_bytes(inputs, tmp_path, run_cli, monkeypatch, name, writes):
    reference = tmp_path / "reference"
    run_cli(*commands(inputs, reference)[name])
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        fill_disk_after(m, writes)
        failed = run_cli(*commands(inputs, out)[name], expect=None)
    assert failed.exit_code != 0 and "unexpected" not in failed.output, failed.output
    assert "free disk space" in failed.output or "No space left" in failed.output, failed.output
    again = run_cli(*commands(inputs, out)[name], expect=None)
    assert again.exit_code == 0, again.output
    assert digest(out) == digest(reference)
