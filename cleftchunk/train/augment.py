"""Training augmentations of the original synapse pipeline, on the CPU with numpy/scipy.

A training sample is cut from an *oversized* source box around the model-input crop, so that
rotation, rescaling, elastic deformation, misalignment and missing sections can look beyond the
crop's borders. All random choices of one sample are drawn first into a :class:`Plan`; applying
the plan is deterministic, and the image and the labels go through the same geometry:

1. z selection: the model's z slices from a stack of ``z + missing_sections_count`` source
   slices, with the missing sections' interior slices dropped (or the centre ``z`` slices);
2. ONE in-plane resampling per slice, combining rotation, rescale, the elastic field (one 2-D
   field for all slices, drawn as a coarse control grid and upsampled bilinearly, see
   :func:`elastic_field`) and misalignment (a per-slice shift): ``map_coordinates`` with order 1
   for the image and order 0 for labels; outside the volume the data are mirrored;
3. label smoothing per slice (dilate, Gaussian σ=2, dilate, threshold 0.8), in the model frame;
4. grayscale (image only): contrast, brightness, clip, gamma; whole stack or per slice;
5. missing parts (image only): a band across one slice filled with the slice mean;
6. flips of z, y, x and the x–y transpose.

Each augmentation has a probability in :class:`AugmentConfig`; 0 switches it off.
:mod:`cleftchunk.train.augment_torch` applies the same plans batch-wise with torch on the model's
device; this module stays the reference it is tested against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.predict.tiling import reflect_index  # the same reflection as predict's padding
# The label "code" array resampled with order 0: bit 0 = cleft, bit 1 = invalid (ignored).
from cleftchunk.labels import CLEFT_BIT, INVALID_BIT


@dataclass
class AugmentConfig:
    """Probabilities (0 = off) and strengths; defaults are the original pipeline's."""

    rotation_p: float = 1.0
    rescale_p: float = 0.5
    rescale_range: tuple[float, float] = (0.8, 1.2)
    elastic_p: float = 0.75
    elastic_alpha: float = 12.0
    elastic_sigma: float = 4.0
    flip_p: float = 1.0
    grayscale_p: float = 0.75
    missing_parts_p: float = 0.9
    missing_parts_width: tuple[int, int] = (3, 10)
    missing_sections_p: float = 0.5
    missing_sections_count: int = 2
    misalignment_p: float = 1.0
    misalignment_max: int = 16
    label_smoothing: bool = True

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all: the sample is the plain crop."""
        return cls(
            rotation_p=0, rescale_p=0, elastic_p=0, flip_p=0, grayscale_p=0, missing_parts_p=0,
            missing_sections_p=0, misalignment_p=0, label_smoothing=False,
        )

    @classmethod
    def from_dict(cls, values: dict | None) -> "AugmentConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CleftchunkError(f"unknown augmentation setting(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        for key in ("rescale_range", "missing_parts_width"):
            if key in values:
                values[key] = tuple(values[key])
        for key, value in values.items():
            if any(not _is_number(v) for v in (value if isinstance(value, (tuple, list)) else (value,))):
                raise CleftchunkError(f"augmentation setting {key}={value!r} must be a number (or numbers), e.g. flip_p=0.5")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rescale_range"] = list(self.rescale_range)
        out["missing_parts_width"] = list(self.missing_parts_width)
        return out

    def validate(self) -> None:
        for f in fields(self):
            if f.name.endswith("_p") and not 0.0 <= float(getattr(self, f.name)) <= 1.0:
                raise CleftchunkError(f"augmentation probability {f.name}={getattr(self, f.name)} must lie in [0, 1]")
        lo, hi = self.rescale_range
        if not 0 < lo <= hi:
            raise CleftchunkError(f"rescale_range {self.rescale_range} must be two positive factors, low <= high")
        if self.missing_sections_count < 0 or self.misalignment_max < 0:
            raise CleftchunkError("missing_sections_count and misalignment_max must not be negative")


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class Plan:
    """Every random choice for one sample (drawn by :meth:`Augmenter.draw`)."""

    z_keep: np.ndarray  # source-stack index of each output slice
    angle: float = 0.0  # radians
    scale: float = 1.0  # > 1 zooms in
    elastic: np.ndarray | None = None  # (2, gy, gx) control-grid displacement in source pixels (elastic_field)
    shifts: np.ndarray | None = None  # (z, 2) integer misalignment per output slice
    smooth_labels: bool = False
    grayscale: np.ndarray | None = None  # (z, 3): contrast, brightness, gamma per output slice
    missing_part: tuple[int, float, float, float, float] | None = None  # slice, cy, cx, angle, width
    flips: tuple[bool, bool, bool, bool] = (False, False, False, False)  # z, y, x, transpose yx
    missing_sections: tuple[int, ...] = ()

    @property
    def warps_in_plane(self) -> bool:
        return self.angle != 0.0 or self.scale != 1.0 or self.elastic is not None


class Augmenter:
    """Draws and applies augmentation plans for crops of ``out_shape`` (the model input)."""

    def __init__(self, out_shape: Sequence[int], config: AugmentConfig | None = None):
        self.out_shape = tuple(int(s) for s in out_shape)
        self.config = config or AugmentConfig()
        self.config.validate()

    # -- the oversized source box ------------------------------------------------------------------
    @property
    def extra_z(self) -> int:
        c = self.config
        return int(c.missing_sections_count) if c.missing_sections_p > 0 else 0

    @property
    def margin_yx(self) -> int:
        """Pixels the in-plane warps can reach beyond the crop on each side (a safe upper bound)."""
        c = self.config
        half = max(self.out_shape[1:]) / 2
        reach = half
        if c.rotation_p > 0:
            reach *= math.sqrt(2)
        if c.rescale_p > 0:
            reach /= min(c.rescale_range[0], 1.0)
        if c.elastic_p > 0:
            reach += c.elastic_alpha  # the smoothed noise lies in [-1, 1]
        if c.misalignment_p > 0:
            reach += c.misalignment_max
        warps = c.rotation_p > 0 or c.rescale_p > 0 or c.elastic_p > 0
        return int(math.ceil(reach - half - 1e-9)) + (1 if warps else 0)  # +1: the interpolation's neighbour

    @property
    def source_shape(self) -> tuple[int, int, int]:
        """The oversized box (for 8×256×256 with all augmentations: 10×512×512)."""
        z, y, x = self.out_shape
        m = self.margin_yx
        return (z + self.extra_z, y + 2 * m, x + 2 * m)

    def source_context(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Voxels of the source box before and after the output crop, per axis."""
        before_z = self.extra_z // 2
        m = self.margin_yx
        return (before_z, m, m), (self.extra_z - before_z, m, m)

    # -- drawing ------------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator) -> Plan:
        c = self.config
        z, y, x = self.out_shape
        plan = Plan(z_keep=np.arange(z) + self.extra_z // 2)
        if rng.random() < c.missing_sections_p and self.extra_z:
            stack = z + self.extra_z
            removed = rng.choice(np.arange(1, stack - 1), size=self.extra_z, replace=False)
            plan.missing_sections = tuple(sorted(int(r) for r in removed))
            plan.z_keep = np.setdiff1d(np.arange(stack), removed)
        if rng.random() < c.rotation_p:
            plan.angle = float(rng.uniform(0, 2 * math.pi))
        if rng.random() < c.rescale_p:
            plan.scale = float(rng.uniform(*c.rescale_range))
        if rng.random() < c.elastic_p:
            plan.elastic = draw_elastic(rng, (y, x), c.elastic_sigma, c.elastic_alpha)
        if rng.random() < c.misalignment_p and c.misalignment_max > 0 and z > 1:
            plan.shifts = self._draw_misalignment(rng, z)
        plan.smooth_labels = bool(c.label_smoothing)
        if rng.random() < c.grayscale_p:
            plan.grayscale = self._draw_grayscale(rng, z)
        if rng.random() < c.missing_parts_p:
            lo, hi = c.missing_parts_width
            plan.missing_part = (
                int(rng.integers(z)), float(rng.uniform(0, y)), float(rng.uniform(0, x)),
                float(rng.uniform(0, math.pi)), float(rng.uniform(lo, hi)),
            )
        if rng.random() < c.flip_p:
            plan.flips = tuple(bool(b) for b in rng.random(4) < 0.5)  # type: ignore[assignment]
        return plan

    def _draw_misalignment(self, rng: np.random.Generator, z: int) -> np.ndarray:
        """One slice shifted, or every slice from an index on (equally likely)."""
        m = self.config.misalignment_max
        shift = rng.integers(-m, m + 1, size=2)
        shifts = np.zeros((z, 2), dtype=np.int64)
        index = int(rng.integers(1, z)) if z > 1 else 0
        if rng.random() < 0.5:
            shifts[index] = shift
        else:
            shifts[index:] = shift
        return shifts

    @staticmethod
    def _draw_grayscale(rng: np.random.Generator, z: int) -> np.ndarray:
        per_slice = rng.random() < 0.5
        n = z if per_slice else 1
        contrast = 1 + rng.uniform(-0.15, 0.15, n)
        brightness = rng.uniform(-0.15, 0.15, n)
        gamma = 2.0 ** rng.uniform(-1, 1, n)
        params = np.stack([contrast, brightness, gamma], axis=1)
        return np.repeat(params, z, axis=0) if not per_slice else params

    # -- geometry of one sample ------------------------------------------------------------------
    def base_coordinates(self, plan: Plan) -> np.ndarray:
        """(2, y, x) source offsets (relative to the crop origin) of each output pixel, before shifts."""
        _, h, w = self.out_shape
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        if not plan.warps_in_plane:
            return np.stack([yy, xx])
        cy, cx = (h - 1) / 2, (w - 1) / 2
        dy, dx = yy - cy, xx - cx
        cos, sin = math.cos(plan.angle) / plan.scale, math.sin(plan.angle) / plan.scale
        coords = np.stack([cy + cos * dy - sin * dx, cx + sin * dy + cos * dx])
        if plan.elastic is not None:
            coords += elastic_field(plan.elastic, (h, w), self.config.elastic_sigma)
        return coords

    def source_roi(self, crop_offset: Sequence[int], plan: Plan, base: np.ndarray) -> Roi:
        """The box (crop-local frame shifted to ``crop_offset``) that the plan reads from."""
        z_lo = int(plan.z_keep.min()) - self.extra_z // 2
        z_hi = int(plan.z_keep.max()) - self.extra_z // 2 + 1
        shifts = plan.shifts if plan.shifts is not None else np.zeros((1, 2), dtype=np.int64)
        lo = [math.floor(base[a].min() + shifts[:, a].min()) for a in (0, 1)]
        hi = [math.floor(base[a].max() + shifts[:, a].max()) + 2 for a in (0, 1)]
        return Roi.from_bounds((z_lo, lo[0], lo[1]), (z_hi, hi[0], hi[1])).shift(crop_offset)

    # -- applying -------------------------------------------------------------------------------------
    def resample(self, source: Any, volume_roi: Roi, crop_offset: Sequence[int], plan: Plan, order: int,
                 base: np.ndarray | None = None, convert: Any = None) -> np.ndarray:
        """Read what the plan needs from ``source`` (array-like, local coordinates) and warp it.

        ``volume_roi`` is the source's extent (offset 0); ``convert`` maps the raw read array to the
        array that gets resampled (e.g. CREMI ids to label codes). Out-of-volume reads are mirrored.
        """
        base = self.base_coordinates(plan) if base is None else base
        want = self.source_roi(crop_offset, plan, base)
        have = want.intersect(volume_roi)
        if have.empty:
            raise ValueError(f"plan reads {want}, outside the volume {volume_roi}")
        data = np.asarray(source[have.to_slices()])
        if convert is not None:
            data = convert(data)
        if data.size and data.min() == data.max():
            # Any interpolation of a constant is that constant: e.g. a label box without clefts
            # (most rejection-sampling tries on sparse data) needs no warping at all.
            return np.full(self.out_shape, data.flat[0], dtype=np.float32 if order > 0 else data.dtype)
        origin = have.offset
        z_index = reflect_index(plan.z_keep - self.extra_z // 2 + int(crop_offset[0]), volume_roi.shape[0]) - origin[0]
        yx_origin = np.array([crop_offset[1] - origin[1], crop_offset[2] - origin[2]], dtype=np.float64)
        out_dtype = np.float32 if order > 0 else data.dtype
        out = np.empty(self.out_shape, dtype=out_dtype)
        shifted_only = not plan.warps_in_plane
        for k, zi in enumerate(z_index):
            shift = yx_origin + (plan.shifts[k] if plan.shifts is not None else 0)
            section = data[int(zi)]
            if shifted_only:
                out[k] = _shifted_window(section, shift.astype(np.int64), self.out_shape[1:])
            else:
                coords = base + shift[:, None, None]
                ndi.map_coordinates(section, coords, output=out[k], order=order, mode="mirror", prefilter=False)
        return out

    def finish_labels(self, code: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(label float32 0/1, valid mask float32) in the model frame from the resampled codes."""
        label = (code & CLEFT_BIT).astype(bool)
        valid = (code & INVALID_BIT) == 0
        if plan.smooth_labels:
            label = smooth_labels(label)
        label, valid = apply_flips([label, valid], plan.flips)
        return label.astype(np.float32), valid.astype(np.float32)

    def finish_image(self, image: np.ndarray, plan: Plan) -> np.ndarray:
        if plan.grayscale is not None:
            image = apply_grayscale(image, plan.grayscale)
        if plan.missing_part is not None:
            apply_missing_part(image, plan.missing_part)
        (image,) = apply_flips([image], plan.flips)
        return image


# -- the elastic field -----------------------------------------------------------------------------
def elastic_spacing(sigma: float) -> float:
    """Pixels between the elastic field's control points: its correlation length σ (at least 1)."""
    return max(float(sigma), 1.0)


def control_shape(shape: Sequence[int], sigma: float) -> tuple[int, int]:
    """Control points per axis covering pixels 0 .. n-1 at :func:`elastic_spacing`."""
    s = elastic_spacing(sigma)
    return tuple(int(math.ceil((n - 1) / s - 1e-9)) + 1 for n in shape)  # type: ignore[return-value]


BILINEAR_SPREAD = 1.075


def draw_elastic(rng: np.random.Generator, shape: Sequence[int], sigma: float, alpha: float) -> np.ndarray:
    """(2, gy, gx) control-point displacements, in [-alpha, alpha].

    The original smooths full-resolution uniform noise with a Gaussian of σ px (35 ms a crop, and
    a (2, y, x) field to ship). Here uniform noise on a grid of spacing σ is smoothed with σ = 1
    grid step — the same correlation length — and scaled by 1/spacing, which keeps the per-pixel
    spread of the original (the spread of smoothed white noise falls as 1/σ per axis pair); the
    field is then upsampled bilinearly (:func:`elastic_field`) by both augmentation paths alike.
    ``BILINEAR_SPREAD`` makes up for the spread bilinear interpolation loses between control points
    (measured: 0.46 px against the original's 0.50 px at σ 4, α 12; tests/test_augment_torch.py).
    """
    s = elastic_spacing(sigma)
    noise = rng.uniform(-1, 1, size=(2, *control_shape(shape, sigma)))
    smooth = np.stack([ndi.gaussian_filter(n, sigma / s, mode="reflect") for n in noise]) * (BILINEAR_SPREAD / s)
    return (np.clip(smooth, -1, 1) * alpha).astype(np.float32)  # clipped: the margin assumes |d| <= alpha


def interpolation_matrix(n_out: int, n_in: int, spacing: float) -> np.ndarray:
    """(n_out, n_in) linear interpolation from control points every ``spacing`` px to pixels."""
    out = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 1:
        out[:, 0] = 1.0
        return out
    position = np.arange(n_out) / spacing
    low = np.clip(np.floor(position).astype(np.int64), 0, n_in - 2)
    frac = position - low
    rows = np.arange(n_out)
    out[rows, low] = 1.0 - frac
    out[rows, low + 1] = frac
    return out


def elastic_field(control: np.ndarray, shape: Sequence[int], sigma: float) -> np.ndarray:
    """(2, y, x) displacement: the control grid upsampled bilinearly (two small matrix products)."""
    s = elastic_spacing(sigma)
    my = interpolation_matrix(int(shape[0]), control.shape[1], s)
    mx = interpolation_matrix(int(shape[1]), control.shape[2], s)
    return np.einsum("hg,cgk,wk->chw", my, control.astype(np.float64), mx, optimize=True)


# -- the single steps (also usable on their own) ----------------------------------------------------
def _shifted_window(section: np.ndarray, origin: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``section[origin : origin + shape]`` with out-of-range indices mirrored (no interpolation)."""
    rows = reflect_index(np.arange(shape[0]) + origin[0], section.shape[0])
    cols = reflect_index(np.arange(shape[1]) + origin[1], section.shape[1])
    if rows[0] >= 0 and np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1):
        return section[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return section[np.ix_(rows, cols)]


_SQUARE = np.ones((3, 3), dtype=bool)


def smooth_labels(label: np.ndarray, sigma: float = 2.0, threshold: float = 0.8) -> np.ndarray:
    """Per slice: dilate, Gaussian σ, dilate, threshold — drops in-plane structures thinner than ~4 px.

    Computed on each slice's label bounding box grown by the filters' reach (clipped to the
    slice), which gives the same result as the whole slice: beyond that reach every value is 0.
    """
    out = np.zeros_like(label, dtype=bool)
    reach = 1 + int(4 * sigma + 0.5) + 1 + 2  # dilation, Gaussian (truncate=4), dilation, spare
    for k, section in enumerate(label):
        rows, cols = np.flatnonzero(section.any(axis=1)), np.flatnonzero(section.any(axis=0))
        if not rows.size:
            continue
        box = Roi.from_bounds((rows[0], cols[0]), (rows[-1] + 1, cols[-1] + 1)).grow(reach).intersect(
            Roi.from_shape(section.shape)
        )
        sl = box.to_slices()
        grown = ndi.binary_dilation(section[sl], structure=_SQUARE).astype(np.float32)
        blurred = ndi.gaussian_filter(grown, sigma)
        out[k][sl] = ndi.grey_dilation(blurred, footprint=_SQUARE) > threshold
    return out


def apply_grayscale(image: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Per slice: ×contrast, +brightness, clip to [0, 1], ^gamma (params: (z, 3))."""
    contrast, brightness, gamma = (params[:, i].astype(np.float32)[:, None, None] for i in range(3))
    out = np.clip(image * contrast + brightness, 0.0, 1.0)
    return np.power(out, gamma, dtype=np.float32)


def apply_missing_part(image: np.ndarray, part: tuple[int, float, float, float, float]) -> None:
    """Fill a band across one slice (through (cy, cx) at ``angle``, ``width`` px) with the slice mean."""
    k, cy, cx, angle, width = part
    h, w = image.shape[1:]
    yy, xx = np.ogrid[:h, :w]
    distance = np.abs((yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle))
    band = distance <= width / 2
    image[k][band] = image[k].mean()


def apply_flips(arrays: list[np.ndarray], flips: Sequence[bool]) -> list[np.ndarray]:
    fz, fy, fx, transpose = flips
    out = []
    for a in arrays:
        if fz:
            a = a[::-1]
        if fy:
            a = a[:, ::-1]
        if fx:
            a = a[:, :, ::-1]
        if transpose:
            a = a.transpose(0, 2, 1)
        out.append(np.ascontiguousarray(a))
    return out


__all__ = [
    "AugmentConfig",
    "Augmenter",
    "Plan",
    "apply_flips",
    "apply_grayscale",
    "apply_missing_part",
    "draw_elastic",
    "elastic_field",
    "smooth_labels",
]
