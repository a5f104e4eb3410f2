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

Segment is an :class:`~cleftchunk.run.operation.Operation`: :func:`~cleftchunk.run.operation.run_operation`
owns its lifecycle (dry run, lock, create / resume / refuse, the completion record of pass 3,
"complete"), and each pass is a :class:`~cleftchunk.run.executor.BlockwiseTask` run by the one
executor on the place :class:`~cleftchunk.run.options.RunOptions` chooses (threads of this
process, local worker processes, or an existing Dask scheduler). The pieces of passes 1 and 2
live in :mod:`cleftchunk.post.components`.

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
from cleftchunk.geometry import Roi
from cleftchunk.io.volumes import Volume, chunk_shape, open_volume
from cleftchunk.labels import CREMI_BACKGROUND, DEFAULT_THRESHOLD, KIND_ATTRIBUTE, cleft_mask, prob_scale, resolve_label_kind
from cleftchunk.post.components import (  # noqa: F401  (connected_components_reference: re-exported)
    SeamLayout,
    canonical_ids,
    components,
    connected_components_reference,
    seam_pairs_of,
    structure,
    tables_and_faces,
)
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout
from cleftchunk.io.outputs import VolumeOperation, create_image
from cleftchunk.run.operation import Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for

#: Blocks of 32 x 512 x 512 voxels: ~100 MiB of labels and output per task.
DEFAULT_BLOCK_FACTOR = (2, 2, 2)


def as_volume(source: Volume | str, voxel_size: Sequence[float] | None = None) -> Volume:
    if isinstance(source, Volume):
        return source
    return open_volume(source, voxel_size=voxel_size)


@dataclass(frozen=True)
class SegmentResult:
    components: int  # kept (ids 1..components)
    removed: int  # smaller than min_size
    voxels: int  # cleft voxels kept
    blocks: int
    threshold: float = DEFAULT_THRESHOLD  # as used (given, or recorded by predict)
    min_size: int = 0
    already_done: int = 0  # blocks an interrupted run had written (resumed, not redone)


def segment(
    pred: Volume | str,
    out: str,
    threshold: float | None = None,
    min_size: int | None = None,
    connectivity: int = 26,
    kind: str = "auto",
    chunks: Sequence[int] | None = None,
    run: RunOptions | None = None,
    log=print,
) -> SegmentResult | None:
    """Write uint64 CREMI cleft ids of ``pred``'s connected components to ``out`` (a Zarr spec).

    ``run`` says where and how (:class:`~cleftchunk.run.options.RunOptions`: workers, block
    shape, dry run, overwrite, progress). Returns None for a dry run (the plan is logged, nothing
    is created, no voxel read) and for an output already complete with these parameters. An
    interrupted run resumes: the completion record says which blocks pass 3 wrote; passes 1 and
    2, which write nothing, run again. An unfinished output of other parameters is refused naming
    them. ``threshold``/``min_size`` left as None: the operating point ``predict`` recorded from
    the checkpoint (its ``postprocess`` attribute), else DEFAULT_THRESHOLD and 0."""
    run = run or RunOptions()
    return run_operation(Segment(pred, out, threshold, min_size, connectivity, kind, chunks, read=not run.dry_run), run, log)


@dataclass(frozen=True)
class Labelling:
    """How every pass labels a block (picklable, shipped with the tasks)."""

    source: Volume
    kind: str
    threshold: float
    connectivity: int
    scale: float | None = None  # the stored value of probability 1 (prob_scale), read once, not per block

    def label(self, roi: Roi):
        from scipy import ndimage

        mask = cleft_mask(self.source[roi.to_slices()], self.kind, self.threshold, self.scale)
        return ndimage.label(mask, structure=structure(self.connectivity))


class Segment(VolumeOperation):
    """Connected components of ``pred``'s cleft voxels as CREMI ids (see the module docstring).
    ``read=False`` (a dry run): the kind is not decided from the values."""

    stage = "segment"

    def __init__(self, pred, out, threshold=None, min_size=None, connectivity=26, kind="auto", chunks=None, read=True):
        self.source = as_volume(pred)
        self.kind = resolve_label_kind(self.source, kind, read=read)
        self.threshold, self.min_size = default_postprocess(self.source, threshold, min_size)
        if self.min_size < 0:
            raise CleftchunkError(f"min_size={self.min_size} is negative: give a number of voxels >= 0")
        self.connectivity = int(connectivity)
        structure(self.connectivity)  # refuse a bad connectivity before any work
        self.chunks = chunk_shape(chunks, self.source.shape)
        self.output, self.inputs = str(out), (pred,)

    def params(self) -> dict:
        return {"threshold": self.threshold, "min_size": self.min_size, "connectivity": self.connectivity, "input_kind": self.kind}

    def identity(self) -> dict:
        source = self.source
        return {"input": source.spec, "shape": list(source.shape), "dtype": str(source.dtype), "chunks": list(self.chunks), **self.params()}

    def layout(self, options: RunOptions) -> GridLayout:
        default = tuple(c * f for c, f in zip(self.chunks, DEFAULT_BLOCK_FACTOR))
        return GridLayout(Roi.from_shape(self.source.shape), block_shape_for(options.block_shape, self.chunks, self.source.shape, default))

    def plan(self, options: RunOptions) -> Plan:
        layout = self.layout(options)
        # per block: labels (int32) and the input, plus the uint64 ids written; tasks: label,
        # seams and relabel per block
        memory = math.prod(layout.block_shape) * (self.source.dtype.itemsize + 4 + 8)
        kind = self.kind or "decided when run, from sampled chunks of the input"
        return Plan(f"segment {self.source.spec} -> {self.output}", layout, 3 * len(layout), 8 * layout.roi.size, memory,
                    (f"  input kind: {kind}",))

    def create(self, state: dict, overwrite: bool) -> Volume:
        attrs = {KIND_ATTRIBUTE: "ids", "segment": self.params(), "source": self.source.spec}
        return create_image(self, self.source, np.uint64, self.chunks, state, overwrite, fill_value=int(CREMI_BACKGROUND), attrs=attrs)

    def execute(self, running: Running, handle: Volume) -> SegmentResult:
        layout = self.layout(running.options)
        labelling = Labelling(self.source, self.kind, self.threshold, self.connectivity, prob_scale(self.source))
        tables, pairs = _label_and_seams(running, labelling, layout)
        offsets = np.cumsum([0] + [t.count for t in tables])
        sizes = np.concatenate([t.sizes for t in tables] + [np.zeros(0, np.int64)])
        first = np.concatenate([t.first for t in tables] + [np.zeros(0, np.int64)])
        component = components(pairs, offsets)
        n_comp = int(component.max()) + 1 if component.size else 0
        comp_sizes = np.bincount(component, weights=sizes, minlength=n_comp).astype(np.int64)
        comp_first = np.full(n_comp, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(comp_first, component, first)
        lut = canonical_ids(comp_sizes, comp_first, self.min_size)[component]
        # pass 3, the one recorded: relabel each block and write it
        shared = tuple(running.client.scatter(a, broadcast=True, hash=False) for a in (lut, offsets))
        task = BlockwiseTask("segment-write", layout, functools.partial(_relabel_task, labelling, handle, layout.order),
                             process_args=shared)
        report = running.run(task, recorded=True)
        from cleftchunk.io.tables import count_written_labels

        count_written_labels(handle, running)  # its cleft table, for training (io/tables.py)
        kept = comp_sizes >= max(self.min_size, 1)
        return SegmentResult(int(kept.sum()), int((~kept).sum()), int(comp_sizes[kept].sum()), len(layout), self.threshold,
                             self.min_size, report.already_done)


def default_postprocess(source: Volume, threshold: float | None, min_size: int | None) -> tuple[float, int]:
    """Given values, else the prediction's recorded ``postprocess`` (predict's attribute), else defaults."""
    from cleftchunk.predict.params import ATTR

    recorded = dict(dict(source.array.attrs).get(ATTR, {}).get("postprocess") or {}) if hasattr(source, "array") else {}
    threshold = recorded.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
    min_size = recorded.get("min_size", 0) if min_size is None else min_size
    return float(threshold), int(min_size)


# -- passes 1 and 2 on the executor ----------------------------------------------------------------
def _label_task(labelling: Labelling, shape: tuple, number_of, block, _prepared=None):
    labels, n = labelling.label(block.write_roi)
    return tables_and_faces(labels, n, number_of(block.index), block.write_roi, shape)


def _label_and_seams(running: Running, labelling: Labelling, layout: GridLayout):
    """Pass 1 (tables and faces of every block, kept by the client: faces hold only labelled
    voxels) and pass 2 (pairs across seams), each one run of the executor."""
    tables, faces = [None] * len(layout), {}

    def keep(block, result):
        table, block_faces = result
        tables[table.number] = table
        if any(face.where.size for face in block_faces.values()):
            faces[block.index] = block_faces

    label = functools.partial(_label_task, labelling, layout.roi.shape, layout.order)
    running.run(BlockwiseTask("segment-label", layout, label, collect=keep))
    neighbours = {tuple(k - d for k, d in zip(index, delta)) for index in faces for delta in itertools.product((0, 1), repeat=3)}
    seams = SeamLayout(layout, sorted(i for i in neighbours if min(i) >= 0), faces)
    pairs = []
    running.run(BlockwiseTask("segment-seams", seams, functools.partial(seam_pairs_of, labelling.connectivity),
                              collect=lambda block, found: pairs.append(found) if found.size else None))
    return tables, (np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64))


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
