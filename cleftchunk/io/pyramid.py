"""Downsampled levels of an OME-Zarr image: ``s1, s2, ...`` each (1, 2, 2) smaller than the last.

EM sections are 10× thicker than a pixel is wide, so only y and x are halved. Images are averaged
over each 2×2 patch (the mean of the voxels that exist, at odd edges), which the OME-Zarr metadata
records as a translation by half a voxel of the finer level. Labels are never averaged (an average
of two ids is a third, meaningless id): ``stride`` keeps the top-left voxel of each patch, whose
centre coincides with the patch's first voxel, so those levels have no extra translation.
``mode`` keeps the most frequent label of each patch (ties: the first in y, x order, so a tie
gives the same as ``stride``); it is centred like ``mean``.

Levels are written with :func:`cleftchunk.run.chunks.fill` (tasks of whole chunks run by the one
block-wise executor), one pass per level, each resuming from the chunks it has stored.
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np

from cleftchunk.run import chunks as chunkwrite
from cleftchunk.geometry import Roi
from cleftchunk.io.ome import ome_multiscales

FACTOR = (1, 2, 2)
METHODS = ("mean", "stride", "mode")


def default_method(dtype: np.dtype, is_mask: bool = False) -> str:
    """Mean for images (uint8/uint16 intensities, floats), stride for masks and id volumes."""
    dtype = np.dtype(dtype)
    if is_mask or dtype.kind == "b" or dtype.itemsize >= 4 and dtype.kind in "iu":
        return "stride"
    return "mean"


class Downsample:
    """Producer of one coarser level from the previous one (picklable for Dask)."""

    def __init__(self, finer: Any, method: str):
        if method not in METHODS:
            raise ValueError(f"unknown downsampling method {method!r}: use {' or '.join(METHODS)}")
        self.finer = finer
        self.method = method

    def __call__(self, roi: Roi) -> np.ndarray:
        source = Roi(scale(roi.offset), scale(roi.shape)).intersect(Roi.from_shape(self.finer.shape))
        data = np.asarray(self.finer[source.to_slices()])
        if self.method == "stride":
            return data[:, ::2, ::2]
        if self.method == "mode":
            return mode_2x2(data)
        return mean_2x2(data).astype(self.finer.dtype, copy=False)


def scale(coord) -> tuple[int, ...]:
    return tuple(c * f for c, f in zip(coord, FACTOR))


def level_shape(shape) -> tuple[int, ...]:
    return tuple(-(-s // f) for s, f in zip(shape, FACTOR))


def max_levels(shape) -> int:
    """Levels (s0 included) until the smaller of y and x is down to 1 voxel: more would only
    repeat 1-voxel sections."""
    smallest = min(int(s) for s, f in zip(shape, FACTOR) if f > 1)
    return 1 + max(0, math.ceil(math.log2(max(1, smallest))))


def mean_2x2(data: np.ndarray) -> np.ndarray:
    """Mean over 2×2 patches in (y, x); patches cut by an odd edge average the voxels they have."""
    z, y, x = data.shape
    padded = np.zeros((z, y + y % 2, x + x % 2), dtype=np.float64)
    padded[:, :y, :x] = data
    counts = np.zeros(padded.shape[1:], dtype=np.float64)
    counts[:y, :x] = 1
    sums = padded.reshape(z, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2).sum(axis=(2, 4))
    n = counts.reshape(counts.shape[0] // 2, 2, counts.shape[1] // 2, 2).sum(axis=(1, 3))
    mean = sums / n
    if data.dtype.kind in "iu":
        mean = np.floor(mean + 0.5)  # round half up, the same in every block
    return mean


def mode_2x2(data: np.ndarray) -> np.ndarray:
    """Most frequent value of each 2×2 patch in (y, x); ties go to the first of the patch.

    Patches cut by an odd edge repeat their edge voxels, so only values they hold compete.
    """
    z, y, x = data.shape
    padded = np.pad(data, ((0, 0), (0, y % 2), (0, x % 2)), mode="edge")
    candidates = np.stack([padded[:, i::2, j::2] for i in (0, 1) for j in (0, 1)])
    votes = sum((candidates == other).astype(np.uint8) for other in candidates)
    winner = np.argmax(votes, axis=0)  # the first of equal maxima
    return np.take_along_axis(candidates, winner[None], axis=0)[0]


def create_level(group: Any, level: int, finer: Any) -> Any:
    """The array of level ``s{level}`` (shape one step coarser than ``finer``), created if missing
    or of another shape; its chunks are those of ``finer``, clipped to the shape."""
    path = f"s{level}"
    shape = level_shape(finer.shape)
    if path in group and tuple(group[path].shape) != shape:
        del group[path]
    if path not in group:
        group.create_array(
            path,
            shape=shape,
            dtype=finer.dtype,
            chunks=tuple(min(c, s) for c, s in zip(finer.chunks, shape)),
            shards=None,
            compressors=finer.compressors,
            fill_value=finer.fill_value,
            dimension_names=("z", "y", "x"),
        )
    return group[path]


def build_levels(group: Any, name: str, levels: int, method: str, voxel_size, offset_nm, running: Any,
                 block_shape=None) -> None:
    """Add levels ``s1 .. s{levels-1}`` to the OME-Zarr image ``group`` (whose ``s0`` exists), one
    pass each on ``running`` (:func:`cleftchunk.run.chunks.fill`: a level resumes from the units
    it has stored). ``block_shape``: the tasks' shape (a multiple of the chunks), else by bytes."""
    from cleftchunk.run.options import block_shape_for

    finer = group["s0"]
    for level in range(1, levels):
        coarser = create_level(group, level, finer)
        shape = None if block_shape is None else block_shape_for(block_shape, coarser.chunks, coarser.shape, block_shape)
        chunkwrite.fill(coarser, Downsample(finer, method), running, block_shape=shape, name=f"{name}/s{level}")
        finer = coarser
    centered = method != "stride"
    group.attrs["ome"] = ome_multiscales(name, voxel_size, offset_nm, level_factors(levels), centered=centered)


def drop_levels(group: Any) -> None:
    """Delete the downsampled levels ``s1, s2, ...`` of an image group (``s0`` stays)."""
    for name in [k for k, _ in group.arrays() if k.startswith("s") and k[1:].isdigit() and k != "s0"]:
        del group[name]


def level_factors(levels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"s{k}", tuple(f**k for f in FACTOR)) for k in range(levels)]
