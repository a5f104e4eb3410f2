"""unetv0: the reference parameter counts, shapes, shape errors and checkpoint safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cleftchunk import CleftchunkError
from cleftchunk import load_model as package_load_model
from cleftchunk.model import (
    CHECKPOINT_FORMAT,
    arch_spec,
    build_model,
    check_input_shape,
    checkpoint_input_size,
    count_parameters,
    load_checkpoint,
    load_model,
    save_checkpoint,
)


@pytest.mark.parametrize(
    "filters, out_channels, expected",
    [
        ((32, 64, 128, 256, 256), 1, 7_731_922),
        ((32, 64, 128, 256, 256), 3, 7_733_654),
        ((28, 36, 48, 64, 80), 1, 761_459),
        ((8, 12, 16, 20, 24), 1, 77_521),
    ],
)
def test_parameter_counts_match_the_reference_table(filters, out_channels, expected):
    assert count_parameters(build_model("unetv0", filters=filters, out_channels=out_channels)) == expected


@pytest.mark.parametrize("preset, expected", [("default", 7_731_922), ("medium", 761_459), ("small", 77_521)])
def test_presets_by_name(preset, expected):
    assert count_parameters(build_model("unetv0", preset=preset)) == expected


def test_default_architecture_is_the_original_width():
    assert count_parameters(build_model()) == 7_731_922


@pytest.mark.parametrize("shape, out_channels", [((8, 64, 64), 1), ((2, 32, 96), 3), ((4, 64, 32), 1)])
def test_forward_keeps_the_spatial_shape(shape, out_channels):
    torch.manual_seed(0)
    net = build_model(preset="small", out_channels=out_channels).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *shape))
    assert out.shape == (2, out_channels, *shape)
    # logits, not probabilities: some are outside [0, 1] for a random network and input
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(8, 256, 256), (8, 224, 224), (2, 32, 32), (18, 256, 256)])
def test_valid_shapes_pass(shape):
    check_input_shape(shape)


@pytest.mark.parametrize(
    "shape, nearest",
    [((9, 256, 256), "8,256,256"), ((8, 240, 240), "8,224,224"), ((8, 250, 260), "8,256,256"), ((1, 10, 33), "2,32,32")],
)
def test_invalid_shapes_name_the_nearest_valid_one(shape, nearest):
    with pytest.raises(CleftchunkError) as e:
        check_input_shape(shape)
    message = str(e.value)
    assert "\n" not in message
    assert message.endswith(f"nearest valid: {nearest}")
    check_input_shape(tuple(int(v) for v in nearest.split(",")))


def test_forward_refuses_an_invalid_shape_with_a_clear_error():
    net = build_model(preset="small").eval()
    with pytest.raises(CleftchunkError, match="nearest valid: 8,64,64"):
        net(torch.rand(1, 1, 9, 64, 64))


def test_unknown_architecture_and_preset_are_user_errors():
    with pytest.raises(CleftchunkError, match="unknown architecture"):
        build_model("unetv9")
    with pytest.raises(CleftchunkError, match="unknown preset"):
        build_model(preset="huge")


def _trained_looking_model():
    torch.manual_seed(1)
    net = build_model(preset="small")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.train()
    net(torch.rand(2, 1, 2, 32, 32))  # moves the BN running statistics away from their defaults
    return net.eval()


def test_load_model_rebuilds_from_the_file_alone_and_returns_probabilities(tmp_path):
    net = _trained_looking_model()
    path = save_checkpoint(tmp_path / "m.pth", net, arch_spec(net), (2, 32, 32), iteration=7, config={"lr": 1e-3})
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["arch"] == {"name": "unetv0", "filters": [8, 12, 16, 20, 24], "in_channels": 1, "out_channels": 1}
    assert checkpoint_input_size(ckpt) == (2, 32, 32)
    assert ckpt["iteration"] == 7 and ckpt["config"] == {"lr": 1e-3}

    for loader in (load_model, package_load_model):
        model = loader(path)
        assert not model.training
        x = torch.rand(1, 1, 2, 32, 32)
        with torch.no_grad():
            prob = model(x)
            expected = torch.sigmoid(net(x))
        assert prob.shape == x.shape
        assert ((prob >= 0) & (prob <= 1)).all()
        torch.testing.assert_close(prob, expected)


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CleftchunkError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CleftchunkError, match="not a readable cleftchunk checkpoint"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CleftchunkError, match="not a cleftchunk checkpoint"):
        load_checkpoint(foreign)



def test_any_random_bytes_are_refused_in_one_line(tmp_path):
    """CI once drew 5,000 random bytes on which the unpickler raised IndexError, which the CLI
    reported as "unexpected". Whatever the bytes, the answer is the one-line refusal."""
    rng = random.Random(0)
    path = tmp_path / "random.pth"
    for i in range(400):
        path.write_bytes(rng.randbytes(rng.choice([2, 3, 10, 40, 200, 5000])))
        with pytest.raises(CleftchunkError, match="not a readable cleftchunk checkpoint"):
            load_checkpoint(path)

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"format": CHECKPOINT_FORMAT, "arch": {}, "input_size": [8, 64, 64], "model": _Evil(marker)}, path)
    with pytest.raises(CleftchunkError, match="not a readable cleftchunk checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
def test_save_is_atomic_under_a_real_kill(tmp_path):
    """A process killed while saving in a loop leaves a checkpoint that still loads."""
    target = tmp_path / "last.pth"
    code = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        from cleftchunk.model import build_model, arch_spec, save_checkpoint
        net = build_model(preset="small")
        ballast = torch.randn(4_000_000)  # 16 MB, so that a kill often lands mid-write
        i = 0
        while True:
            i += 1
            save_checkpoint({str(target)!r}, net, arch_spec(net), (8, 64, 64), iteration=i, extra={{"ballast": ballast}})
        """
    )
    iterations = []
    for delay in (0.05, 0.13, 0.29):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 60
            while not target.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert target.exists(), "the saving loop never wrote a checkpoint"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(target)
        assert ckpt["ballast"].numel() == 4_000_000
        iterations.append(ckpt["iteration"])
    assert all(i >= 1 for i in iterations)
