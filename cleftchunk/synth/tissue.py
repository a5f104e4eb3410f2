"""The tissue model of the synthetic generator: neurons, synapses, vesicles, mitochondria.

Geometry lives in *cell units*: space is cut into neuron cells of ``CELL`` voxels (20 sections ×
80 × 80 px, i.e. 800 × 320 × 320 nm, so neurites run along z), each holding one jittered seed
point. Neurons are the additively weighted Voronoi cells of these seeds (weights make some cells
large like dendrites, most small like axons, and bend the boundaries) in a *warped* space: every
voxel's in-plane position is displaced by smooth value noise, which turns the polygons into
rounded, wiggly profiles whose membranes drift slowly from section to section.

Every feature has bounded support and is enumerated from the hashed cells that can reach a
region, so a voxel's value never depends on which region it is computed in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.synth.fields import hash_key, rand, uniform, value_noise, value_noise_at

#: Neuron cell size in voxels (z, y, x).
CELL = np.array([20, 80, 80], dtype=np.int64)
#: One cell unit in 4-nm "px" units per axis (a section is 40 nm = 10 px).
CELL_PX = CELL * np.array([10, 1, 1])
#: Warp field: octaves of (lattice spacing in voxels, largest in-plane displacement in px).
WARP_OCTAVES = (((12, 96, 96), 22.0), ((6, 40, 40), 7.0))
WARP_PX = sum(amp for _, amp in WARP_OCTAVES)
#: Candidate seeds of a voxel: the cells around its own (unwarped) cell; wider in-plane
#: because the warp moves voxels by up to WARP_PX (about a third of a cell).
CANDIDATE_OFFSETS = np.array(list(itertools.product((-1, 0, 1), (-2, -1, 0, 1, 2), (-2, -1, 0, 1, 2))))
#: Neighbour pairs that may carry a synapse: the forward half of the 26-neighbourhood.
PAIR_OFFSETS = np.array([o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0)])
#: Tessellation work unit inside a cell, in voxels: small enough that pruning leaves few candidates.
PIECE = (5, 32, 32)
#: How many cells away an object's anchor cell may lie from a region it reaches (contacts and
#: mitochondria reach < 3.7 cells from their cell, see CONTACT_REACH_PX and MITO_REACH_PX).
OBJECT_REACH_CELLS = 3

# Hash streams: one per kind of random number, so that they are independent.
(S_JITTER, S_WEIGHT, S_ID, S_TONE, S_WARP_Y, S_WARP_X, S_PAIR, S_SYN, S_VES, S_MITO, S_TEXTURE) = range(11)

_MASK48 = np.uint64((1 << 48) - 1)


# -- seeds ----------------------------------------------------------------------------------
@dataclass
class Seeds:
    """Seed points of a set of cells: absolute position (cell units), weight, id, tone."""

    cells: np.ndarray  # (n, 3) int64
    pos: np.ndarray  # (n, 3) float64, cell units
    weight: np.ndarray  # (n,) float64, cell units
    ids: np.ndarray  # (n,) uint64 neuron ids
    tone: np.ndarray  # (n,) float32 cytoplasm brightness


def seeds_of(seed: int, cells: np.ndarray) -> Seeds:
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 3)
    cz, cy, cx = cells.T
    jitter = np.stack([rand(seed, S_JITTER, cz, cy, cx, axis) for axis in range(3)], axis=-1)
    pos = cells + 0.1 + 0.8 * jitter
    # Mostly thin neurites (weight ~0) and a few thick ones.
    weight = 0.7 * rand(seed, S_WEIGHT, cz, cy, cx) ** 4
    ids = neuron_ids_of(seed, cells)
    tone = (0.58 + 0.18 * rand(seed, S_TONE, cz, cy, cx)).astype(np.float32)
    return Seeds(cells, pos, weight, ids, tone)


def neuron_ids_of(seed: int, cells: np.ndarray) -> np.ndarray:
    """uint64 ids: 48-bit hashes + 1, never 0 nor the CREMI special values."""
    cz, cy, cx = np.asarray(cells, dtype=np.int64).reshape(-1, 3).T
    return (hash_key(seed, S_ID, cz, cy, cx) & _MASK48) + np.uint64(1)


# -- warp -----------------------------------------------------------------------------------
def warp_fields(seed: int, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """In-plane displacement (px) of every voxel of ``roi``: (dy, dx), float32 (z, y, x)."""
    z, y, x = (np.arange(b, e) for b, e in zip(roi.begin, roi.end))
    fields = []
    for stream in (S_WARP_Y, S_WARP_X):
        total = None
        for octave, (spacing, amp) in enumerate(WARP_OCTAVES):
            v = value_noise(seed, stream + 1000 * octave, z, y, x, spacing) * np.float32(2 * amp)
            total = v if total is None else total + v
        fields.append(total)
    return fields[0], fields[1]


def warp_at(seed: int, points: np.ndarray) -> np.ndarray:
    """Displacement (dy, dx) at integer voxel points (n, 3), as :func:`warp_fields` gives it."""
    out = []
    for stream in (S_WARP_Y, S_WARP_X):
        total = None
        for octave, (spacing, amp) in enumerate(WARP_OCTAVES):
            v = value_noise_at(seed, stream + 1000 * octave, points, spacing) * np.float32(2 * amp)
            total = v if total is None else total + v
        out.append(total)
    return np.stack(out, axis=-1)


# -- tessellation ---------------------------------------------------------------------------
@dataclass
class Tessellation:
    """Per voxel of a region: nearest and second-nearest neuron id and the gap between them.

    ``gap`` is half the difference of the two weighted distances, in in-plane px: about the
    distance to the membrane, 0 on it.
    """

    nid1: np.ndarray  # uint64
    nid2: np.ndarray  # uint64
    gap: np.ndarray  # float32 px
    tone: np.ndarray  # float32 cytoplasm brightness of the nearest neuron


def tessellate(seed: int, roi: Roi, wy: np.ndarray, wx: np.ndarray) -> Tessellation:
    shape = roi.shape
    nid1 = np.empty(shape, np.uint64)
    nid2 = np.empty(shape, np.uint64)
    gap = np.empty(shape, np.float32)
    tone = np.empty(shape, np.float32)
    for cell, pieces in _pieces_by_cell(roi):
        seeds = seeds_of(seed, cell + CANDIDATE_OFFSETS)
        for piece in pieces:
            sl = piece.to_slices(roi.begin)
            l1, l2, g = _nearest_two(seeds, piece, cell, wy[sl], wx[sl])
            nid1[sl] = seeds.ids[l1]
            nid2[sl] = seeds.ids[l2]
            gap[sl] = g
            tone[sl] = seeds.tone[l1]
    return Tessellation(nid1, nid2, gap, tone)


def _pieces_by_cell(roi: Roi):
    """(cell, pieces of ``roi`` inside that unwarped neuron cell) for every cell ``roi`` touches."""
    first = np.floor_divide(roi.begin, CELL)
    last = np.floor_divide(np.array(roi.end) - 1, CELL)
    for cell in itertools.product(*(range(a, b + 1) for a, b in zip(first, last))):
        inside = Roi(tuple(np.array(cell) * CELL), tuple(CELL)).intersect(roi)
        pieces = []
        for piece_index in itertools.product(*(range(-(-s // p)) for s, p in zip(inside.shape, PIECE))):
            begin = tuple(b + i * p for b, i, p in zip(inside.begin, piece_index, PIECE))
            pieces.append(Roi(begin, PIECE).intersect(inside))
        yield np.array(cell), pieces


def _cell_frame(piece: Roi, cell: np.ndarray, wy: np.ndarray, wx: np.ndarray):
    """Voxel positions of a piece in cell units relative to ``cell``'s corner (float32)."""
    rel = [np.arange(b, e) - c * n for b, e, c, n in zip(piece.begin, piece.end, cell, CELL)]
    pz = ((rel[0].astype(np.float32) + np.float32(0.5)) / np.float32(CELL[0]))[:, None, None]
    py = (rel[1].astype(np.float32)[None, :, None] + np.float32(0.5) + wy) / np.float32(CELL[1])
    px = (rel[2].astype(np.float32)[None, None, :] + np.float32(0.5) + wx) / np.float32(CELL[2])
    return pz, py, px


def _nearest_two(seeds: Seeds, piece: Roi, cell: np.ndarray, wy: np.ndarray, wx: np.ndarray):
    pz, py, px = _cell_frame(piece, cell, wy, wx)
    rel = (seeds.pos - cell).astype(np.float32)
    weight = seeds.weight.astype(np.float32)
    lo = np.array([pz.min(), py.min(), px.min()], dtype=np.float64)
    hi = np.array([pz.max(), py.max(), px.max()], dtype=np.float64)
    keep = _candidates_that_can_win(rel.astype(np.float64), seeds.weight, lo, hi)
    d1 = np.full(py.shape, np.inf, np.float32)
    d2 = np.full(py.shape, np.inf, np.float32)
    l1 = np.zeros(py.shape, np.int16)
    l2 = np.zeros(py.shape, np.int16)
    for k in np.flatnonzero(keep):  # fixed global order: ties resolve the same everywhere
        sz, sy, sx = rel[k]
        d = np.sqrt((pz - sz) ** 2 + (py - sy) ** 2 + (px - sx) ** 2) - weight[k]
        closer1 = d < d1
        closer2 = d < d2
        l2 = np.where(closer1, l1, np.where(closer2, np.int16(k), l2))
        d2 = np.where(closer1, d1, np.minimum(d2, d))
        l1 = np.where(closer1, np.int16(k), l1)
        d1 = np.minimum(d1, d)
    gap = (d2 - d1) * np.float32(0.5 * CELL[1])
    return l1, l2, gap


def _candidates_that_can_win(rel: np.ndarray, weight: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Exact pruning: drop seeds that are farther than two others from every point of the box.

    A seed whose smallest possible distance exceeds the second-smallest largest possible
    distance of the others is never first or second; the margin keeps float32 rounding from
    ever mattering, so pruning changes no result, only the cost.
    """
    nearest = np.clip(rel, lo, hi)
    lower = np.sqrt(((rel - nearest) ** 2).sum(axis=1)) - weight
    farthest = np.maximum(np.abs(rel - lo), np.abs(rel - hi))
    upper = np.sqrt((farthest**2).sum(axis=1)) - weight
    second_upper = np.partition(upper, 1)[1]
    return lower <= second_upper + 1e-3


def nearest_two_at(seed: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the two nearest seeds of warped points (n, 3) in cell units (objects' anchors)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    cells = np.floor(points).astype(np.int64)
    cand = cells[:, None, :] + CANDIDATE_OFFSETS[None]
    seeds = seeds_of(seed, cand.reshape(-1, 3))
    pos = seeds.pos.reshape(cand.shape)
    d = np.sqrt(((pos - points[:, None, :]) ** 2).sum(axis=-1)) - seeds.weight.reshape(cand.shape[:2])
    order = np.argsort(d, axis=1, kind="stable")[:, :2]
    ids = seeds.ids.reshape(cand.shape[:2])
    return np.take_along_axis(ids, order[:, :1], 1)[:, 0], np.take_along_axis(ids, order[:, 1:2], 1)[:, 0]


# -- objects --------------------------------------------------------------------------------
def cells_reaching(roi: Roi) -> np.ndarray:
    """All cells whose objects may reach into ``roi`` (n, 3)."""
    first = np.floor_divide(roi.begin, CELL) - OBJECT_REACH_CELLS
    last = np.floor_divide(np.array(roi.end) - 1, CELL) + OBJECT_REACH_CELLS
    grids = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(first, last)), indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=-1)


@dataclass
class Contact:
    """A synapse (``cleft_id`` set) or a vesicle cloud at a plain contact (``cleft_id`` None).

    Positions in px units (4 nm; z scaled ×10), absolute and warped.
    """

    key: int
    pre: int  # neuron id of the presynaptic (vesicle) side
    post: int
    centre: np.ndarray  # (3,) point on the contact face
    normal: np.ndarray  # (3,) unit normal pointing into the postsynaptic cell
    radius: float  # cleft / PSD disk radius, px
    cloud_centre: np.ndarray
    cloud_radius: float
    cleft_id: int | None

    def reach(self) -> float:
        return max(self.radius, float(np.linalg.norm(self.cloud_centre - self.centre)) + self.cloud_radius)


#: Upper bounds of how far (px) a contact's and a mitochondrion's voxels lie from their anchor.
CONTACT_REACH_PX = 110.0
MITO_REACH_PX = 185.0


def contacts(seed: int, cells: np.ndarray, synapse_rate: float, cloud_rate: float, roi: Roi) -> list[Contact]:
    """Synapses and cleft-less vesicle clouds between ``cells`` and their neighbours that reach ``roi``."""
    a = np.repeat(cells, len(PAIR_OFFSETS), axis=0)
    b = a + np.tile(PAIR_OFFSETS, (len(cells), 1))
    (az, ay, ax), (bz, by, bx) = a.T, b.T
    h = hash_key(seed, S_PAIR, az, ay, ax, bz, by, bx)
    u = uniform(h)
    chosen = np.flatnonzero(u < synapse_rate + cloud_rate)
    if len(chosen) == 0:
        return []
    sa, sb = seeds_of(seed, a[chosen]), seeds_of(seed, b[chosen])
    # The point of the segment between the seeds where the weighted distances are equal.
    diff = sb.pos - sa.pos
    length = np.linalg.norm(diff, axis=1)
    frac = (length + sa.weight - sb.weight) / (2 * length)
    anchor = sa.pos + diff * frac[:, None]
    near = near_roi(anchor * CELL_PX, CONTACT_REACH_PX, roi)
    chosen, sa, sb, anchor = chosen[near], _subset(sa, near), _subset(sb, near), anchor[near]
    n1, n2 = nearest_two_at(seed, anchor)
    out = []
    for i, k in enumerate(chosen):
        if {int(n1[i]), int(n2[i])} != {int(sa.ids[i]), int(sb.ids[i])}:
            continue  # the two seeds do not actually touch there
        out.append(_make_contact(seed, int(h[k]), sa, sb, i, anchor[i], bool(u[k] < synapse_rate)))
    return out


def _make_contact(seed: int, key: int, sa: Seeds, sb: Seeds, i: int, anchor: np.ndarray, is_synapse: bool) -> Contact:
    r = rand(seed, S_SYN, key, np.arange(6))
    a_is_pre = r[0] < 0.5
    pre, post = (sa, sb) if a_is_pre else (sb, sa)
    centre = anchor * CELL_PX
    to_post = (post.pos[i] - pre.pos[i]) / CELL_PX  # Voronoi face normal, covariant to px units
    normal = to_post / np.linalg.norm(to_post)
    to_pre = pre.pos[i] * CELL_PX - centre
    to_pre /= np.linalg.norm(to_pre)
    radius = 18.0 + 32.0 * r[1]
    cloud_radius = 26.0 + 24.0 * r[2]
    cloud_centre = centre + to_pre * (0.8 * cloud_radius + 6.0)
    cleft_id = int((np.uint64(key) & _MASK48) + np.uint64(1)) if is_synapse else None
    return Contact(key, int(pre.ids[i]), int(post.ids[i]), centre, normal, radius, cloud_centre, cloud_radius, cleft_id)


@dataclass
class Mitochondrion:
    """A capsule inside one neuron: segment centre ± half_length·axis, radius; px units."""

    key: int
    host: int
    centre: np.ndarray
    axis: np.ndarray
    half_length: float
    radius: float

    def reach(self) -> float:
        return self.half_length + self.radius


def mitochondria(seed: int, cells: np.ndarray, rate: float, roi: Roi) -> list[Mitochondrion]:
    cz, cy, cx = cells.T
    keys, hosts = [], []
    for slot, share in enumerate((1.0, 0.4)):  # up to two per neuron cell
        h = hash_key(seed, S_MITO, cz, cy, cx, slot)
        chosen = np.flatnonzero(uniform(h) < rate * share)
        keys.append(h[chosen])
        hosts.append(cells[chosen])
    keys, hosts = np.concatenate(keys), np.concatenate(hosts)
    if len(keys) == 0:
        return []
    s = seeds_of(seed, hosts)
    r = np.stack([rand(seed, S_MITO, keys, j) for j in range(7)], axis=-1)
    # Keep the anchor well inside its own cell, where the seed's neuron is.
    anchor = s.pos + (r[:, :3] - 0.5) * np.array([0.5, 0.3, 0.3])
    inside = near_roi(anchor * CELL_PX, MITO_REACH_PX, roi)
    inside[inside] = nearest_two_at(seed, anchor[inside])[0] == s.ids[inside]
    # Mostly along the neurite (z), tilted by up to ~50 degrees.
    axis = np.stack([np.ones(len(keys)), 2.4 * (r[:, 3] - 0.5), 2.4 * (r[:, 4] - 0.5)], axis=-1)
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return [
        Mitochondrion(int(keys[i]), int(s.ids[i]), anchor[i] * CELL_PX, axis[i], 40.0 + 120.0 * r[i, 5], 9.0 + 13.0 * r[i, 6])
        for i in np.flatnonzero(inside)
    ]


def near_roi(points_px: np.ndarray, reach_px: float, roi: Roi) -> np.ndarray:
    """Which objects anchored at ``points_px`` (n, 3) can touch ``roi`` (a conservative test)."""
    lo, hi = _voxel_bounds(np.reshape(points_px, (-1, 3)), reach_px)
    return np.all((hi > np.array(roi.begin)) & (lo < np.array(roi.end)), axis=1)


def _subset(seeds: Seeds, mask: np.ndarray) -> Seeds:
    return Seeds(seeds.cells[mask], seeds.pos[mask], seeds.weight[mask], seeds.ids[mask], seeds.tone[mask])


def bbox_voxels(centre_px: np.ndarray, reach_px: float) -> Roi:
    """Voxels an object of ``reach_px`` around ``centre_px`` can touch, warp included."""
    lo, hi = _voxel_bounds(np.asarray(centre_px, dtype=np.float64), reach_px)
    return Roi.from_bounds(lo, hi)


def _voxel_bounds(points_px: np.ndarray, reach_px: float) -> tuple[np.ndarray, np.ndarray]:
    margin = np.array([0.0, WARP_PX, WARP_PX]) + 2.0
    scale = np.array([10.0, 1.0, 1.0])
    lo = np.floor((points_px - reach_px) / scale - margin).astype(np.int64)
    hi = np.ceil((points_px + reach_px) / scale + margin).astype(np.int64) + 1
    return lo, hi


# -- texture --------------------------------------------------------------------------------
def cytoplasm_texture(seed: int, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """Mottled cytoplasm (float32, about [-0.5, 0.5]) and sparse dark specks (float32 darkness).

    The specks stand for microtubules and ER cut across: small, dark, everywhere — another
    reason why dark voxels alone say nothing about clefts.
    """
    z, y, x = (np.arange(b, e) for b, e in zip(roi.begin, roi.end))
    coarse = value_noise(seed, S_TEXTURE, z, y, x, (3, 24, 24))
    fine = value_noise(seed, S_TEXTURE + 100, z, y, x, (1, 5, 5))
    specks = np.maximum(fine - np.float32(0.26), np.float32(0.0)) * np.float32(1.6)
    return coarse * np.float32(0.6) + fine * np.float32(0.5), specks
