"""Fill a Zarr array storage unit by storage unit, in parallel on the executor, resumably.

The *storage unit* of an array is its shard when it is sharded, else its chunk: the object the
store holds under one key. Zarr's local store writes every object to a temporary file and
renames it into place, so a unit is either wholly present or absent, never half-written, even
when the process is killed or the disk fills up. That makes the store itself the record of what
is done: each task of :func:`fill` checks which of its units are present (:func:`unit_stored`)
and writes only the others; :func:`stored_units` lists them all (for tests and tools).
No separate "done" marker exists that could disagree with the data. A kill in the middle of a
write leaves a temporary ``*.partial`` file, never a key; :func:`fill` deletes those first.

Work is grouped into *tasks* (:func:`task_layout`, the executor's blocks): boxes of whole units,
a full section plane when it fits in ``task_bytes``, as thin in z as allowed, so that sources
stored plane-wise or in HDF5 slabs are read in large, aligned pieces. ``align`` (the source's
chunk shape) makes task boxes whole multiples of it where that costs at most
:data:`ALIGN_SLACK` × ``task_bytes``, so that every source chunk is decompressed once rather than
once per task that cuts it. Peak memory is about ``workers × 3 × task_bytes`` whatever the
volume size, and the client holds nothing per unit.

A unit whose data is entirely the fill value is not stored by Zarr, so a resumed run reads it
again (and writes nothing): correct, merely a little redundant.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cleftchunk.geometry import ChunkGrid, Coord, Roi
from cleftchunk.run.executor import BlockwiseTask, run_blockwise
from cleftchunk.run.layout import GridLayout
from cleftchunk.run.records import BlockRecord, identity_hash, remove_record

#: Bytes of source data one task reads: large enough for efficient I/O, small enough that a
#: few workers stay within a few hundred MiB.
DEFAULT_TASK_BYTES = 32 * 2**20

Producer = Callable[[Roi], np.ndarray]


def unit_shape(array: Any) -> tuple[int, ...]:
    shards = getattr(array, "shards", None)
    return tuple(int(s) for s in (shards or array.chunks))


def unit_grid(array: Any) -> ChunkGrid:
    """The grid of storage units (shards, else chunks) over the array, in array-local voxels."""
    return ChunkGrid(Roi.from_shape(array.shape), unit_shape(array))


#: Suffix of the temporary files Zarr's local store renames into place; a killed write leaves one.
PARTIAL_SUFFIX = ".partial"


def _stored_keys(array: Any) -> list[str]:
    """Keys under the array in its store, relative to the array."""
    from zarr.core.sync import sync

    store, path = array.store_path.store, array.store_path.path
    prefix = f"{path}/" if path else ""

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return [k[len(prefix) :] for k in sync(keys())]


def stored_units(array: Any) -> set[Coord]:
    """Indices of the storage units present in the array's store (temporary files do not count)."""
    present = set(_stored_keys(array))
    grid = unit_grid(array)
    return {index for index in grid.indices() if array.metadata.encode_chunk_key(index) in present}


def remove_partial_writes(array: Any) -> int:
    """Delete the temporary files that writes killed mid-way left behind; how many there were."""
    from zarr.core.sync import sync

    store, path = array.store_path.store, array.store_path.path
    partial = [k for k in _stored_keys(array) if k.endswith(PARTIAL_SUFFIX)]
    for key in partial:
        sync(store.delete(f"{path}/{key}" if path else key))
    return len(partial)


#: How far past ``task_bytes`` a task may grow to cover whole source chunks.
ALIGN_SLACK = 4


def _aligned_minimum(grid: ChunkGrid, itemsize: int, task_bytes: int, align: Sequence[int] | None) -> tuple[int, ...]:
    """Per axis, the fewest units whose extent is a multiple of the source chunk (1 if too costly)."""
    if align is None:
        return (1,) * grid.roi.ndim
    minimum = [min(math.lcm(int(unit), int(src)) // unit, n) for unit, src, n in zip(grid.chunk_shape, align, grid.grid_shape)]
    unit_bytes = math.prod(grid.chunk_shape) * itemsize
    for axis in (0, 1, 2):  # too big a box: give up alignment axis by axis
        if math.prod(minimum) * unit_bytes > ALIGN_SLACK * task_bytes:
            minimum[axis] = 1
    return tuple(minimum)


def _units_per_task(grid: ChunkGrid, itemsize: int, task_bytes: int, minimum: Sequence[int] = (1, 1, 1)) -> tuple[int, ...]:
    """Units a task spans per axis: ``minimum`` in z, then as many of x, then of y, as fit.

    Extents along y and x stay multiples of ``minimum``.
    """
    unit_bytes = math.prod(grid.chunk_shape) * itemsize
    mz, my, mx = minimum
    budget = max(1, task_bytes // (unit_bytes * mz * my * mx))  # in blocks of mz × my × mx units
    nz, ny, nx = grid.grid_shape
    along_x = min(nx, mx * min(budget, -(-nx // mx)))
    rows = max(1, budget // max(1, -(-along_x // mx))) if along_x >= nx else 1
    along_y = min(ny, my * rows)
    return (min(nz, mz), along_y, along_x)


def _box_indices(box: Roi) -> Iterable[Coord]:
    """The integer points of ``box`` (here: unit indices), in C order."""
    return itertools.product(*(range(b, e) for b, e in zip(box.begin, box.end)))


# -- running tasks on the executor ---------------------------------------------------------
def task_layout(grid: ChunkGrid, itemsize: int, task_bytes: int = DEFAULT_TASK_BYTES, align: Sequence[int] | None = None) -> GridLayout:
    """Tasks covering ``grid`` as the executor's blocks: boxes of whole units, ``minimum`` (the
    alignment) in z, then as many units of x, then of y, as fit in ``task_bytes``."""
    per_task = _units_per_task(grid, itemsize, task_bytes, _aligned_minimum(grid, itemsize, task_bytes, align))
    return GridLayout(grid.roi, tuple(p * u for p, u in zip(per_task, grid.chunk_shape)))


def units_in(grid: ChunkGrid, roi: Roi) -> Iterable[Coord]:
    """The indices of the units of ``grid`` inside ``roi`` (a box of whole units), in C order."""
    first = [(b - o) // c for b, o, c in zip(roi.begin, grid.roi.begin, grid.chunk_shape)]
    last = [-(-(e - o) // c) for e, o, c in zip(roi.end, grid.roi.begin, grid.chunk_shape)]
    return _box_indices(Roi.from_bounds(first, last))


def unit_stored(array: Any, index: Coord) -> bool:
    """Whether the storage unit ``index`` is in the array's store (one existence check)."""
    from zarr.core.sync import sync

    store, path = array.store_path.store, array.store_path.path
    key = array.metadata.encode_chunk_key(tuple(index))
    return sync(store.exists(f"{path}/{key}" if path else key))


def fill(
    array: Any,
    produce: Producer,
    *,
    workers: int = 2,
    scheduler: str = "threads",
    task_bytes: int = DEFAULT_TASK_BYTES,
    progress: bool | str = False,
    source_itemsize: int | None = None,
    align: Sequence[int] | None = None,
    client: Any = None,
    resume: bool = True,
    record_at: tuple[Any, str] | None = None,
) -> "FillReport":
    """Write every storage unit of the zarr ``array`` not yet stored, with data ``produce(roi)``.

    Runs on the executor (:mod:`cleftchunk.run.executor`): on ``client``, else on
    :func:`~cleftchunk.run.local.block_client` (``workers``, ``scheduler``: threads, processes or
    a scheduler's address). ``produce`` receives ROIs in array-local voxels and must be picklable
    for worker processes. Each task checks which of its units are stored (``resume``; False for
    an array just created, where none is) and reads and writes only if some are missing: the
    client holds nothing per unit. ``progress`` (True or a description) shows the progress display.

    ``record_at`` = (path, identity hash): a completion record of the tasks (one byte per task,
    :class:`~cleftchunk.run.records.BlockRecord`), so that a resumed run skips finished tasks
    without asking the store about their units; the tasks it does not mark still check their
    units (a task killed after some writes). It is removed once every unit is written.
    """
    grid = unit_grid(array)
    remove_partial_writes(array)
    itemsize = source_itemsize or np.dtype(array.dtype).itemsize
    layout = task_layout(grid, itemsize, task_bytes, align)
    record = None
    if record_at is not None:
        # the task layout belongs to the identity: a resumed run with another task size must not
        # trust marks of other tasks
        identity = identity_hash(record_at[1], list(layout.roi.shape), list(layout.block_shape))
        record = BlockRecord.open(record_at[0], len(layout), identity, fresh=not resume)[0]
    process = functools.partial(_fill_block, array, produce, grid, itemsize, resume)
    task = BlockwiseTask(_name(progress, "fill"), layout, process, record=record, batch=layout.auto_batch(), fatal=(Exception,))
    report = _run(client, workers, scheduler, task, progress)
    if record is not None:
        remove_record(record.path)
    counts = report.counts
    # On success every unit is either written now or was already stored (by a task this run
    # found in the record, or by one that checked its units).
    return FillReport(units=grid.num_chunks, already_stored=grid.num_chunks - counts["written"], written=counts["written"], bytes_read=counts["bytes"])


@dataclass(frozen=True)
class FillReport:
    units: int
    already_stored: int
    written: int
    bytes_read: int


def _fill_block(array: Any, produce: Producer, grid: ChunkGrid, itemsize: int, resume: bool, block: Any, _prepared: Any = None) -> dict:
    units = list(units_in(grid, block.write_roi))
    missing = [u for u in units if not unit_stored(array, u)] if resume else units
    if not missing:
        return {"stored": len(units)}
    data = produce(block.write_roi)
    if len(missing) == len(units):
        write_box(array, block.write_roi, data)
    else:
        for index in missing:
            roi = grid.chunk_roi(index)
            write_box(array, roi, data[roi.to_slices(block.write_roi.offset)])
    return {"stored": len(units) - len(missing), "written": len(missing), "bytes": block.write_roi.size * itemsize}


def write_box(array: Any, roi: Roi, data: np.ndarray) -> None:
    """One write of whole storage units (each lands in the store atomically)."""
    array[roi.to_slices()] = data


def _name(progress: bool | str, default: str) -> str:
    return progress if isinstance(progress, str) else default


def _run(client: Any, workers: int, scheduler: str, task: BlockwiseTask, progress: bool | str):
    """Run ``task`` on ``client``, or on a client started for it; the first error is raised."""
    from cleftchunk.run.local import block_client

    with contextlib.nullcontext(client) if client is not None else block_client(workers, scheduler) as c:
        return run_blockwise(c, task, progress=bool(progress))


# -- comparing ----------------------------------------------------------------------------
def compare(
    array: Any,
    produce: Producer,
    *,
    workers: int = 2,
    scheduler: str = "threads",
    task_bytes: int = DEFAULT_TASK_BYTES,
    progress: bool | str = False,
    align: Sequence[int] | None = None,
    client: Any = None,
) -> list[tuple[Coord, Roi, int]]:
    """Chunks of ``array`` whose content differs from ``produce``: (chunk index, ROI, voxels differing)."""
    grid = ChunkGrid(Roi.from_shape(array.shape), tuple(int(c) for c in array.chunks))
    layout = task_layout(grid, np.dtype(array.dtype).itemsize, task_bytes, align)
    found: list = []
    task = BlockwiseTask(_name(progress, "compare"), layout, functools.partial(_compare_block, array, produce, grid),
                         batch=layout.auto_batch(), fatal=(Exception,), collect=lambda block, m: found.extend(m))
    _run(client, workers, scheduler, task, progress)
    return sorted(found)


def _compare_block(array: Any, produce: Producer, grid: ChunkGrid, block: Any, _prepared: Any = None) -> list:
    expected = produce(block.write_roi)
    stored = np.asarray(array[block.write_roi.to_slices()])
    found = []
    for index in units_in(grid, block.write_roi):
        roi = grid.chunk_roi(index)
        local = roi.to_slices(block.write_roi.offset)
        differing = count_differences(stored[local], expected[local])
        if differing:
            found.append((index, roi, differing))
    return found


def count_differences(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return max(a.size, b.size)
    equal = a == b
    if a.dtype.kind == "f":
        equal |= np.isnan(a) & np.isnan(b)
    return int(equal.size - np.count_nonzero(equal))
