"""The two kinds of tasks a prediction runs on the workers, one pair per block (the executor,
:mod:`cleftchunk.run.executor`, runs them: *tiles* is a block's ``prepare``, *blend* its ``process``).

- *tiles* (:func:`run_block_tiles`): run the tiles the block owns once; save the parts of their
  weighted sum Σ q(w·p) that fall in other blocks' write regions (the *spill*) to scratch, one
  piece per user block; return the part inside the block's own write region, in memory.
- *blend* (:func:`blend_block`): add its own part and the pieces its dependency blocks spilled
  into it, divide by the summed weights, write the block's output chunks.

On a GPU worker the tiles task keeps the sums on the device: only the spill pieces are copied to
the host, and the own part stays there as a tensor — the blend task's input, so Dask prefers to
run the blend on that worker (moving it would cost its bytes; if it does move, the tensor travels
pickled and lands on the other worker's GPU) — and the blend adds the pieces into it, divides and
rounds on the device: only the uint8 block comes back. Not yet run on a GPU (none was lent); the
same torch code is tested on the CPU (:attr:`Job.sums_as_tensors`).

See :mod:`cleftchunk.predict` for why the result does not depend on the block shape.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.predict.tiling import (
    TileGrid,
    block_denominator,
    blended_uint8_of_parts,
    blended_uint8_of_parts_torch,
    reflect_read,
    sums_dtype,
    weights_for,
)
from cleftchunk.io.volumes import Volume
from cleftchunk.predict.params import PredictParams
from cleftchunk.predict.plan import BlockWork
from cleftchunk.predict.runner import ModelSource, is_empty_tile
from cleftchunk.predict.scratch import Scratch
from cleftchunk.predict.worker import WorkerState, state_of



# -- the two kinds of tasks (run on the workers) ------------------------------------------
@dataclass(frozen=True)
class Job:
    """What every task needs; small and picklable (volumes reopen lazily on each worker).

    ``sums_as_tensors``: keep a block's sums as torch tensors and blend them in torch (the GPU
    path; on a CPU only to test that path). ``state``: the run's worker state when its tasks are
    threads of this process (None in worker processes: each keeps its own, see
    :mod:`cleftchunk.predict.worker`)."""

    input: Volume
    output: Volume
    mask: Volume | None
    params: PredictParams
    grid: TileGrid
    roi: Roi
    scratch: Scratch
    torch_threads: int | None = None
    sums_as_tensors: bool = False
    state: WorkerState | None = field(default=None, compare=False, repr=False)


def run_block_tiles(job: Job, work: BlockWork, own: bool, source: ModelSource) -> tuple[dict, np.ndarray | None]:
    """The *tiles* task: run the tiles a block owns once; spill what other blocks need to scratch
    and return (counts, the sum over its own write region, or None when it is all zero).

    ``own`` False: the block itself is written already and only its users need its spill, which an
    earlier run may have saved (then no tile runs).
    """
    if not work.tiles:
        return {"tiles": 0}, None
    saved = job.scratch.spill_stats(work.index)
    if saved is not None and not own:
        return {"tiles": saved["tiles"], "reused": saved["tiles"]}, None
    roi = work.tiles_roi
    raw = reflect_read(job.input.read, job.roi, roi)
    mask = None if job.mask is None else reflect_read(job.mask.read, job.roi, roi)
    tiles = [job.grid.tile(t).relative_to(roi).to_slices() for t in work.tiles]
    to_run = [s for s in tiles if not is_empty_tile(raw[s], None if mask is None else mask[s])]
    counts = {"tiles": len(tiles), "run": 0, "skipped": len(tiles) - len(to_run)}
    partial = None
    if to_run:
        state = state_of(job.state)
        runner = state.runner(source, job.params, job.torch_threads)
        before = runner.tiles_run
        weights = weights_for(job.params.window, job.params.blend)
        dtype = sums_dtype(job.grid)
        if runner.cuda or job.sums_as_tensors:  # the sums stay on the device (see blend_block)
            partial = runner.accumulate_tensor((raw[s] for s in to_run), to_run, roi.shape, weights, dtype)
        else:
            partial = runner.accumulate((raw[s] for s in to_run), to_run, roi.shape, weights, dtype=dtype,
                                        out=state.workspace("sums", roi.shape, dtype))
        counts["run"] = runner.tiles_run - before
    if saved is None:
        pieces = {} if partial is None else {
            user: _on_host(partial[roi.intersect(write).relative_to(roi).to_slices()]) for user, write in work.users if user != work.index
        }
        counts.update(job.scratch.save_spill(work.index, pieces, {"tiles": len(tiles)}))
    if not own or partial is None:
        return counts, None
    own_sums = partial[roi.intersect(work.write_roi).relative_to(roi).to_slices()]
    if _is_tensor(own_sums):  # stays on the device; a copy, so that the rest of the tiles' sums is freed
        return counts, own_sums.clone()
    # a copy, always: ``partial`` is this thread's workspace, which its next task overwrites
    return counts, np.array(own_sums, copy=True)


def blend_block(job: Job, work: BlockWork, prepared: tuple[dict, np.ndarray | None]) -> dict:
    """The *blend* task: add the block's own sum and the pieces spilled into it, divide by Σ q(w),
    write. (The executor records the block done once this returns.)

    The sums are integers below 2^53 (``check_fixed_headroom``); they are added in float64 (exactly
    the same integers, and no conversion before the division, which works in float64 anyway), a
    cache-sized slab at a time (:func:`tiling.blended_uint8_of_parts`). ``own`` is never modified:
    a retried task gets it again.
    """
    counts, own = prepared
    write = work.write_roi
    denominator = block_denominator(job.grid, job.params.blend, write)
    parts = []  # (where in the write region, the sums there) of every block whose tiles reach it
    for dep, dep_roi in work.deps:
        common = dep_roi.intersect(write)
        piece = own if dep == work.index else job.scratch.load_piece(dep, work.index, common.shape)
        if piece is not None:
            parts.append((common.relative_to(write).to_slices(), piece))
    if _is_tensor(own):  # a GPU worker: add, divide and round on the device; only uint8 comes back
        out = blended_uint8_of_parts_torch(parts, denominator, own.device)
    else:
        out = blended_uint8_of_parts(parts, denominator)
    if job.mask is not None:
        out[job.mask.read(write) == 0] = 0
    job.output.write(write, out)
    return {**counts, "voxels": write.size}


def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _on_host(sums):
    """A spill piece as a numpy array (copied from the device when it is a tensor there)."""
    return sums.cpu().numpy() if _is_tensor(sums) else sums
