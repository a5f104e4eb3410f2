"""Where a volume lies in the sample, and how two volumes used together line up: one rule.

A volume's *frame* is its voxel size (nm), its offset (nm, the position of its first voxel) and
its shape. Two volumes a command combines (image and labels, prediction and ground truth, input
and mask, clefts and raw, the viewer's layers) are used together by :func:`align`:

- the same voxel size and offset: voxel for voxel;
- the same voxel size, offsets differing by whole voxels: placed by their offsets. A command that
  can use a part (``mode="overlap"``: training; ``mode="cover"``: evaluate, predict's mask) uses
  the overlap and says which in one line (:attr:`Alignment.note`); one that cannot
  (``mode="same"``) refuses. Where shapes differ but the offsets are equal (often both the
  default 0), nothing says where the smaller lies: evaluate and training refuse (``placed``);
- different voxel sizes, or offsets a fraction of a voxel apart: refused, naming both frames and
  the fixes (resample one, or ``--ignore-frame`` for the user who knows the metadata is wrong).

``ignore=True`` (``--ignore-frame``) uses the volumes voxel for voxel from their first voxels,
whatever their metadata says. A volume that records no voxel size has no frame to compare: it
is used voxel for voxel too, and then must have the other's shape (placing it by a guessed
offset would be a silent wrong answer).

Pure value types: nothing here reads a voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi, drop_axes, normalize_key

#: The flag that tells a command to use volumes voxel for voxel (cli/options.py defines it once).
IGNORE_FLAG = "--ignore-frame"
MODES = ("same", "cover", "overlap")


@dataclass(frozen=True)
class Frame:
    """Voxel size and offset in nm, shape in voxels; ``known``: the voxel size was recorded."""

    voxel_size: tuple[float, ...]
    offset_nm: tuple[float, ...]
    shape: tuple[int, ...]
    name: str = "volume"
    known: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        object.__setattr__(self, "offset_nm", tuple(float(o) for o in self.offset_nm))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not len(self.voxel_size) == len(self.offset_nm) == len(self.shape):
            raise ValueError(f"frame of {self.name}: voxel size, offset and shape differ in length")

    @classmethod
    def of(cls, volume: Any, name: str | None = None, voxel_size: Sequence[float] | None = None) -> "Frame":
        """The frame of anything with ``voxel_size``, ``offset_nm`` and ``shape`` (a Volume);
        ``voxel_size`` overrides the recorded one (evaluate's ``--voxel-size``)."""
        shape = tuple(volume.shape)
        known = voxel_size is not None or bool(getattr(volume, "voxel_size_known", True))
        vs = voxel_size if voxel_size is not None else getattr(volume, "voxel_size", None) or (1.0,) * len(shape)
        offset = getattr(volume, "offset_nm", None) or (0.0,) * len(shape)
        return cls(tuple(vs), tuple(offset), shape, name or str(getattr(volume, "spec", volume)), known)

    @property
    def end_nm(self) -> tuple[float, ...]:
        return tuple(o + s * v for o, s, v in zip(self.offset_nm, self.shape, self.voxel_size))

    def describe(self) -> str:
        """``shape (4, 32, 32), voxel size (40.0, 4.0, 4.0) nm, offset (0.0, 0.0, 0.0) nm``."""
        if not self.known:
            return f"shape {self.shape}, no recorded voxel size"
        return f"shape {self.shape}, voxel size {self.voxel_size} nm, offset {self.offset_nm} nm"

    def extent(self) -> str:
        """Where it lies: ``(0, 0, 0) nm to (160, 128, 128) nm`` (``info`` prints it)."""
        return f"{_nm(self.offset_nm)} nm to {_nm(self.end_nm)} nm" if self.known else "unknown (no voxel size recorded)"

    def __str__(self) -> str:
        return f"{self.name} ({self.describe()})"


@dataclass(frozen=True)
class Alignment:
    """The parts of two volumes used together: ``a`` and ``b`` are array-local boxes of equal
    shape (voxel i of one is voxel i of the other); ``note`` is the one line to say when only a
    part is used (None when everything is)."""

    a: Roi
    b: Roi
    note: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.a.shape

    @property
    def whole(self) -> bool:
        return self.note is None


def align(a: Frame, b: Frame, ignore: bool = False, mode: str = "same", fix: str = "give volumes at one resolution (resample one)",
          placed: str | None = None) -> Alignment:
    """How ``a`` and ``b`` line up (module docstring). ``mode``: ``same`` (the frames must be
    equal), ``cover`` (``a`` must cover ``b``; ``a`` is cropped to it) or ``overlap`` (both are
    cropped to their overlap). ``fix``: what to do about different voxel sizes, in the
    command's words. ``placed``: volumes of different shapes must have different offsets (equal
    ones, usually the default 0, place nothing: a crop of unknown position would be used as if
    it were at the corner); the text is the fix."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if len(a.shape) != len(b.shape):
        raise CleftchunkError(f"{a.name} has {len(a.shape)} axes and {b.name} {len(b.shape)}: give volumes of the same dimensionality")
    if ignore or not (a.known and b.known):
        return _voxel_for_voxel(a, b, ignore, mode)
    if a.voxel_size != b.voxel_size:
        raise CleftchunkError(
            f"voxel sizes differ: {a.name} has voxel size {a.voxel_size} nm, {b.name} {b.voxel_size} nm: {fix}, "
            f"or pass {IGNORE_FLAG} to use them voxel for voxel"
        )
    steps = [(ob - oa) / v for oa, ob, v in zip(a.offset_nm, b.offset_nm, a.voxel_size)]
    if not all(math.isclose(s, round(s), abs_tol=1e-6) for s in steps):
        raise CleftchunkError(
            f"offsets differ by a fraction of a voxel: {a} and {b}: fix the offset in the metadata of one, "
            f"or pass {IGNORE_FLAG} to use them voxel for voxel"
        )
    whole_a = Roi((0,) * len(a.shape), a.shape)
    whole_b = Roi(tuple(int(round(s)) for s in steps), b.shape)  # b in a's array coordinates
    if whole_a == whole_b:
        return Alignment(Roi.from_shape(a.shape), Roi.from_shape(b.shape))
    differ = "shapes differ" if a.shape != b.shape else "offsets differ"
    if placed is not None and a.offset_nm == b.offset_nm:
        raise CleftchunkError(
            f"shapes differ: {a} and {b} start at the same offset, which places neither inside the other: {placed}, "
            f"or pass {IGNORE_FLAG} to use their first voxels"
        )
    if mode == "same":
        raise CleftchunkError(
            f"{differ}: {a} and {b} do not cover the same region: give volumes of one frame, or pass "
            f"{IGNORE_FLAG} to use them voxel for voxel"
        )
    used = whole_b if mode == "cover" else whole_a.intersect(whole_b)
    if used.empty or not whole_a.contains(used):
        what = "does not cover" if mode == "cover" else "does not overlap"
        raise CleftchunkError(
            f"{differ}: {a} {what} {b}: crop or pad one to the other's frame (their offsets place them), or pass "
            f"{IGNORE_FLAG} to use them voxel for voxel"
        )
    a_box, b_box = used, used.shift(tuple(-o for o in whole_b.offset))
    note = f"placed by their offsets: using {a.name} [{_box(a_box)}] with {b.name} [{_box(b_box)}]"
    return Alignment(a_box, b_box, note)


def _voxel_for_voxel(a: Frame, b: Frame, ignore: bool, mode: str) -> Alignment:
    """From the first voxels of both: the same shape, or (``cover``/``overlap`` under
    ``ignore``) the part both have."""
    if a.shape == b.shape:
        return Alignment(Roi.from_shape(a.shape), Roi.from_shape(b.shape))
    unknown = [f.name for f in (a, b) if not f.known]
    if ignore and mode != "same":
        shape = tuple(min(x, y) for x, y in zip(a.shape, b.shape))
        if mode == "cover" and shape != b.shape:
            raise CleftchunkError(f"{a} is smaller than {b}: with {IGNORE_FLAG} it must have at least the other's shape")
        box = Roi.from_shape(shape)
        return Alignment(box, box, f"{IGNORE_FLAG}: using the first {_x(shape)} voxels of {a.name} and {b.name}")
    why = f"{' and '.join(unknown)} records no voxel size, so" if unknown and not ignore else f"with {IGNORE_FLAG}"
    raise CleftchunkError(
        f"shapes differ: {a} and {b}; {why} they are used voxel for voxel and need one shape: "
        "crop or pad one to the other, or record their voxel sizes and offsets"
    )


def _x(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _nm(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _box(roi: Roi) -> str:
    return ",".join(f"{b}:{e}" for b, e in zip(roi.begin, roi.end))


class Cropped:
    """A volume seen through an array-local box: the part :func:`align` chose. It has the
    volume's dtype, chunks, attributes and name, the box's shape, and numpy-style slicing
    (steps of 1) relative to the box."""

    def __init__(self, volume: Any, box: Roi):
        self.volume, self.box = volume, box

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "volume" not in self.__dict__:  # pickling probes before __init__
            raise AttributeError(name)
        return getattr(self.volume, name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.box.shape

    def __getitem__(self, key: Any) -> Any:
        slices, dropped = normalize_key(key, self.box.shape)  # the key rule of every source
        shifted = tuple(slice(b + s.start, b + s.stop) for s, b in zip(slices, self.box.begin))
        return drop_axes(self.volume[shifted], dropped)

    def __str__(self) -> str:
        return f"{self.volume}[{_box(self.box)}]"


def crop(volume: Any, box: Roi) -> Any:
    """``volume`` itself when ``box`` is all of it, else a :class:`Cropped` view."""
    return volume if box == Roi.from_shape(tuple(volume.shape)) else Cropped(volume, box)


def paired(a: Any, b: Any, ignore: bool = False, mode: str = "overlap", log: Any = print,
           names: tuple[str, str] = ("image", "labels"),
           placed: str | None = "give labels covering exactly the image, or record where they lie in their offset") -> tuple[Any, Any]:
    """``a`` and ``b`` cropped to the part :func:`align` uses (logging its note): for commands
    that read both voxel for voxel (training's image and labels)."""
    frames = (Frame.of(v, f"{n} {getattr(v, 'spec', v)}") for v, n in zip((a, b), names))
    alignment = align(*frames, ignore=ignore, mode=mode, placed=placed)
    if alignment.note and log is not None:
        log(alignment.note)
    return crop(a, alignment.a), crop(b, alignment.b)
