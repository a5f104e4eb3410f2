"""The one image-intensity rule: how stored EM intensities become the model's input in [0, 1].

uint8 is divided by 255 and uint16 by 65535 (their full scale); float images are taken as they
are, or multiplied by ``scale`` (e.g. 1/255 for a float copy of 0..255 data). Training and
prediction both read images through this rule, so a model sees the same numbers in both.
Float input must be finite and, after scaling, within [0, 1]: anything else would give wrong
probabilities silently (NaN becomes 0 in a uint8 prediction).
"""

from __future__ import annotations

import math

import numpy as np

from cleftchunk.errors import CleftchunkError

#: Full-scale value of each integer image dtype: the model sees value / full scale.
FULL_SCALE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}

#: Rounding slack allowed above 1 (and below 0) for float images.
TOLERANCE = 1e-6


def check_image_dtype(dtype, what: str = "image") -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FULL_SCALE and dtype.kind != "f":
        raise CleftchunkError(
            f"{what} is {dtype}, which is not supported: images must be uint8, uint16 or float "
            "(0..1, or 0..255 with --scale 1/255); store it as one of these"
        )
    return dtype


def check_scale(scale: float | None) -> float | None:
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise CleftchunkError(f"scale {scale} must be a positive finite number, e.g. 1/255 for 0..255 float images")
    return scale


def image_scale(dtype, scale: float | None = None) -> float:
    """The factor that maps stored intensities of ``dtype`` to [0, 1]."""
    dtype = check_image_dtype(dtype)
    if scale is not None:
        return float(check_scale(scale))
    return 1.0 / FULL_SCALE[dtype] if dtype in FULL_SCALE else 1.0


def check_unit_range(values: np.ndarray, where: str, scale: float | None = None) -> None:
    """Refuse float values that are not finite or fall outside [0, 1] once scaled (cheap: one pass)."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    if not np.isfinite(values).all():
        raise CleftchunkError(f"{where} holds NaN or inf: fix or mask those voxels (predict writes no zeros in their place)")
    factor = 1.0 if scale is None else scale
    low, high = float(values.min()) * factor, float(values.max()) * factor
    if low < -TOLERANCE or high > 1 + TOLERANCE:
        hint = "pass --scale 1/255 for a 0..255 float copy" if scale is None else f"--scale {scale:g} does not bring it into [0, 1]"
        raise CleftchunkError(f"{where} holds float values {low:g}..{high:g}, outside [0, 1]: {hint}")


def nan_if_not_finite(data: np.ndarray) -> np.ndarray:
    """``data``, or all NaN when it is float holding NaN or inf: training reads crops so, and its
    loop refuses a NaN crop naming it (augmentation could otherwise drop or clip the bad voxels)."""
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        return np.full(data.shape, np.nan, np.float32)
    return data
