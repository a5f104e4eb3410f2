"""Synthetic CREMI-like EM volumes with synaptic clefts, generated block by block.

Every voxel is a pure function of (seed, parameters, global voxel coordinate): random numbers are
counter-based hashes of integer keys (:mod:`cleftchunk.synth_fields`), every feature has bounded
support and is enumerated from the hashed cells that can reach a region (:mod:`cleftchunk.synth_tissue`),
and the only spatial filter (in-plane blur) is computed on the region grown by its kernel radius.
So any region, computed alone or as part of any other region, is byte-identical — which lets
:func:`synthesize` write volumes of any size block by block, in parallel, with constant memory.

What a sample holds (voxel size 40 × 4 × 4 nm, axes z, y, x):

- ``neuron_ids`` (uint64): an anisotropic, warped 3-D tessellation (neurites ~0.2–1 µm across,
  running mostly along z, membranes slanted across sections);
- ``clefts`` (uint64, CREMI convention): one id per synapse, background 0xFFFFFFFFFFFFFFFF. A cleft is a
  disk (radius 70–240 nm) of the contact face between two neurons, ~10 px thick, spanning a few
  sections; on the postsynaptic side a dark PSD, on the presynaptic side a cloud of ~10 px vesicles;
- ``raw`` (uint8): textured cytoplasm, dark membranes, PSDs, vesicle clouds, mitochondria — and as
  distractors plain contacts, cleft-less vesicle clouds and mitochondria, which are as dark as
  clefts, so that no intensity threshold finds the clefts; then blur, per-section brightness and
  contrast, noise, missing and misaligned sections.

Statistics at the default parameters (documented ranges, checked by the tests on 40 × 512 × 512
samples, ~6.7 µm³): cleft voxels are 0.05–0.8 % of the volume (typically 0.2–0.45 %, CREMI-like);
0.5–4 clefts per µm³ (typically 1–2.5); ~100–300 neurite pieces per such sample.

The labels depend on the seed and ``synapse_rate`` only, not on ``difficulty`` — except in
misaligned sections. Imaging defects and the labels: a *misaligned* section is one whose content is shifted in-plane
(a function of (seed, section index): isolated shifted sections and steps that shift every
following section). As in CREMI, the ground truth is aligned with the raw: labels are shifted
together with the image. A *missing* section has its raw replaced by flat grey; its labels are
kept (the structures continue through it, and a model is expected to infer them from context).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.synth.fields import rand, value_noise, voxel_noise
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
from cleftchunk.labels import CREMI_BACKGROUND

VOXEL_SIZE = (40, 4, 4)
#: The extent of a CREMI training sample (5 × 5 × 5 µm), the default of ``cleftchunk synth``.
DEFAULT_SHAPE = (125, 1250, 1250)
#: Half-thickness of the cleft label around the contact face, px (the label is ~10 px thick).
CLEFT_HALF_PX = 5.0
MEMBRANE_HALF_PX = 2.6
#: Lattice of the illumination field: independent per section, smooth over ~1.5 µm in-plane.
SHADING_SPACING = (1, 384, 384)
#: Raw value of a missing section (labels are kept there).
MISSING_GREY = 128
#: Largest region generated at once inside generate_region (bounds its working memory).
WORK_PIECE = (8, 512, 512)

# Hash streams of the imaging model (distinct from the tissue streams).
S_SECTION, S_GRAIN, S_NOISE, S_VESICLE_POS, S_SHADING = 50, 51, 52, 53, 54


@dataclass(frozen=True)
class SynthParams:
    """All knobs of the generator. ``None`` fields take a default derived from ``difficulty``."""

    difficulty: float = 0.5
    synapse_rate: float = 0.022  # share of neighbouring neuron pairs joined by a synapse
    cloud_rate: float | None = None  # cleft-less vesicle clouds, per neighbouring pair
    mito_rate: float | None = None  # mitochondria per neuron cell
    noise: float | None = None  # std of the imaging noise (fraction of full scale)
    grain: float | None = None  # std of the fine texture noise before blur
    blur: float | None = None  # in-plane Gaussian sigma, px
    section_contrast: float | None = None  # ± relative contrast change between sections
    section_brightness: float | None = None  # ± brightness change between sections
    shading: float | None = None  # ± uneven illumination across a section (smooth gain field)
    membrane_dark: float | None = None  # darkness of membranes (0 none, 1 black)
    psd_dark: float | None = None
    missing_rate: float | None = None  # share of sections missing (flat grey)
    misalign_rate: float | None = None  # share of sections shifted alone
    misalign_step_rate: float | None = None  # share of sections from which all later ones shift
    misalign_px: int = 12  # largest shift per event, px

    def resolved(self) -> "SynthParams":
        d = self.difficulty
        defaults = dict(
            cloud_rate=0.012 + 0.03 * d,
            mito_rate=0.15 + 0.35 * d,
            noise=0.02 + 0.08 * d,
            grain=0.03 + 0.05 * d,
            blur=0.5 + 1.0 * d,
            section_contrast=0.04 + 0.16 * d,
            section_brightness=0.02 + 0.08 * d,
            shading=0.03 + 0.12 * d,
            membrane_dark=0.72 - 0.1 * d,
            psd_dark=0.85 - 0.2 * d,
            missing_rate=0.02 * d,
            misalign_rate=0.02 * d,
            misalign_step_rate=0.01 * d,
        )
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    @property
    def halo(self) -> int:
        """In-plane context the blur needs (scipy's kernel radius at truncate=4)."""
        return int(4.0 * float(self.blur) + 0.5) if self.blur else 0


PARAM_NAMES = tuple(f.name for f in dataclasses.fields(SynthParams))


def make_params(difficulty: float = 0.5, **overrides) -> SynthParams:
    """Validated, fully resolved parameters; bad values raise a one-line CleftchunkError."""
    if not (isinstance(difficulty, (int, float)) and 0.0 <= float(difficulty) <= 1.0):
        raise CleftchunkError(f"difficulty {difficulty!r} is outside [0, 1]: give a value such as 0.5")
    unknown = sorted(set(overrides) - set(PARAM_NAMES))
    if unknown:
        raise CleftchunkError(f"unknown synth parameter(s) {', '.join(unknown)}: known are {', '.join(PARAM_NAMES[1:])}")
    for name, value in overrides.items():
        if value is not None and (not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value)):
            raise CleftchunkError(f"synth parameter {name}={value!r} must be a non-negative number")
        if name.endswith("_rate") and value is not None and value > 1:
            raise CleftchunkError(f"synth parameter {name}={value!r} is a share of sections: give a value in [0, 1]")
    return SynthParams(difficulty=float(difficulty), **overrides).resolved()


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise CleftchunkError(f"seed {seed!r} must be an integer in [0, 2**63): give e.g. --seed 0")
    return int(seed)


# -- the public entry point -----------------------------------------------------------------
def generate_region(
    roi: Roi | Sequence[int], seed: int = 0, difficulty: float = 0.5, *, resolved: SynthParams | None = None, **params
) -> dict:
    """Generate the voxels of ``roi`` (world voxels, z, y, x; a shape means offset 0).

    ``params`` override single knobs of :class:`SynthParams`; ``resolved`` passes a whole
    :func:`make_params` result instead (then ``difficulty`` and ``params`` are ignored).

    Returns ``{"raw": uint8, "clefts": uint64, "neuron_ids": uint64}`` arrays of ``roi.shape``,
    byte-identical to the same voxels cut out of any larger region.
    """
    roi = roi if isinstance(roi, Roi) else Roi.from_shape(roi)
    check_seed(seed)
    if roi.ndim != 3:
        raise CleftchunkError(f"region {roi} must have 3 axes (z, y, x)")
    p = resolved if resolved is not None else make_params(difficulty, **params)
    out = {
        "raw": np.empty(roi.shape, np.uint8),
        "clefts": np.empty(roi.shape, np.uint64),
        "neuron_ids": np.empty(roi.shape, np.uint64),
    }
    z = np.arange(roi.begin[0], roi.end[0])
    shift_y, shift_x = section_shifts(seed, z, p)
    for run in _runs_of_equal_shift(roi, shift_y, shift_x):
        first = run.begin[0] - roi.begin[0]
        source = run.shift((0, int(shift_y[first]), int(shift_x[first])))
        for piece in _work_pieces(source):
            target = piece.shift((0, -int(shift_y[first]), -int(shift_x[first]))).to_slices(roi.begin)
            rendered = _render(seed, piece, p)
            for name in out:
                out[name][target] = rendered[name]
    missing = missing_sections(seed, z, p)
    out["raw"][missing] = MISSING_GREY
    return out


def section_shifts(seed: int, z: np.ndarray, p: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """In-plane shift (px) of the content of each section: steps that persist, plus lone shifts.

    Steps accumulate from section 0 outwards (a section below 0 undoes the steps between it and
    0), so the shift of a section is a function of (seed, z) alone.
    """
    z = np.asarray(z, dtype=np.int64)
    if len(z) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = np.arange(min(int(z.min()), 0), max(int(z.max()), 0) + 1)
    step = _section_events(seed, span, 0, p.misalign_step_rate, p.misalign_px)
    step[span == 0] = 0
    # cumulative[k] = sum of steps over 0 < j <= span[k] (negative below 0).
    csum = np.cumsum(step, axis=0)
    zero = int(np.flatnonzero(span == 0)[0])
    cumulative = csum - csum[zero]
    lone = _section_events(seed, z, 1, p.misalign_rate, p.misalign_px)
    total = cumulative[z - span[0]] + lone
    return total[:, 0], total[:, 1]


def _section_events(seed: int, z: np.ndarray, kind: int, rate: float, max_px: int) -> np.ndarray:
    u = rand(seed, S_SECTION, z, 10 + kind)
    shift = np.stack([rand(seed, S_SECTION, z, 20 + 2 * kind + a) for a in range(2)], axis=-1)
    px = np.rint((2 * shift - 1) * max_px).astype(np.int64)
    return np.where((u < rate)[:, None], px, 0)


def missing_sections(seed: int, z: np.ndarray, p: SynthParams) -> np.ndarray:
    return rand(seed, S_SECTION, np.asarray(z, dtype=np.int64), 30) < p.missing_rate


def _runs_of_equal_shift(roi: Roi, shift_y: np.ndarray, shift_x: np.ndarray):
    start = 0
    for i in range(1, roi.shape[0] + 1):
        if i == roi.shape[0] or shift_y[i] != shift_y[start] or shift_x[i] != shift_x[start]:
            yield Roi((roi.begin[0] + start, roi.begin[1], roi.begin[2]), (i - start, roi.shape[1], roi.shape[2]))
            start = i


def _work_pieces(roi: Roi):
    grid_shape = [-(-s // w) for s, w in zip(roi.shape, WORK_PIECE)]
    for index in np.ndindex(*grid_shape):
        begin = tuple(b + i * w for b, i, w in zip(roi.begin, index, WORK_PIECE))
        yield Roi(begin, WORK_PIECE).intersect(roi)


# -- rendering one region -------------------------------------------------------------------
def _render(seed: int, roi: Roi, p: SynthParams) -> dict:
    grown = roi.grow((0, p.halo, p.halo))
    tissue = render_tissue(seed, grown, p)
    image = _blur_in_plane(tissue.pop("intensity"), p.blur)
    inner = roi.relative_to(grown).to_slices()
    image = _imaging(seed, roi, image[inner], p)
    return {"raw": image, "clefts": tissue["clefts"][inner], "neuron_ids": tissue["neuron_ids"][inner]}


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


# -- imaging --------------------------------------------------------------------------------
def _blur_in_plane(image: np.ndarray, sigma: float) -> np.ndarray:
    if not sigma:
        return image
    from scipy import ndimage  # imported here: the command line loads this module at start-up

    out = ndimage.gaussian_filter1d(image, sigma, axis=1, mode="nearest", truncate=4.0)
    return ndimage.gaussian_filter1d(out, sigma, axis=2, mode="nearest", truncate=4.0)


def _imaging(seed: int, roi: Roi, image: np.ndarray, p: SynthParams) -> np.ndarray:
    """Uneven illumination, per-section contrast and brightness, detector noise, 8-bit quantisation."""
    z, y, x = (np.arange(b, e) for b, e in zip(roi.begin, roi.end))
    if p.shading:
        image = image * (np.float32(1.0) + value_noise(seed, S_SHADING, z, y, x, SHADING_SPACING) * np.float32(2 * p.shading))
    contrast = (1.0 + p.section_contrast * (2.0 * rand(seed, S_SECTION, z, 1) - 1.0)).astype(np.float32)
    brightness = (p.section_brightness * (2.0 * rand(seed, S_SECTION, z, 2) - 1.0)).astype(np.float32)
    mean = np.float32(0.55)
    image = (image - mean) * contrast[:, None, None] + mean + brightness[:, None, None]
    image = image + voxel_noise(seed, S_NOISE, z, y, x) * np.float32(p.noise)
    return np.clip(np.rint(image * np.float32(255.0)), 0, 255).astype(np.uint8)
