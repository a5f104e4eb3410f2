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
3. relabel each block through a lookup table and write it.

Why pass 2 sees every connection: two neighbouring voxels in different blocks differ by at most one
voxel per axis, and along some axis ``a`` their blocks differ, so they lie on the two planes either
side of a block boundary along ``a``. The seam of block A along ``a`` (A's last plane and the next
plane, spanning A's extent grown by one voxel at the high end of the other axes) contains them when
A is the block holding (boundary - 1, min of the two positions on the other axes): the larger
position on those axes is at most one beyond A's end. Every voxel of a seam lies on a face plane
(along ``a``) of one of the up to eight blocks it meets, which is why pass 1 keeps only faces.

Final ids are 1..K ordered by each component's first voxel in C order (the smallest linear index
over the component), computed from the per-block tables: the result does not depend on the block
shape or the worker count, byte for byte. Memory: one block per task, tables the size of the number
of components, and the labelled face voxels of the blocks whose seams are still pending.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import writes_output
from cleftchunk.labels import DEFAULT_THRESHOLD, KIND_ATTRIBUTE, cleft_mask, resolve_label_kind
from cleftchunk.geometry import Roi, blocks
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import DEFAULT_CHUNKS, Volume, create_like, exists, open_volume
from cleftchunk.run.layout import GridLayout

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


def label_block_tables(source: Volume, kind: str, threshold: float, number: int, roi: Roi, shape: tuple, connectivity: int):
    """Pass 1 for one block: its tables and its six face planes of local labels."""
    labels, n = _label_block(source, kind, threshold, roi, connectivity)
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
    worker processes. ``dry_run``: log the plan and return None, creating nothing.
    ``threshold``/``min_size`` left as None: the operating point ``predict`` recorded from the
    checkpoint (its ``postprocess`` attribute), else DEFAULT_THRESHOLD and 0."""
    source = as_volume(pred)
    kind = resolve_label_kind(source, kind)
    threshold, min_size = default_postprocess(source, threshold, min_size)
    if min_size < 0:
        raise CleftchunkError(f"--min-size {min_size} is negative: give a number of voxels >= 0")
    structure(connectivity)  # refuse a bad connectivity before any work
    runner = Runner(workers, progress, scheduler, processes)
    total = Roi.from_shape(source.shape)
    chunks = tuple(int(c) for c in (chunks or DEFAULT_CHUNKS))
    if len(chunks) != 3 or min(chunks) <= 0:
        raise CleftchunkError(f"chunk shape {chunks} must be three positive extents (z, y, x)")
    chunks = tuple(min(c, s) for c, s in zip(chunks, source.shape))
    block_shape = aligned_block_shape(block_shape, chunks, source.shape)
    if dry_run:
        layout = GridLayout(total, block_shape)
        # per block: labels (int32) and the input, plus the uint64 ids written; tasks: label,
        # up to 3 seams and relabel per block
        memory = math.prod(block_shape) * (source.dtype.itemsize + 4 + 8)
        log(runner.describe("segment", layout, 5 * len(layout), 8 * total.size, memory))
        return None
    plan = blocks(total, block_shape)
    target = _create_output(out, source, chunks, overwrite, threshold, min_size, connectivity, kind)
    with runner:
        return _segment(source, kind, threshold, min_size, connectivity, plan, total, target, runner)


def _segment(source, kind, threshold, min_size, connectivity, plan, total, target, runner) -> SegmentResult:
    tables = _equivalences_and_tables(source, kind, threshold, plan, total, connectivity, runner)
    block_tables, pairs = tables
    offsets = np.cumsum([0] + [t.count for t in block_tables])
    sizes = np.concatenate([t.sizes for t in block_tables] + [np.zeros(0, np.int64)])
    first = np.concatenate([t.first for t in block_tables] + [np.zeros(0, np.int64)])
    component = _components(pairs, offsets)
    n_comp = int(component.max()) + 1 if component.size else 0
    comp_sizes = np.bincount(component, weights=sizes, minlength=n_comp).astype(np.int64)
    comp_first = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(comp_first, component, first)
    comp_ids = canonical_ids(comp_sizes, comp_first, min_size)
    lut = comp_ids[component]

    _relabel_all(source, kind, threshold, plan, connectivity, offsets, lut, target, runner)
    target.array.attrs[COMPLETE_ATTRIBUTE] = True
    kept = comp_sizes >= max(min_size, 1)
    return SegmentResult(int(kept.sum()), int((~kept).sum()), int(comp_sizes[kept].sum()), len(plan), threshold, min_size)


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


def _create_output(out, source, chunks, overwrite, threshold, min_size, connectivity, kind) -> Volume:
    """Create the output; an unfinished output of an earlier run is redone without --overwrite."""
    if not overwrite and exists(out) and _is_unfinished(out):
        overwrite = True
    params = {"threshold": threshold, "min_size": min_size, "connectivity": connectivity, "input_kind": kind}
    return create_like(
        out,
        source,
        np.uint64,
        chunks=chunks,
        fill_value=int(CREMI_BACKGROUND),
        attrs={KIND_ATTRIBUTE: "ids", COMPLETE_ATTRIBUTE: False, "segment": params, "source": source.spec},
        overwrite=overwrite,
    )


def _is_unfinished(spec: str) -> bool:
    try:
        attrs = dict(open_volume(spec).array.attrs)
    except CleftchunkError:
        return False
    return attrs.get(KIND_ATTRIBUTE) == "ids" and attrs.get(COMPLETE_ATTRIBUTE) is False


@dataclass
class Runner:
    """How block tasks run: ``workers`` Dask threads of this process (one: synchronous), or the
    Dask cluster at ``scheduler``, or (``processes``) a local cluster of ``workers`` worker
    processes; with a progress bar or not. Use it as a context manager: a cluster is connected
    (or started) once for all the passes of a command, and closed after."""

    workers: int | None = None
    progress: bool = False
    scheduler: str | None = None
    processes: bool = False
    _client: object = field(default=None, repr=False)
    _session: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise CleftchunkError(f"--workers {self.workers} must be at least 1")

    @property
    def distributed(self) -> bool:
        return bool(self.scheduler or self.processes)

    def __enter__(self) -> "Runner":
        if self.distributed:
            from cleftchunk.run.cluster import ClusterSpec, dask_client

            self._session = dask_client(ClusterSpec(workers=self.workers or 1, scheduler=self.scheduler, cores=self.workers))
            self._client = self._session.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._session is not None:
            self._session.__exit__(*exc)
            self._session = self._client = None

    def compute(self, tasks: list, what: str = "") -> list:
        import contextlib
        import sys

        import dask
        from dask.diagnostics import ProgressBar

        if not tasks:
            return []
        if self.progress:
            print(what, file=sys.stderr, flush=True)
        if self._client is not None:
            return list(self._client.gather(self._client.compute(tasks)))
        options = {"scheduler": "synchronous"} if self.workers == 1 else {"scheduler": "threads", "num_workers": self.workers}
        bar = ProgressBar(out=sys.stderr) if self.progress else contextlib.nullcontext()
        with bar:
            return list(dask.compute(*tasks, **options))

    def describe(self, what: str, layout, tasks: int, output_bytes: int, memory: int) -> str:
        """The --dry-run text of a block-wise pass (nothing is run, nothing created)."""
        where = f"the cluster at {self.scheduler}" if self.scheduler else (
            f"{self.workers or 1} local worker processes" if self.processes else f"{self.workers or 'one per core'} threads of this process")
        return "\n".join([
            f"plan: {what}: {len(layout)} blocks of {layout.block_shape} over {layout.roi} on {where}",
            f"  tasks: about {tasks}",
            f"  output: {output_bytes / 2**20:.1f} MiB before compression",
            f"  memory per worker thread: about {memory / 2**20:.1f} MiB",
            "  nothing was run and nothing was created (--dry-run)",
        ])


def _equivalences_and_tables(source, kind, threshold, plan, total, connectivity, runner: Runner):
    from dask import delayed

    shape = total.shape
    labelled = [
        delayed(label_block_tables, nout=2, pure=True)(source, kind, threshold, i, b.write_roi, shape, connectivity)
        for i, b in enumerate(plan)
    ]
    by_index = {b.index: i for i, b in enumerate(plan)}
    seams = []
    for i, b in enumerate(plan):
        for axis in range(3):
            seam = seam_roi(b.write_roi, axis, total)
            if seam is None:
                continue
            pieces = []
            for delta in itertools.product((0, 1), repeat=3):
                j = by_index.get(tuple(k + d for k, d in zip(b.index, delta)))
                if j is None:
                    continue
                side = "low" if delta[axis] else "high"
                pieces.append([j, plan[j].write_roi, labelled[j][1][(axis, side)]])
            seams.append(delayed(seam_pairs, pure=True)(axis, seam, pieces, connectivity))
    results = runner.compute([t[0] for t in labelled] + seams, "segment: labelling blocks and their seams")
    block_tables = results[: len(plan)]
    pairs = [p for p in results[len(plan) :] if p.size]
    return block_tables, (np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64))


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
def relabel_block(source, kind, threshold, roi: Roi, connectivity, lut_part: np.ndarray, target: Volume) -> int:
    labels, n = _label_block(source, kind, threshold, roi, connectivity)
    if n != lut_part.size:
        raise RuntimeError(f"block {roi} labelled differently in two passes ({n} vs {lut_part.size} labels)")
    table = np.concatenate([np.array([CREMI_BACKGROUND], dtype=np.uint64), lut_part])
    target.array[roi.to_slices()] = table[labels]
    return n


def _relabel_all(source, kind, threshold, plan, connectivity, offsets, lut, target, runner: Runner) -> None:
    from dask import delayed

    tasks = [
        delayed(relabel_block, pure=True)(
            source, kind, threshold, b.write_roi, connectivity, lut[offsets[i] : offsets[i + 1]], target
        )
        for i, b in enumerate(plan)
    ]
    runner.compute(tasks, "segment: writing cleft ids")
