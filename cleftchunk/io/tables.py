"""The cleft table of a label volume: how many cleft voxels each storage unit (cell) holds, and
which cells are annotated at all — computed once, block-wise, and stored beside the labels.

Why: training draws crops near clefts and only from annotated space. Counting clefts by reading
every label chunk before the first step costs a terabyte of reads on a terabyte volume; the table
is a few MiB at most and is reused by every run.

- **Cells** are the label array's storage units (shards, else chunks): a unit is either in the
  store or not, so "annotated" is decided per cell. Sources without a store of units (HDF5, TIFF,
  numpy) use the training cache's chunks and are counted in memory (:func:`count_in_memory`).
- **Values**: the number of cleft voxels of the cell, or :data:`NOT_ANNOTATED` (−1, the table's
  fill value) for a cell that holds no annotation.
- **Annotated space** (``annotated``): ``whole`` — every cell (labels cleftchunk wrote: convert
  and segment write them whole, and Zarr does not store a unit that is all fill value, so the
  listing would miss background units); ``stored`` — only the units the store holds, found by
  LISTING it (labels another tool wrote into a few cubes: a unit never written reads as the fill
  value, which is not background but "unknown"). ``auto``: ``whole`` for outputs of cleftchunk's
  stages (convert, segment, synth, threshold, predict: their provenance attribute says so), else ``stored``.
- **Where**: the Zarr array ``<labels array>_cleft_counts`` beside the label array in its group
  (``out.zarr/clefts/s0`` → ``out.zarr/clefts/s0_cleft_counts``; a label array at a store's root:
  the store ``<root>_cleft_counts``). Its state (identity, completion) is the attribute
  ``cleftchunk_cleft-counts``; a table of other parameters is derived data and rebuilt.
- **Block-wise**: :class:`CleftCounts` is an :class:`~cleftchunk.run.operation.Operation`; each
  block writes one chunk of the table (a box of cells), so it resumes, runs on threads, worker
  processes or a cluster, and shows a progress bar like every other stage. With ``stored`` only
  the blocks holding listed units are visited.
- **Staleness**: labels rewritten by another tool after the table was made are not detected;
  remove the table (or pass ``overwrite``) after such a change. cleftchunk's own writers replace it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import ChunkGrid, Coord, Roi
from cleftchunk.labels import CLEFT_BIT, label_codes
from cleftchunk.run.chunks import stored_unit_indices  # one listing of the store (tests import it from here too)
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout, SubsetLayout
from cleftchunk.run.operation import Operation, Plan, Running, run_operation
from cleftchunk.run.options import RunOptions

NOT_ANNOTATED = -1
SUFFIX = "_cleft_counts"
#: Label bytes one block (one table chunk) covers at most: a task reads at most this much.
BLOCK_LABEL_BYTES = 256 * 2**20
ANNOTATED = ("auto", "whole", "stored")


@dataclass
class CleftTable:
    """Cleft voxels per cell of a volume of ``shape`` (``NOT_ANNOTATED`` where unannotated)."""

    counts: np.ndarray
    cell: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def grid(self) -> ChunkGrid:
        return ChunkGrid(Roi.from_shape(self.shape), self.cell)

    @property
    def everywhere(self) -> bool:
        return bool((self.counts >= 0).all())

    @property
    def clefts(self) -> int:
        return int(self.counts[self.counts > 0].sum())

    def cell_box(self, roi: Roi) -> tuple[slice, ...]:
        """The cells overlapping ``roi`` (array-local voxels), as slices of :attr:`counts`."""
        return tuple(slice(max(0, b // c), max(0, min(n, -(-e // c)))) for b, e, c, n in zip(roi.begin, roi.end, self.cell, self.counts.shape))

    def annotated_mask(self, roi: Roi) -> np.ndarray | None:
        """Voxels of ``roi`` in annotated cells (True), or None when all of them are."""
        box = self.cell_box(roi)
        cells = self.counts[box] >= 0
        if cells.all():
            return None
        mask = np.zeros(roi.shape, bool)
        for local in zip(*np.nonzero(cells)):  # only the annotated cells of the box (a few)
            index = tuple(int(i) + s.start for i, s in zip(local, box))
            part = self.grid.chunk_roi(index).intersect(roi)
            if not part.empty:
                mask[part.relative_to(roi).to_slices()] = True
        return mask


# -- where a table lives ----------------------------------------------------------------------
def table_spec(labels: Any) -> str | None:
    """The table's Zarr spec for a Zarr label Volume; None for other sources (counted in memory),
    and for a part of a volume (frames.Cropped: labels placed by their offset), whose cells would
    not be the stored table's."""
    from cleftchunk.frames import Cropped

    if isinstance(labels, Cropped) or not getattr(labels, "is_zarr", False) or getattr(labels, "channel", None) is not None:
        return None
    container = str(labels.container).rstrip("/")
    return f"{container}/{labels.inner}{SUFFIX}" if labels.inner else f"{container}{SUFFIX}"


def _split(spec: str) -> tuple[str, str | None]:
    from cleftchunk.io.volumes import split_spec

    return split_spec(spec)


def cell_shape(labels: Any) -> tuple[int, ...]:
    from cleftchunk.run.chunks import unit_shape

    return tuple(min(int(c), int(s)) for c, s in zip(unit_shape(labels.array), labels.shape))


def resolve_annotated(labels: Any, annotated: str) -> str:
    if annotated not in ANNOTATED:
        raise CleftchunkError(f"annotated={annotated} is not one of {', '.join(ANNOTATED)}")
    if annotated != "auto":
        return annotated
    # any stage of cleftchunk (convert, segment, synth, threshold, predict) writes its output whole,
    # and says so in its provenance attribute (Zarr then stores no unit of fill value only)
    written = any(k.startswith("cleftchunk_") and isinstance(v, dict) for k, v in labels.attrs.items())
    return "whole" if written else "stored"


# -- counting ------------------------------------------------------------------------------------
def count_cells(read: Callable[[Roi], np.ndarray], kind: str, grid: ChunkGrid, cells: Any) -> np.ndarray:
    """Cleft voxels of each cell in ``cells`` (indices of ``grid``), in order."""
    out = []
    for index in cells:
        codes = label_codes(read(grid.chunk_roi(tuple(index))), kind)
        out.append(int(np.count_nonzero(codes & CLEFT_BIT)))
    return np.asarray(out, np.int64)


def count_in_memory(labels: Any, kind: str, cell: Sequence[int]) -> CleftTable:
    """The table of a source without a store of units (HDF5, TIFF, numpy): every cell is
    annotated, read once (cell by cell, so memory stays one cell)."""
    shape = tuple(int(s) for s in labels.shape)
    grid = ChunkGrid(Roi.from_shape(shape), tuple(int(c) for c in cell))
    counts = count_cells(lambda r: np.asarray(labels[r.to_slices()]), kind, grid, grid.indices())
    return CleftTable(counts.reshape(grid.grid_shape), tuple(grid.chunk_shape), shape)


# -- the operation ---------------------------------------------------------------------------------
class CleftCounts(Operation):
    """Count the clefts of each cell of a Zarr label volume into its table (see the module docstring)."""

    stage = "cleft-counts"
    output_name = "a cleft count table"
    written_by = "counted"

    def __init__(self, labels: Any, kind: str, annotated: str = "auto", output: str | None = None):
        from cleftchunk.labels import canonical

        # one name per rule, so that the table convert wrote ("mask") is the one training ("nonzero") finds
        self.labels, self.kind = labels, {"mask": "main"}.get(canonical(kind), canonical(kind))
        self.annotated = resolve_annotated(labels, annotated)
        spec = output or table_spec(labels)
        if spec is None:
            raise CleftchunkError(f"{labels} is not a Zarr array: its cleft table is counted in memory, not stored")
        self.output, self.inputs = spec, (labels,)
        self.cell = cell_shape(labels)
        self.grid = ChunkGrid(Roi.from_shape(labels.shape), self.cell)
        cell_bytes = math.prod(self.cell) * labels.dtype.itemsize
        per_block = max(1, BLOCK_LABEL_BYTES // cell_bytes)
        self.table_chunks = _box_of(per_block, self.grid.grid_shape)
        self._listed: list[Coord] | None = None

    def identity(self) -> dict:
        return {"shape": list(self.labels.shape), "dtype": str(self.labels.dtype), "cell": list(self.cell),
                "kind": self.kind, "annotated": self.annotated, "table_chunks": list(self.table_chunks)}

    def base_layout(self, options: RunOptions | None = None) -> GridLayout:
        """Blocks of whole table chunks (one by default; ``--block-shape``: a multiple of them)."""
        from cleftchunk.run.options import block_shape_for

        unit = tuple(t * c for t, c in zip(self.table_chunks, self.cell))
        given = options.block_shape if options is not None else None
        return GridLayout(Roi.from_shape(self.labels.shape), block_shape_for(given, unit, self.labels.shape, unit))

    def listed(self) -> list[Coord]:
        if self._listed is None:
            self._listed = stored_unit_indices(self.labels.array)
        return self._listed

    def layout(self, options: RunOptions | None = None) -> Any:
        base = self.base_layout(options)
        if self.annotated == "whole":
            return base
        per_block = [b // c for b, c in zip(base.block_shape, self.cell)]
        blocks = sorted({tuple(i // t for i, t in zip(index, per_block)) for index in self.listed()})
        return SubsetLayout(base, blocks)

    def plan(self, options: RunOptions) -> Plan:
        layout = self.layout(options)
        cells = math.prod(self.grid.grid_shape)
        return Plan(f"count clefts of {self.labels} ({self.annotated} annotation) -> {self.output}", self.base_layout(options),
                    len(layout), cells * 8, math.prod(self.cell) * self.labels.dtype.itemsize * 2)

    # -- storage (a plain Zarr array; its state in its attributes) --------------------------------
    def _open(self, mode: str = "r") -> Any:
        import zarr

        from cleftchunk.io import stores

        container, inner = _split(self.output)
        return zarr.open_array(stores.zarr_store(container, mode), mode=mode, path=inner or "")

    def exists(self) -> bool:
        from cleftchunk.io.volumes import exists

        return exists(self.output)

    def read_state(self) -> dict | None:
        from cleftchunk.run.records import _zarr_missing

        try:
            attrs = dict(self._open().attrs)
        except (*_zarr_missing(), FileNotFoundError, KeyError):
            return None
        state = attrs.get(self.attribute)
        return state if isinstance(state, dict) and "identity_hash" in state else None

    def write_state(self, handle: Any, state: dict) -> None:
        handle.attrs[self.attribute] = state

    def create(self, state: dict, overwrite: bool) -> Any:
        import zarr

        from cleftchunk.io import stores

        container, inner = _split(self.output)
        attrs = {self.attribute: state, "cell": list(self.cell), "annotated": self.annotated}
        store = stores.zarr_store(container, "a")
        if inner is None:
            return zarr.create_array(store, shape=self.grid.grid_shape, chunks=self.table_chunks, dtype="int64",
                                     fill_value=NOT_ANNOTATED, attributes=attrs, overwrite=True)
        return zarr.open_group(store, mode="a").create_array(inner, shape=self.grid.grid_shape, chunks=self.table_chunks,
                                                              dtype="int64", fill_value=NOT_ANNOTATED, attributes=attrs,
                                                              overwrite=True)

    def reopen(self) -> Any:
        return self._open("r+")

    def record_path(self):
        from cleftchunk.run.records import record_path_beside

        return record_path_beside(*_split(self.output), self.stage)

    def guard(self, log):
        from cleftchunk.io.outputs import VolumeOperation

        return VolumeOperation.guard(self, log)  # the overlap check and the writer lock of volumes

    def execute(self, running: Running, handle: Any) -> Any:
        stored = None if self.annotated == "whole" else frozenset(self.listed())
        process = functools.partial(_count_block, self.labels, self.kind, self.cell, stored, handle)
        return running.run(BlockwiseTask(self.stage, self.layout(running.options), process), recorded=True)


def _box_of(cells: int, grid: Sequence[int]) -> tuple[int, ...]:
    """A box of at most ``cells`` cells, filling x, then y, then z (C order reads)."""
    out = []
    left = max(1, cells)
    for n in reversed(grid):
        take = max(1, min(int(n), left))
        out.append(take)
        left = max(1, left // take)
    return tuple(reversed(out))


def _count_block(labels: Any, kind: str, cell: Sequence[int], stored: frozenset | None, table: Any, block: Any,
                 _prepared: Any = None) -> dict:
    """Count the cells of one block (whole table chunks) and write its part of the table."""
    grid = ChunkGrid(Roi.from_shape(labels.shape), tuple(cell))
    first = tuple(b // c for b, c in zip(block.write_roi.begin, cell))
    last = tuple(min(n, -(-e // c)) for e, c, n in zip(block.write_roi.end, cell, grid.grid_shape))
    out = np.full(tuple(l - f for f, l in zip(first, last)), NOT_ANNOTATED, np.int64)
    cells = [i for i in itertools.product(*(range(f, l) for f, l in zip(first, last))) if stored is None or i in stored]
    counts = count_cells(lambda r: np.asarray(labels[r.to_slices()]), kind, grid, cells)
    for index, n in zip(cells, counts):
        out[tuple(i - f for i, f in zip(index, first))] = n
    table[tuple(slice(f, l) for f, l in zip(first, last))] = out
    return {"cells": len(cells), "clefts": int(counts.sum())}


# -- using tables ----------------------------------------------------------------------------------
def load_table(spec: str, shape: Sequence[int]) -> CleftTable:
    """A stored table, reading only the table chunks its store holds (the rest is unannotated)."""
    import zarr

    from cleftchunk.io import stores

    container, inner = _split(spec)
    array = zarr.open_array(stores.zarr_store(container, "r"), mode="r", path=inner or "")
    counts = np.full(array.shape, NOT_ANNOTATED, np.int64)
    chunks = tuple(int(c) for c in array.chunks)
    for index in stored_unit_indices(array):
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
        counts[box] = array[box]
    return CleftTable(counts, tuple(int(c) for c in array.attrs["cell"]), tuple(int(s) for s in shape))


def write_cleft_table(labels: Any, kind: str = "auto", annotated: str = "auto", run: RunOptions | None = None,
                      log: Any = None, client: Any = None) -> "CleftCounts | None":
    """Count the clefts of the Zarr label volume ``labels`` (a spec or Volume) into its table,
    block-wise, unless a complete table of these parameters is there already (one of other
    parameters is derived data, replaced). ``kind``: what the labels hold (labels.py; auto: as
    every stage decides it). The operation (None for a dry run, and for labels that are not Zarr)."""
    from cleftchunk.io.volumes import Volume, open_volume
    from cleftchunk.labels import resolve_label_kind

    volume = labels if isinstance(labels, Volume) else open_volume(labels)
    if table_spec(volume) is None:
        return None
    op = CleftCounts(volume, resolve_label_kind(volume, kind, scan=False) or "main", annotated)
    run = run or RunOptions()
    if run.dry_run:
        run_operation(op, run, log)  # the plan, in words
        return None
    present = op.exists()
    state = op.read_state() if present else None
    digest = op.full_identity()[1]
    if not run.overwrite and state is not None and state.get("identity_hash") == digest and state.get("complete"):
        return op
    if present and state is None:
        raise CleftchunkError(f"{op.output} exists and is not a cleft count table: move it away, the table of {volume} goes there")
    stale = state is not None and state.get("identity_hash") != digest
    run_operation(op, run.but(overwrite=run.overwrite or stale), log or (lambda message: None), client)
    return op


def cleft_table(labels: Any, kind: str, cell: Sequence[int], annotated: str = "auto", run: RunOptions | None = None,
                log: Any = None) -> CleftTable:
    """The table of ``labels`` for training: the stored one when it matches, else built (and
    stored beside Zarr labels; counted in memory, in cells of ``cell``, for other sources)."""
    if table_spec(labels) is None:
        return count_in_memory(labels, kind, cell)
    if not writable_beside(labels):
        return count_unstored(CleftCounts(labels, kind, annotated), log)
    from cleftchunk.io import stores

    try:
        op = write_cleft_table(labels, kind, annotated, (run or RunOptions()).but(dry_run=False), log)
    except stores.storage_errors() as e:  # a read-only bucket: the table cannot be kept, only used
        (log or _stderr)(f"cannot store the cleft table beside {labels} ({type(e).__name__}): counted for this run only")
        return count_unstored(CleftCounts(labels, kind, annotated), log)
    return load_table(op.output, labels.shape)


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def writable_beside(labels: Any) -> bool:
    """Whether a table can be written beside local labels (object stores: tried, see cleft_table)."""
    import os
    from pathlib import Path

    from cleftchunk.io import stores

    if stores.is_url(labels.container):
        return True
    container = Path(str(labels.container))
    return os.access(container, os.W_OK) and os.access(container.parent, os.W_OK)


def count_unstored(op: "CleftCounts", log: Any = None) -> CleftTable:
    """The table ``op`` would store, counted in this process and kept in memory only (labels on a
    store this user cannot write): the same blocks (listed units only), the same counts."""
    (log or _stderr)(f"{op.labels} is read-only here: its cleft table is counted for this run only (not stored)")
    counts = np.full(op.grid.grid_shape, NOT_ANNOTATED, np.int64)
    stored = None if op.annotated == "whole" else frozenset(op.listed())
    for block in op.layout().blocks():
        _count_block(op.labels, op.kind, op.cell, stored, counts, block)
    return CleftTable(counts, op.cell, tuple(op.labels.shape))


def count_written_labels(volume: Any, running: Running) -> None:
    """The hook of the stages that write labels (convert, segment), at the end of their label
    output: count its clefts into its table, on the same client. Counted afresh (the labels were
    just written, so a table already there may be stale); nothing for volumes that hold no labels."""
    from cleftchunk.labels import KIND_ATTRIBUTE

    kind = volume.attrs.get(KIND_ATTRIBUTE)
    if kind in ("ids", "main", "mask"):
        write_cleft_table(volume, kind, "whole", running.options.but(overwrite=True, dry_run=False, block_shape=None), running.log, running.client)
