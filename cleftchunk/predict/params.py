"""Prediction parameters: everything that can change a bit of the output, and nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass


from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Coord, Roi, as_coord
from cleftchunk.intensity import check_scale
from cleftchunk.predict.tiling import (
    TileGrid,
    importance_map,
)



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


# -- parameters ---------------------------------------------------------------------------
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
        object.__setattr__(self, "window", as_coord(self.window, 3))
        if any(w <= 0 for w in self.window):
            raise CleftchunkError(f"model input size {self.window} must be positive: e.g. -mi 8,256,256")
        if self.batch_size < 1:
            raise CleftchunkError(f"batch size {self.batch_size} must be at least 1")
        if self.tta not in TTA_CHOICES:
            raise CleftchunkError(f"--tta {self.tta}: use one of {', '.join(map(str, TTA_CHOICES))}")
        if self.tta == 16 and self.window[1] != self.window[2]:
            raise CleftchunkError(f"--tta 16 transposes y and x, which needs a square window, not {self.window}: use --tta 8")
        if self.precision not in PRECISIONS[1:]:
            raise CleftchunkError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        importance_map((1, 1, 1), self.blend)  # validates the name

    def grid(self, volume_roi: Roi) -> TileGrid:
        return TileGrid.over(volume_roi, self.window, self.overlap, self.pad)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        if d["scale"] is None:  # outputs written before the option existed keep their identity
            del d["scale"]
        return d
