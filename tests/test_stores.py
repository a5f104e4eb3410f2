"""Object stores and URLs (issue 15): convert, info, predict (killed and resumed) and evaluate
against a real S3-protocol server on 127.0.0.1 give the bytes of a local run; HTTP reads; and the
set-up mistakes (unknown scheme, missing bucket, no credentials, endpoint down) are one-line errors."""

from __future__ import annotations

import functools
import http.server
import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume, open_volume
from s3_server import environment, free_port, s3_server
from test_predict import CHUNKS, WINDOW, make_slow_model, tissue, write_volume

# servers, clusters and subprocesses: part of the full suite, not of the quick loop
pytestmark = pytest.mark.slow

VS = ("--voxel-size", "40,4,4")
_names = itertools.count()
METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3):
    import s3fs

    name = f"bucket-{next(_names)}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def chunk_bytes_s3(url: str) -> dict[str, bytes]:
    """Every data object under ``url`` (metadata documents left out: they hold dates and paths)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://").rstrip("/")
    return {k[len(root) + 1 :]: fs.cat(k) for k in fs.find(root) if k.rpartition("/")[2] not in METADATA}


def chunk_bytes_local(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in METADATA
    }


# -- convert and info -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["raw.zarr", "container.zarr/raw"])
def test_convert_to_s3_gives_the_bytes_of_a_local_conversion(tmp_path, run_cli, bucket, form):
    data = np.random.default_rng(0).integers(0, 256, (6, 40, 36), dtype=np.uint8)
    np.save(tmp_path / "src.npy", data)
    options = (*VS, "--chunks", "2,16,16", "--levels", "2", "--no-progress")
    run_cli("convert", tmp_path / "src.npy", tmp_path / form, *options)
    run_cli("convert", tmp_path / "src.npy", f"{bucket}/{form}", *options)
    remote = chunk_bytes_s3(f"{bucket}/{form}")
    assert remote == chunk_bytes_local(tmp_path / form) and any(k.startswith("s1/") for k in remote)
    volume = open_volume(f"{bucket}/{form}")
    np.testing.assert_array_equal(volume[:], data)
    assert volume.voxel_size == (40.0, 4.0, 4.0)
    again = run_cli("convert", tmp_path / "src.npy", f"{bucket}/{form}", *options)
    assert "nothing" in again.output.lower() or "complete" in again.output.lower()
    assert not (Path.cwd() / "s3:").exists()


def test_info_on_s3_lists_a_container_and_describes_an_image(tmp_path, run_cli, bucket):
    import json

    for name in ("raw", "labels"):
        volume = create_volume(f"{bucket}/c.zarr/{name}", (4, 8, 8), "uint8", chunks=(2, 8, 8))
        volume.write(volume.roi, np.full((4, 8, 8), 7, np.uint8))
    listed = json.loads(run_cli("info", f"{bucket}/c.zarr", "--json").output)
    assert [i["spec"] for i in listed] == [f"{bucket}/c.zarr/labels/s0", f"{bucket}/c.zarr/raw/s0"]
    one = json.loads(run_cli("info", f"{bucket}/c.zarr/raw", "--json").output)[0]
    assert one["shape"] == [4, 8, 8] and one["value_min"] == 7 == one["value_max"] and one["stored_bytes"] > 0


# -- predict, killed and resumed -------------------------------------------------------------------
STOP = Path(__file__).parent / "stop_at_block.py"


@pytest.mark.slow
def test_predict_from_and_to_s3_resumes_after_a_kill_with_the_bytes_of_a_local_run(tmp_path, bucket, run_cli):
    """Killed (SIGKILL, at a known block: tests/stop_at_block.py) after 3 blocks and resumed."""
    import torch

    from cleftchunk.model import arch_spec, build_model, save_checkpoint
    from stop_at_block import recorded, summary

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    checkpoint = save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (4, 32, 32))
    raw = tissue((8, 48, 48), seed=3)
    local_in = write_volume(tmp_path / "in.zarr" / "raw", raw)
    remote_in = write_volume(f"{bucket}/in.zarr", raw)
    local_out, remote_out = str(tmp_path / "local.zarr" / "pred"), f"{bucket}/pred.zarr"
    common = ("--checkpoint", str(checkpoint), "--chunks", ",".join(map(str, CHUNKS)), "--block-shape", "4,16,16", "--workers", "0", "--no-progress")
    run_cli("predict", local_in, local_out, *common)

    work = tmp_path / "work"  # the current directory receives a URL output's scratch
    work.mkdir()

    def remote(stop_after: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(STOP), str(stop_after), "predict", remote_in, remote_out, *common],
                              cwd=work, capture_output=True, text=True, timeout=180, start_new_session=True)

    killed = remote(3)
    assert killed.returncode == -signal.SIGKILL and recorded(killed.stdout) == 3, killed.stdout + killed.stderr
    again = remote(0)
    assert again.returncode == 0, again.stdout + again.stderr
    already, now, total = summary(again.stdout)
    assert already == 3 and already + now == total and now > 0
    np.testing.assert_array_equal(open_volume(remote_out)[:], open_volume(local_out)[:])
    assert chunk_bytes_s3(f"{remote_out}/s0") == chunk_bytes_local(Path(local_out) / "s0")
    assert not list(work.glob(".pred.zarr.predict-*")), "the scratch is removed when the run completes"


def test_predict_scratch_option_is_used_for_an_s3_output(tmp_path, bucket):
    from test_predict import predict

    raw = tissue((4, 32, 32), seed=1)
    spec = write_volume(f"{bucket}/in.zarr", raw)
    result = predict(make_slow_model(0.0), spec, f"{bucket}/out.zarr", window=WINDOW, chunks=CHUNKS, workers=0,
                     progress=False, log=lambda message: None, scratch=tmp_path / "scratch")
    assert result.blocks_written == result.blocks
    assert (tmp_path / "scratch").is_dir() and not list((tmp_path / "scratch").iterdir())  # used, then cleaned
    assert not list(Path.cwd().glob(".out.zarr.predict-*"))


# -- evaluate ----------------------------------------------------------------------------------------
def test_evaluate_from_s3_equals_a_local_evaluation(tmp_path, run_cli, bucket):
    import json

    rng = np.random.default_rng(4)
    gt = np.full((6, 64, 64), 0xFFFFFFFFFFFFFFFF, np.uint64)
    gt[2:4, 8:14, 8:20] = 5
    gt[1:3, 20:28, 4:10] = 9
    pred = np.zeros(gt.shape, np.uint8)
    pred[2:4, 9:15, 8:18] = 200
    pred[5, 60:, 60:] = rng.integers(128, 255, (4, 4), dtype=np.uint8)  # > θ from every cleft: false positives
    for where in (str(tmp_path), bucket):
        for name, data, fill in (("pred", pred, 0), ("gt", gt, 0xFFFFFFFFFFFFFFFF)):
            v = create_volume(f"{where}/{name}.zarr", data.shape, data.dtype, chunks=(2, 16, 16), fill_value=fill)
            v.write(v.roi, data)
    results = []
    for where in (str(tmp_path), bucket):
        out = tmp_path / f"m{len(results)}.json"
        run_cli("evaluate", f"{where}/pred.zarr", f"{where}/gt.zarr", "--gt-kind", "ids", "--json", out, "--no-progress")
        results.append(json.loads(out.read_text()))
    for r in results:  # the inputs' paths differ, of course; every number must not
        r["inputs"] = {k: v for k, v in r["inputs"].items() if k not in ("pred", "gt")}
    assert results[0] == results[1] and results[0]["tp"] > 0 and results[0]["fp"] > 0


# -- HTTP (read only) --------------------------------------------------------------------------------
def test_http_zarr_is_read_and_refused_as_an_output(tmp_path, run_cli):
    data = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    write_volume(tmp_path / "served" / "img.zarr", data)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img.zarr"
        np.testing.assert_array_equal(open_volume(url)[:], data)
        assert '"shape": [\n      4,' in run_cli("info", url, "--json").output
        msg = one_line_error(run_cli("convert", url, f"{url.rsplit('/', 1)[0]}/copy.zarr", expect=2))
        assert "read-only" in msg and "s3://" in msg
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# -- set-up mistakes: one line each, naming the fix --------------------------------------------------
@pytest.mark.parametrize("url", ["ftp://host/x.zarr/raw", "foo://bucket/x.zarr"])
def test_unknown_schemes_are_refused_and_write_nothing_locally(tmp_path, run_cli, url, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "src.npy", np.zeros((2, 2, 2), np.uint8))
    for args in (("convert", tmp_path / "src.npy", url, *VS), ("info", url)):
        msg = one_line_error(run_cli(*args, expect=2))
        assert "unknown storage scheme" in msg and "s3://" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npy"]


@pytest.mark.parametrize("spec", ["s3://b/sample.h5:volumes/raw", "s3://b/stack.tif", "s3://b/data.n5/raw"])
def test_local_only_formats_from_a_url_are_refused(run_cli, spec, s3):
    msg = one_line_error(run_cli("info", spec, expect=2))
    assert "local files only" in msg


def test_missing_bucket_is_named_with_the_fix(tmp_path, run_cli, s3):
    np.save(tmp_path / "src.npy", np.zeros((2, 2, 2), np.uint8))
    msg = one_line_error(run_cli("convert", tmp_path / "src.npy", "s3://no-such-bucket/x.zarr", *VS, expect=2))
    assert "bucket 'no-such-bucket' does not exist" in msg and "aws s3 mb" in msg
    assert "does not exist" in one_line_error(run_cli("info", "s3://no-such-bucket/x.zarr", expect=2))


def test_missing_credentials_are_named_with_the_fix(run_cli, s3):
    with environment({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None}):
        msg = one_line_error(run_cli("info", "s3://any-bucket/x.zarr", expect=2))
    assert "no credentials" in msg and "AWS_ACCESS_KEY_ID" in msg and "AWS_PROFILE" in msg


def test_an_endpoint_that_is_down_fails_quickly(run_cli, s3):
    with environment({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}):
        started = time.monotonic()
        msg = one_line_error(run_cli("info", "s3://any-bucket/x.zarr", expect=2))
        took = time.monotonic() - started
    assert "cannot reach the storage endpoint" in msg and "AWS_ENDPOINT_URL" in msg
    assert took < 30, f"took {took:.1f} s"


def test_gs_without_gcsfs_says_how_to_install_it(run_cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    msg = one_line_error(run_cli("info", "gs://bucket/x.zarr", expect=2))
    assert "pip install gcsfs" in msg


def test_a_url_is_never_a_local_folder():
    from cleftchunk.io.volumes import split_spec

    assert split_spec("s3://b/p/out.zarr/raw/s0") == ("s3://b/p/out.zarr", "raw/s0")
    assert split_spec("gs://b/out.zarr") == ("gs://b/out.zarr", None)
    with pytest.raises(CleftchunkError, match="unknown storage scheme"):
        split_spec("ftp://b/out.zarr")


# -- the other stages read (and write) object stores too ---------------------------------------------
def test_segment_export_and_view_from_s3_equal_local(tmp_path, run_cli, bucket):
    import h5py

    pred = np.zeros((4, 32, 32), np.uint8)
    pred[1:3, 4:12, 4:12] = 220
    pred[:, 20:30, 18:28] = 160
    for where in (str(tmp_path), bucket):
        v = create_volume(f"{where}/pred.zarr", pred.shape, pred.dtype, chunks=(2, 16, 16))
        v.write(v.roi, pred)
        run_cli("segment", f"{where}/pred.zarr", "-o", f"{where}/seg.zarr/clefts", "--no-progress")
    local, remote = open_volume(tmp_path / "seg.zarr/clefts"), open_volume(f"{bucket}/seg.zarr/clefts")
    np.testing.assert_array_equal(remote[:], local[:])
    assert len(np.unique(remote[:])) == 3  # background and two clefts
    assert chunk_bytes_s3(f"{bucket}/seg.zarr/clefts/s0") == chunk_bytes_local(tmp_path / "seg.zarr/clefts/s0")
    run_cli("export", f"{bucket}/seg.zarr/clefts", tmp_path / "from_s3.hdf")
    run_cli("export", tmp_path / "seg.zarr/clefts", tmp_path / "local.hdf")
    with h5py.File(tmp_path / "from_s3.hdf") as a, h5py.File(tmp_path / "local.hdf") as b:
        np.testing.assert_array_equal(a["volumes/labels/clefts"][...], b["volumes/labels/clefts"][...])
    from cleftchunk.view import ViewLayers, build_viewer

    viewer = build_viewer(ViewLayers(f"{bucket}/pred.zarr", clefts=f"{bucket}/seg.zarr/clefts"))
    assert [layer.name for layer in viewer.state.layers] == ["image", "clefts"]


def test_synth_to_a_url_is_refused_with_the_way_round(run_cli, bucket):
    msg = one_line_error(run_cli("synth", f"{bucket}/sample.zarr", expect=2))
    assert "local sample" in msg and "convert" in msg
