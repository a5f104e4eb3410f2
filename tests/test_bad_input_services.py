"""Bad input that the table of tests/test_bad_input.py cannot hold: servers that are not Dask
schedulers, a reader that closes the pipe, a disk that fills while a checkpoint is saved, NaN
that reaches the gradients, hosts that do not resolve, and the message catalogue's rule checked
on every command's own refusals."""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.volumes import create_volume
from cleftchunk.labels import CREMI_BACKGROUND

SHAPE = (4, 32, 32)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    raw = create_volume(str(root / "in.zarr/raw"), SHAPE, np.uint8, chunks=SHAPE, attrs={"cleft_kind": "image"})
    raw.array[...] = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[1:3, 4:12, 4:12] = 7
    labels = create_volume(str(root / "in.zarr/clefts"), SHAPE, np.uint64, chunks=SHAPE, fill_value=int(CREMI_BACKGROUND))
    labels.array[...] = clefts
    return root


@contextlib.contextmanager
def serving(handler_class, server_class=socketserver.TCPServer):
    """A server on a free port of 127.0.0.1, in a thread, for the duration."""
    server = server_class(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines in the test output
        pass


class _Proxy(socketserver.BaseRequestHandler):
    """What a proxy in the way says on connect: an HTTP error, before the client sends anything."""

    def handle(self):
        self.request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")


class _Silent(socketserver.BaseRequestHandler):
    """Accepts, reads and never answers (nor speaks HTTP)."""

    def handle(self):
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            while self.request.recv(1024):
                pass


@pytest.mark.parametrize("handler, message", [
    (_Quiet, r"answered like an HTTP server, not a Dask scheduler"),
    (_Proxy, r"answered like an HTTP server \(a proxy\?\), not a Dask scheduler"),
    (_Silent, r"sent nothing within 1 s, not a Dask scheduler"),
], ids=["http-server", "proxy", "silent"])
def test_a_server_that_is_not_a_dask_scheduler_is_named_not_waited_for(ws, tmp_path, run_cli, monkeypatch, handler, message):
    import re

    monkeypatch.setenv("CLEFTCHUNK_CONNECT_TIMEOUT", "1")
    with serving(handler) as port:
        start = time.monotonic()
        result = run_cli("threshold", ws / "in.zarr/raw", "-o", tmp_path / "o.zarr/m", "--scheduler", f"tcp://127.0.0.1:{port}", expect=2)
        took = time.monotonic() - start
    assert re.search(message, result.output), result.output
    assert "EiB" not in result.output and result.output.count("\n") == 1
    assert took < 15, f"took {took:.0f} s"
    assert not (tmp_path / "o.zarr").exists()  # refused before the output was created


def test_the_probe_lets_a_real_scheduler_through(ws, tmp_path, run_cli):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None) as cluster:
        run_cli("threshold", ws / "in.zarr/raw", "-o", tmp_path / "o.zarr/m", "--scheduler", cluster.scheduler_address, "--no-progress")
    run_cli("threshold", ws / "in.zarr/raw", "-o", tmp_path / "local.zarr/m", "--no-progress")
    from cleftchunk.io.volumes import open_volume

    np.testing.assert_array_equal(open_volume(tmp_path / "o.zarr/m")[:], open_volume(tmp_path / "local.zarr/m")[:])


# -- a reader that stops early -----------------------------------------------------------------------
def test_a_closed_pipe_ends_quietly_and_the_json_is_whole(ws, tmp_path):
    """`cleftchunk evaluate ... --json m.json | head -1`: no "Broken pipe", and the file is written."""
    pred = create_volume(str(tmp_path / "p.zarr/pred"), SHAPE, np.uint8, chunks=SHAPE, attrs={"cleft_kind": "prob"})
    pred.array[1:3, 4:12, 4:12] = 250
    command = [sys.executable, "-c", "from cleftchunk_cli.main import main; main()", "evaluate", str(tmp_path / "p.zarr/pred"),
               str(ws / "in.zarr/clefts"), "--json", str(tmp_path / "m.json"), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    process.stdout.close()  # the reader is gone before the first line
    err = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, err
    assert err == "", err
    import json

    assert json.loads((tmp_path / "m.json").read_text())["gt_voxels"] > 0  # whole: it parses


# -- checkpoints on a full disk ---------------------------------------------------------------------
def test_a_checkpoint_on_a_full_disk_is_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil

    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    net = build_model("unetv0", preset="small")

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4992 vs 4880")

    monkeypatch.setattr(torch, "save", full)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage._replace(free=4096))
    with pytest.raises(CleftchunkError, match=r"checkpoint .*m.pth could not be written: no space left on the disk: free disk space"):
        save_checkpoint(tmp_path / "m.pth", net, arch_spec(net), (4, 32, 32))
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its partial file
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage._replace(free=1 << 40))
    with pytest.raises(CleftchunkError, match=r"could not be written \(\[enforce fail at inline_container.cc:595\]"):
        save_checkpoint(tmp_path / "m.pth", net, arch_spec(net), (4, 32, 32))


def test_a_bug_in_saving_is_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    net = build_model("unetv0", preset="small")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint(tmp_path / "m.pth", net, arch_spec(net), (4, 32, 32))


# -- NaN that reaches the gradients -----------------------------------------------------------------
def _train_config(ws, out, **overrides):
    values = {
        "root": str(ws), "images": "in.zarr/raw", "labels": "in.zarr/clefts", "output": str(out), "input_size": [4, 32, 32],
        "preset": "small", "batch_size": 1, "loader_workers": 0, "iteration_total": 4, "iteration_save": 2, "progress": False,
        "threads": 1, "log_dir": str(out) + "-runs",
    }
    return {**values, **overrides}


def test_a_non_finite_gradient_stops_training_and_no_non_finite_weights_are_saved(ws, tmp_path, monkeypatch):
    """A finite loss with NaN gradients (a NaN the loss masked away) used to train NaN weights."""
    import cleftchunk.train.trainer as trainer_module
    from cleftchunk.model import load_checkpoint
    from cleftchunk.train import train

    real = trainer_module.training_loss
    calls = []

    def masked_nan(logits, *args):
        calls.append(1)
        loss = real(logits, *args)
        if len(calls) == 3:  # a NaN branch where() leaves out: the loss stays finite, its gradient is NaN
            hidden = torch.sqrt(logits.float().sum() * 0 - 1)
            loss = loss + torch.where(torch.tensor(False), hidden, torch.zeros(()))
        return loss

    monkeypatch.setattr(trainer_module, "training_loss", masked_nan)
    with pytest.raises(CleftchunkError, match=r"a gradient became NaN or inf at iteration 3 \(crops: .*in.zarr/raw.* at voxel .*last good checkpoint .*iteration 2\)"):
        train(_train_config(ws, tmp_path / "run"))
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "volume_4.pth").exists()


def test_weights_that_became_non_finite_are_never_saved(ws, tmp_path, monkeypatch):
    import cleftchunk.train.trainer as trainer_module
    from cleftchunk.train import train

    real = trainer_module.Trainer.step

    def poisoned(self, batch):
        result = real(self, batch)
        if self.iteration == 2:  # the weights themselves, as a NaN step of the optimizer leaves them
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("inf"))
            for p in self.net.parameters():
                p.grad = None
        return result

    monkeypatch.setattr(trainer_module.Trainer, "step", poisoned)
    with pytest.raises(CleftchunkError, match=r"the weights became NaN or inf at iteration 2.*no checkpoint was written yet"):
        train(_train_config(ws, tmp_path / "run"))
    assert not list((tmp_path / "run").glob("*.pth"))


# -- hosts that do not resolve ------------------------------------------------------------------------
def test_an_unresolvable_host_is_said_so_not_does_not_exist(run_cli, monkeypatch, tmp_path):
    pytest.importorskip("aiohttp", reason="https:// reads need aiohttp")
    monkeypatch.chdir(tmp_path)
    result = run_cli("info", "https://cleftchunk-no-such-host.invalid/x.zarr", expect=2)
    assert "cannot be resolved" in result.output and "does not exist" not in result.output, result.output


def test_a_scheme_prefix_is_a_url_or_refused_and_a_local_name_with_a_colon_is_written_dot_slash(tmp_path, monkeypatch):
    from cleftchunk.io.stores import parse_location

    monkeypatch.chdir(tmp_path)
    assert parse_location("s3://bucket/x.zarr") == "s3://bucket/x.zarr"
    assert parse_location("data/file.h5:volumes/raw") == Path("data/file.h5:volumes/raw")  # an HDF5 dataset, not a scheme
    assert parse_location("./s3:/bucket/x.zarr") == Path("s3:/bucket/x.zarr")
    for bad in ("s3:/bucket/x.zarr", "s3:bucket/x.zarr", "gs:/b/x.zarr", "https:/host/x.zarr", "myhost:8080/x.zarr"):
        with pytest.raises(CleftchunkError, match="starts like a .*:// URL but is not one"):
            parse_location(bad)
    with pytest.raises(CleftchunkError, match="unknown storage scheme ftp://"):
        parse_location("ftp://host/x.zarr")


def test_the_message_catalogue_speaks_each_commands_flags():
    """cli/messages.for_command, on the hints the library writes for the commonest caller."""
    from cleftchunk_cli.main import COMMANDS, cli
    from cleftchunk_cli.messages import COMMAND_NAMES, for_command, unknown_flags

    assert COMMAND_NAMES == set(COMMANDS)
    commands = cli.commands
    kind = "x.zarr/clefts holds an EM image, not cleft labels: give the clefts volume (or --kind ids|main|mask if its metadata is wrong)"
    assert "--label-mode cremi|zero-background|nonzero" in for_command(kind, commands["train"])
    assert "--gt-kind ids|main|mask" in for_command(kind, commands["evaluate"], {"pred": "p.zarr/pred", "gt": "x.zarr/clefts"})
    assert "--pred-kind ids" in for_command(kind, commands["evaluate"], {"pred": "x.zarr/clefts", "gt": "g.zarr/clefts"})
    assert for_command(kind, commands["segment"]) == kind  # segment has --kind
    other = "say what it holds with --kind mask (evaluate: --pred-kind/--gt-kind)"
    assert for_command(other, commands["segment"]) == "say what it holds with --kind mask"
    assert "(hint: keep this)" in for_command("a problem (hint: keep this)", commands["segment"])
    several = "two.h5 holds several datasets (a, b): pick one with --dataset or FILE:DATASET"
    assert for_command(several, commands["predict"]).endswith("pick one with FILE:DATASET")
    for name, command in commands.items():
        for message in (kind, other, several, "four.zarr is 4-D: pick one of its 2 channels (axis 0) with --channel K"):
            assert not unknown_flags(for_command(message, command, {"pred": "p", "gt": "x.zarr/clefts"}), command), (name, message)
