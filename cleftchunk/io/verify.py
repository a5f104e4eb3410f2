"""``convert --verify``: compare every chunk of a conversion's level 0 with its source, block-wise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.io.convert import ConversionPlan, SourceReader, _label, source_chunking
from cleftchunk.io.volumes import open_volume
from cleftchunk.run import chunks as chunkwrite
from cleftchunk.run.options import RunOptions


@dataclass(frozen=True)
class Mismatch:
    chunk: tuple[int, ...]
    roi: Roi
    voxels: int

    def __str__(self) -> str:
        return f"chunk {self.chunk} ({self.roi}): {self.voxels} voxels differ"


def verify(plan: ConversionPlan, run: RunOptions | None = None) -> list[Mismatch]:
    """Compare every chunk of the output's level 0 with the source, on ``run``'s client; the
    chunks that differ."""
    output = open_volume(f"{plan.dst}/s0")
    if output.shape != plan.shape:
        return [Mismatch((), Roi.from_shape(plan.shape), int(np.prod(plan.shape)))]
    found = chunkwrite.compare(output.array, SourceReader(plan.source, plan.not_cleft), run,
                               name=f"verify {_label(plan.dst)}", align=source_chunking(plan.source))
    return [Mismatch(index, roi, n) for index, roi, n in found]
