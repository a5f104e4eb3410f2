"""Drawing the tissue of one region, before imaging: membranes, synapses (cleft labels and PSDs),
vesicle clouds and mitochondria, each drawn only into its bounding box (see :mod:`.generate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cleftchunk.geometry import Roi
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.synth.fields import rand, voxel_noise
from cleftchunk.synth.tissue import (
    WARP_PX,
    Contact,
    Mitochondrion,
    Tessellation,
    bbox_voxels,
    cells_reaching,
    contacts,
    cytoplasm_texture,
    mitochondria,
    tessellate,
    warp_at,
    warp_fields,
)

# ``SynthParams`` in annotations is cleftchunk.synth.generate.SynthParams, not imported: generate imports this module.

#: Half-thickness of the cleft label around the contact face, px (the label is ~10 px thick).
CLEFT_HALF_PX = 5.0
MEMBRANE_HALF_PX = 2.6
# Hash streams of the drawing (of the imaging model's streams, see generate.py; distinct from the tissue streams).
S_GRAIN, S_VESICLE_POS = 51, 53


@dataclass
class _Canvas:
    """The arrays a region is drawn on; objects draw into their bounding box only."""

    roi: Roi
    tess: Tessellation
    wy: np.ndarray
    wx: np.ndarray
    dark: np.ndarray  # float32, composited with max (order-independent)
    clefts: np.ndarray  # uint64, composited with min (BG is the largest value)

    def window(self, box: Roi):
        """(slices, box ∩ roi) or None when the box misses the region."""
        inside = box.intersect(self.roi)
        if inside.empty:
            return None
        return inside.to_slices(self.roi.begin), inside

    def px_coords(self, sl, inside: Roi):
        """Warped positions in px units (z ×10) of the voxels of a window, float64."""
        z = (np.arange(inside.begin[0], inside.end[0]) + 0.5) * 10.0
        y = np.arange(inside.begin[1], inside.end[1])[None, :, None] + 0.5 + self.wy[sl].astype(np.float64)
        x = np.arange(inside.begin[2], inside.end[2])[None, None, :] + 0.5 + self.wx[sl].astype(np.float64)
        return z[:, None, None], y, x


def render_tissue(seed: int, roi: Roi, p: SynthParams) -> dict:
    """Noise-free intensity (float32, ~[0, 1]), clefts and neuron ids of ``roi``."""
    wy, wx = warp_fields(seed, roi)
    tess = tessellate(seed, roi, wy, wx)
    dark = _membrane_darkness(tess.gap, p.membrane_dark)
    canvas = _Canvas(roi, tess, wy, wx, dark, np.full(roi.shape, CREMI_BACKGROUND, np.uint64))
    cells = cells_reaching(roi)
    found = contacts(seed, cells, p.synapse_rate, p.cloud_rate, roi)
    for contact in found:
        if contact.cleft_id is not None:
            _draw_synapse(canvas, contact, p)
    _draw_vesicles(seed, canvas, found)
    for mito in mitochondria(seed, cells, p.mito_rate, roi):
        _draw_mitochondrion(canvas, mito)
    texture, specks = cytoplasm_texture(seed, roi)
    np.maximum(canvas.dark, specks, out=canvas.dark)
    z, y, x = (np.arange(b, e) for b, e in zip(roi.begin, roi.end))
    grain = voxel_noise(seed, S_GRAIN, z, y, x) * np.float32(p.grain)
    intensity = (tess.tone + texture * np.float32(0.16) + grain) * (np.float32(1.0) - canvas.dark)
    return {"intensity": intensity, "clefts": canvas.clefts, "neuron_ids": tess.nid1}


def _membrane_darkness(gap: np.ndarray, strength: float) -> np.ndarray:
    t = gap * np.float32(1.0 / MEMBRANE_HALF_PX)
    return np.maximum(np.float32(1.0) - t * t, np.float32(0.0)) * np.float32(strength)  # gap >= 0


def _draw_synapse(canvas: _Canvas, c: Contact, p: SynthParams) -> None:
    reach = c.radius + 12.0  # the PSD band reaches ~10 px beyond the face
    hit = canvas.window(bbox_voxels(c.centre, reach))
    if hit is None:
        return
    sl, inside = hit
    z, y, x = canvas.px_coords(sl, inside)
    vz, vy, vx = z - c.centre[0], y - c.centre[1], x - c.centre[2]
    along = vz * c.normal[0] + vy * c.normal[1] + vx * c.normal[2]
    radial2 = vz * vz + vy * vy + vx * vx - along * along
    n1, n2, gap = canvas.tess.nid1[sl], canvas.tess.nid2[sl], canvas.tess.gap[sl]
    pre, post = np.uint64(c.pre), np.uint64(c.post)
    on_face = ((n1 == pre) & (n2 == post)) | ((n1 == post) & (n2 == pre))
    in_disk = on_face & (radial2 < c.radius**2)
    cleft = in_disk & (gap < CLEFT_HALF_PX)
    target = canvas.clefts[sl]
    np.minimum(target, np.where(cleft, np.uint64(c.cleft_id), CREMI_BACKGROUND), out=target)
    # Postsynaptic density: a thick dark band on the post side, fading at the disk rim;
    # a thinner, lighter one on the presynaptic side.
    rim = np.sqrt(np.clip(1.0 - radial2 / (c.radius**2), 0.0, 1.0))
    depth = np.where(n1 == post, 12.0, 4.0)
    band = np.clip(1.0 - ((gap - 1.0) / depth) ** 2, 0.0, 1.0) * np.where(n1 == post, 1.0, 0.7)
    psd = np.where(in_disk, band * rim * p.psd_dark, 0.0).astype(np.float32)
    np.maximum(canvas.dark[sl], psd, out=canvas.dark[sl])


def _draw_vesicles(seed: int, canvas: _Canvas, found: list[Contact]) -> None:
    """~10 px vesicles (dark ring, greyish lumen) in the presynaptic side of each cloud."""
    near = [c for c in found if canvas.window(bbox_voxels(c.cloud_centre, c.cloud_radius + 8.0))]
    if not near:
        return
    cloud_voxels = warped_px_to_voxel(seed, np.array([c.cloud_centre for c in near]))
    stamps = [_vesicle_stamps(seed, c, v) for c, v in zip(near, cloud_voxels)]
    centres = np.concatenate([s[0] for s in stamps])  # voxel frame, float64
    radii = np.concatenate([s[1] for s in stamps])
    owner = np.concatenate([s[2] for s in stamps])
    base = np.floor(centres).astype(np.int64)
    reach = np.array([1, VESICLE_STAMP, VESICLE_STAMP])
    touching = np.all((base + reach >= canvas.roi.begin) & (base - reach < canvas.roi.end), axis=1)
    for batch in np.array_split(np.flatnonzero(touching), max(1, int(touching.sum()) // 256)):
        _stamp_vesicles(canvas, centres[batch], base[batch], radii[batch], owner[batch])


#: Half-width (px) of the in-plane window drawn around a vesicle centre.
VESICLE_STAMP = 8


def _stamp_vesicles(canvas: _Canvas, centres, base, radii, owner) -> None:
    hw = VESICLE_STAMP
    oz, oy, ox = np.meshgrid(np.arange(-1, 2), np.arange(-hw, hw + 1), np.arange(-hw, hw + 1), indexing="ij")
    vz = base[:, 0, None, None, None] + oz[None]
    vy = base[:, 1, None, None, None] + oy[None]
    vx = base[:, 2, None, None, None] + ox[None]
    roi = canvas.roi
    inside = (
        (vz >= roi.begin[0]) & (vz < roi.end[0]) & (vy >= roi.begin[1]) & (vy < roi.end[1]) & (vx >= roi.begin[2]) & (vx < roi.end[2])
    )
    if not inside.any():
        return
    k, iz, iy, ix = np.nonzero(inside)
    gz, gy, gx = vz[k, iz, iy, ix], vy[k, iz, iy, ix], vx[k, iz, iy, ix]
    # Distances in px (sections are 10 px apart) between voxel centres and vesicle centres.
    dz = (gz + 0.5 - centres[k, 0]) * 10.0
    dy = gy + 0.5 - centres[k, 1]
    dx = gx + 0.5 - centres[k, 2]
    r = radii[k]
    section_r2 = r * r - dz * dz
    ring_r = np.sqrt(np.maximum(section_r2, 0.0))
    dist = np.sqrt(dy * dy + dx * dx)
    ring = np.clip(1.0 - np.abs(dist - ring_r) / 1.4, 0.0, 1.0) * 0.72
    lumen = np.where(dist < ring_r, 0.06, 0.0)
    value = np.where(section_r2 > 1.0, np.maximum(ring, lumen), 0.0).astype(np.float32)
    lz, ly, lx = gz - roi.begin[0], gy - roi.begin[1], gx - roi.begin[2]
    host = canvas.tess.nid1[lz, ly, lx] == owner[k]
    clear = canvas.tess.gap[lz, ly, lx] > CLEFT_HALF_PX + 1.0
    keep = host & clear & (value > 0)
    np.maximum.at(canvas.dark, (lz[keep], ly[keep], lx[keep]), value[keep])


def _vesicle_stamps(seed: int, c: Contact, cloud_voxel: np.ndarray):
    """Vesicle centres (voxel frame), radii (px) and host neuron of one cloud."""
    count = int(0.25 * (c.cloud_radius / 5.0) ** 3)
    k = np.arange(3 * count)  # over-draw, then keep the points inside the unit ball
    u = np.stack([rand(seed, S_VESICLE_POS, c.key, k, a) for a in range(4)], axis=-1)
    offset = 2.0 * u[:, :3] - 1.0
    inside = (offset**2).sum(axis=1) < 1.0
    offset, radius_u = offset[inside][:count], u[inside, 3][:count]
    centres = cloud_voxel + offset * c.cloud_radius / np.array([10.0, 1.0, 1.0])
    return centres, 4.0 + 2.0 * radius_u, np.full(len(offset), c.pre, np.uint64)


def warped_px_to_voxel(seed: int, points_px: np.ndarray) -> np.ndarray:
    """Voxel-frame positions (voxel i spans [i, i+1)) whose warped positions are ``points_px`` (n, 3).

    The warp is smooth, so a few fixed-point steps invert it to about a pixel.
    """
    points_px = np.asarray(points_px, dtype=np.float64).reshape(-1, 3)
    frame = points_px / np.array([10.0, 1.0, 1.0])
    for _ in range(4):
        shift = warp_at(seed, np.floor(frame).astype(np.int64)).astype(np.float64)
        frame[:, 1:] = points_px[:, 1:] - shift
    return frame


def _draw_mitochondrion(canvas: _Canvas, m: Mitochondrion) -> None:
    """Section by section, only around the capsule's cross-section (a long box is mostly empty)."""
    roi = canvas.roi
    z_range = bbox_voxels(m.centre, m.reach()).intersect(roi)
    for z in range(z_range.begin[0], z_range.end[0]):
        qz = (z + 0.5) * 10.0
        # Segment parameters whose points lie within one radius of this section.
        t0 = max(-m.half_length, (qz - m.radius - m.centre[0]) / m.axis[0])
        t1 = min(m.half_length, (qz + m.radius - m.centre[0]) / m.axis[0])
        if t0 > t1:
            continue
        ends = m.centre + np.outer((t0, t1), m.axis)
        lo = np.floor(ends[:, 1:].min(axis=0) - m.radius - WARP_PX - 2).astype(np.int64)
        hi = np.ceil(ends[:, 1:].max(axis=0) + m.radius + WARP_PX + 2).astype(np.int64)
        if np.any(hi <= roi.begin[1:]) or np.any(lo >= roi.end[1:]):
            continue
        hit = canvas.window(Roi.from_bounds((z, lo[0], lo[1]), (z + 1, hi[0], hi[1])))
        _draw_mito_window(canvas, m, *hit)


def _draw_mito_window(canvas: _Canvas, m: Mitochondrion, sl, inside: Roi) -> None:
    z, y, x = canvas.px_coords(sl, inside)
    vz, vy, vx = z - m.centre[0], y - m.centre[1], x - m.centre[2]
    along = vz * m.axis[0] + vy * m.axis[1] + vx * m.axis[2]
    t = np.clip(along, -m.half_length, m.half_length)
    rz, ry, rx = vz - t * m.axis[0], vy - t * m.axis[1], vx - t * m.axis[2]
    dist = np.sqrt(rz * rz + ry * ry + rx * rx)
    inner = dist < m.radius
    if not inner.any():
        return
    n1, gap = canvas.tess.nid1[sl], canvas.tess.gap[sl]
    inner &= (n1 == np.uint64(m.host)) & (gap > MEMBRANE_HALF_PX + 1.0)
    # Cristae: dark folds across the long axis; a dark double outer membrane.
    phase = (along / 7.0) + (ry + rx) / 11.0
    cristae = (phase - np.floor(phase)) < 0.35
    edge = (m.radius - dist) < 2.0
    value = np.where(edge, 0.62, np.where(cristae, 0.55, 0.36))
    value = np.where(inner, value, 0.0).astype(np.float32)
    np.maximum(canvas.dark[sl], value, out=canvas.dark[sl])
