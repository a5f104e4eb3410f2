"""One executor for every block-wise stage: stream blocks to a Dask client, a bounded number at a
time, in raster order, with retries, failures reported per block, one progress display and one
completion record.

A stage declares a :class:`BlockwiseTask` (modelled on daisy's ``Task`` and volara's blockwise
tasks): its *layout* (the blocks, generated lazily in raster order), the function that processes
one block on a worker, and the :class:`~cleftchunk.run.records.BlockRecord` its completion goes
to. A stage whose blocks exchange data (predict) also declares a *prepare* function run once per
block, and which blocks' prepared results each block needs (``uses``/``users``): the block is
processed once all of them are ready, with its own prepared result as an argument.

Why the client stays small whatever the volume: blocks are generated one by one, at most
``in_flight`` blocks are open (submitted and not finished) at any time, and the bookkeeping of
prepared results covers only the open front. Why "done" is never recorded for data that is not
written: ``process`` writes the block's data and returns; only then does the client mark it.
A killed worker's tasks are re-run by Dask (its results are recomputed from their keys).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from cleftchunk.geometry import Coord, Roi
from cleftchunk.run.progress import Progress
from cleftchunk.run.records import BlockRecord


#: Called as ``hook(task, block, report)`` on the client after each block is recorded done: a
#: place for tools and tests to stop a run at a known block (a deterministic "kill mid-run"),
#: rather than racing the clock. Empty in normal runs.
BLOCK_DONE_HOOKS: list[Callable[["BlockwiseTask", Any, "RunReport"], None]] = []


class Layout(Protocol):
    """Blocks in raster order; each block has ``index`` and ``write_roi``."""

    def __len__(self) -> int: ...
    def blocks(self) -> Iterator[Any]: ...
    def block(self, index: Coord) -> Any: ...
    def order(self, index: Coord) -> int: ...


@dataclass(frozen=True)
class BlockwiseTask:
    """A block-wise operation as a declaration (see the module docstring).

    ``process(block, prepared)`` runs on a worker, writes the block's data and returns a dict of
    counts (summed into the report); ``prepared`` is the block's own ``prepare`` result (None
    without ``prepare``). ``prepare(block, own)`` returns ``(counts, payload)``; ``own`` is False
    when the block itself is done and only its users need it (the payload is then ignored).
    ``release(index)`` runs on the client once every user of a block's prepared result is over.
    ``batch`` blocks go in one Dask task (tiny blocks; only without ``prepare``).
    ``collect(block, result)``, when given, runs on the client with what ``process`` returned for
    each finished block, instead of summing it into the report (per-block results a later pass
    needs: segment's tables, evaluate's census, synth's HDF5 data). ``process_args`` are extra
    arguments of ``process`` (after ``prepared``), e.g. Dask futures of data every block shares
    (resolved on the worker, shipped once rather than with every task).
    """

    name: str
    layout: Layout
    process: Callable[..., dict]
    record: BlockRecord | None = None
    prepare: Callable[..., tuple[dict, Any]] | None = None
    uses: Callable[[Coord], Iterable[Coord]] | None = None
    users: Callable[[Coord], Iterable[Coord]] | None = None
    release: Callable[[Coord], None] | None = None
    prepare_args: tuple = ()  # extra arguments of prepare, e.g. Dask futures (resolved on the worker)
    batch: int = 1
    fatal: tuple[type[BaseException], ...] = ()  # errors that stop the run (e.g. out of GPU memory)
    collect: Callable[[Any, Any], None] | None = None
    process_args: tuple = ()


@dataclass
class RunReport:
    name: str
    blocks: int
    already_done: int = 0
    written: int = 0
    failed: list[tuple[Roi, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    first_block_seconds: float | None = None  # from the run's start to the first block done (benchmarks)


def n_threads(client: Any) -> int:
    """Task threads of the cluster (at least 1): a ``distributed.Client`` or a
    :class:`~cleftchunk.run.local.ThreadClient`, both of which describe their workers."""
    workers = client.scheduler_info()["workers"].values()
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


def run_blockwise(
    client: Any, task: BlockwiseTask, *, retries: int = 2, progress: bool = True, in_flight: int | None = None
) -> RunReport:
    """Run every block of ``task`` not recorded done; return what happened (failures included)."""
    report = RunReport(task.name, len(task.layout))
    threads = n_threads(client)
    # enough batches to keep every thread busy (a batch is one Dask task)
    batch = max(1, min(task.batch, len(task.layout) // (8 * threads)))
    if batch != task.batch:
        task = dataclasses.replace(task, batch=batch)
    limit = in_flight or 4 * threads * batch
    run = _Run(client, task, retries, limit, report, Progress(task.name, enabled=progress))
    try:
        run.loop()
    finally:
        run.close()
        if task.record is not None:
            task.record.flush()
    return report


class _Run:
    """The state of one run: the open front of blocks and their prepared results."""

    def __init__(self, client: Any, task: BlockwiseTask, retries: int, limit: int, report: RunReport, progress: Progress):
        self.client, self.task, self.retries, self.limit, self.report, self.progress = client, task, retries, limit, report, progress
        self.token = uuid.uuid4().hex[:8]
        self.started = time.perf_counter()
        self.todo = self._todo()
        self.open = 0  # blocks submitted or waiting, not finished
        self.futures: dict[Any, tuple[str, Any]] = {}  # future -> (kind, block or batch)
        self.prepared: dict[Coord, dict] = {}  # index -> {"future", "state", "pending"}
        self.waiting: dict[Coord, Any] = {}  # blocks whose prepared inputs are not all ready
        self.completed = _as_completed(client)

    # -- what is left ----------------------------------------------------------------------
    def _todo(self) -> Iterator[Any]:
        record, layout = self.task.record, self.task.layout
        for block in layout.blocks():
            if record is not None and record.is_done(layout.order(block.index)):
                self.report.already_done += 1
                self.progress.skip(block.write_roi.size)
                continue
            yield block

    def _uses(self, index: Coord) -> list[Coord]:
        """The blocks whose prepared results this block waits for: its own first, then ``uses``."""
        return [index] + [d for d in self.task.uses(index) if d != index]

    def _users(self, index: Coord) -> list[Coord]:
        return [index] + [u for u in self.task.users(index) if u != index]

    def _is_done(self, index: Coord) -> bool:
        record = self.task.record
        return record is not None and record.is_done(self.task.layout.order(index))

    # -- the loop ----------------------------------------------------------------------------
    def loop(self) -> None:
        self.progress.start(len(self.task.layout))
        self._fill()
        while self.futures:
            # everything finished since the last look, with the small results fetched in one
            # round trip (a result each would cost a round trip per block)
            batch = [(f, *self.futures.pop(f)) for f in self.completed.next_batch(block=True) if f in self.futures]
            wanted = [f for f, kind, item in batch if f.status == "finished" and self._wants_result(kind, item)]
            results = dict(zip(wanted, self.client.gather(wanted))) if wanted else {}
            for future, kind, item in batch:
                if kind == "prepare":
                    self._prepared(item, future, results.get(future))
                else:
                    self._processed(item, future, results.get(future))
            self._fill()

    def _wants_result(self, kind: str, item: Any) -> bool:
        """Results the client reads: processed blocks' counts, and prepared counts of done blocks
        (never a payload a block's own process takes: that stays on the workers)."""
        if kind == "process":
            return True
        entry = self.prepared.get(item)
        return entry is not None and not entry["own"]

    def _fill(self) -> None:
        while self.open < self.limit:
            if self.task.prepare is None and self.task.batch > 1:
                batch = list(itertools.islice(self.todo, self.task.batch))
                if not batch:
                    return
                self.open += len(batch)
                self._submit_process(batch)
                continue
            block = next(self.todo, None)
            if block is None:
                return
            self._open(block)

    def _open(self, block: Any) -> None:
        self.open += 1
        if self.task.prepare is None:
            self._submit_process([block])
            return
        for dep in self._uses(block.index):
            self._ensure_prepared(dep, own=dep == block.index)
        self.waiting[block.index] = block
        self._try_process(block)

    def _ensure_prepared(self, index: Coord, own: bool) -> None:
        if index in self.prepared:
            return
        pending = sum(1 for u in self._users(index) if not self._is_done(u))
        future = self.client.submit(
            self.task.prepare, self.task.layout.block(index), own, *self.task.prepare_args,
            key=f"{self.task.name}-prepare-{self.token}-{'_'.join(map(str, index))}", retries=self.retries, pure=False,
            priority=-self.task.layout.order(index),
        )
        self.prepared[index] = {"future": future, "state": "pending", "pending": pending, "error": None, "own": own}
        self.futures[future] = ("prepare", index)
        self.completed.add(future)

    def _prepared(self, index: Coord, future: Any, result: Any) -> None:
        entry = self.prepared.get(index)
        if entry is None:  # every user is over already (they failed on another block's error)
            return
        if future.status == "finished":
            entry["state"] = "ready"
            if not entry["own"]:  # a done block's tiles, for its users: the payload is None, fetch the counts
                counts, _ = result
                self.report.counts.update(counts)
                entry["future"] = None
        else:
            self._fatal(future)
            entry["state"], entry["error"] = "error", _one_line(future.exception())
        for user in self._users(index):
            if user in self.waiting:
                self._try_process(self.waiting[user])

    def _try_process(self, block: Any) -> None:
        deps = [self.prepared[d] for d in self._uses(block.index)]
        errors = [d["error"] for d in deps if d["state"] == "error"]
        if errors:
            del self.waiting[block.index]
            self._failed([block], errors[0])
            return
        if all(d["state"] == "ready" for d in deps):
            del self.waiting[block.index]
            own = self.prepared[block.index]
            self._submit_process([block], own["future"])
            # Dask keeps the payload for the task just submitted; the other users only need to
            # know it is ready, so the client lets it go (worker memory follows the open front)
            own["future"] = None

    def _submit_process(self, blocks: list, prepared: Any = None) -> None:
        first = blocks[0].index
        future = self.client.submit(
            _process_batch, self.task.process, blocks, prepared, *self.task.process_args,
            key=f"{self.task.name}-{self.token}-{'_'.join(map(str, first))}", retries=self.retries, pure=False,
            priority=-self.task.layout.order(first),
        )
        self.futures[future] = ("process", blocks)
        self.completed.add(future)

    def _processed(self, blocks: list, future: Any, results: Any) -> None:
        if future.status == "finished":
            for block, counts in zip(blocks, results):
                if self.task.collect is not None:
                    self.task.collect(block, counts)
                else:
                    self.report.counts.update(counts)
                self._done(block)
        else:
            self._fatal(future)
            self._failed(blocks, _one_line(future.exception()))

    def _done(self, block: Any) -> None:
        if self.task.record is not None:
            self.task.record.mark_done(self.task.layout.order(block.index))
        if self.report.first_block_seconds is None:
            self.report.first_block_seconds = time.perf_counter() - self.started
        self.report.written += 1
        self._close(block)
        self.progress.update(block.write_roi.size, written=1, failed=0)
        for hook in BLOCK_DONE_HOOKS:
            hook(self.task, block, self.report)

    def _failed(self, blocks: list, error: str) -> None:
        for block in blocks:
            self.report.failed.append((block.write_roi, error))
            self._close(block)
            self.progress.update(block.write_roi.size, written=0, failed=1)

    def _close(self, block: Any) -> None:
        """A block is over (written or failed): release prepared results nobody needs any more."""
        self.open -= 1
        if self.task.prepare is None:
            return
        for dep in self._uses(block.index):
            entry = self.prepared[dep]
            entry["pending"] -= 1
            if entry["pending"] <= 0:
                del self.prepared[dep]
                if self.task.release is not None:
                    self.task.release(dep)

    def _fatal(self, future: Any) -> None:
        error = future.exception()
        if self.task.fatal and isinstance(error, self.task.fatal):
            raise error

    def close(self) -> None:
        for future in list(self.futures):
            future.cancel()
        self.progress.close()


def _process_batch(process: Callable[..., dict], blocks: Sequence[Any], prepared: Any, *args: Any) -> list[dict]:
    """One Dask task: process its blocks in order (a batch of tiny blocks, or one block)."""
    return [process(block, prepared, *args) for block in blocks]


def _as_completed(client: Any) -> Any:
    """The queue of finished tasks: the client's own (:class:`cleftchunk.run.local.ThreadClient`),
    else Dask's."""
    own = getattr(client, "as_completed", None)
    if callable(own):
        return own()
    from distributed import as_completed

    return as_completed()


def _one_line(error: BaseException | None) -> str:
    text = str(error).splitlines()[0] if error is not None and str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]
