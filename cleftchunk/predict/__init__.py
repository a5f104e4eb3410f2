"""Block-wise prediction of cleft probabilities over volumes of any size, on Dask.

The answer (what :func:`predict_reference` computes in memory, and :func:`predict` block-wise):

- A global grid of windows over the *frame* (the volume, reflect-padded by half a window with
  ``pad``, and padded up to one window on axes shorter than it): :class:`tiling.TileGrid`.
- A tile whose input is a single value (e.g. zero padding around the tissue), or that contains no
  voxel of the optional ``mask``, is *empty*: its prediction is p = 0 without running the model.
  It still counts in the blending weights, so skipping changes nothing but the time.
- Each voxel gets Σ w·p / Σ w over the tiles covering it (w: the Gaussian importance map, or 1
  with ``blend="constant"``), written as uint8 round(255·p); voxels outside the mask are 0.

Why block-wise results are byte-identical to the reference, whatever the block size, the number
of workers, retries or resumes:

1. Every tile is run exactly once, by the block that contains its start (clamped into the volume),
   on the same input (the reflect-padded read of :func:`tiling.reflect_read` equals ``np.pad``).
2. The model sees batches of a fixed shape: a block's last batch is padded with zero tiles to
   ``batch_size``. Kernels are chosen by shape and compute each sample on its own, so a tile's
   probabilities do not depend on its batch-mates or on where a block boundary fell.
3. The sums Σ w·p and Σ w are accumulated in fixed point (24 fractional bits,
   ``tiling.FIXED_BITS``): each contribution is rounded once, by a rule that depends only on
   (w, p), and integer addition is associative. So the sums are the same whatever order
   contributions from neighbouring blocks are added in. Σ w is recomputed from the grid alone,
   where it is needed, one axis at a time (a sum over a product grid of shifts), cached per block
   position.
3b. Each contribution is at most 2^24 (w ≤ 1 and p ∈ [0, 1]) and no voxel gets more than
   ``grid.max_cover()`` of them (27 at overlap 0.5, 1331 at 0.9), so the sums are held in int32
   while that is at most 127 (``tiling.sums_dtype``: every overlap up to 0.75), else int64 —
   4 bytes a voxel for a block's sums, its spills and its denominators. Every sum is below 2^53
   (``check_fixed_headroom`` refuses a grid where it might not be), so float64 holds it exactly:
   the engine adds a rounded product into the integer sums in float64 and stores it back, and
   the blend adds the parts into a float64 numerator, both exactly integer addition.

The engine (blocks aligned to the output chunks, streamed by :mod:`cleftchunk.run.executor`):

- The plan (:mod:`.plan`) is lazy: per-axis tables of block extents, owned tile ranges and
  dependency ranges; blocks are generated on demand in raster order, in which a block's
  dependencies (itself and blocks before it on every axis) always come first.
- *tiles* task of block B: runs the tiles B owns once into Σ q(w·p) over the region they cover;
  the parts of that sum inside *other* blocks' write regions (the *spill*) go to scratch, one
  compressed piece per user block (written to a temporary name and renamed; the spill counts as
  saved only once its ``.json`` appears); the part inside B's own write region is returned in
  memory to B's blend task and never touches scratch. A run whose tasks are all threads of one
  process (the default on a CPU-only machine) keeps spills in memory instead, up to a budget
  (:meth:`.scratch.Scratch.in_memory`; ``OutputOptions.memory_spills``): the same integers, handed over without a file.
- *blend* task of block B, submitted once the tiles tasks of all its dependency blocks have
  finished: adds its own part and the pieces spilled into it (4. below), divides by Σ q(w),
  writes B's output chunks (no other task writes them, so no locks). Only after it returned does
  the client mark B done in the completion record (:mod:`cleftchunk.run.records`, one byte per
  block). A spill is deleted once every block needing it is over, so scratch follows the front.
- 4. Adding the same integers in another order gives the same sums (3.), so splitting a block's
  sum into "own part in memory" and "pieces from scratch", with any block shape, worker count,
  retry or resume, gives the bytes of the reference.
- Resume: blocks recorded done are skipped; a done block whose spill a remaining block needs
  gives it from scratch or reruns its tiles (same integers; spills kept in memory are always
  rerun, they end with their run); a remaining block reruns its tiles.
  A hash of the model and of every parameter that can change a bit of the output is stored in
  the output's attributes, and a different one refuses to resume (``overwrite`` replaces the
  output); the record also holds the block layout's hash, and one of another layout is discarded
  with the spills, never trusted.
"""

from cleftchunk.predict.api import Predict, PredictResult, predict
from cleftchunk.predict.params import (
    DEFAULT_BLOCK_SHAPE,
    PRECISIONS,
    TTA_CHOICES,
    WORKER_BLOCK_SHAPE,
    GpuOutOfMemory,
    OutputOptions,
    PredictParams,
    WindowOptions,
)
from cleftchunk.predict.reference import predict_reference
from cleftchunk.predict.runner import TileRunner

__all__ = [
    "DEFAULT_BLOCK_SHAPE",
    "PRECISIONS",
    "TTA_CHOICES",
    "GpuOutOfMemory",
    "OutputOptions",
    "Predict",
    "PredictParams",
    "PredictResult",
    "TileRunner",
    "WORKER_BLOCK_SHAPE",
    "WindowOptions",
    "predict",
    "predict_reference",
]
