"""The driver of a prediction: declare its two tasks per block to the executor
(:mod:`cleftchunk.run.executor`), run them as the operation's one recorded pass, and turn the
executor's report into a :class:`PredictResult`. Spills are dropped as soon as every block that
needs them is over."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.predict.params import GpuOutOfMemory
from cleftchunk.predict.plan import TileLayout
from cleftchunk.predict.runner import ModelSource
from cleftchunk.predict.tasks import Job, blend_block, run_block_tiles
from cleftchunk.run.executor import BlockwiseTask


# -- the result ---------------------------------------------------------------------------
@dataclass
class PredictResult:
    output: str
    tiles_in_grid: int
    tiles_needed: int = 0  # tiles this run had to produce (all of them unless resuming)
    tiles_run: int = 0  # tiles that went through the model in this run
    tiles_skipped: int = 0  # empty tiles (p = 0, model not run)
    tiles_reused: int = 0  # tiles whose partial an earlier run or attempt had saved
    blocks: int = 0
    blocks_written: int = 0
    blocks_already_done: int = 0
    failed: list[tuple[Roi, str]] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None
    spill_bytes: int = 0  # bytes written to scratch (each read back once by the block needing it)
    spill_memory_bytes: int = 0  # bytes of spills an in-process run handed over in memory instead
    first_block_seconds: float | None = None

    @property
    def tiles_ratio(self) -> float:
        """Tiles produced (run + skipped + reused) ÷ tiles needed: 1 means each exactly once."""
        done = self.tiles_run + self.tiles_skipped + self.tiles_reused
        return done / self.tiles_needed if self.tiles_needed else 1.0

    def summary(self) -> str:
        return (
            f"{self.output}: {self.blocks_written} blocks written ({self.blocks_already_done} already done) "
            f"of {self.blocks}; tiles run {self.tiles_run}, empty {self.tiles_skipped}, reused {self.tiles_reused} "
            f"of {self.tiles_needed} needed ({self.tiles_in_grid} in the grid): ratio {self.tiles_ratio:g}; "
            f"{self.seconds:.1f} s"
        )


def run_blocks(running: Any, job: Job, layout: TileLayout, source: ModelSource, result: PredictResult) -> None:
    """Run the blocks not recorded done (``running``: :class:`cleftchunk.run.operation.Running`);
    fill ``result`` from the executor's report; failed blocks fail the command, naming them."""
    client = running.client
    source_arg = client.scatter(source, broadcast=True, hash=False) if source.module is not None else source
    task = BlockwiseTask(
        "predict",
        layout,
        functools.partial(blend_block, job),
        prepare=functools.partial(run_block_tiles, job),
        prepare_args=(source_arg,),
        uses=lambda index: [d for d, _ in layout.block_deps(index)],
        users=layout.users,
        release=job.scratch.drop_spill,
        fatal=(GpuOutOfMemory,),
    )
    report = running.run(task, recorded=True, check=False)
    counts = report.counts
    result.blocks_already_done = report.already_done
    result.blocks_written = report.written
    result.failed = report.failed
    result.tiles_needed += counts["tiles"]
    result.tiles_run += counts["run"]
    result.tiles_skipped += counts["skipped"]
    result.tiles_reused += counts["reused"]
    result.spill_bytes += counts["spill_bytes"]
    result.spill_memory_bytes += counts["spill_memory_bytes"]
    result.first_block_seconds = report.first_block_seconds
    if result.failed:
        shown = "; ".join(f"{roi}: {err}" for roi, err in result.failed[:3])
        raise CleftchunkError(
            f"{len(result.failed)} of {result.blocks} blocks failed ({shown}{'; ...' if len(result.failed) > 3 else ''}): "
            "fix the cause and re-run the same command to finish them"
        )
