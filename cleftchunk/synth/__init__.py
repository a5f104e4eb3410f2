"""Synthetic CREMI-like samples: procedural tissue, clefts and imaging defects, any size.

:mod:`.fields` (hash-based noise) → :mod:`.tissue` (cells, membranes, clefts, distractors) →
:mod:`.generate` (a region's raw, clefts and neuron ids as a pure function of the seed and the
coordinates) → :mod:`.write` (block-wise Zarr or CREMI HDF5 output), :mod:`.preview` (a PNG).
"""

from cleftchunk.synth.generate import VOXEL_SIZE, SynthParams, generate_region, make_params
from cleftchunk.synth.write import read_sample, synthesize

__all__ = ["VOXEL_SIZE", "SynthParams", "generate_region", "make_params", "read_sample", "synthesize"]
