"""Cleft instances: binarize a prediction, then connected components block-wise.

What counts as a cleft voxel depends on the *kind* of volume (decided by :func:`cleftchunk.labels.resolve_kind`):

- ``ids``   CREMI cleft ids (uint64): every value but 0xFFFFFFFFFFFFFFFF is a cleft, 0 included;
- ``main``  PyTorch Connectomics labels (unsigned ints): 0 is background, anything else a cleft;
- ``mask``  0/1 masks (bool or integers): non-zero is a cleft;
- ``prob``  probabilities: uint8 (round(p*255)) >= threshold, or float in [0, 1] >= threshold/255.

Block-wise connected components (:func:`segment`), in three passes over blocks that tile the volume:

1. label every block alone (scipy.ndimage.label); keep per-block tables (size and first voxel of
   each local label) and the labelled voxels of the block's six face planes;
2. for every block boundary, compare the two label planes that touch across it and collect the
   pairs of local labels that are neighbours; connected components of this (small) equivalence
   graph are the global components;
3. relabel each block through a lookup table and write it; each block written is recorded in a
   completion record, so an interrupted run resumes without rewriting them.

Each pass is a :class:`~cleftchunk.run.executor.BlockwiseTask` run by the one executor
(threads of this process, local worker processes, or an existing Dask scheduler).

Why pass 2 sees every connection: two neighbouring voxels in different blocks differ by at most one
voxel per axis, and along some axis ``a`` their blocks differ, so they lie on the two planes either
side of a block boundary along ``a``. The seam of block A along ``a`` (A's last plane and the next
plane, spanning A's extent grown by one voxel at the high end of the other axes) contains them when
A is the block holding (boundary - 1, min of the two positions on the other axes): the larger
position on those axes is at most one beyond A's end. Every voxel of a seam lies on a face plane
(along ``a``) of one of the up to eight blocks it meets, which is why pass 1 keeps only faces.

Final ids are 1..K ordered by each component's first voxel in C order (the smallest linear index
over the component), computed from the per-block tables: the result does not depend on the block
shape or the worker count, byte for byte. Memory: one block per task on the workers; on the
client, tables the size of the number of components, and the labelled voxels of every block's
faces from pass 1 until pass 2 is over (clefts are sparse, so this is a small fraction of the face
voxels; a cleft-dense terabyte would need the faces spilled to a scratch folder instead).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import writes_output
from cleftchunk.labels import DEFAULT_THRESHOLD, KIND_ATTRIBUTE, cleft_mask, resolve_label_kind
from cleftchunk.geometry import Roi
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import DEFAULT_CHUNKS, Volume, create_like, exists, open_volume, split_spec
from cleftchunk.run.executor import BlockwiseTask, run_blockwise
from cleftchunk.run.layout import GridLayout
from cleftchunk.run.local import block_client, check_workers, describe_plan, where
from cleftchunk.run.records import BlockRecord, identity_hash, record_path_beside, remove_record

#: Blocks of 32 x 512 x 512 voxels: ~100 MiB of labels and output per task.
DEFAULT_BLOCK_FACTOR = (2, 2, 2)
#: Local labels are packed with their block's number into one uint64: block << 32 | label.
_LABEL_BITS = 32


# -- what is a cleft voxel -----------------------------------------------------------------------
def as_volume(source: Volume | str, voxel_size: Sequence[float] | None = None) -> Volume:
    if isinstance(source, Volume):
        return source
    return open_volume(source, voxel_size=voxel_size)


# -- connectivity --------------------------------------------------------------------------------
def structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    if connectivity == 6:
        return ndimage.generate_binary_structure(3, 1)
    if connectivity == 26:
        return ndimage.generate_binary_structure(3, 3)
    raise CleftchunkError(f"connectivity {connectivity} is not supported: use 6 or 26")


def connected_components_reference(mask: np.ndarray, connectivity: int = 26, min_size: int = 0) -> np.ndarray:
    """Whole-array components with the same canonical ids as :func:`segment` (for tests/benchmarks)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=structure(connectivity))
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    first = np.full(n, flat.size, dtype=np.int64)
    nonzero = np.flatnonzero(flat)
    np.minimum.at(first, flat[nonzero] - 1, nonzero)
    lut = canonical_ids(sizes, first, min_size)
    return np.concatenate([[CREMI_BACKGROUND], lut])[labels]


def canonical_ids(sizes: np.ndarray, first: np.ndarray, min_size: int) -> np.ndarray:
    """Ids 1..K for components of at least ``min_size`` voxels, ordered by first voxel; others BG."""
    keep = np.flatnonzero(sizes >= max(min_size, 1))
    ids = np.full(sizes.shape, CREMI_BACKGROUND, dtype=np.uint64)
    ids[keep[np.argsort(first[keep], kind="stable")]] = np.arange(1, keep.size + 1, dtype=np.uint64)
    return ids


# -- pass 1: label each block -------------------------------------------------------------------
@dataclass(frozen=True)
class BlockTables:
    """What pass 1 keeps of a block: per local label (1..n), its size and first voxel."""

    number: int
    sizes: np.ndarray  # int64 (n,)
    first: np.ndarray  # int64 (n,): smallest global C-order linear index

    @property
    def count(self) -> int:
        return int(self.sizes.size)


def _label_block(source: Volume, kind: str, threshold: float, roi: Roi, connectivity: int):
    from scipy import ndimage

    mask = cleft_mask(source[roi.to_slices()], kind, threshold)
    labels, n = ndimage.label(mask, structure=structure(connectivity))
    return labels, n


def tables_and_faces(labels: np.ndarray, n: int, number: int, roi: Roi, shape: tuple):
    """The tables of a labelled block (local labels 1..n) and its six face planes."""
    flat = labels.ravel()
    nonzero = np.flatnonzero(flat)
    sizes = np.bincount(flat[nonzero], minlength=n + 1)[1:].astype(np.int64)
    # nonzero is sorted, so the first occurrence of each label is its first voxel in C order;
    # C order within a box is the same as C order in the whole volume.
    present, where = np.unique(flat[nonzero], return_index=True)
    local = np.array(np.unravel_index(nonzero[where], labels.shape)).T + np.array(roi.offset)
    first = np.zeros(n, dtype=np.int64)
    if present.size:
        first[present - 1] = np.ravel_multi_index(local.T, shape)
    faces = {
        (axis, side): SparsePlane.of(np.take(labels, 0 if side == "low" else -1, axis=axis))
        for axis in range(3)
        for side in ("low", "high")
    }
    return BlockTables(number, sizes, first), faces


@dataclass(frozen=True)
class SparsePlane:
    """A face plane of labels, kept as its labelled voxels only: clefts are sparse, so faces held
    between pass 1 and pass 2 cost memory in proportion to the cleft voxels on them."""

    shape: tuple
    where: np.ndarray  # flat indices of the labelled voxels
    labels: np.ndarray

    @classmethod
    def of(cls, plane: np.ndarray) -> "SparsePlane":
        where = np.flatnonzero(plane)
        return cls(plane.shape, where, plane.ravel()[where])

    def dense(self) -> np.ndarray:
        plane = np.zeros(self.shape, dtype=self.labels.dtype)
        plane.ravel()[self.where] = self.labels
        return plane


# -- pass 2: equivalences across block boundaries ----------------------------------------------------
def seam_pairs(axis: int, seam: Roi, pieces: list[tuple[int, Roi, "SparsePlane"]], connectivity: int) -> np.ndarray:
    """Pairs of packed labels (block << 32 | label) that touch across a seam.

    ``seam`` is two planes thick along ``axis``; ``pieces`` are (block number, block ROI, that
    block's face plane along ``axis`` on the seam's side) for every block the seam meets.
    """
    packed = np.zeros(seam.shape, dtype=np.uint64)
    for number, block_roi, face in pieces:
        part = block_roi.intersect(seam)
        if part.empty:
            continue
        face_roi = _drop_axis(block_roi, axis)
        cut = face.dense()[_drop_axis(part, axis).to_slices(face_roi.offset)]
        values = cut.astype(np.uint64)
        values[cut != 0] |= np.uint64(number) << np.uint64(_LABEL_BITS)
        packed[part.to_slices(seam.offset)] = np.expand_dims(values, axis)
    before = np.moveaxis(packed, axis, 0)[0]
    after = np.moveaxis(packed, axis, 0)[1]
    shifts = [(0, 0)] if connectivity == 6 else [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
    found = [_touching(before, after, shift) for shift in shifts]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.uint64)
    return np.unique(pairs, axis=0) if pairs.size else pairs


def _drop_axis(roi: Roi, axis: int) -> Roi:
    return Roi(roi.offset[:axis] + roi.offset[axis + 1 :], roi.shape[:axis] + roi.shape[axis + 1 :])


def _touching(before: np.ndarray, after: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """Pairs (before[p], after[p + shift]) where both are labelled."""
    src, dst = [], []
    for s, n in zip(shift, before.shape):
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    a, b = before[tuple(src)], after[tuple(dst)]
    both = (a != 0) & (b != 0)
    return np.stack([a[both], b[both]], axis=1)


def seam_roi(block_roi: Roi, axis: int, total: Roi) -> Roi | None:
    """The seam after ``block_roi`` along ``axis``, or None at the end of the volume."""
    if block_roi.end[axis] >= total.end[axis]:
        return None
    before = [0, 0, 0]
    after = [1, 1, 1]
    before[axis] = -(block_roi.shape[axis] - 1)
    return block_roi.grow(before, after).intersect(total)


# -- the block-wise driver ------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentResult:
    components: int  # kept (ids 1..components)
    removed: int  # smaller than min_size
    voxels: int  # cleft voxels kept
    blocks: int
    threshold: float = DEFAULT_THRESHOLD  # as used (given, or recorded by predict)
    min_size: int = 0
    already_done: int = 0  # blocks an interrupted run had written (resumed, not redone)


@writes_output("segment", "out", ("pred",))
def segment(
    pred: Volume | str,
    out: str,
    threshold: float | None = None,
    min_size: int | None = None,
    connectivity: int = 26,
    kind: str = "auto",
    block_shape: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler: str | None = None,
    processes: bool = False,
    dry_run: bool = False,
    log=print,
) -> SegmentResult | None:
    """Write uint64 CREMI cleft ids of ``pred``'s connected components to ``out`` (a Zarr spec).

    Runs on ``workers`` threads, or the Dask cluster at ``scheduler``, or (``processes``) local
    worker processes, through the block-wise executor. ``dry_run``: log the plan and return None,
    creating nothing. An interrupted run resumes: its completion record (checked against a hash
    of the blocks and parameters) says which blocks are written; passes 1 and 2, which write
    nothing, run again. ``threshold``/``min_size`` left as None: the operating point ``predict``
    recorded from the checkpoint (its ``postprocess`` attribute), else DEFAULT_THRESHOLD and 0."""
    source = as_volume(pred)
    kind = resolve_label_kind(source, kind)
    threshold, min_size = default_postprocess(source, threshold, min_size)
    if min_size < 0:
        raise CleftchunkError(f"--min-size {min_size} is negative: give a number of voxels >= 0")
    structure(connectivity)  # refuse a bad connectivity before any work
    check_workers(workers)
    place = scheduler or ("processes" if processes else "threads")
    total = Roi.from_shape(source.shape)
    chunks = tuple(int(c) for c in (chunks or DEFAULT_CHUNKS))
    if len(chunks) != 3 or min(chunks) <= 0:
        raise CleftchunkError(f"chunk shape {chunks} must be three positive extents (z, y, x)")
    chunks = tuple(min(c, s) for c, s in zip(chunks, source.shape))
    layout = GridLayout(total, aligned_block_shape(block_shape, chunks, source.shape))
    if dry_run:
        # per block: labels (int32) and the input, plus the uint64 ids written; tasks: label,
        # seams and relabel per block
        memory = math.prod(layout.block_shape) * (source.dtype.itemsize + 4 + 8)
        log(describe_plan("segment", layout, where(workers, place), 3 * len(layout), 8 * total.size, memory))
        return None
    params = {"threshold": threshold, "min_size": min_size, "connectivity": connectivity, "input_kind": kind}
    identity = identity_hash("segment", 1, source.spec, list(source.shape), str(source.dtype), list(chunks),
                             list(layout.block_shape), params)
    target, record = _open_output(out, source, chunks, overwrite, params, layout, identity)
    with block_client(workers, place, announce=progress) as client:
        result = _segment(client, Labelling(source, kind, threshold, connectivity), min_size, layout, target, record, progress)
    target.array.attrs[COMPLETE_ATTRIBUTE] = True
    remove_record(record.path)
    return result


@dataclass(frozen=True)
class Labelling:
    """How every pass labels a block (picklable, shipped with the tasks)."""

    source: Volume
    kind: str
    threshold: float
    connectivity: int

    def label(self, roi: Roi):
        return _label_block(self.source, self.kind, self.threshold, roi, self.connectivity)


def _segment(client, labelling: Labelling, min_size, layout: GridLayout, target, record, progress) -> SegmentResult:
    tables, pairs = _label_and_seams(client, labelling, layout, progress)
    offsets = np.cumsum([0] + [t.count for t in tables])
    sizes = np.concatenate([t.sizes for t in tables] + [np.zeros(0, np.int64)])
    first = np.concatenate([t.first for t in tables] + [np.zeros(0, np.int64)])
    component = _components(pairs, offsets)
    n_comp = int(component.max()) + 1 if component.size else 0
    comp_sizes = np.bincount(component, weights=sizes, minlength=n_comp).astype(np.int64)
    comp_first = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(comp_first, component, first)
    lut = canonical_ids(comp_sizes, comp_first, min_size)[component]
    done = _relabel_all(client, labelling, layout, offsets, lut, target, record, progress)
    kept = comp_sizes >= max(min_size, 1)
    return SegmentResult(int(kept.sum()), int((~kept).sum()), int(comp_sizes[kept].sum()), len(layout), labelling.threshold, min_size, done)


COMPLETE_ATTRIBUTE = "complete"


def default_postprocess(source: Volume, threshold: float | None, min_size: int | None) -> tuple[float, int]:
    """Given values, else the prediction's recorded ``postprocess`` (predict's attribute), else defaults."""
    from cleftchunk.predict.params import ATTR

    recorded = dict(dict(source.array.attrs).get(ATTR, {}).get("postprocess") or {}) if hasattr(source, "array") else {}
    threshold = recorded.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
    min_size = recorded.get("min_size", 0) if min_size is None else min_size
    return float(threshold), int(min_size)


def aligned_block_shape(block_shape: Sequence[int] | None, chunks: Sequence[int], shape: Sequence[int]) -> tuple:
    """Blocks are whole output chunks (no two tasks write one chunk); round up to a multiple."""
    if block_shape is None:
        block_shape = tuple(c * f for c, f in zip(chunks, DEFAULT_BLOCK_FACTOR))
    block_shape = tuple(int(b) for b in block_shape)
    if len(block_shape) != 3 or any(b <= 0 for b in block_shape):
        raise CleftchunkError(f"block shape {block_shape} must be three positive extents (z, y, x)")
    rounded = tuple(c * math.ceil(b / c) for b, c in zip(block_shape, chunks))
    return tuple(min(r, c * math.ceil(s / c)) for r, c, s in zip(rounded, chunks, shape))


def _open_output(out, source, chunks, overwrite, params, layout, identity) -> tuple[Volume, BlockRecord]:
    """The output and its completion record. An unfinished output of an earlier run resumes when
    its record has this run's identity, else is redone (without --overwrite: it is ours)."""
    path = record_path_beside(*split_spec(out), "segment")
    if not overwrite and exists(out) and _is_unfinished(out):
        record, trusted = BlockRecord.open(path, len(layout), identity)
        if trusted:
            return open_volume(out, mode="r+"), record
        overwrite = True
    target = create_like(
        out,
        source,
        np.uint64,
        chunks=chunks,
        fill_value=int(CREMI_BACKGROUND),
        attrs={KIND_ATTRIBUTE: "ids", COMPLETE_ATTRIBUTE: False, "segment": params, "source": source.spec},
        overwrite=overwrite,
    )
    return target, BlockRecord.open(path, len(layout), identity, fresh=True)[0]


def _is_unfinished(spec: str) -> bool:
    try:
        attrs = dict(open_volume(spec).array.attrs)
    except CleftchunkError:
        return False
    return attrs.get(KIND_ATTRIBUTE) == "ids" and attrs.get(COMPLETE_ATTRIBUTE) is False


# -- passes 1 and 2 on the executor ----------------------------------------------------------------
def _label_task(labelling: Labelling, shape: tuple, number_of, block, _prepared=None):
    labels, n = labelling.label(block.write_roi)
    return tables_and_faces(labels, n, number_of(block.index), block.write_roi, shape)


@dataclass(frozen=True)
class SeamBlock:
    """Pass 2's unit of work: a block's (up to three) seams with the faces of the blocks they meet."""

    index: tuple
    write_roi: Roi
    seams: tuple  # (axis, seam ROI, [(block number, block ROI, face), ...])


@dataclass
class _SeamLayout:
    """The blocks whose seams may join labels (a block or a neighbour has a labelled face)."""

    base: GridLayout
    indices: list
    faces: dict

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, index) -> int:
        return self.base.order(index)

    def blocks(self):
        return (self.block(index) for index in self.indices)

    def block(self, index) -> SeamBlock:
        roi = self.base.block(index).write_roi
        seams = []
        for axis in range(3):
            seam = seam_roi(roi, axis, self.base.roi)
            if seam is None:
                continue
            pieces = []
            for delta in itertools.product((0, 1), repeat=3):
                other = tuple(k + d for k, d in zip(index, delta))
                if other in self.faces:
                    side = "low" if delta[axis] else "high"
                    pieces.append((self.base.order(other), self.base.block(other).write_roi, self.faces[other][(axis, side)]))
            seams.append((axis, seam, pieces))
        return SeamBlock(index, roi, tuple(seams))


def _seam_task(connectivity: int, block: SeamBlock, _prepared=None) -> np.ndarray:
    found = [seam_pairs(axis, seam, pieces, connectivity) for axis, seam, pieces in block.seams]
    found = [p for p in found if p.size]
    return np.concatenate(found) if found else np.zeros((0, 2), np.uint64)


def _label_and_seams(client, labelling: Labelling, layout: GridLayout, progress: bool):
    """Pass 1 (tables and faces of every block, kept by the client: faces hold only labelled
    voxels) and pass 2 (pairs across seams), each one run of the executor."""
    tables, faces = [None] * len(layout), {}

    def keep(block, result):
        table, block_faces = result
        tables[table.number] = table
        if any(face.where.size for face in block_faces.values()):
            faces[block.index] = block_faces

    label = functools.partial(_label_task, labelling, layout.roi.shape, layout.order)
    _run(client, BlockwiseTask("segment-label", layout, label, collect=keep), progress)
    neighbours = {tuple(k - d for k, d in zip(index, delta)) for index in faces for delta in itertools.product((0, 1), repeat=3)}
    seams = _SeamLayout(layout, sorted(i for i in neighbours if min(i) >= 0), faces)
    pairs = []
    _run(client, BlockwiseTask("segment-seams", seams, functools.partial(_seam_task, labelling.connectivity),
                               collect=lambda block, found: pairs.append(found) if found.size else None), progress)
    return tables, (np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64))


def _run(client, task: BlockwiseTask, progress: bool):
    return raise_if_failed(run_blockwise(client, task, progress=progress), task.name)


def raise_if_failed(report, name: str):
    """A pass with failed blocks stops the command (the next pass needs every block's result)."""
    if report.failed:
        roi, error = report.failed[0]
        raise CleftchunkError(
            f"{len(report.failed)} of {report.blocks} blocks of {name} failed (first: {roi}: {error}): "
            "fix the cause and re-run the same command (written blocks are kept)"
        )
    return report


def _components(pairs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Global component of every (block, local label), by graph components of the pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = int(offsets[-1])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    block = (pairs >> np.uint64(_LABEL_BITS)).astype(np.int64)
    local = (pairs & np.uint64((1 << _LABEL_BITS) - 1)).astype(np.int64)
    dense = offsets[block] + local - 1
    graph = coo_matrix((np.ones(len(dense), np.int8), (dense[:, 0], dense[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return component.astype(np.int64)


# -- pass 3: relabel and write ---------------------------------------------------------------------
def relabel_block(labelling: Labelling, roi: Roi, lut_part: np.ndarray, target: Volume) -> int:
    """Write the final ids of one block. A block without labels writes nothing: its output chunks
    are the fill value (background) already, and Zarr does not store chunks of the fill value."""
    if lut_part.size == 0:
        return 0
    labels, n = labelling.label(roi)
    if n != lut_part.size:
        raise RuntimeError(f"block {roi} labelled differently in two passes ({n} vs {lut_part.size} labels)")
    table = np.concatenate([np.array([CREMI_BACKGROUND], dtype=np.uint64), lut_part])
    target.array[roi.to_slices()] = table[labels]
    return n


def _relabel_task(labelling: Labelling, target: Volume, number_of, block, _prepared, lut: np.ndarray, offsets: np.ndarray) -> dict:
    number = number_of(block.index)
    return {"labels": relabel_block(labelling, block.write_roi, lut[offsets[number] : offsets[number + 1]], target)}


def _relabel_all(client, labelling: Labelling, layout: GridLayout, offsets, lut, target, record: BlockRecord, progress: bool) -> int:
    """Pass 3: the executor records each block done once its ids are written; returns how many
    blocks an earlier, interrupted run had written already."""
    shared = tuple(client.scatter(a, broadcast=True, hash=False) for a in (lut, offsets))
    task = BlockwiseTask(
        "segment-write", layout, functools.partial(_relabel_task, labelling, target, layout.order),
        record=record, process_args=shared,
    )
    return _run(client, task, progress).already_done
