"""Every block-wise stage through the one executor: the same bytes for any block shape, worker
count and place (threads, worker processes, an existing scheduler the test starts on 127.0.0.1);
dry runs of terabyte volumes that return at once and write nothing."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from cleftchunk.io.volumes import create_volume, open_volume
from cleftchunk.post.metrics import evaluate
from cleftchunk.post.segment import connected_components_reference, segment
from cleftchunk.run.options import RunOptions
from cleftchunk.synth.generate import generate_region
from convert_helpers import ramp

VS = ("--voxel-size", "40,4,4")
METRICS = ["pred_voxels", "gt_voxels", "fp", "fn", "tp", "adgt", "adf", "cremi_score", "precision", "recall", "f1"]
TB = (1024, 31232, 31232)  # 10^12 voxels


def stored_files(folder: Path) -> dict:
    """Every stored object under ``folder`` except metadata, by relative path: the bytes on disk."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"}


@pytest.fixture(scope="module")
def scheduler_address():
    """A cluster of 2 worker processes on 127.0.0.1, started by the test, as a user's would be."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0", scheduler_port=0) as cluster:
        yield cluster.scheduler_address


# -- the same bytes wherever and however it runs ------------------------------------------------
@pytest.mark.slow
def test_convert_gives_the_same_bytes_on_threads_processes_and_an_existing_scheduler(tmp_path, run_cli, scheduler_address):
    data = ramp((9, 40, 36), np.uint16)
    np.save(tmp_path / "d.npy", data)
    common = ("--chunks", "2,16,16", "--levels", "2", "--no-progress", *VS)
    places = {
        "one": ("--threads", "1", "--task-mb", "0"),
        "three": ("--threads", "3", "--task-mb", "1"),
        "procs": ("--workers", "2"),
        "remote": ("--scheduler", scheduler_address, "--task-mb", "0"),
    }
    for name, options in places.items():
        run_cli("convert", tmp_path / "d.npy", tmp_path / f"{name}.zarr/d", *common, *options)
    reference = stored_files(tmp_path / "one.zarr/d")
    assert any("s1" in str(k) for k in reference)  # the pyramid level went through the executor too
    for name in places:
        assert stored_files(tmp_path / f"{name}.zarr/d") == reference, name
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "remote.zarr/d/s0"))[:], data)


@pytest.mark.slow
def test_synth_gives_the_same_bytes_on_threads_processes_and_an_existing_scheduler(tmp_path, run_cli, scheduler_address):
    shape = "10,48,40"
    for name, options in {"one": ("--threads", "1"), "threads": ("--threads", "3", "--block-shape", "4,32,16"),
                          "procs": ("--workers", "2"), "remote": ("--scheduler", scheduler_address)}.items():
        run_cli("synth", tmp_path / f"{name}.zarr", "--shape", shape, "--chunks", "4,16,16", "--seed", "4", "--no-progress", *options)
    reference = stored_files(tmp_path / "one.zarr")
    assert reference
    for name in ("threads", "procs", "remote"):
        assert stored_files(tmp_path / f"{name}.zarr") == reference, name
    # the CREMI file is written by the client from results the remote workers send back
    run_cli("synth", tmp_path / "remote.hdf", "--shape", shape, "--chunks", "4,16,16", "--seed", "4", "--no-progress", "--scheduler", scheduler_address)
    expected = generate_region((10, 48, 40), seed=4)
    with h5py.File(tmp_path / "remote.hdf", "r") as f:
        np.testing.assert_array_equal(f["volumes/raw"][...], expected["raw"])
        np.testing.assert_array_equal(f["volumes/labels/clefts"][...], expected["clefts"])


@pytest.mark.slow
def test_segment_bytes_do_not_depend_on_workers_block_shape_or_place(tmp_path, scheduler_address):
    rng = np.random.default_rng(11)
    pred = np.where(rng.random((8, 32, 24)) < 0.08, 200, 10).astype(np.uint8)
    volume = create_volume(tmp_path / "p.zarr/pred", pred.shape, pred.dtype, chunks=(2, 8, 8), voxel_size=(40, 4, 4))
    volume.array[...] = pred
    spec = str(tmp_path / "p.zarr/pred")
    runs = {
        "w1": RunOptions(threads=1, block_shape=(2, 8, 8)),
        "w3": RunOptions(threads=3, block_shape=(4, 16, 8)),
        "procs": RunOptions(workers=2, block_shape=(8, 8, 24)),
        "remote": RunOptions(scheduler=scheduler_address, block_shape=(2, 32, 8)),
    }
    for name, options in runs.items():
        segment(spec, str(tmp_path / f"{name}.zarr/ids"), chunks=(2, 8, 8), min_size=2, run=options)
    np.testing.assert_array_equal(open_volume(str(tmp_path / "w1.zarr/ids"))[...], connected_components_reference(pred >= 128, 26, 2))
    reference = stored_files(tmp_path / "w1.zarr/ids")
    for name in runs:
        assert stored_files(tmp_path / f"{name}.zarr/ids") == reference, name


@pytest.mark.slow
def test_evaluate_does_not_depend_on_workers_block_shape_or_place(tmp_path, scheduler_address):
    rng = np.random.default_rng(12)
    specs = []
    for name, density in (("p", 0.01), ("g", 0.005)):
        data = (rng.random((8, 40, 40)) < density).astype(np.uint8)
        volume = create_volume(tmp_path / f"v.zarr/{name}", data.shape, data.dtype, chunks=(4, 8, 8), voxel_size=(40, 4, 4))
        volume.array[...] = data
        specs.append(str(tmp_path / f"v.zarr/{name}"))
    runs = [RunOptions(threads=1, block_shape=(4, 8, 8)), RunOptions(threads=3, block_shape=(8, 16, 24)),
            RunOptions(workers=2, block_shape=(2, 40, 8)), RunOptions(scheduler=scheduler_address, block_shape=(4, 8, 8))]
    results = [evaluate(*specs, halo=(1, 2, 2), run=options) for options in runs]
    assert results[0]["pred_voxels"] > 0 and results[0]["gt_voxels"] > 0
    for result in results[1:]:
        assert {k: result[k] for k in METRICS} == {k: results[0][k] for k in METRICS}


# -- dry runs of a terabyte: at once, and nothing written -------------------------------------------
def virtual_tb(folder: Path) -> str:
    """A 1 TB uint8 Zarr array with no stored chunk (what benchmarks/scale.py uses)."""
    zarr.open_group(str(folder / "tb.zarr"), mode="w").create_array("raw", shape=TB, chunks=(32, 512, 512), dtype="uint8", fill_value=0)
    return str(folder / "tb.zarr/raw")


def files_under(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def test_convert_dry_run_of_a_terabyte_returns_at_once_and_writes_nothing(tmp_path, run_cli):
    spec = virtual_tb(tmp_path)
    before = files_under(tmp_path)
    started = time.perf_counter()
    result = run_cli("convert", spec, tmp_path / "out.zarr/raw", *VS, "--levels", "3", "--dry-run")
    assert time.perf_counter() - started < 20
    assert "plan: convert" in result.output and "nothing was run" in result.output
    assert "TiB before compression" in result.output and "memory per worker thread" in result.output
    assert files_under(tmp_path) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["predict", "segment", "evaluate", "threshold", "export", "convert"])
def test_every_command_plans_a_plain_terabyte_in_seconds_and_creates_nothing(tmp_path, run_cli, command):
    """A plain uint8 Zarr array (no kind, no voxel size stated): no command reads it whole to plan."""
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    spec = virtual_tb(tmp_path)
    if command == "predict":
        net = build_model("unetv0", preset="small")
        save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (8, 64, 64))
    before = files_under(tmp_path)
    args = {
        "predict": ("predict", spec, tmp_path / "out/p.zarr/pred", "-pm", tmp_path / "small.pth"),
        "segment": ("segment", spec, "-o", tmp_path / "out/s.zarr/ids"),
        "evaluate": ("evaluate", spec, spec, "--voxel-size", "40,4,4", "--json", tmp_path / "out/m.json"),
        "threshold": ("threshold", spec, "-o", tmp_path / "out/m.zarr"),
        "export": ("export", spec, tmp_path / "out/c.hdf"),
        "convert": ("convert", spec, tmp_path / "out/c.zarr/raw", "--voxel-size", "40,4,4"),
    }[command]
    started = time.perf_counter()
    result = run_cli(*args, "--dry-run")
    assert time.perf_counter() - started < 30
    assert "plan: " in result.output and "nothing was run and nothing was created" in result.output
    assert files_under(tmp_path) == before


def test_synth_dry_run_of_a_terabyte_returns_at_once_and_writes_nothing(tmp_path, run_cli):
    started = time.perf_counter()
    result = run_cli("synth", tmp_path / "big.zarr", "--shape", ",".join(map(str, TB)), "--dry-run")
    assert time.perf_counter() - started < 20
    blocks = 64 * 122 * 122  # chunks of 16 × 256 × 256
    assert f"{blocks} blocks of (16, 256, 256)" in result.output and "nothing was run" in result.output
    assert "15.4 TiB before compression" in result.output  # 17 bytes a voxel: raw, clefts, neuron ids
    assert files_under(tmp_path) == set()


@pytest.mark.slow
def test_export_writes_the_same_file_in_one_slab_in_many_and_from_an_existing_scheduler(tmp_path, scheduler_address, monkeypatch):
    import cleftchunk.post.export as ex
    from cleftchunk.labels import CREMI_BACKGROUND

    clefts = generate_region((8, 32, 32), seed=2)["clefts"]
    volume = create_volume(tmp_path / "c.zarr/ids", clefts.shape, clefts.dtype, chunks=(2, 16, 16), voxel_size=(40, 4, 4),
                           fill_value=int(CREMI_BACKGROUND), attrs={"cleft_kind": "ids"})
    volume.array[...] = clefts
    spec = str(tmp_path / "c.zarr/ids")
    ex.export_cremi(spec, tmp_path / "one.hdf", raw=spec)
    monkeypatch.setattr(ex, "SLAB_BYTES", 2 * 32 * 32 * 8)  # two sections a slab: four slabs
    assert ex.slab_depth(open_volume(spec), open_volume(spec).roi) == 2
    ex.export_cremi(spec, tmp_path / "slabs.hdf", raw=spec)
    ex.export_cremi(spec, tmp_path / "remote.hdf", raw=spec, run=RunOptions(scheduler=scheduler_address))
    with h5py.File(tmp_path / "one.hdf", "r") as f:
        np.testing.assert_array_equal(f["volumes/labels/clefts"][...], clefts)
        reference = {name: (f[name][...], dict(f[name].attrs)) for name in ("volumes/labels/clefts", "volumes/raw")}
    for name in ("slabs", "remote"):
        with h5py.File(tmp_path / f"{name}.hdf", "r") as f:
            for dataset, (data, attrs) in reference.items():
                np.testing.assert_array_equal(f[dataset][...], data)
                assert {k: list(v) for k, v in f[dataset].attrs.items()} == {k: list(v) for k, v in attrs.items()}
