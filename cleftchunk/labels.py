"""What a volume holds, decided once, by one rule that every stage reads.

Kinds (the ``cleft_kind`` attribute of a volume written by cleftchunk):

- ``ids``: CREMI cleft ids, uint64; background 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFE marks
  voxels the metrics ignore; every other value is a cleft voxel.
- ``main``: 0-background ids or masks, as in PyTorch Connectomics' ``main`` datasets: non-zero is
  a cleft voxel.
- ``mask``: 0/1 (or bool): non-zero is a cleft voxel.
- ``prob``: cleft probabilities, uint8 (p·255, what ``cleftchunk predict`` writes), uint16
  (p·65535) or float in [0, 1] (or in [0, ``prob_max``] when the volume's ``prob_max`` attribute
  states another full scale, e.g. 255); a cleft voxel is one at or above a threshold, given of
  255 whatever the dtype (:func:`prob_scale`).
- ``image`` and ``neurons``: EM intensities and neuron ids. They are not cleft labels, and a stage
  that reads labels refuses them instead of counting every voxel as a cleft.

:func:`resolve_kind` decides, in this order: an explicit ``kind`` (the commands' ``--kind`` /
``--labels``; checked against the dtype); the stored ``cleft_kind`` attribute (written by
``convert``, ``synth``, ``predict`` and ``segment``); a ``background`` attribute; the dtype and
name; and only then a look at a bounded number of chunk-sized boxes spread over the volume
(:func:`sampled_range`, :func:`detect_uint64_kind`), so deciding costs the same for a gigabyte
and a petabyte; a dry run reads none (``read=False``). When the boxes cannot tell CREMI ids from
0-background ids, or a uint8 mask from probabilities, it is an error that names the override —
never a guess that turns every voxel into a cleft. A volume read as cleft labels
(:func:`resolve_label_kind`) whose kind was guessed from the dtype and values (not stated) and
under which most sampled voxels would be clefts is refused too (:func:`check_sparse`): clefts
are sparse, and such a volume holds probabilities or neuron ids.

This module knows nothing of storage: it works on anything with ``dtype``, ``shape``, ``attrs``,
``inner`` (the path inside its container) and numpy-style slicing.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError

#: The attribute that records a volume's kind.
KIND_ATTRIBUTE = "cleft_kind"
#: Provenance attribute of `cleftchunk predict` outputs (uint8 probabilities).
PREDICT_ATTRIBUTE = "cleftchunk_predict"
#: The stored value of probability 1 when it is not the dtype's (float probabilities of 0..255).
PROB_MAX_ATTRIBUTE = "prob_max"
#: Full scale of probabilities by dtype (floats: 1, unless ``prob_max`` says otherwise).
PROB_FULL_SCALE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
#: A guessed label kind under which more than this share of the sampled voxels are clefts is refused.
MOST = 0.5

#: Kinds that hold clefts (what ``--kind`` accepts).
KINDS = ("ids", "main", "mask", "prob")
#: Kinds that do not.
OTHER_KINDS = ("image", "neurons")
#: Other names users know these by (``--label-mode`` of training; the issue tracker's words).
ALIASES = {"cremi": "ids", "nonzero": "main", "zero-background": "main"}

CREMI_BACKGROUND = np.uint64(0xFFFFFFFFFFFFFFFF)
CREMI_INVALID = np.uint64(0xFFFFFFFFFFFFFFFE)
DEFAULT_THRESHOLD = 128

#: Training's uint8 label codes: bit 0 cleft, bit 1 invalid (resampled with order 0).
CLEFT_BIT = 1
INVALID_BIT = 2

#: CREMI's own dataset paths.
CREMI_RAW = "volumes/raw"
CREMI_CLEFTS = "volumes/labels/clefts"
CREMI_NEURONS = "volumes/labels/neuron_ids"


def canonical(kind: str) -> str:
    """``kind`` with aliases resolved; an unknown name is an error listing the valid ones."""
    kind = ALIASES.get(kind, kind)
    if kind != "auto" and kind not in KINDS + OTHER_KINDS:
        raise CleftchunkError(f"unknown volume kind {kind!r}: use one of auto, {', '.join(KINDS)} (or cremi, zero-background)")
    return kind


def check_fits(dtype: Any, kind: str, where: str) -> None:
    dtype = np.dtype(dtype)
    fits = {
        "ids": dtype == np.uint64,
        "main": dtype.kind in "biu",
        "mask": dtype.kind in "biu",
        "prob": dtype in PROB_FULL_SCALE or dtype.kind == "f",
        "image": dtype.kind in "uif",
        "neurons": dtype.kind in "iu",
    }[kind]
    if not fits:
        raise CleftchunkError(f"{where}: dtype {dtype} cannot hold {kind!r} data: choose another kind")


def declared_kind(attrs: dict) -> str | None:
    """The kind a volume's attributes state, if any."""
    declared = attrs.get(KIND_ATTRIBUTE)
    if declared in KINDS + OTHER_KINDS:
        return declared
    if PREDICT_ATTRIBUTE in attrs or PROB_MAX_ATTRIBUTE in attrs:
        return "prob"
    if "background" in attrs:
        try:
            background = int(attrs["background"])
        except (TypeError, ValueError):
            return None
        return "ids" if background == int(CREMI_BACKGROUND) else "main" if background == 0 else None
    return None


def path_parts(volume: Any) -> list[str]:
    """The parts of a volume's path inside its container, without OME-Zarr's level names."""
    parts = [p for p in str(getattr(volume, "inner", "") or "").split("/") if p]
    while parts and parts[-1].startswith("s") and parts[-1][1:].isdigit():
        parts.pop()
    return parts


def kind_from_name(volume: Any) -> str | None:
    """What the dataset's name says: CREMI's paths, and PyTorch Connectomics' ``main``."""
    inner = "/".join(path_parts(volume))
    if inner.endswith(CREMI_CLEFTS):
        return "ids" if np.dtype(volume.dtype) == np.uint64 else None
    if inner.endswith(CREMI_NEURONS):
        return "neurons"
    if inner.endswith(CREMI_RAW):
        return "image"
    if "main" in path_parts(volume) and np.dtype(volume.dtype).kind in "biu":
        return "main"
    return None


def resolve_kind(volume: Any, kind: str = "auto", value_range: Any = None, scan: bool = True, read: bool = True) -> str | None:
    """The kind of ``volume`` (see the module docstring). ``value_range()`` → (min, max) replaces
    the sampled range (:func:`sampled_range`) of uint8 and float volumes with no stated kind;
    with ``scan=False`` (training, which reads only the crops it needs) an unstated uint8 volume
    is taken as a mask (non-zero = cleft) without reading it, which gives the same cleft voxels
    as ``prob`` for 0/255 masks. ``read=False`` (a dry run): no voxel is read, and a kind that
    only the values could tell is None."""
    where = getattr(volume, "spec", None) or str(volume)
    kind = canonical(kind)
    if kind != "auto":
        check_fits(volume.dtype, kind, where)
        return kind
    stated = declared_kind(dict(getattr(volume, "attrs", None) or {})) or kind_from_name(volume)
    if stated is not None:
        check_fits(volume.dtype, stated, where)
        return stated
    dtype = np.dtype(volume.dtype)
    if dtype == np.bool_:
        return "mask"
    if dtype.kind == "u" and dtype not in (np.uint8, np.uint64):
        return "main"
    if dtype == np.uint8 and not scan:
        return "mask"
    if dtype not in (np.uint8, np.uint64) and dtype.kind != "f":
        raise CleftchunkError(
            f"{where}: dtype {dtype} is neither CREMI ids (uint64), a mask, labels (unsigned) nor "
            "probabilities (uint8/float): convert it, or say what it is with --kind"
        )
    if not read:
        return None
    if dtype == np.uint64:
        return detect_uint64_kind(volume)
    low, high, whole = (*value_range(), True) if value_range is not None else sampled_range(volume)
    if dtype == np.uint8:
        return _uint8_kind(where, high, whole)
    if 0 <= low and high <= 1:
        return "prob"
    sampled = "" if whole else " where sampled"
    scale = f"; probabilities of 0..255 need the attribute {PROB_MAX_ATTRIBUTE}: 255" if 0 <= low and high <= 255 else ""
    raise CleftchunkError(
        f"{where}: {dtype} values span [{low:g}, {high:g}]{sampled}, neither probabilities in [0, 1] "
        f"nor ids/masks: convert it to uint8 probabilities or uint64 CREMI ids{scale}"
    )


def check_sparse(volume: Any, kind: str, where: str, boxes: int | None = None) -> str:
    """``kind`` (guessed, not stated) unless most voxels of the sampled boxes would be clefts
    under it: clefts are sparse, so such a volume holds probabilities (or neuron ids), and reading
    it as labels would make one cleft of nearly everything."""
    cleft = total = 0
    for box in sample_boxes(volume, boxes or SAMPLE_CHUNKS)[0]:
        data = np.asarray(volume[box])
        cleft, total = cleft + int((label_codes(data, kind) & CLEFT_BIT).sum()), total + data.size  # CREMI's invalid: not clefts
    if total and cleft > MOST * total:
        raise CleftchunkError(
            f"{where}: read as {kind} labels, {cleft / total:.0%} of the sampled voxels would be clefts: it looks like "
            "probabilities: --kind prob (or neuron ids, which are not cleft labels)"
        )
    return kind


def _uint8_kind(where: str, high: float, whole: bool) -> str:
    """uint8 values: above 1 somewhere → probabilities; 0/1 → a mask. Sampled boxes holding only
    zeros say nothing of the rest: an error naming the override rather than a guess."""
    if high > 1:
        return "prob"
    if high == 1 or whole:
        return "mask"
    raise CleftchunkError(
        f"{where}: uint8 values with no stated kind, and every sampled chunk holds only 0: "
        "say what it holds with --kind mask (non-zero = cleft) or --kind prob (p*255)"
    )


def known_kind(volume: Any) -> str | None:
    """The kind when it can be told without reading much: stated, named, or a uint64 volume
    whose sampled boxes decide. None otherwise (``convert`` then records nothing)."""
    stated = declared_kind(dict(getattr(volume, "attrs", None) or {})) or kind_from_name(volume)
    if stated is not None or np.dtype(volume.dtype) != np.uint64:
        return stated
    try:
        return detect_uint64_kind(volume)
    except CleftchunkError:
        return None


def resolve_label_kind(volume: Any, kind: str = "auto", value_range: Any = None, scan: bool = True, read: bool = True) -> str | None:
    """:func:`resolve_kind` for a volume read as cleft labels: images and neuron ids are refused."""
    resolved = resolve_kind(volume, kind, value_range, scan, read)
    guessed = canonical(kind) == "auto" and np.dtype(volume.dtype) != np.bool_ and not (
        declared_kind(dict(getattr(volume, "attrs", None) or {})) or kind_from_name(volume))
    # volumes opened from storage (arrays handed to the library are taken as the caller says)
    if guessed and read and resolved in ("ids", "main", "mask") and getattr(volume, "spec", None):
        check_sparse(volume, resolved, volume.spec)
    if resolved in OTHER_KINDS:
        what = "an EM image" if resolved == "image" else "neuron ids"
        raise CleftchunkError(
            f"{getattr(volume, 'spec', volume)} holds {what}, not cleft labels: give the clefts volume "
            "(or --kind ids|main|mask if its metadata is wrong)"
        )
    return resolved


def detect_uint64_kind(labels: Any, boxes: int = 4) -> str:
    """uint64 labels with no stated kind: CREMI ids if 0xFF..FF occurs, 0-background if 0 does.

    CREMI clefts are sparse, so any box holds background; a 0-background volume never holds
    0xFF..FF. Reads at most ``boxes`` chunk-sized boxes along the diagonal, so the cost does not
    grow with the volume. Boxes that hold neither value cannot be told apart: an error.
    """
    shape = tuple(int(s) for s in labels.shape)
    chunk = tuple(getattr(labels, "chunks", None) or (16, 256, 256))[-len(shape):]
    size = tuple(max(1, min(int(c), s)) for c, s in zip(chunk, shape))
    seen_zero = False
    for i in range(boxes):
        frac = (i + 0.5) / boxes
        start = tuple(int((s - b) * frac) for s, b in zip(shape, size))
        data = np.asarray(labels[tuple(slice(a, a + b) for a, b in zip(start, size))])
        if (data == CREMI_BACKGROUND).any():
            return "ids"
        seen_zero = seen_zero or bool((data == 0).any())
    if seen_zero:
        return "main"
    raise CleftchunkError(
        f"{getattr(labels, 'spec', labels)}: uint64 labels holding neither the CREMI background 0xFFFFFFFFFFFFFFFF "
        "nor 0 where sampled: say which they are with --kind ids (CREMI) or --kind main (0 = background)"
    )


def prob_scale(volume: Any) -> float:
    """The stored value of probability 1: 255 (uint8), 65535 (uint16), 1 for floats, unless the
    ``prob_max`` attribute states another (e.g. 255 for float copies of uint8 maps)."""
    stated = dict(getattr(volume, "attrs", None) or {}).get(PROB_MAX_ATTRIBUTE)
    if stated is not None:
        try:
            value = float(stated)
        except (TypeError, ValueError):
            value = float("nan")
        if not (np.isfinite(value) and value > 0):
            raise CleftchunkError(f"{getattr(volume, 'spec', volume)}: attribute {PROB_MAX_ATTRIBUTE}={stated!r} must be a positive number")
        return value
    return float(PROB_FULL_SCALE.get(np.dtype(volume.dtype), 1))


def probability_scale(volume: Any, read: bool = True) -> float:
    """:func:`prob_scale` of a volume that must hold probabilities: uint8, uint16 or float, and
    (``read``: from the sampled boxes) floats within [0, scale], so that 0..255 floats are never
    compared with threshold/255 and taken as all clefts."""
    spec = getattr(volume, "spec", volume)
    if np.dtype(volume.dtype) not in PROB_FULL_SCALE and np.dtype(volume.dtype).kind != "f":
        raise CleftchunkError(f"{spec} holds {volume.dtype}, not probabilities: give uint8, uint16 or float probabilities")
    scale = prob_scale(volume)
    if read and np.dtype(volume.dtype).kind == "f":
        low, high, _ = sampled_range(volume)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise CleftchunkError(f"{spec}: probabilities hold NaN or infinite values: fix the prediction (predict writes none)")
        if not (0 <= low and high <= scale):
            raise CleftchunkError(
                f"{spec}: float values span [{low:g}, {high:g}], not probabilities in [0, {scale:g}]: "
                f"give probabilities in [0, 1] (or record their full scale in the attribute {PROB_MAX_ATTRIBUTE})"
            )
    return scale


def checked_threshold(threshold: float) -> float:
    """A cleft threshold, of 255 whatever the probabilities' dtype."""
    if not 0 < threshold <= 255:
        raise CleftchunkError(f"threshold={threshold:g} is outside (0, 255]: it applies to uint8 probabilities (p*255)")
    return float(threshold)


def cleft_mask(data: np.ndarray, kind: str, threshold: float = DEFAULT_THRESHOLD, scale: float | None = None) -> np.ndarray:
    """Boolean mask of cleft voxels (CREMI's invalid value counts as a cleft here; see
    :func:`invalid_mask`). ``threshold`` is of 255 whatever the dtype; ``scale``: the stored
    value of probability 1 (:func:`prob_scale`; default the dtype's)."""
    if kind == "ids":
        return data != CREMI_BACKGROUND
    if kind in ("main", "mask"):
        return data != 0
    if kind == "prob":
        full = float(PROB_FULL_SCALE.get(data.dtype, 1)) if scale is None else float(scale)
        if data.dtype == np.uint8 and full == 255:
            return data >= threshold  # exact, as predict writes them
        if data.dtype == np.uint16 and full == 65535:
            return data >= threshold * 257  # 65535 / 255 = 257 exactly
        if data.dtype.kind == "f" and not np.isfinite(data).all():  # NaN >= t is False: never silently background
            raise CleftchunkError(
                f"probabilities hold {np.count_nonzero(~np.isfinite(data))} NaN or infinite values in a block: "
                "fix the prediction (predict writes none), or replace them before thresholding"
            )
        return data >= threshold / 255.0 * full
    raise ValueError(f"not a cleft kind: {kind!r}")


def invalid_mask(data: np.ndarray, kind: str) -> np.ndarray | None:
    """Voxels the metrics and the loss ignore (only CREMI ids have them); None when none can be."""
    return data == CREMI_INVALID if kind == "ids" else None


def label_codes(data: np.ndarray, kind: str) -> np.ndarray:
    """uint8 codes (bit 0 cleft, bit 1 invalid) from stored labels, for training's resampling."""
    kind = canonical(kind)
    if kind == "ids":
        data = data.astype(np.uint64, copy=False)
        invalid = data == CREMI_INVALID
        cleft = (data != CREMI_BACKGROUND) & ~invalid
        return (cleft * np.uint8(CLEFT_BIT)) | (invalid * np.uint8(INVALID_BIT))
    return cleft_mask(data, kind).astype(np.uint8)


def not_cleft_values(kind: str) -> tuple[int, ...]:
    """The stored values that are not clefts, for making a 0/1 mask (``convert --mask``)."""
    if kind == "ids":
        return (int(CREMI_BACKGROUND), int(CREMI_INVALID))
    if kind in ("main", "mask"):
        return (0,)
    raise CleftchunkError(f"a {kind!r} volume has no cleft/background values to make a mask of: give a label volume")


#: Chunks read at most to decide the kind of a uint8 or float volume from its values.
SAMPLE_CHUNKS = 64


def sample_boxes(volume: Any, boxes: int = SAMPLE_CHUNKS) -> tuple[list[tuple[slice, ...]], bool]:
    """Chunk-sized boxes of ``volume`` to look at, and whether they cover all of it: every chunk
    when there are at most ``boxes``, else ``boxes`` chunks evenly spread in raster order (the
    chunk grid is indexed arithmetically: nothing grows with the volume)."""
    shape = tuple(int(s) for s in volume.shape)
    if 0 in shape:
        return [], True
    chunk = tuple(getattr(volume, "chunks", None) or (16, 256, 256))[-len(shape):]
    size = tuple(max(1, min(int(c), s)) for c, s in zip(chunk, shape))
    grid = tuple(-(-s // c) for s, c in zip(shape, size))
    n = int(np.prod(grid, dtype=np.int64))
    if n <= boxes:
        picks = range(n)
    else:
        picks = sorted({round(i * (n - 1) / max(boxes - 1, 1)) for i in range(boxes)})
    out = []
    for flat in picks:
        index = np.unravel_index(flat, grid)
        out.append(tuple(slice(int(i) * c, min((int(i) + 1) * c, s)) for i, c, s in zip(index, size, shape)))
    return out, n <= boxes


def sampled_range(volume: Any, boxes: int = SAMPLE_CHUNKS) -> tuple[float, float, bool]:
    """(min, max, whole) of the values in :func:`sample_boxes`; ``whole``: every voxel was read.
    A NaN anywhere sampled makes both NaN; an empty volume is (0, 0, True)."""
    low, high = np.inf, -np.inf
    where, whole = sample_boxes(volume, boxes)
    for box in where:
        data = np.asarray(volume[box])
        if data.size:  # np.minimum/np.maximum propagate NaN, as the values' min/max would
            low, high = float(np.minimum(low, data.min())), float(np.maximum(high, data.max()))
    return (0.0, 0.0, whole) if low > high else (low, high, whole)


def kind_attrs(kind: str | None) -> dict:
    """The attributes that record ``kind`` on a new volume (none when it is unknown)."""
    return {} if kind is None else {KIND_ATTRIBUTE: kind}


__all__: Sequence[str] = [
    "CREMI_BACKGROUND", "CREMI_INVALID", "KINDS", "KIND_ATTRIBUTE", "cleft_mask", "label_codes", "resolve_kind",
    "resolve_label_kind",
]
