"""``threshold(pred, output)``: a 0/1 cleft mask (uint8) of a probability map, block by block."""

from __future__ import annotations

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.labels import DEFAULT_THRESHOLD, KIND_ATTRIBUTE, cleft_mask
from cleftchunk.io.outputs import MapOperation, create_image


class Threshold(MapOperation):
    """Voxels of ``pred`` (uint8 p·255, or float p) at or above ``threshold`` (of 255) are 1."""

    stage = "threshold"

    def __init__(self, pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None):
        from cleftchunk.io.volumes import Volume, open_volume

        self.source = pred if isinstance(pred, Volume) else open_volume(pred)
        if self.source.dtype != np.uint8 and self.source.dtype.kind != "f":
            raise CleftchunkError(f"{self.source.spec} holds {self.source.dtype}, not probabilities: give uint8 or float probabilities")
        if not 0 < threshold <= 255:
            raise CleftchunkError(f"threshold={threshold:g} is outside (0, 255]: it applies to uint8 probabilities (p*255)")
        self.output, self.inputs, self.threshold, self.chunks = str(output), (pred,), float(threshold), chunks

    def identity(self) -> dict:
        return {"input": self.source.spec, "shape": list(self.source.shape), "threshold": self.threshold, "chunks": list(self._chunks())}

    def create(self, state: dict, overwrite: bool):
        return create_image(self, self.source, np.uint8, self._chunks(), state, overwrite, attrs={KIND_ATTRIBUTE: "mask"})

    def compute(self, data, roi, block_roi):
        return cleft_mask(data, "prob", self.threshold).astype(np.uint8)


def threshold(pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None, run=None, log=None):
    """Write the mask; the executor's report (None for a dry run or an output already complete)."""
    return Threshold(pred, output, threshold, chunks).run(run, log)
