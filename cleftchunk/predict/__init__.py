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
3. The sums Σ w·p and Σ w are accumulated in fixed point (int64, 40 fractional bits): each
   contribution is rounded once, by a rule that depends only on (w, p), and integer addition is
   associative. So the sums are the same whatever order contributions from neighbouring blocks
   are added in. (A worker may keep a running sum of those integers in float64, which holds
   integers below 2^53 exactly: at most 8191 contributions < 2^40 go in before the sum moves to
   int64, so it is the same integer sum.) Σ w is recomputed from the grid alone, where it is
   needed, one axis at a time (a sum over a product grid of shifts), cached per block position.

The engine (a Dask graph over blocks aligned to the output chunks):

- *tiles* task of block B: runs the tiles B owns and saves their weighted sum Σ q(w·p) over the
  region they cover as an int64 *partial* in a scratch directory (written to a temporary name and
  renamed, so that a partial either exists completely or not at all).
- *blend* task of block B: adds the partials of the (at most 2 per axis when blocks are at least
  a window wide) blocks whose tiles reach B, divides by Σ q(w), writes B's output chunks (no other
  task writes them, so no locks), and only then marks B done. A partial is deleted as soon as all
  blocks that need it are written, so scratch space follows the front of the computation, and
  memory is bounded by the block size times the number of workers.
- Resume: done blocks are skipped and saved partials reused; a hash of the model and of every
  parameter that can change a bit of the output is stored in the output's attributes, and a
  different one refuses to resume (``overwrite`` replaces the output).
"""

from cleftchunk.predict.api import PredictResult, predict
from cleftchunk.predict.params import DEFAULT_BLOCK_SHAPE, PRECISIONS, TTA_CHOICES, GpuOutOfMemory, PredictParams
from cleftchunk.predict.reference import predict_reference
from cleftchunk.predict.runner import TileRunner

__all__ = [
    "DEFAULT_BLOCK_SHAPE",
    "PRECISIONS",
    "TTA_CHOICES",
    "GpuOutOfMemory",
    "PredictParams",
    "PredictResult",
    "TileRunner",
    "predict",
    "predict_reference",
]
