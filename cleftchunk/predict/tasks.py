"""The two kinds of tasks a prediction runs on the workers, one pair per block.

- *tiles* (:func:`run_block_tiles`): run the tiles the block owns once and save their weighted
  sum as a fixed-point partial in scratch space;
- *blend* (:func:`blend_block`): add the partials that reach the block, divide by the summed
  weights, write the block's output chunks, mark it done.

See :mod:`cleftchunk.predict` for why the result does not depend on the block shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.predict.tiling import (
    TileGrid,
    block_denominator,
    blended_uint8,
    reflect_read,
    weights_for,
)
from cleftchunk.io.volumes import Volume
from cleftchunk.predict.params import PredictParams
from cleftchunk.predict.plan import BlockWork
from cleftchunk.predict.runner import ModelSource, _runner_for, is_empty_tile
from cleftchunk.predict.scratch import Scratch



# -- the two kinds of tasks (run on the workers) ------------------------------------------
@dataclass(frozen=True)
class Job:
    """What every task needs; small and picklable (volumes reopen lazily on each worker)."""

    input: Volume
    output: Volume
    mask: Volume | None
    params: PredictParams
    grid: TileGrid
    volume_roi: Roi
    scratch: Scratch
    torch_threads: int | None = None


def run_block_tiles(job: Job, work: BlockWork, source: ModelSource) -> dict:
    """The *tiles* task: run the tiles a block owns once, save Σ q(w·p) over them as a partial."""
    saved = job.scratch.has_partial(work.index)
    if saved is not None:  # done by an earlier run or attempt
        return {**saved, "reused": True}
    roi = work.tiles_roi
    raw = reflect_read(job.input.read, job.volume_roi, roi)
    mask = None if job.mask is None else reflect_read(job.mask.read, job.volume_roi, roi)
    tiles = [job.grid.tile(t).relative_to(roi).to_slices() for t in work.tiles]
    to_run = [s for s in tiles if not is_empty_tile(raw[s], None if mask is None else mask[s])]
    stats = {"tiles": len(tiles), "run": len(to_run), "skipped": len(tiles) - len(to_run), "reused": False}
    if not to_run:
        job.scratch.save_partial(work.index, None, stats)
        return stats
    weights = weights_for(job.params.window, job.params.blend)
    runner = _runner_for(source, job.params, job.torch_threads)
    partial = runner.accumulate((raw[s] for s in to_run), to_run, roi.shape, weights)
    stats["run"] = runner.tiles_run
    job.scratch.save_partial(work.index, partial, stats)
    return stats


def blend_block(job: Job, work: BlockWork, *_tiles_done: Any) -> dict:
    """The *blend* task: add the partials reaching a block, divide by Σ q(w), write, mark done."""
    write = work.write_roi
    denominator = block_denominator(job.grid, job.params.blend, write)
    numerator = np.zeros(write.shape, dtype=np.int64)
    for dep, dep_roi in work.deps:
        partial = job.scratch.load_partial(dep)
        if partial is None:
            continue
        common = dep_roi.intersect(write)
        numerator[common.relative_to(write).to_slices()] += partial[common.relative_to(dep_roi).to_slices()]
    out = blended_uint8(numerator, denominator)
    if job.mask is not None:
        out[job.mask.read(write) == 0] = 0
    job.output.write(write, out)
    job.scratch.mark_done(work.index)
    return {"voxels": write.size}
