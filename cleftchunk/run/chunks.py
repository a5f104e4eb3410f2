"""Fill a Zarr array storage unit by storage unit, in parallel on the executor, resumably.

The *storage unit* of an array is its shard when it is sharded, else its chunk: the object the
store holds under one key. Zarr's local store writes every object to a temporary file and
renames it into place, so a unit is either wholly present or absent, never half-written, even
when the process is killed or the disk fills up. That makes the store itself a record of what
is done: each task of :func:`fill` checks which of its units are present (:func:`unit_stored`)
and writes only the others; :func:`stored_units` lists them all (for tests and tools). A pass
that an operation records (``recorded=True``) also has the operation's completion record (one
byte per task, :class:`~cleftchunk.run.records.BlockRecord`), which only lets a resumed run skip
the store checks of tasks it marks done; it never marks a task whose units were not all written,
so it cannot disagree with the data. A kill in the middle of a write leaves a temporary
``*.partial`` file, never a key; :func:`fill` deletes those first.

Work is grouped into *tasks* (:func:`task_layout`, the executor's blocks): boxes of whole units,
a full section plane when it fits in ``task_bytes``, as thin in z as allowed, so that sources
stored plane-wise or in HDF5 slabs are read in large, aligned pieces (or boxes of a given block
shape, a multiple of the unit). ``align`` (the source's chunk shape) makes task boxes whole
multiples of it where that costs at most :data:`ALIGN_SLACK` × ``task_bytes``, so that every
source chunk is decompressed once rather than once per task that cuts it. Peak memory is about
``task threads × 3 × task_bytes`` whatever the volume size, and the client holds nothing per unit.

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
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout

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
    return set(stored_unit_indices(array))


def stored_unit_indices(array: Any) -> list[Coord]:
    """Indices of the storage units (shards, else chunks) the store holds, from one listing of
    the array's keys (never a check per unit of the grid: a terabyte grid has millions)."""
    grid = unit_grid(array).grid_shape
    meta = array.metadata
    if getattr(meta, "zarr_format", 3) == 2:
        sep, prefix = getattr(meta, "dimension_separator", ".") or ".", ""
    else:
        encoding = meta.chunk_key_encoding
        sep = getattr(encoding, "separator", "/")
        prefix = f"c{sep}" if getattr(encoding, "name", "default") == "default" else ""
    found = []
    for key in _stored_keys(array):
        if key.endswith(PARTIAL_SUFFIX) or not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(sep)
        if len(parts) != len(grid) or not all(p.isdigit() for p in parts):
            continue  # metadata (zarr.json, .zarray) and anything else that is not a unit
        index = tuple(int(p) for p in parts)
        if all(i < n for i, n in zip(index, grid)):
            found.append(index)
    return sorted(found)


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


def _running(on: Any):
    """What ``on`` runs passes on: a :class:`~cleftchunk.run.operation.Running` as it is (inside an
    operation), a client (a Dask client or :class:`~cleftchunk.run.local.ThreadClient`, with the
    default options), else a context giving one on a client started for ``on`` (RunOptions;
    None: the defaults)."""
    from cleftchunk.run.operation import Running
    from cleftchunk.run.options import RunOptions

    if isinstance(on, Running):
        return contextlib.nullcontext(on)
    if on is not None and not isinstance(on, RunOptions):
        return contextlib.nullcontext(Running(on, RunOptions(), None, lambda _: None))
    options = on if on is not None else RunOptions()

    @contextlib.contextmanager
    def started():
        with options.client() as client:
            yield Running(client, options, None, lambda _: None)

    return started()


#: Errors that stop a fill or compare at once instead of being reported per block: the machine's
#: (disk full, permissions, a read-only or vanished file system, memory), which every other block
#: would meet too. They are raised as they are; anything else fails only its block.
FATAL = (OSError, MemoryError)


def fill_layout(array: Any, task_bytes: int = DEFAULT_TASK_BYTES, source_itemsize: int | None = None,
                align: Sequence[int] | None = None, block_shape: Sequence[int] | None = None) -> GridLayout:
    """The tasks of :func:`fill` over ``array``: ``block_shape`` (already checked to be a multiple
    of the storage unit) when given, else :func:`task_layout` of ``task_bytes``."""
    grid = unit_grid(array)
    if block_shape is not None:
        return GridLayout(grid.roi, tuple(int(b) for b in block_shape))
    return task_layout(grid, source_itemsize or np.dtype(array.dtype).itemsize, task_bytes, align)


def fill_task(array: Any, produce: Producer, layout: GridLayout, *, name: str = "fill", source_itemsize: int | None = None,
              resume: bool = True) -> BlockwiseTask:
    """The executor's task writing every unit of ``array`` in ``layout`` (see :func:`fill`)."""
    remove_partial_writes(array)
    itemsize = source_itemsize or np.dtype(array.dtype).itemsize
    process = functools.partial(_fill_block, array, produce, unit_grid(array), itemsize, resume)
    return BlockwiseTask(name, layout, process, batch=layout.auto_batch(), fatal=FATAL)


def fill(
    array: Any,
    produce: Producer,
    on: Any = None,
    *,
    task_bytes: int = DEFAULT_TASK_BYTES,
    block_shape: Sequence[int] | None = None,
    layout: GridLayout | None = None,
    name: str = "fill",
    source_itemsize: int | None = None,
    align: Sequence[int] | None = None,
    resume: bool = True,
    recorded: bool = False,
) -> "FillReport":
    """Write every storage unit of the zarr ``array`` not yet stored, with data ``produce(roi)``.

    Runs one pass on the executor (:mod:`cleftchunk.run.executor`): on ``on``, the
    :class:`~cleftchunk.run.operation.Running` of an operation, a client, or a
    :class:`~cleftchunk.run.options.RunOptions` (a client is started for this pass; None: the
    defaults). ``produce`` receives ROIs in array-local voxels and must be picklable for worker
    processes. Each task checks which of its units are stored (``resume``; False for an array
    just created, where none is) and reads and writes only if some are missing: the client holds
    nothing per unit. A failed block is reported with the others after the pass (the run fails
    naming them); errors of the machine (:data:`FATAL`) stop it at once.

    ``recorded``: this is the operation's recorded pass: its tasks go to the operation's
    completion record (:class:`~cleftchunk.run.records.BlockRecord`, one byte per task), so that
    a resumed run skips finished tasks without asking the store about their units; tasks it does
    not mark still check their units (a task killed after some writes). The tasks are
    ``layout`` when given (the recorded pass's must be the operation's plan's), else
    :func:`fill_layout` of ``task_bytes``/``block_shape``.
    """
    layout = layout or fill_layout(array, task_bytes, source_itemsize, align, block_shape)
    task = fill_task(array, produce, layout, name=name, source_itemsize=source_itemsize, resume=resume)
    with _running(on) as running:
        report = running.run(task, recorded=recorded)
    units = unit_grid(array).num_chunks
    written = report.counts["written"]
    # Every unit is now either written by this pass or was already stored (by a task the record
    # says is done, or by one that checked its units).
    return FillReport(units=units, already_stored=units - written, written=written, bytes_read=report.counts["bytes"])


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


# -- comparing ----------------------------------------------------------------------------
def compare(
    array: Any,
    produce: Producer,
    on: Any = None,
    *,
    task_bytes: int = DEFAULT_TASK_BYTES,
    name: str = "compare",
    align: Sequence[int] | None = None,
) -> list[tuple[Coord, Roi, int]]:
    """Chunks of ``array`` whose content differs from ``produce``: (chunk index, ROI, voxels
    differing). ``on``: as for :func:`fill`; a block that cannot be compared fails the run."""
    grid = ChunkGrid(Roi.from_shape(array.shape), tuple(int(c) for c in array.chunks))
    layout = task_layout(grid, np.dtype(array.dtype).itemsize, task_bytes, align)
    found: list = []
    task = BlockwiseTask(name, layout, functools.partial(_compare_block, array, produce, grid),
                         batch=layout.auto_batch(), fatal=FATAL, collect=lambda block, m: found.extend(m))
    with _running(on) as running:
        running.run(task)
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
