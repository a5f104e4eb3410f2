"""``threshold(pred, output)``: a 0/1 cleft mask (uint8) of a probability map, block by block."""

from __future__ import annotations

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.labels import DEFAULT_THRESHOLD, KIND_ATTRIBUTE, PROB_FULL_SCALE, PROB_MAX_ATTRIBUTE, cleft_mask, prob_scale, sampled_range
from cleftchunk.io.outputs import MapOperation, create_image
from cleftchunk.run.operation import run_operation


class Threshold(MapOperation):
    """Voxels of ``pred`` (uint8 p·255, uint16 p·65535, or float p) at or above ``threshold`` (of 255) are 1."""

    stage = "threshold"

    def __init__(self, pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None):
        from cleftchunk.io.volumes import Volume, open_volume

        self.source = pred if isinstance(pred, Volume) else open_volume(pred)
        if self.source.dtype not in PROB_FULL_SCALE and self.source.dtype.kind != "f":
            raise CleftchunkError(f"{self.source.spec} holds {self.source.dtype}, not probabilities: give uint8, uint16 or float probabilities")
        self.scale = prob_scale(self.source)
        if self.source.dtype.kind == "f":  # 0..255 floats compared with threshold/255 would be all clefts
            low, high, _ = sampled_range(self.source)
            if not (0 <= low and high <= self.scale):
                raise CleftchunkError(
                    f"{self.source.spec}: float values span [{low:g}, {high:g}], not probabilities in [0, {self.scale:g}]: "
                    f"give probabilities in [0, 1] (or record their full scale in the attribute {PROB_MAX_ATTRIBUTE})"
                )
        if not 0 < threshold <= 255:
            raise CleftchunkError(f"threshold={threshold:g} is outside (0, 255]: it applies to uint8 probabilities (p*255)")
        self.output, self.inputs, self.threshold, self.chunks = str(output), (pred,), float(threshold), chunks

    def identity(self) -> dict:
        return {"input": self.source.spec, "shape": list(self.source.shape), "threshold": self.threshold, "chunks": list(self._chunks())}

    def create(self, state: dict, overwrite: bool):
        return create_image(self, self.source, np.uint8, self._chunks(), state, overwrite, attrs={KIND_ATTRIBUTE: "mask"})

    def compute(self, data, roi, block_roi):
        return cleft_mask(data, "prob", self.threshold, self.scale).astype(np.uint8)


def threshold(pred, output, threshold: float = DEFAULT_THRESHOLD, chunks=None, run=None, log=None):
    """Write the mask; the executor's report (None for a dry run or an output already complete)."""
    return run_operation(Threshold(pred, output, threshold, chunks), run, log)
