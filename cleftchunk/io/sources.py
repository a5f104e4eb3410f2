"""Read-only sources that are not Zarr or HDF5: TIFF stacks, image folders, ``.npy`` and N5.

Each source is a small array-like with ``shape``, ``dtype``, ``chunks``, ``attrs`` and
``__getitem__`` (a tuple of slices / ints), which is all :class:`cleftchunk.io.volumes.Volume` needs.
Sources open their files lazily and drop open handles when pickled, so that a Dask worker in
another process reopens them. None of them ever loads more than the requested region plus the
storage units (pages, blocks) it overlaps.

- :class:`TiffStack`: a multi-page TIFF; memory-mapped when its pages are stored contiguous and
  uncompressed, else read page by page (only the pages in the requested z range). The voxel
  size comes from ImageJ metadata when it is complete (:func:`tiff_frame_attrs`).
- :class:`ImageFolder`: a folder of per-section TIFF/PNG images, sorted naturally (``2.png``
  before ``10.png``), one section per file.
- :class:`NpyArray`: a ``.npy`` file, memory-mapped (``np.load(mmap_mode="r")``).
- :class:`~cleftchunk.io.n5.N5Array`: an N5 dataset (in :mod:`cleftchunk.io.n5`, re-exported here).

A file that cannot be decoded is reported as corrupt or truncated; a file this process may not
read, or memory running out, is reported as what it is (:func:`cleftchunk.io.access.reading`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import drop_axes, normalize_key
from cleftchunk.io.access import damaged_file_errors, natural_key, reading, roi_of
from cleftchunk.io.n5 import N5_DTYPES, N5Array, decode_n5_block, is_n5, n5_attributes, n5_datasets  # noqa: F401  (re-exported)

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


class _LazyFile:
    """Base for sources holding an open handle: dropped on pickling, reopened on use."""

    _handle_names: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._handle_names:
            state[name] = None
        return state


# -- TIFF ---------------------------------------------------------------------------------
class TiffStack(_LazyFile):
    """A multi-page TIFF as a (z, y, x[, c]) array.

    TiffFile handles seek and read one shared file object, so each thread opens its own.
    """

    _handle_names = ("_local", "_memmap")

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._memmap = None
        series = self._series()
        self.shape = tuple(int(s) for s in series.shape)
        self.dtype = np.dtype(series.dtype)
        self.attrs = tiff_frame_attrs(self._file())
        # One chunk per page: pages are the unit a TIFF stores and reads.
        self.chunks = (1,) + self.shape[1:] if len(self.shape) >= 3 else self.shape
        self.contiguous = series.dataoffset is not None

    def _file(self):
        import tifffile

        if self._local is None:
            self._local = threading.local()
        if getattr(self._local, "tif", None) is None:
            with reading(self.path, "TIFF file"):
                self._local.tif = tifffile.TiffFile(self.path)
        return self._local.tif

    def _series(self):
        tif = self._file()
        if not tif.series:
            raise CleftchunkError(f"{self.path} holds no readable images: the TIFF file is corrupt, truncated or empty")
        return tif.series[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = normalize_key(key, self.shape)
        with reading(self.path, "TIFF file"):
            data = self._mapped()[slices] if self.contiguous else self._read_pages(slices)
        return drop_axes(np.array(data), dropped)

    def _mapped(self) -> np.ndarray:
        import tifffile

        if self._memmap is None:
            self._memmap = tifffile.memmap(self.path, mode="r").reshape(self.shape)
        return self._memmap

    def _read_pages(self, slices: tuple[slice, ...]) -> np.ndarray:
        out = np.empty(roi_of(slices).shape, dtype=self.dtype)
        series = self._series()
        if len(self.shape) < 3 or len(series.pages) != self.shape[0]:
            # Not one page per section (e.g. a single planar page): read the series whole.
            return series.asarray()[slices]
        for i, z in enumerate(range(slices[0].start, slices[0].stop)):
            page = series.pages[z].asarray() if series.pages[z] is not None else self._file().asarray(key=z)
            out[i] = page.reshape(self.shape[1:])[slices[1:]]
        return out

    def close(self) -> None:
        if self._local is not None and getattr(self._local, "tif", None) is not None:
            self._local.tif.close()
        self._local = threading.local()
        self._memmap = None


#: Nanometres per length unit, for the units ImageJ writes into TIFF metadata.
UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, r"\u00b5m": 1e3, "micron": 1e3, "micrometer": 1e3, "mm": 1e6}


def tiff_frame_attrs(tif: Any) -> dict:
    """``{"voxel_size": [z, y, x]}`` in nm from ImageJ metadata, or {} if it is incomplete.

    ImageJ stores the section thickness as ``spacing`` and the pixel size as X/YResolution
    (pixels per ``unit``); without all of them the voxel size is unknown rather than guessed.
    """
    meta = tif.imagej_metadata or {}
    scale = UNIT_NM.get(str(meta.get("unit", "")).lower())
    tags = tif.pages.first.tags
    x, y = tags.get("XResolution"), tags.get("YResolution")
    if scale is None or "spacing" not in meta or x is None or y is None:
        return {}

    def size(tag: Any) -> float:
        pixels_per_unit = tag.value[0] / tag.value[1]
        return round(scale / pixels_per_unit, 6)

    return {"voxel_size": [round(float(meta["spacing"]) * scale, 6), size(y), size(x)]}


# -- image folders ------------------------------------------------------------------------
class ImageFolder:
    """A folder of per-section images (TIFF or PNG), one z section per file, sorted naturally."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = image_files(self.path)
        if not self.files:
            raise CleftchunkError(f"{self.path} holds no .tif/.tiff/.png images: check the folder")
        first = self._read_file(self.files[0])
        if first.ndim not in (2, 3):
            raise CleftchunkError(f"{self.files[0]} has shape {first.shape}: sections must be 2-D images")
        self.section_shape = first.shape
        self.shape = (len(self.files),) + tuple(first.shape)
        self.dtype = first.dtype
        self.chunks = (1,) + tuple(first.shape)
        self.attrs: dict = {}
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Compare every file's header with the first (cheap: no pixels are read), so that a
        mismatched section is refused before any output exists, not half-way through."""
        for path in self.files[1:]:
            shape = _image_header_shape(path)
            if shape is not None and shape != tuple(self.section_shape):
                raise CleftchunkError(
                    f"{path} is {shape} but {self.files[0]} is {tuple(self.section_shape)}: all sections of a folder must match"
                )

    def _read_file(self, path: Path) -> np.ndarray:
        with reading(path, "image"):
            if path.suffix.lower() in TIFF_SUFFIXES:
                import tifffile

                return tifffile.imread(path)
            from PIL import Image

            with Image.open(path) as image:
                return np.asarray(image)

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = normalize_key(key, self.shape)
        out = np.empty(roi_of(slices).shape, dtype=self.dtype)
        for i, z in enumerate(range(slices[0].start, slices[0].stop)):
            section = self._read_file(self.files[z])
            if section.shape != self.section_shape or section.dtype != self.dtype:
                raise CleftchunkError(
                    f"{self.files[z]} is {section.shape} {section.dtype} but {self.files[0]} is "
                    f"{self.section_shape} {self.dtype}: all sections of a folder must match"
                )
            out[i] = section[slices[1:]]
        return drop_axes(out, dropped)


def _image_header_shape(path: Path) -> tuple[int, ...] | None:
    """(y, x[, channels]) from the file's header; None when the header cannot tell (read it then)."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return tuple(tif.series[0].shape)
        from PIL import Image

        with Image.open(path) as image:
            bands = len(image.getbands())
            return (image.height, image.width) + ((bands,) if bands > 1 else ())
    except damaged_file_errors():  # a damaged file is reported with its reason when it is read
        return None


def image_files(folder: Path) -> list[Path]:
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and not is_n5(path) and not _is_zarr_dir(path) and bool(image_files(path))


def _is_zarr_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


# -- npy ----------------------------------------------------------------------------------
class NpyArray(_LazyFile):
    """A ``.npy`` file, memory-mapped: reading a region touches only its pages."""

    _handle_names = ("_memmap",)

    def __init__(self, path: Path):
        self.path = Path(path)
        self._memmap = None
        mapped = self._mapped()
        self.shape = tuple(int(s) for s in mapped.shape)
        self.dtype = mapped.dtype
        self.chunks = self.shape
        self.attrs: dict = {}

    def _mapped(self) -> np.ndarray:
        if self._memmap is None:
            with reading(self.path, ".npy array"):
                self._memmap = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._memmap

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._mapped()[key])


__all__ = [
    "IMAGE_SUFFIXES", "N5_DTYPES", "N5Array", "TIFF_SUFFIXES", "ImageFolder", "NpyArray", "TiffStack",
    "damaged_file_errors", "decode_n5_block", "drop_axes", "image_files", "is_image_folder", "is_n5",
    "n5_attributes", "n5_datasets", "natural_key", "normalize_key", "reading", "roi_of", "tiff_frame_attrs",
]
