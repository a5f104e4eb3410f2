"""CREMI synaptic-cleft metrics, exact and block-wise.

Definitions (cremi_python ``Clefts.py``; see shared/reference/cremi-metrics.md): with I the invalid
ground-truth voxels (0xFFFFFFFFFFFFFFFE, CREMI ids only), P = predicted cleft voxels minus I,
Q = true cleft voxels minus I, r the voxel size (nm) and d_X(v) the Euclidean distance (nm) from v
to the nearest voxel of X (invalid voxels do not block distances):

- FP(θ) = |{v in P : d_Q(v) > θ}|, FN(θ) = |{v in Q : d_P(v) > θ}| (strict, θ = 200 nm default);
- ADGT = mean of d_Q over P, ADF = mean of d_P over Q, CREMI score = (ADGT + ADF) / 2;
- mean, std (population), max, median and count of both distance sets
  (``pred_to_gt``: d_Q over P, ``gt_to_pred``: d_P over Q);
- TP = |P| - FP, precision = TP / |P|, recall = (|Q| - FN) / |Q|, F1 = 2 TP / (2 TP + FP + FN).

Empty sets, reported explicitly rather than crashing (None is ``null`` in JSON):

- P empty: ``pred_to_gt`` has count 0 and None statistics, ADGT None, precision None;
- Q empty: ``gt_to_pred`` likewise, ADF None, recall None;
- P empty and Q not: every true voxel is infinitely far from the prediction: ``gt_to_pred`` mean,
  max, median = inf (std None), ADF = inf, FN = |Q|, CREMI score = inf, recall 0, F1 0;
- Q empty and P not: symmetrically ADGT = inf, FP = |P|, score inf, precision 0, F1 0;
- both empty: every distance statistic, the score, precision, recall and F1 are None; FP = FN = 0.
  A score of None means "nothing to score", not "perfect".

Frames (:mod:`cleftchunk.frames`): the ground truth is scored whole, against the part of the
prediction its frame covers (the same frame: all of it; a smaller ground truth, e.g. the labelled
region of a padded CREMI sample, placed by the offsets of both); different voxel sizes, or a
prediction that does not cover the ground truth, are refused (:func:`evaluated_region`).

Block-wise exactness (:func:`evaluate`). For each block B holding query voxels (P, to measure
d_Q; then Q, to measure d_P) the target mask is read in G = B grown by a halo (clipped to the
volume) and a KD-tree over its target voxels (sparse targets) or its feature transform (scipy,
with sampling = r; dense targets) gives, for each query voxel v, the nearest target *inside G*,
at distance d_G(v) >= d(v). Any target t outside G differs from v on some axis a by at least
m_a(v) voxels, the steps from v to just beyond G's face on that side (a face on the volume border
has no outside), so d(t, v) >= M(v) = min_a m_a(v) r_a. Hence d_G(v) <= M(v)
implies d(v) = d_G(v). The other voxels ("far" voxels, e.g. a prediction far from every true
cleft) are resolved exactly against the target voxels of other blocks: a first pass records the
bounding box of the targets of every block; the blocks not already inside G are visited in order
of a lower bound of the distance from the far voxels' bounding box to their target box, each
lowering the far voxels' best distance (nearest target by KD-tree, distance recomputed from the
integer offset), and the search stops when the next lower bound exceeds the largest best distance:
no target left can be closer. This holds however far the nearest cleft is; memory is one grown
block (or one target box) at a time.

Distances are always computed from integer offsets, exactly as scipy computes them from its feature
transform (((dz rz)² + (dy ry)²) + (dx rx)², then sqrt, in float64), so block-wise and whole-volume
distances agree to the bit up to ties between equally near targets.

The median needs the values: each block returns the table of its distinct distance values with
their counts (np.unique), and the tables are merged. Distances are norms of integer offsets, so
there are far fewer distinct values than voxels; the merged table is a sufficient statistic from
which count, mean, std, max, median and the θ counts are all exact (up to summation order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.frames import Frame, align
from cleftchunk.geometry import Roi
from cleftchunk.io.volumes import Volume
from cleftchunk.labels import CREMI_INVALID, DEFAULT_THRESHOLD, cleft_mask, prob_scale, resolve_label_kind
from cleftchunk.post.segment import as_volume
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout, SubsetLayout
from cleftchunk.run.operation import Operation, Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for
from cleftchunk.post.stats import STAT_KEYS, assemble, format_table, jsonable, merge_histograms  # noqa: F401  (re-exported)
from cleftchunk.post.stats import stats_from_histogram, stats_from_values, to_json  # noqa: F401  (re-exported)

THETA_NM = 200.0
DEFAULT_BLOCK_SHAPE = (32, 256, 256)
DIRECTIONS = ("pred_to_gt", "gt_to_pred")
#: Up to this fraction of target voxels in a grown block, a KD-tree over them finds nearest targets
#: faster than a whole-block EDT (20x at 0.3 %, measured on 38x306x306 blocks).
KDTREE_MAX_FRACTION = 0.02


# -- distances -----------------------------------------------------------------------------------
def offset_distances(offsets: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Lengths in nm of integer voxel offsets (n, 3), bit-identical to scipy's EDT formula."""
    scaled = offsets.astype(np.float64) * np.asarray(voxel_size, dtype=np.float64)
    squared = scaled * scaled
    return np.sqrt(squared[:, 0] + squared[:, 1] + squared[:, 2])


# -- the whole-volume reference ------------------------------------------------------------------
def cremi_metrics_reference(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    voxel_size: Sequence[float],
    theta: float = THETA_NM,
    invalid_mask: np.ndarray | None = None,
    gt_distances: np.ndarray | None = None,
) -> dict:
    """The definition on whole arrays with scipy's EDT (memory: ~40 bytes per voxel).

    ``gt_distances``: :func:`distances_to_gt` of the same ground truth, when several predictions
    are scored against it (an operating-point sweep): the EDT of the ground truth is then computed
    once, not once per prediction.
    """
    from scipy.ndimage import distance_transform_edt

    pred_mask = np.asarray(pred_mask, dtype=bool)
    gt_mask = np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise CleftchunkError(f"prediction shape {pred_mask.shape} differs from ground truth shape {gt_mask.shape}")
    invalid = np.zeros_like(gt_mask) if invalid_mask is None else np.asarray(invalid_mask, dtype=bool)
    p = pred_mask & ~invalid
    q = gt_mask & ~invalid
    sampling = tuple(float(v) for v in voxel_size)

    def distances_to(target: np.ndarray, query: np.ndarray) -> np.ndarray:
        if not target.any():
            return np.full(int(query.sum()), np.inf)
        return distance_transform_edt(~target, sampling=sampling)[query]

    d_q = (distances_to_gt(q, sampling) if gt_distances is None else gt_distances)[p]
    d_p = distances_to(p, q)
    inputs = {"shape": list(p.shape), "voxel_size": list(sampling), "theta_nm": float(theta), "invalid_voxels": int(invalid.sum())}
    return assemble(stats_from_values(d_q), stats_from_values(d_p), int((d_q > theta).sum()), int((d_p > theta).sum()), inputs)


def distances_to_gt(gt_mask: np.ndarray, voxel_size: Sequence[float], invalid_mask: np.ndarray | None = None) -> np.ndarray:
    """Every voxel's distance (nm) to the nearest valid ground-truth voxel (inf without any)."""
    from scipy.ndimage import distance_transform_edt

    q = np.asarray(gt_mask, dtype=bool)
    if invalid_mask is not None:
        q = q & ~np.asarray(invalid_mask, dtype=bool)
    if not q.any():
        return np.full(q.shape, np.inf)
    return distance_transform_edt(~q, sampling=tuple(float(v) for v in voxel_size))


# -- block-wise ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """The prediction and ground truth volumes, and how to read cleft voxels from each."""

    pred: Volume
    gt: Volume
    pred_kind: str
    gt_kind: str
    threshold: float
    pred_origin: tuple = (0, 0, 0)  # where the ground truth's first voxel lies in the prediction
    scales: tuple = (None, None)  # stored values of probability 1 (labels.prob_scale) of both

    def read(self, roi: Roi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P, Q and I (``roi`` local to the ground truth) as boolean arrays."""
        g = self.gt[roi.to_slices()]
        invalid = g == CREMI_INVALID if self.gt_kind == "ids" else np.zeros(g.shape, dtype=bool)
        p = cleft_mask(self.pred[roi.shift(self.pred_origin).to_slices()], self.pred_kind, self.threshold, self.scales[0]) & ~invalid
        q = cleft_mask(g, self.gt_kind, self.threshold, self.scales[1]) & ~invalid
        return p, q, invalid

    def sets(self, roi: Roi, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """(query, target) masks: P and Q for ``pred_to_gt``, Q and P for ``gt_to_pred``."""
        p, q, _ = self.read(roi)
        return (p, q) if direction == "pred_to_gt" else (q, p)


@dataclass(frozen=True)
class Census:
    """Pass 1 for one block: voxel counts and the bounding boxes of P and Q."""

    roi: Roi
    counts: dict = field(default_factory=dict)  # "pred_to_gt" -> |P|, "gt_to_pred" -> |Q|, "invalid"
    boxes: dict = field(default_factory=dict)  # same keys: bounding box of P / Q (None if empty)


def census(pair: Pair, roi: Roi) -> Census:
    p, q, invalid = pair.read(roi)
    counts = {"pred_to_gt": int(p.sum()), "gt_to_pred": int(q.sum()), "invalid": int(invalid.sum())}
    return Census(roi, counts, {"pred_to_gt": _bounding_box(p, roi), "gt_to_pred": _bounding_box(q, roi)})


def _bounding_box(mask: np.ndarray, roi: Roi) -> Roi | None:
    if not mask.any():
        return None
    begin, end = [], []
    for axis in range(mask.ndim):
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        begin.append(int(along[0]))
        end.append(int(along[-1]) + 1)
    return Roi.from_bounds(begin, end).shift(roi.offset)


def block_distances(
    pair: Pair, block: Roi, halo: Sequence[int], total: Roi, voxel_size: tuple, target_boxes: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Exact distances of the query voxels of ``block``, per direction, as (values, counts, far).

    ``target_boxes`` maps each direction to be measured to the target boxes of all blocks (rows of
    :func:`boxes_array`); both directions share one read of the grown block.
    """
    grown = block.grow(tuple(halo)).intersect(total)
    p, q, _ = pair.read(grown)
    out = {}
    for direction, boxes in target_boxes.items():
        query, target = (p, q) if direction == "pred_to_gt" else (q, p)
        coords = np.argwhere(query[block.relative_to(grown).to_slices()]) + np.array(block.offset)
        if len(coords):
            out[direction] = _distances(pair, direction, coords, target, grown, total, voxel_size, boxes)
    return out


def _distances(pair, direction, coords, target, grown, total, voxel_size, boxes) -> tuple[np.ndarray, np.ndarray, int]:
    best = np.full(len(coords), np.inf)
    if target.any():
        found = nearest_in(target, coords - np.array(grown.offset), voxel_size) + np.array(grown.offset)
        best = offset_distances(found - coords, voxel_size)
    far = best > outside_bound(coords, grown, total, voxel_size)
    if far.any():
        best[far] = nearest_far(pair, direction, coords[far], best[far], grown, boxes, voxel_size)
    values, counts = np.unique(best, return_counts=True)
    return values, counts, int(far.sum())


def nearest_in(target: np.ndarray, points: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """For each point (local voxel coordinates), the position of a nearest voxel of ``target``.

    Sparse targets: a KD-tree over the target voxels (scaled to nm); dense ones: scipy's feature
    transform. Both find an exact nearest target; they can only differ between equally near ones.
    """
    if np.count_nonzero(target) <= KDTREE_MAX_FRACTION * target.size:
        from scipy.spatial import cKDTree

        scale = np.asarray(voxel_size, dtype=np.float64)
        targets = np.argwhere(target)
        _, index = cKDTree(targets * scale).query(points * scale, k=1)
        return targets[index]
    from scipy.ndimage import distance_transform_edt

    features = distance_transform_edt(~target, sampling=voxel_size, return_distances=False, return_indices=True)
    return features[(slice(None),) + tuple(points.T)].T


def outside_bound(coords: np.ndarray, grown: Roi, total: Roi, voxel_size: Sequence[float]) -> np.ndarray:
    """A lower bound (nm) of the distance from each voxel to any voxel outside ``grown``."""
    steps_before = (coords - np.array(grown.begin) + 1).astype(np.float64)
    steps_after = (np.array(grown.end) - coords).astype(np.float64)
    steps_before[:, np.array(grown.begin) <= np.array(total.begin)] = np.inf  # nothing lies beyond
    steps_after[:, np.array(grown.end) >= np.array(total.end)] = np.inf
    nm = np.minimum(steps_before, steps_after) * np.asarray(voxel_size, dtype=np.float64)
    return nm.min(axis=1)


def boxes_array(boxes: list[Roi]) -> np.ndarray:
    """Boxes as rows (begin z, y, x, end z, y, x): one small array, cheap to ship to every task."""
    return np.array([b.begin + b.end for b in boxes], dtype=np.int64).reshape(-1, 6)


def box_gaps_nm(lo: np.ndarray, hi: np.ndarray, boxes: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Lower bounds (nm) of the distance from any voxel in [lo, hi] (inclusive) to any voxel of each box."""
    gaps = np.maximum(0, np.maximum(boxes[:, :3] - hi, lo - (boxes[:, 3:] - 1)))
    scaled = gaps * np.asarray(voxel_size, dtype=np.float64)
    return np.sqrt((scaled * scaled).sum(axis=1))


def nearest_far(
    pair: Pair, direction: str, coords: np.ndarray, best: np.ndarray, grown: Roi, target_boxes: np.ndarray, voxel_size
) -> np.ndarray:
    """Exact distances for voxels whose nearest target may lie outside ``grown`` (see module doc)."""
    from scipy.spatial import cKDTree

    inside = (target_boxes[:, :3] >= grown.begin).all(axis=1) & (target_boxes[:, 3:] <= grown.end).all(axis=1)
    candidates = target_boxes[~inside]  # boxes inside ``grown`` were in the EDT already
    gaps = box_gaps_nm(coords.min(axis=0), coords.max(axis=0), candidates, voxel_size)
    order = np.lexsort(tuple(candidates[:, a] for a in (2, 1, 0)) + (gaps,))  # by gap, then position
    scale = np.asarray(voxel_size, dtype=np.float64)
    best = best.copy()
    for i in order:
        if gaps[i] > best.max():
            break  # every remaining target is at least this far from every far voxel
        box = Roi.from_bounds(candidates[i, :3], candidates[i, 3:])
        _, target = pair.sets(box, direction)
        targets = np.argwhere(target) + np.array(box.offset)
        active = np.flatnonzero(best > gaps[i])  # the others cannot get closer in this box
        _, index = cKDTree(targets * scale).query(coords[active] * scale, k=1)
        best[active] = np.minimum(best[active], offset_distances(targets[index] - coords[active], voxel_size))
    return best


def common_voxel_size(pred: Volume, gt: Volume, voxel_size: Sequence[float] | None) -> tuple[float, ...]:
    """The explicit voxel size, else the metadata's (:func:`cleftchunk.frames.align` has checked
    that both agree), else an error."""
    if voxel_size is not None:
        vs = tuple(float(v) for v in voxel_size)
        if len(vs) != 3 or any(not (math.isfinite(v) and v > 0) for v in vs):
            raise CleftchunkError(f"voxel size {vs} must be three positive numbers (z, y, x) in nm")
        return vs
    known = [v for v in (pred, gt) if v.voxel_size_known]
    if not known:
        raise CleftchunkError(
            f"neither {pred.spec} nor {gt.spec} records a voxel size: pass --voxel-size Z,Y,X (e.g. 40,4,4 for CREMI)"
        )
    return tuple(float(v) for v in known[0].voxel_size)


def evaluate(
    pred: Volume | str,
    gt: Volume | str,
    theta: float = THETA_NM,
    threshold: float = DEFAULT_THRESHOLD,
    voxel_size: Sequence[float] | None = None,
    pred_kind: str = "auto",
    gt_kind: str = "auto",
    halo: Sequence[int] | None = None,
    run: RunOptions | None = None,
    log=print,
    ignore_frame: bool = False,
) -> dict | None:
    """The CREMI cleft metrics of ``pred`` against ``gt``, block-wise on the executor, exact.

    ``halo`` (voxels per axis, default ceil(θ / voxel size)) only trades reading and nearest-target
    work in the grown block against the far-voxel search; the result does not depend on it, nor
    on the block shape or the workers. The ground truth is scored whole, on the part of the
    prediction its frame covers (:func:`evaluated_region`); ``ignore_frame``: voxel for voxel from
    the first voxels, whatever the metadata say. ``run`` says where and how
    (:class:`~cleftchunk.run.options.RunOptions`; its ``block_shape`` defaults to 32,256,256).
    A dry run logs the plan, reads no voxel and returns None.
    """
    run = run or RunOptions()
    operation = Evaluate(pred, gt, theta, threshold, voxel_size, pred_kind, gt_kind, halo, read=not run.dry_run, ignore_frame=ignore_frame)
    if operation.note:
        log(operation.note)
    return run_operation(operation, run, log)


class Evaluate(Operation):
    """The metrics as an operation that writes no volume: checks and plan, then two passes
    (census, distances) run on the client :class:`RunOptions` chooses. ``read=False`` (a dry
    run): a kind only the values could tell is left undecided (None), and nothing is read."""

    stage = "evaluate"

    def __init__(self, pred, gt, theta=THETA_NM, threshold=DEFAULT_THRESHOLD, voxel_size=None, pred_kind="auto", gt_kind="auto",
                 halo=None, read=True, ignore_frame=False):
        pred, gt = as_volume(pred), as_volume(gt)
        if len(pred.shape) != 3 or len(gt.shape) != 3:
            raise CleftchunkError(f"{pred.spec} and {gt.spec} must both be 3-D (z, y, x) volumes")
        if not (math.isfinite(theta) and theta >= 0):
            raise CleftchunkError(f"θ = {theta} nm must be a finite distance >= 0 (CREMI uses 200): fix --theta")
        self.voxel_size = common_voxel_size(pred, gt, voxel_size)
        self.region, self.note = evaluated_region(pred, gt, voxel_size, ignore_frame)
        kinds = resolve_label_kind(pred, pred_kind, read=read), resolve_label_kind(gt, gt_kind, read=read)
        self.pair = Pair(pred, gt, *kinds, threshold, self.region.offset, (prob_scale(pred), prob_scale(gt)))
        self.halo = tuple(halo) if halo is not None else default_halo(theta, self.voxel_size)
        if len(self.halo) != 3 or any(int(h) != h or h < 0 for h in self.halo):
            raise CleftchunkError(f"halo {self.halo} must be 3 whole numbers of voxels >= 0 (it changes speed only, never the result)")
        self.pred, self.gt, self.theta, self.threshold = pred, gt, theta, threshold

    def identity(self) -> dict:
        return {}  # nothing is written: no output to resume or refuse

    def layout(self, options: RunOptions) -> GridLayout:
        # no output chunks to align to: any block shape, clipped to the volume
        shape = self.gt.shape
        return GridLayout(Roi.from_shape(shape), block_shape_for(options.block_shape, (1, 1, 1), shape, DEFAULT_BLOCK_SHAPE))

    def plan(self, options: RunOptions) -> Plan:
        layout = self.layout(options)
        grown = math.prod(b + 2 * h for b, h in zip(layout.block_shape, self.halo))
        # both volumes over the grown block, masks, distance transform (float64 + int indices)
        memory = grown * (self.pred.dtype.itemsize + self.gt.dtype.itemsize + 2 + 8 + 3 * 8)
        kinds = [k or "decided when run, from sampled chunks" for k in (self.pair.pred_kind, self.pair.gt_kind)]
        return Plan(f"evaluate {self.pred.spec} against {self.gt.spec}", layout, 2 * len(layout), 0, memory,
                    (f"  kinds: prediction {kinds[0]}, ground truth {kinds[1]}",))

    def execute(self, running: Running, handle: None) -> dict:
        return _evaluate(running, self, self.layout(running.options))


def _census_task(pair: Pair, block, _prepared=None) -> Census:
    return census(pair, block.write_roi)


def _distances_task(pair: Pair, halo, total: Roi, voxel_size, block, _prepared, boxes: dict) -> dict:
    # a direction without any target anywhere has only infinite distances: counted by the client
    wanted = {d: b for d, b in boxes.items() if len(b)}
    return block_distances(pair, block.write_roi, halo, total, voxel_size, wanted)


def _evaluate(running: Running, op: Evaluate, layout: GridLayout) -> dict:
    """Pass 1 (census of every block), then pass 2 (distances of the blocks holding query
    voxels), each one run of the executor; the client merges the blocks' small results."""
    pair, halo, vs, region, theta = op.pair, op.halo, op.voxel_size, op.region, op.theta
    censuses: dict = {}
    running.run(BlockwiseTask("evaluate-census", layout, functools.partial(_census_task, pair),
                              collect=lambda block, c: censuses.__setitem__(layout.order(block.index), c)))
    censuses = [censuses[i] for i in range(len(layout))]
    boxes = {d: boxes_array([c.boxes[_other(d)] for c in censuses if c.boxes[_other(d)] is not None]) for d in DIRECTIONS}
    queried = [b.index for b, c in zip(layout.blocks(), censuses) if any(c.counts[d] and len(boxes[d]) for d in DIRECTIONS)]
    results = []
    running.run(BlockwiseTask(
        "evaluate-distances", SubsetLayout(layout, queried), functools.partial(_distances_task, pair, halo, layout.roi, vs),
        collect=lambda block, r: results.append(r), process_args=(running.client.scatter([boxes], broadcast=True, hash=False)[0],),
    ))

    stats, beyond, far = {}, {}, 0
    for direction in DIRECTIONS:
        parts = [r[direction][:2] for r in results if direction in r]
        far += sum(r[direction][2] for r in results if direction in r)
        n = sum(c.counts[direction] for c in censuses)
        if parts:
            values, counts = merge_histograms(parts)
        else:
            values, counts = np.full(1 if n else 0, np.inf), np.full(1 if n else 0, n, dtype=np.int64)
        stats[direction] = stats_from_histogram(values, counts)
        beyond[direction] = int(counts[values > theta].sum())
    inputs = {
        "shape": list(op.gt.shape),
        "pred_region": [f"{b}:{e}" for b, e in zip(region.begin, region.end)],
        "voxel_size": list(vs),
        "theta_nm": float(theta),
        "invalid_voxels": sum(c.counts["invalid"] for c in censuses),
        "pred": op.pred.spec,
        "gt": op.gt.spec,
        "pred_kind": pair.pred_kind,
        "gt_kind": pair.gt_kind,
        "threshold": op.threshold if "prob" in (pair.pred_kind, pair.gt_kind) else None,
        "blocks": len(layout),
        "block_shape": list(layout.block_shape),
        "halo": list(halo),
        "far_voxels": far,
    }
    return assemble(stats["pred_to_gt"], stats["gt_to_pred"], beyond["pred_to_gt"], beyond["gt_to_pred"], inputs)


def evaluated_region(pred: Volume, gt: Volume, voxel_size: Sequence[float] | None = None, ignore_frame: bool = False) -> tuple[Roi, str | None]:
    """The prediction's voxels (array-local) compared with the whole ground truth, voxel for
    voxel, and the line that says so when it is a part: the ground truth's frame placed in the
    prediction's (e.g. the labelled region of a padded CREMI sample), which must cover it.
    ``voxel_size`` (``--voxel-size``) replaces both volumes' recorded ones."""
    frames = Frame.of(pred, f"prediction {pred.spec}", voxel_size), Frame.of(gt, f"ground truth {gt.spec}", voxel_size)
    alignment = align(*frames, ignore=ignore_frame, mode="cover", fix="resample one, or force one with --voxel-size",
                      placed="crop or pad one to the other's frame, or record the ground truth's offset")
    return alignment.a, alignment.note


def default_halo(theta: float, voxel_size: Sequence[float]) -> tuple[int, ...]:
    """θ of context: distances up to θ decide FP/FN, and most of them are then settled inside the
    grown block (measured on 64x512x1024: halo θ 5.7 s, θ/2 6.9 s, 2θ 6.1 s)."""
    return tuple(math.ceil(theta / v) for v in voxel_size)


def _other(direction: str) -> str:
    return "gt_to_pred" if direction == "pred_to_gt" else "pred_to_gt"
