"""Fill a Zarr array storage unit by storage unit, in parallel on Dask, resumably.

The *storage unit* of an array is its shard when it is sharded, else its chunk: the object the
store holds under one key. Zarr's local store writes every object to a temporary file and
renames it into place, so a unit is either wholly present or absent, never half-written, even
when the process is killed or the disk fills up. That makes the store itself the record of what
is done: :func:`stored_units` lists the keys present, and :func:`fill` writes only the others.
No separate "done" marker exists that could disagree with the data. A kill in the middle of a
write leaves a temporary ``*.partial`` file, never a key; :func:`fill` deletes those first.

Work is grouped into *tasks*: boxes of whole units, a full section plane when it fits in
``task_bytes``, so that sources stored plane-wise or in HDF5 slabs are read in large, aligned
pieces. Peak memory is about ``workers × 3 × task_bytes`` whatever the volume size.

A unit whose data is entirely the fill value is not stored by Zarr, so a resumed run reads it
again (and writes nothing): correct, merely a little redundant.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cleftchunk.geometry import ChunkGrid, Coord, Roi

#: Bytes of source data one task reads: large enough for efficient I/O, small enough that a
#: few workers stay within a few hundred MiB.
DEFAULT_TASK_BYTES = 32 * 2**20

Producer = Callable[[Roi], np.ndarray]


@dataclass(frozen=True)
class Task:
    """A box of whole storage units (``box``, in unit indices), and those still to be written.

    ``missing`` is None when every unit of the box is missing (the common case, kept cheap so
    that plans over millions of units stay small).
    """

    roi: Roi
    box: Roi
    missing: tuple[Coord, ...] | None = None

    @property
    def units(self) -> list[Coord]:
        return list(_box_indices(self.box))

    @property
    def todo(self) -> list[Coord]:
        return self.units if self.missing is None else list(self.missing)

    @property
    def todo_count(self) -> int:
        return self.box.size if self.missing is None else len(self.missing)

    @property
    def complete_write(self) -> bool:
        """Every unit of the box is written (so the whole box is written at once)."""
        return self.missing is None


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


def plan_tasks(
    grid: ChunkGrid,
    itemsize: int,
    task_bytes: int = DEFAULT_TASK_BYTES,
    done: Iterable[Coord] = (),
    align: Sequence[int] | None = None,
) -> list[Task]:
    """Tasks covering ``grid``: as thin in z as allowed, spreading over x then y within ``task_bytes``.

    ``align`` (the source's chunk shape) makes task boxes whole multiples of it where that costs
    at most :data:`ALIGN_SLACK` × ``task_bytes``, so that every source chunk is decompressed once
    rather than once per task that cuts it. Tasks whose units are all in ``done`` are left out.
    """
    done = set(done)
    per_task = _units_per_task(grid, itemsize, task_bytes, _aligned_minimum(grid, itemsize, task_bytes, align))
    task_grid = ChunkGrid(Roi.from_shape(grid.grid_shape), per_task)
    tasks = []
    for _, box in task_grid.chunks():
        roi = grid.chunk_roi(box.begin).union(grid.chunk_roi(tuple(e - 1 for e in box.end)))
        if not done:
            tasks.append(Task(roi, box))
            continue
        missing = tuple(u for u in _box_indices(box) if u not in done)
        if missing:
            tasks.append(Task(roi, box, missing if len(missing) < box.size else None))
    return tasks


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


# -- running tasks ------------------------------------------------------------------------
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
) -> "FillReport":
    """Write every storage unit of the zarr ``array`` not yet stored, with data ``produce(roi)``.

    ``produce`` receives ROIs in array-local voxels and must be picklable for the ``processes``
    scheduler. ``progress`` (True or a description) shows a tqdm bar in bytes of source data.
    """
    grid = unit_grid(array)
    remove_partial_writes(array)
    done = stored_units(array)
    itemsize = source_itemsize or np.dtype(array.dtype).itemsize
    tasks = plan_tasks(grid, itemsize, task_bytes, done, align)
    total = sum(t.roi.size for t in tasks) * itemsize
    run_tasks([(_fill_task, array, produce, task, grid, itemsize) for task in tasks], total, workers, scheduler, progress)
    written = sum(t.todo_count for t in tasks)
    return FillReport(units=grid.num_chunks, already_stored=len(done), written=written, bytes_read=total)


@dataclass(frozen=True)
class FillReport:
    units: int
    already_stored: int
    written: int
    bytes_read: int


def _fill_task(array: Any, produce: Producer, task: Task, grid: ChunkGrid, itemsize: int) -> int:
    data = produce(task.roi)
    if task.complete_write:
        write_box(array, task.roi, data)
    else:
        for index in task.todo:
            roi = grid.chunk_roi(index)
            write_box(array, roi, data[roi.to_slices(task.roi.offset)])
    return task.roi.size * itemsize


def write_box(array: Any, roi: Roi, data: np.ndarray) -> None:
    """One write of whole storage units (each lands in the store atomically)."""
    array[roi.to_slices()] = data


def run_tasks(calls: Sequence[tuple], total_bytes: int, workers: int, scheduler: str, progress: bool | str) -> list:
    """Run ``(function, *args)`` calls on a local Dask scheduler; each returns bytes done."""
    import dask

    if not calls:
        return []
    if workers <= 1:
        scheduler = "sync"
    delayed = [dask.delayed(call[0], pure=False)(*call[1:]) for call in calls]
    with _ProgressBar(total_bytes, progress):
        return list(dask.compute(*delayed, scheduler=scheduler, num_workers=max(1, workers)))


class _ProgressBar:
    """A tqdm bar in bytes (so it shows MB/s and ETA), advanced as Dask tasks finish."""

    def __init__(self, total: int, progress: bool | str):
        self.total = total
        self.desc = progress if isinstance(progress, str) else None
        self.enabled = bool(progress)

    def __enter__(self):
        if not self.enabled:
            return self
        from dask.callbacks import Callback
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
        bar = self.bar

        def posttask(key, result, dsk, state, worker_id):
            done = result[0] if isinstance(result, tuple) else result
            if isinstance(done, (int, np.integer)):
                bar.update(int(done))

        self.callback = Callback(posttask=posttask)
        self.callback.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.callback.__exit__(*exc)
            self.bar.close()
        return False


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
) -> list[tuple[Coord, Roi, int]]:
    """Chunks of ``array`` whose content differs from ``produce``: (chunk index, ROI, voxels differing)."""
    grid = ChunkGrid(Roi.from_shape(array.shape), tuple(int(c) for c in array.chunks))
    itemsize = np.dtype(array.dtype).itemsize
    tasks = plan_tasks(grid, itemsize, task_bytes, align=align)
    total = sum(t.roi.size for t in tasks) * itemsize
    results = run_tasks([(_compare_task, array, produce, task, grid) for task in tasks], total, workers, scheduler, progress)
    mismatches = [m for found in results for m in found[1]]
    return sorted(mismatches)


def _compare_task(array: Any, produce: Producer, task: Task, grid: ChunkGrid) -> tuple[int, list]:
    expected = produce(task.roi)
    stored = np.asarray(array[task.roi.to_slices()])
    found = []
    for index in task.units:
        roi = grid.chunk_roi(index)
        local = roi.to_slices(task.roi.offset)
        differing = count_differences(stored[local], expected[local])
        if differing:
            found.append((index, roi, differing))
    return task.roi.size * stored.itemsize, found


def count_differences(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return max(a.size, b.size)
    equal = a == b
    if a.dtype.kind == "f":
        equal |= np.isnan(a) & np.isnan(b)
    return int(equal.size - np.count_nonzero(equal))
