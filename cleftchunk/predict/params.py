"""Prediction parameters, in three groups shared by the command line and the library:

- :class:`WindowOptions`: the sliding window and how its tiles are run and blended — what the
  user chooses (``window`` None: the checkpoint's; ``batch_size`` None and ``precision`` "auto":
  chosen for the device). :meth:`WindowOptions.resolve` turns it into
- :class:`PredictParams`: everything that can change a bit of the output (and nothing else),
  resolved for one model and device; stored in the output as part of its identity.
- :class:`OutputOptions`: the output's chunks and mask, where the intermediate sums go, and the
  cores predict may use (``--cpus``).

How the work runs (workers, GPUs, block shape, dry run, overwrite...) is the shared
:class:`cleftchunk.run.options.RunOptions`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Coord, Roi, as_coord
from cleftchunk.intensity import check_scale
from cleftchunk.predict.tiling import TileGrid, importance_map, stride_for

PREDICT_FORMAT = "cleftchunk-predict/2"  # 2: sums at 24 fractional bits (1: 40)
ATTR = "cleftchunk_predict"
#: Blocks of a local CPU job (its task threads hand spills over in memory: small blocks, small peak).
DEFAULT_BLOCK_SHAPE = (32, 512, 512)
#: Blocks when tasks run in worker processes (GPUs, --workers, a cluster): spills go through
#: scratch files, and a block 8× larger spills 0.30 instead of 0.71 of its voxels at overlap 0.5
#: (interior of a large volume; the plan's count): about 0.7 bytes per output voxel written as
#: compressed int32, 1.4 of traffic, where 32×512×512 blocks write 1.7 (benchmarks/RESULTS.md);
#: and an eighth of the tasks. Each worker then holds about 1 GiB of block-sized arrays.
WORKER_BLOCK_SHAPE = (64, 1024, 1024)
TTA_CHOICES = (1, 4, 8, 16)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class GpuOutOfMemory(CleftchunkError):
    """The GPU cannot hold a batch; the message says which batch size to try."""


def _check_window(window: Coord | None) -> Coord | None:
    if window is None:
        return None
    window = as_coord(tuple(window), 3)
    if any(w <= 0 for w in window):
        raise CleftchunkError(f"model input size {window} must be positive: e.g. -mi 8,256,256")
    return window


def _check_choices(blend: str, tta: int, precision: str, allowed: Sequence[str]) -> None:
    if tta not in TTA_CHOICES:
        raise CleftchunkError(f"--tta {tta}: use one of {', '.join(map(str, TTA_CHOICES))}")
    if precision not in allowed:
        raise CleftchunkError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    importance_map((1, 1, 1), blend)  # validates the name


@dataclass(frozen=True)
class WindowOptions:
    """The window and how its tiles are run and blended (defaults: the command line's).

    ``window``: the model input Z,Y,X (None: the size the checkpoint was trained with; required
    with an in-memory model). ``overlap``: the fraction of a window neighbouring tiles share.
    ``blend``: "gaussian" or "constant" weights. ``pad``: reflect-pad the volume by half a
    window. ``batch_size``: tiles per forward pass (None: 1 on a CPU, 4 on a GPU). ``tta``: flip
    test-time augmentation (1, 4, 8 or 16 variants). ``scale``: float images are multiplied by it
    to reach [0, 1]. ``precision``: "auto" (fp32 on a CPU, bf16 autocast on a GPU), "fp32",
    "bf16" or "fp16". ``compile``: torch.compile the model on each worker.
    """

    window: Coord | None = None
    overlap: float = 0.5
    blend: str = "gaussian"
    pad: bool = False
    batch_size: int | None = None
    tta: int = 1
    scale: float | None = None
    precision: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _check_window(self.window))
        object.__setattr__(self, "tta", int(self.tta))
        check_scale(self.scale)
        stride_for((1, 1, 1), self.overlap)  # validates the overlap
        if self.batch_size is not None and self.batch_size < 1:
            raise CleftchunkError(f"batch size {self.batch_size} must be at least 1")
        _check_choices(self.blend, self.tta, self.precision, PRECISIONS)

    def resolve(self, window: Sequence[int], device: str) -> "PredictParams":
        """The parameters of a run on ``device`` ("cpu" or "cuda") with ``window`` (the given one,
        or the checkpoint's)."""
        precision = ("bf16" if device == "cuda" else "fp32") if self.precision == "auto" else self.precision
        batch = self.batch_size if self.batch_size is not None else (4 if device == "cuda" else 1)
        return PredictParams(tuple(window), self.overlap, self.blend, self.pad, batch, self.tta, precision, device,
                             self.compile, scale=self.scale)


@dataclass(frozen=True)
class OutputOptions:
    """The output's layout and predict's own resources.

    ``chunks``: the output's chunk shape Z,Y,X (default 16,256,256). ``mask``: a volume (or
    spec) whose zero voxels are not predicted. ``scratch``: the folder for per-block partial sums,
    on a filesystem every worker sees (default: beside a local output; for an object-store output,
    the current directory). ``cores``: CPU cores to use in all (default: all): task threads of a
    local CPU job, and torch threads per worker process (cores ÷ workers).
    ``memory_spills``: bytes of partial sums a run in this process hands over in memory rather
    than through scratch files (None: a quarter of the available memory, at most 4 GiB; 0: all
    through files).
    """

    chunks: Coord | None = None
    mask: Any = None
    scratch: str | os.PathLike | None = None
    cores: int | None = None
    memory_spills: int | None = None
    ignore_frame: bool = False  # the mask in the input's frame, voxel for voxel (cleftchunk.frames)

    def __post_init__(self) -> None:
        from cleftchunk.run.options import check_count

        if self.chunks is not None:
            from cleftchunk.io.volumes import chunk_shape

            object.__setattr__(self, "chunks", chunk_shape(self.chunks))
        object.__setattr__(self, "cores", check_count(self.cores, "cores", 1))
        object.__setattr__(self, "memory_spills", check_count(self.memory_spills, "memory_spills", 0))


@dataclass(frozen=True)
class PredictParams:
    """Everything that can change a bit of the output (and nothing that cannot)."""

    window: Coord
    overlap: float = 0.5
    blend: str = "gaussian"
    pad: bool = False
    batch_size: int = 1
    tta: int = 1
    precision: str = "fp32"
    device: str = "cpu"  # the kind of device: "cpu" or "cuda"
    compile: bool = False
    scale: float | None = None  # float images: multiply by this to reach [0, 1] (cleftchunk.intensity)

    def __post_init__(self) -> None:
        check_scale(self.scale)
        object.__setattr__(self, "window", _check_window(self.window))
        if self.batch_size < 1:
            raise CleftchunkError(f"batch size {self.batch_size} must be at least 1")
        _check_choices(self.blend, self.tta, self.precision, PRECISIONS[1:])
        if self.tta == 16 and self.window[1] != self.window[2]:
            raise CleftchunkError(f"--tta 16 transposes y and x, which needs a square window, not {self.window}: use --tta 8")

    def grid(self, volume_roi: Roi) -> TileGrid:
        return TileGrid.over(volume_roi, self.window, self.overlap, self.pad)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        if d["scale"] is None:  # outputs written before the option existed keep their identity
            del d["scale"]
        return d
