"""The cleft model: ``unetv0`` of the original synapse pipeline, a name registry, and checkpoints.

The network returns *logits* (so that the loss can be computed safely under mixed precision);
:func:`load_model` wraps it so that inference code gets *probabilities*.

Checkpoints are plain dicts of tensors and builtin types, loaded with ``weights_only=True`` so that
reading a checkpoint never runs pickled code. Their layout (``format: cleftchunk-checkpoint/1``)::

    {"format", "arch": {"name", "filters", "in_channels", "out_channels"}, "input_size": [z, y, x],
     "model": state_dict, "iteration", "optimizer", "scheduler", "config", "rng", ...extra}

An optional ``postprocess`` entry (``{"threshold", "min_size", ...}``, chosen on validation data by
:mod:`cleftchunk.train.operating_point`) is the binarization ``segment`` uses by default.
"""

from __future__ import annotations

import math

import errno
import os
import warnings
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cleftchunk.errors import CleftchunkError, write_failure
from cleftchunk.urls import local_file

CHECKPOINT_FORMAT = "cleftchunk-checkpoint/1"

#: Filter widths by preset name: the original default, and the later (CPU-friendly) variants.
PRESETS: dict[str, tuple[int, ...]] = {
    "default": (32, 64, 128, 256, 256),
    "medium": (28, 36, 48, 64, 80),
    "small": (8, 12, 16, 20, 24),
}

#: unetv0 never pools along z; in-plane it pools 4 times by 2 and the centre's SE pools by 2 more.
Z_MULTIPLE = 2
XY_MULTIPLE = 32


# -- shape rules -----------------------------------------------------------------------------------
def _nearest_multiple(value: int, multiple: int) -> int:
    """Nearest positive multiple; ties go down (9 -> 8 for multiples of 2)."""
    down = max(multiple, (value // multiple) * multiple)
    up = down + multiple
    return down if value - down <= up - value else up


def nearest_valid_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    z, y, x = (int(s) for s in shape)
    return (
        _nearest_multiple(z, Z_MULTIPLE),
        _nearest_multiple(y, XY_MULTIPLE),
        _nearest_multiple(x, XY_MULTIPLE),
    )


def is_valid_input_shape(shape: Sequence[int]) -> bool:
    if len(shape) != 3:
        return False
    z, y, x = (int(s) for s in shape)
    return z > 0 and y > 0 and x > 0 and z % Z_MULTIPLE == 0 and y % XY_MULTIPLE == 0 and x % XY_MULTIPLE == 0


def check_input_shape(shape: Sequence[int]) -> None:
    """Raise a CleftchunkError naming the nearest valid shape if unetv0 cannot take ``shape``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise CleftchunkError(f"model input {shape} must have 3 extents z,y,x (e.g. 8,256,256)")
    if not is_valid_input_shape(shape):
        text = ",".join(str(s) for s in shape)
        near = ",".join(str(s) for s in nearest_valid_shape(shape))
        raise CleftchunkError(
            f"{text} is not a valid model input: z must be even and y, x multiples of 32; nearest valid: {near}"
        )


# -- building blocks -------------------------------------------------------------------------------
def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class ConvBN(nn.Sequential):
    """Replication padding ("same" size), Conv3d without bias, BatchNorm, optionally ELU."""

    def __init__(self, i: int, o: int, kernel: int | Sequence[int], dilation: int | Sequence[int] = 1, elu: bool = True):
        kernel, dilation = _triple(kernel), _triple(dilation)
        pad = [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
        layers: list[nn.Module] = []
        if any(pad):
            # ReplicationPad3d takes (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi).
            layers.append(nn.ReplicationPad3d((pad[2], pad[2], pad[1], pad[1], pad[0], pad[0])))
        layers.append(nn.Conv3d(i, o, kernel, dilation=dilation, bias=False))
        layers.append(nn.BatchNorm3d(o))
        if elu:
            layers.append(nn.ELU(inplace=True))
        super().__init__(*layers)


class Residual(nn.Module):
    """A residual body plus a 1×1×1 projection of the input; their sum goes through ELU."""

    def __init__(self, body: nn.Module, i: int, o: int):
        super().__init__()
        self.body = body
        self.projection = ConvBN(i, o, 1, elu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(self.body(x) + self.projection(x))


def res2d(i: int, o: int) -> Residual:
    return Residual(nn.Sequential(ConvBN(i, o, (1, 3, 3)), ConvBN(o, o, (1, 3, 3), elu=False)), i, o)


def res3d(i: int, o: int) -> Residual:
    return Residual(nn.Sequential(ConvBN(i, o, 3), ConvBN(o, o, 3, elu=False)), i, o)


def bottleneck(i: int, o: int) -> Residual:
    body = nn.Sequential(ConvBN(i, o, 1), ConvBN(o, o, 3, dilation=(1, 2, 2)), ConvBN(o, o, 1, elu=False))
    return Residual(body, i, o)


class LocalSE(nn.Module):
    """Local squeeze-excitation: a gate computed on (zr, sr, sr) windows, upsampled back; x + gate·x."""

    def __init__(self, c: int, cr: int, sr: int, zr: int = 1):
        super().__init__()
        self.scale = (zr, sr, sr)
        self.gate = nn.Sequential(
            nn.AvgPool3d(kernel_size=self.scale, stride=self.scale),
            nn.Conv3d(c, c // cr, 1, bias=True),
            nn.BatchNorm3d(c // cr),
            nn.ELU(inplace=True),
            nn.Conv3d(c // cr, c, 1, bias=True),
            nn.BatchNorm3d(c),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.interpolate(self.gate(x), scale_factor=self.scale, mode="trilinear", align_corners=False)
        return x + gate * x


def stage(block: nn.Module, se: LocalSE) -> nn.Sequential:
    return nn.Sequential(block, se)


class UpAdd(nn.Module):
    """Decoder entry: 1×1×1 conv to the skip's width, trilinear ×(1,2,2) upsampling, add the skip."""

    def __init__(self, deeper: int, skip: int):
        super().__init__()
        self.reduce = ConvBN(deeper, skip, 1)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce(deep), scale_factor=(1, 2, 2), mode="trilinear", align_corners=False)
        return up + skip


class UNetV0(nn.Module):
    """unetv0 (see shared/reference/unetv0.md). ``forward`` maps (N, in, z, y, x) to logits."""

    def __init__(self, filters: Sequence[int] = PRESETS["default"], in_channels: int = 1, out_channels: int = 1):
        super().__init__()
        f = tuple(int(v) for v in filters)
        if len(f) != 5 or any(v <= 0 for v in f):
            raise CleftchunkError(f"unetv0 needs 5 positive filter widths, got {f}: e.g. 8,12,16,20,24")
        self.filters = f
        self.enc1 = stage(res2d(in_channels, f[0]), LocalSE(f[0], 2, 16))
        self.enc2 = stage(res2d(f[0], f[1]), LocalSE(f[1], 4, 8))
        self.enc3 = stage(res3d(f[1], f[2]), LocalSE(f[2], 8, 4))
        self.enc4 = stage(bottleneck(f[2], f[3]), LocalSE(f[3], 16, 2, zr=2))
        self.centre = stage(bottleneck(f[3], f[4]), LocalSE(f[4], 16, 2, zr=2))
        self.up4, self.dec4 = UpAdd(f[4], f[3]), stage(bottleneck(f[3], f[3]), LocalSE(f[3], 16, 2, zr=2))
        self.up3, self.dec3 = UpAdd(f[3], f[2]), stage(res3d(f[2], f[2]), LocalSE(f[2], 8, 4))
        self.up2, self.dec2 = UpAdd(f[2], f[1]), stage(res2d(f[1], f[1]), LocalSE(f[1], 4, 8))
        self.up1, self.dec1 = UpAdd(f[1], f[0]), stage(res2d(f[0], f[0]), LocalSE(f[0], 2, 16))
        self.head = ConvBN(f[0], out_channels, 3, elu=False)
        self.pool = nn.MaxPool3d((1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x.shape[-3:])
        # The input in the weights' layout: one of them alone in channels-last ran slower than neither.
        e1 = self.enc1(x.contiguous(memory_format=layout_of(self.head)))
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        c = self.centre(self.pool(e4))
        d4 = self.dec4(self.up4(c, e4))
        d3 = self.dec3(self.up3(d4, e3))
        d2 = self.dec2(self.up2(d3, e2))
        d1 = self.dec1(self.up1(d2, e1))
        return self.head(d1)


# -- registry --------------------------------------------------------------------------------------
#: Architectures by name: each builder takes (filters, in_channels, out_channels).
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"unetv0": UNetV0}
DEFAULT_PRESET = {"unetv0": "default"}


def resolve_filters(arch: str = "unetv0", preset: str | None = None, filters: Sequence[int] | None = None) -> tuple[int, ...]:
    """Filter widths from explicit ``filters``, else a preset name, else the architecture's default."""
    if filters is not None:
        return tuple(int(v) for v in filters)
    name = preset or DEFAULT_PRESET.get(arch, "default")
    if name not in PRESETS:
        raise CleftchunkError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)} or give --filters")
    return PRESETS[name]


def build_model(
    arch: str = "unetv0",
    preset: str | None = None,
    filters: Sequence[int] | None = None,
    in_channels: int = 1,
    out_channels: int = 1,
) -> nn.Module:
    """A freshly initialised network by architecture name; its forward returns logits."""
    if arch not in ARCHITECTURES:
        raise CleftchunkError(f"unknown architecture {arch!r}: use one of {', '.join(sorted(ARCHITECTURES))}")
    net = ARCHITECTURES[arch](resolve_filters(arch, preset, filters), in_channels=in_channels, out_channels=out_channels)
    return on_device(net, "cpu")


def on_device(net: nn.Module, device: Any) -> nn.Module:
    """``net`` on ``device`` in the memory layout that runs fastest there.

    On the CPU channels-last (NDHWC): oneDNN's 3-D convolutions ran the demo's unetv0 training
    step (preset small, 2×8×128×128, 2 threads) in 0.30–0.35 s instead of 0.39–0.46 s, and its
    inference 1.7× faster (0.083 s against 0.14 s a batch), than in PyTorch's default NCDHW. At
    one 8×256×256 window it does not pay: 1.02× (small) and 0.92× (default preset), measured
    in benchmarks/results/predict-hotpath.md (2026-12-06 rerun); a per-window choice is not made yet.
    On a GPU the default layout, until a GPU run measures the other.
    """
    device = torch.device(device)
    layout = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
    return net.to(device=device, memory_format=layout)


def layout_of(module: nn.Module) -> torch.memory_format:
    """The memory layout of ``module``'s convolution weights (see :func:`on_device`)."""
    weight = next(m.weight for m in module.modules() if isinstance(m, nn.Conv3d) and m.in_channels > 1)
    channels_last = weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def set_output_prior(model: nn.Module, prior: float) -> None:
    """Start the network's output at probability ``prior`` everywhere: the bias of its last layer
    (unetv0's head is a conv and a BatchNorm, so the BatchNorm's shift) becomes logit(prior).

    Why: with a plain BCE the background must reach p ≈ 0, and a BatchNorm'd output whose shift
    starts at 0 (p = 0.5) moves by about the learning rate per Adam step, so after a short CPU
    run the whole volume still sits near p ≈ 0.2 (measured: median 45–66 of 255 after 500–800
    steps). The rebalanced BCE of the original wants p = 0.5 for an undecided voxel, and keeps 0.
    """
    if not 0 < prior < 1:
        raise CleftchunkError(f"output prior {prior} must lie strictly between 0 and 1, e.g. 0.01")
    last = [m for m in unwrap(model).modules() if getattr(m, "bias", None) is not None][-1]
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1 - prior)))


def arch_spec(model: nn.Module, name: str = "unetv0") -> dict:
    """The ``arch`` entry of a checkpoint: enough to rebuild ``model`` by name."""
    net = unwrap(model)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv3d))
    last = [m for m in net.modules() if isinstance(m, nn.Conv3d)][-1]
    return {
        "name": name,
        "filters": list(net.filters),
        "in_channels": int(first.in_channels),
        "out_channels": int(last.out_channels),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / probability wrappers."""
    while hasattr(model, "module") or isinstance(model, ProbabilityModel):
        model = model.module if hasattr(model, "module") else model.net
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ProbabilityModel(nn.Module):
    """Inference wrapper: probabilities (sigmoid of the logits); ``logits`` gives the raw output."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: dict,
    input_size: Sequence[int],
    iteration: int = 0,
    optimizer: Any = None,
    scheduler: Any = None,
    config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, then ``os.replace``.

    A kill at any moment leaves either the previous file or the new one, never a torn file.
    ``extra`` entries are added at the top level (e.g. "rng", "sampler", "ema").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": dict(arch),
        "input_size": [int(s) for s in input_size],
        "model": unwrap(model).state_dict(),
        "iteration": int(iteration),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "config": config,
        "rng": None,
    }
    state.update(extra or {})
    return _write_atomically(path, state)


def set_checkpoint_entry(path: str | os.PathLike, key: str, value: Any) -> Path:
    """Add or replace one top-level entry of a checkpoint file (atomically, as it is written)."""
    state = load_checkpoint(path)
    state[key] = value
    return _write_atomically(Path(path), state)


def checkpoint_postprocess(ckpt: dict) -> dict | None:
    """The checkpoint's chosen binarization ``{"threshold", "min_size"}``, or None."""
    entry = ckpt.get("postprocess")
    if not isinstance(entry, dict) or "threshold" not in entry:
        return None
    return {"threshold": float(entry["threshold"]), "min_size": int(entry.get("min_size", 0))}


def _write_atomically(path: Path, state: dict) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:  # torch reports a failed write as RuntimeError ("enforce fail at inline_container.cc")
        raise write_failure(f"checkpoint {path}", path.parent, e) from None
    finally:  # after the rename there is nothing left to remove; after any failure, the partial file
        Path(tmp).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (``weights_only=True``); one-line errors for unusable files.

    The messages never repeat torch's advice to load with ``weights_only=False``: for a file that
    is refused, that advice means running whatever code the file holds.
    """
    path = local_file(path, "checkpoint")
    _check_checkpoint_path(path)
    try:
        with warnings.catch_warnings():  # bytes of another format read as a pickle "protocol 38" warn
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, MemoryError):  # about this user or machine, not the file's bytes
        raise
    # Bytes that are no loadable checkpoint raise whatever the unpickler trips on first:
    # UnpicklingError (refused or foreign pickles), RuntimeError (a damaged zip archive), EOFError
    # (empty), OSError (a zip cut short), and for random bytes also IndexError (an opcode popping an
    # empty stack), KeyError, UnicodeDecodeError, struct.error ... (tests/test_model.py feeds it
    # thousands of random files). None of them says more than "not a checkpoint".
    except Exception as e:
        raise CleftchunkError(f"{path} is not a readable cleftchunk checkpoint ({_load_problem(e)}): use a file written by cleftchunk train") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CleftchunkError(f"{path} is not a cleftchunk checkpoint (no format {CHECKPOINT_FORMAT!r}): use a file written by cleftchunk train")
    for key in ("arch", "input_size", "model"):
        if key not in ckpt:
            raise CleftchunkError(f"{path} lacks the {key!r} entry: the checkpoint is incomplete, use another one")
    if not isinstance(ckpt["arch"], dict) or not isinstance(ckpt["model"], dict):
        raise CleftchunkError(f"{path} has a malformed 'arch' or 'model' entry: the checkpoint is damaged, use another one")
    return ckpt


def _check_checkpoint_path(path: Path) -> None:
    """Say what the path is when it is not a regular file (a directory, a symlink loop, nothing)."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CleftchunkError(f"checkpoint {path} is a symbolic link loop: point it at a .pth file written by cleftchunk train") from None
        raise CleftchunkError(f"checkpoint {path} does not exist: check the path (training writes <out>/last.pth)") from None
    if path.is_dir():
        raise CleftchunkError(f"checkpoint {path} is a directory: give the .pth file inside it (training writes <out>/last.pth)")
    if not path.is_file():
        raise CleftchunkError(f"checkpoint {path} is not a regular file: give a .pth file written by cleftchunk train")
    if path.stat().st_size == 0:
        raise CleftchunkError(f"checkpoint {path} is empty (0 bytes): it was not written completely, use another one")


def _load_problem(error: BaseException) -> str:
    """What went wrong in torch.load, in a few words, without torch's unsafe-loading advice."""
    text = str(error)
    if "unsupported global" in text.lower():  # a pickled class or function: running it could do anything
        return "it holds Python objects other than tensors and plain values, which are never loaded"
    if isinstance(error, EOFError) or "truncated" in text.lower() or "central directory" in text:
        return "the file is truncated or damaged"
    return "the file is damaged or of another format"


def checkpoint_input_size(ckpt: dict) -> tuple[int, int, int]:
    return tuple(int(s) for s in ckpt["input_size"])  # type: ignore[return-value]


def model_from_checkpoint(ckpt: dict, weights: str = "model") -> nn.Module:
    """The bare network (logits) rebuilt from a checkpoint dict, weights loaded, in eval mode."""
    arch = ckpt["arch"]
    net = build_model(
        arch.get("name", "unetv0"),
        filters=arch.get("filters"),
        in_channels=int(arch.get("in_channels", 1)),
        out_channels=int(arch.get("out_channels", 1)),
    )
    try:
        net.load_state_dict(ckpt[weights])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = (lines[1] if len(lines) > 1 else (lines or [""])[0])[:200]
        raise CleftchunkError(f"checkpoint weights do not fit its architecture {arch} ({first}): the file is damaged, use another one") from None
    _check_finite_weights(net)
    return net.eval()


def _check_finite_weights(net: nn.Module) -> None:
    """NaN or inf weights make every prediction NaN, which uint8 output would store as zeros."""
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CleftchunkError(f"checkpoint weights {name} hold NaN or inf (training diverged): use an earlier checkpoint")


def load_model(path: str | os.PathLike, device: Any = "cpu") -> nn.Module:
    """Rebuild a trained model from a checkpoint file alone, in eval mode, returning probabilities.

    Input: float (N, in_channels, z, y, x), raw intensities / 255; output: same spatial shape.
    """
    net = model_from_checkpoint(load_checkpoint(path))
    return ProbabilityModel(on_device(net, device)).eval()
