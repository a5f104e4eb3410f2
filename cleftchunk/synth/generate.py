"""Synthetic CREMI-like EM volumes with synaptic clefts, generated block by block.

Every voxel is a pure function of (seed, parameters, global voxel coordinate): random numbers are
counter-based hashes of integer keys (:mod:`cleftchunk.synth.fields`), every feature has bounded
support and is enumerated from the hashed cells that can reach a region (:mod:`cleftchunk.synth.tissue`),
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
from cleftchunk.synth.render import render_tissue

VOXEL_SIZE = (40, 4, 4)
#: The extent of a CREMI training sample (5 × 5 × 5 µm), the default of ``cleftchunk synth``.
DEFAULT_SHAPE = (125, 1250, 1250)
#: Lattice of the illumination field: independent per section, smooth over ~1.5 µm in-plane.
SHADING_SPACING = (1, 384, 384)
#: Raw value of a missing section (labels are kept there).
MISSING_GREY = 128
#: Largest region generated at once inside generate_region (bounds its working memory).
WORK_PIECE = (8, 512, 512)

# Hash streams of the imaging model (distinct from the tissue streams; 51 and 53 are render.py's).
S_SECTION, S_NOISE, S_SHADING = 50, 52, 54


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
