"""The pieces of block-wise connected components (see :mod:`cleftchunk.post.segment` for the
algorithm and why it is exact): the connectivity, the whole-array reference, canonical ids, the
per-block tables and faces of pass 1, the seams and equivalence pairs of pass 2, and the graph
components that join them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.run.layout import GridLayout

#: Local labels are packed with their block's number into one uint64: block << 32 | label.
_LABEL_BITS = 32


# -- connectivity --------------------------------------------------------------------------------
def structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    if connectivity == 6:
        return ndimage.generate_binary_structure(3, 1)
    if connectivity == 26:
        return ndimage.generate_binary_structure(3, 3)
    raise CleftchunkError(f"connectivity={connectivity} is not supported: use 6 or 26")


def connected_components_reference(mask: np.ndarray, connectivity: int = 26, min_size: int = 0) -> np.ndarray:
    """Whole-array components with the same canonical ids as :func:`cleftchunk.post.segment.segment`
    (for tests and benchmarks)."""
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


@dataclass(frozen=True)
class SeamBlock:
    """Pass 2's unit of work: a block's (up to three) seams with the faces of the blocks they meet."""

    index: tuple
    write_roi: Roi
    seams: tuple  # (axis, seam ROI, [(block number, block ROI, face), ...])


@dataclass
class SeamLayout:
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


def seam_pairs_of(connectivity: int, block: SeamBlock, _prepared=None) -> np.ndarray:
    """Pass 2's task: the pairs of packed labels that touch across a block's seams."""
    found = [seam_pairs(axis, seam, pieces, connectivity) for axis, seam, pieces in block.seams]
    found = [p for p in found if p.size]
    return np.concatenate(found) if found else np.zeros((0, 2), np.uint64)


def components(pairs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
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
