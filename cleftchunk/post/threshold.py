"""``threshold(pred, output)``: a 0/1 cleft mask (uint8) of a probability map, block by block."""

from __future__ import annotations

import numpy as np

from cleftchunk.labels import DEFAULT_THRESHOLD, KIND_ATTRIBUTE, checked_threshold, cleft_mask, probability_scale
from cleftchunk.io.outputs import MapOperation, create_image


class Threshold(MapOperation):
    """Voxels of ``pred`` (uint8 p·255, uint16 p·65535, or float p) at or above ``threshold`` (of 255) are 1."""

    stage = "threshold"

    def __init__(self, pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None, read: bool = True):
        from cleftchunk.io.volumes import Volume, open_volume

        self.source = pred if isinstance(pred, Volume) else open_volume(pred)
        self.scale, self.threshold = probability_scale(self.source, read), checked_threshold(threshold)
        self.output, self.inputs, self.chunks = str(output), (pred,), chunks

    def identity(self) -> dict:
        return {"input": self.source.spec, "shape": list(self.source.shape), "threshold": self.threshold, "chunks": list(self._chunks())}

    def create(self, state: dict, overwrite: bool):
        return create_image(self, self.source, np.uint8, self._chunks(), state, overwrite, attrs={KIND_ATTRIBUTE: "mask"})

    def compute(self, data, roi, block_roi):
        return cleft_mask(data, "prob", self.threshold, self.scale).astype(np.uint8)


def threshold(pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None, run=None, log=None):
    """Write the mask; the executor's report (None for a dry run or an output already complete)."""
    return Threshold(pred, output, threshold, chunks, read=not (run and run.dry_run)).run(run, log)
