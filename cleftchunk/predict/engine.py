"""The driver of a prediction: submit the blocks' tasks to a Dask client, follow them, count
tiles, drop partials that no block needs any more, and collect failures."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable


from cleftchunk.geometry import Coord, Roi
from cleftchunk.predict.params import GpuOutOfMemory
from cleftchunk.predict.plan import BlockWork, Plan, _name
from cleftchunk.predict.runner import ModelSource
from cleftchunk.predict.scratch import Scratch
from cleftchunk.predict.tasks import Job, blend_block, run_block_tiles



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


def _execute(client: Any, job: Job, plan: Plan, source: ModelSource, retries: int, progress: bool, result: PredictResult) -> None:
    """Run the blocks not done yet; follow them: progress, partial clean-up, failures."""
    scratch = job.scratch
    done = scratch.done()
    todo = [w for w in plan.blocks() if _name(w.index) not in done]
    result.blocks_already_done = len(plan) - len(todo)
    needed = Counter(_name(d) for w in todo for d, _ in w.deps)
    for stale in scratch.partials() - set(needed):
        scratch.drop_partial(stale)
    tiles_futures, blend_futures = _submit(client, job, plan, todo, source, retries, result)
    try:
        _follow(blend_futures, needed, scratch, progress, result)
        _count_tiles(tiles_futures.values(), result)
    finally:
        for f in list(blend_futures) + list(tiles_futures.values()):
            if f.status != "finished":
                f.cancel()


def _submit(client: Any, job: Job, plan: Plan, todo: list[BlockWork], source: ModelSource, retries: int, result: PredictResult):
    """Submit tiles and blend tasks in raster order with falling priority, so that blocks finish
    in that order and the front of partials (scratch space) stays small."""
    source_arg = client.scatter(source, broadcast=True, hash=False) if source.module is not None else source
    token = uuid.uuid4().hex[:8]
    tiles_futures: dict[Coord, Any] = {}
    blend_futures: dict[Any, BlockWork] = {}
    for order, work in enumerate(todo):
        for dep, _ in work.deps:
            if dep not in tiles_futures:
                result.tiles_needed += len(plan.block(dep).tiles)
                tiles_futures[dep] = client.submit(
                    run_block_tiles, job, plan.block(dep), source_arg,
                    key=f"predict-tiles-{token}-{_name(dep)}", retries=retries, priority=-order, pure=False,
                )
        deps = [tiles_futures[d] for d, _ in work.deps]
        future = client.submit(
            blend_block, job, work, *deps, key=f"predict-blend-{token}-{_name(work.index)}", retries=retries, priority=-order, pure=False
        )
        blend_futures[future] = work
    return tiles_futures, blend_futures


def _follow(blend_futures: dict[Any, BlockWork], needed: Counter, scratch: Scratch, progress: bool, result: PredictResult) -> None:
    """Collect blend tasks as they finish; drop a partial once every block needing it is written."""
    from distributed import as_completed
    from tqdm import tqdm

    total = sum(w.write_roi.size for w in blend_futures.values())
    with tqdm(total=total, unit="vox", unit_scale=True, disable=not progress, desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:
        for future in as_completed(list(blend_futures)):
            work = blend_futures.pop(future)
            if future.status != "finished":
                error = future.exception()
                if isinstance(error, GpuOutOfMemory):
                    raise error
                result.failed.append((work.write_roi, _one_line(error)))
                continue
            result.blocks_written += 1
            bar.update(work.write_roi.size)
            bar.set_postfix_str(f"blocks {result.blocks_written + result.blocks_already_done}/{result.blocks}")
            for dep, _ in work.deps:
                needed[_name(dep)] -= 1
                if needed[_name(dep)] == 0:
                    scratch.drop_partial(_name(dep))


def _count_tiles(futures: Iterable[Any], result: PredictResult) -> None:
    """Tile counts from the tiles tasks' own results: what really went through the model."""
    for future in futures:
        if future.status != "finished":
            continue
        stats = future.result()
        if stats.get("reused"):
            result.tiles_reused += stats["tiles"]
        else:
            result.tiles_run += stats["run"]
            result.tiles_skipped += stats["skipped"]


def _one_line(error: BaseException | None) -> str:
    text = str(error).splitlines()[0] if error is not None and str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]
