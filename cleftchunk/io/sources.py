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
- :class:`N5Array`: an N5 dataset (zarr 3 no longer reads N5). N5 lists dimensions, block sizes,
  block indices and resolutions x-first; they are reversed here to (z, y, x). Blocks are
  big-endian, carry a small header (mode, ndim, actual block size), and may be compressed with
  raw, gzip, zlib, bzip2, xz, zstd or blosc; a block that is missing on disk reads as 0.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import ChunkGrid, Roi

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
N5_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")


# -- indexing helpers ---------------------------------------------------------------------
def normalize_key(key: Any, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Expand ``key`` to one step-1 slice per axis; also return the axes indexed by an int.

    Sources read boxes, so this accepts what the volume layer and dask pass: slices with
    step 1, ints and Ellipsis.
    """
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (len(shape) - len(key))
    if len(key) != len(shape):
        raise IndexError(f"too many indices for an array of shape {tuple(shape)}")
    slices, dropped = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, (int, np.integer)):
            k = int(k) + (n if k < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
            slices.append(slice(k, k + 1))
            dropped.append(axis)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError("sources only support contiguous slices (step 1)")
            slices.append(slice(start, max(start, stop)))
        else:
            raise IndexError(f"unsupported index {k!r}: use slices or ints")
    return tuple(slices), tuple(dropped)


def roi_of(slices: Sequence[slice]) -> Roi:
    return Roi.from_bounds([s.start for s in slices], [s.stop for s in slices])


def _drop_axes(data: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    return data.squeeze(axis=tuple(axes)) if axes else data


def natural_key(name: str) -> list:
    """Sort key under which ``s2.png`` comes before ``s10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


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
            try:
                self._local.tif = tifffile.TiffFile(self.path)
            except Exception as e:
                raise CleftchunkError(f"{self.path} is not a readable TIFF file ({e}): check that it is complete") from e
        return self._local.tif

    def _series(self):
        tif = self._file()
        if not tif.series:
            raise CleftchunkError(f"{self.path} holds no readable images: the TIFF file is corrupt, truncated or empty")
        return tif.series[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = normalize_key(key, self.shape)
        try:
            if self.contiguous:
                data = self._mapped()[slices]
            else:
                data = self._read_pages(slices)
        except CleftchunkError:
            raise
        except Exception as e:  # tifffile/numpy raise many kinds for damaged files
            raise CleftchunkError(f"cannot read {self.path} ({type(e).__name__}: {e}): the file is corrupt or truncated") from e
        return _drop_axes(np.array(data), dropped)

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
        try:
            if path.suffix.lower() in TIFF_SUFFIXES:
                import tifffile

                return tifffile.imread(path)
            from PIL import Image

            with Image.open(path) as image:
                return np.asarray(image)
        except Exception as e:
            raise CleftchunkError(f"cannot read image {path} ({type(e).__name__}: {e}): the file is corrupt or truncated") from e

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
        return _drop_axes(out, dropped)


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
    except Exception:  # a damaged file is reported with its reason when it is read
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
            try:
                self._memmap = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # ValueError for pickled/object or truncated files, OSError...
                raise CleftchunkError(f"{self.path} is not a readable .npy array ({e}): check that it is complete") from e
        return self._memmap

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(self._mapped()[key])


# -- N5 -----------------------------------------------------------------------------------
def is_n5(path: Path) -> bool:
    """A directory that is (or is inside) an N5 container."""
    path = Path(path)
    if path.suffix.lower() == ".n5":
        return True
    attrs = path / "attributes.json"
    if path.is_dir() and attrs.exists():
        try:
            meta = json.loads(attrs.read_text())
        except (OSError, ValueError):
            return False
        return "n5" in meta or "dimensions" in meta
    return False


def n5_attributes(path: Path) -> dict:
    file = Path(path) / "attributes.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise CleftchunkError(f"{file} is not valid JSON ({e}): the N5 container is damaged") from e


def n5_datasets(container: Path) -> list[str]:
    """Paths of the datasets below an N5 container (directories whose attributes name dimensions)."""
    out = []
    for attrs in sorted(Path(container).rglob("attributes.json")):
        if "dimensions" in n5_attributes(attrs.parent):
            out.append(attrs.parent.relative_to(container).as_posix())
    return out


class N5Array:
    """An N5 dataset read block by block, presented in (z, y, x) order."""

    def __init__(self, container: Path, inner: str | None):
        self.container = Path(container)
        self.inner = (inner or "").strip("/")
        self.path = self.container / self.inner if self.inner else self.container
        meta = n5_attributes(self.path)
        if "dimensions" not in meta:
            found = n5_datasets(self.container)
            raise CleftchunkError(
                f"{self.path} is not an N5 dataset; the container has: {', '.join(found) or 'no datasets'} "
                f"(name one, e.g. {self.container}/{found[0] if found else 'raw'})"
            )
        self.shape = tuple(int(d) for d in reversed(meta["dimensions"]))
        self.chunks = tuple(int(b) for b in reversed(meta["blockSize"]))
        dtype = meta.get("dataType")
        if dtype not in N5_DTYPES:
            raise CleftchunkError(f"{self.path}: N5 data type {dtype!r} is not supported: use one of {', '.join(N5_DTYPES)}")
        self.dtype = np.dtype(dtype)
        self.compression = _n5_compression(meta)
        self.attrs = _n5_frame_attrs(meta)
        self.grid = ChunkGrid(Roi.from_shape(self.shape), self.chunks)

    def __getitem__(self, key: Any) -> np.ndarray:
        slices, dropped = normalize_key(key, self.shape)
        want = roi_of(slices)
        out = np.zeros(want.shape, dtype=self.dtype)
        for index in self.grid.indices_overlapping(want):
            block_roi = self.grid.chunk_roi(index)
            block = self.read_block(index, block_roi.shape)
            if block is None:
                continue  # missing blocks read as 0
            overlap = block_roi.intersect(want)
            out[overlap.to_slices(want.offset)] = block[overlap.to_slices(block_roi.offset)]
        return _drop_axes(out, dropped)

    def block_path(self, index: Sequence[int]) -> Path:
        return self.path.joinpath(*(str(i) for i in reversed(index)))

    def read_block(self, index: Sequence[int], expected: Sequence[int]) -> np.ndarray | None:
        """The block at grid ``index`` (z, y, x) as an array of ``expected`` shape, or None if missing."""
        path = self.block_path(index)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_n5_block(raw, self.dtype, self.compression, expected)
        except Exception as e:
            raise CleftchunkError(f"N5 block {path} is corrupt or truncated ({type(e).__name__}: {e}): re-copy the dataset") from e


def _n5_compression(meta: dict) -> dict:
    comp = meta.get("compression")
    if comp is None:  # N5 before 1.0: "compressionType": "gzip"
        comp = {"type": meta.get("compressionType", "raw")}
    kind = comp.get("type", "raw")
    if kind not in ("raw", "gzip", "bzip2", "xz", "zstd", "blosc"):
        raise CleftchunkError(f"N5 compression {kind!r} is not supported: recompress with raw, gzip, bzip2, xz, zstd or blosc")
    return comp


def _n5_frame_attrs(meta: dict) -> dict:
    """N5 attributes with the frame (resolution, offset) reversed to z, y, x under our own names."""
    attrs = {k: v for k, v in meta.items() if k not in ("dimensions", "blockSize", "dataType", "compression")}
    resolution = meta.get("resolution")
    pixel = meta.get("pixelResolution")
    if resolution is None and pixel is not None:
        resolution = pixel["dimensions"] if isinstance(pixel, dict) else pixel
    for key in ("resolution", "pixelResolution", "offset"):
        attrs.pop(key, None)
    if resolution is not None:
        attrs["voxel_size"] = [float(v) for v in reversed(resolution)]
    if meta.get("offset") is not None:
        attrs["offset"] = [float(v) for v in reversed(meta["offset"])]
    return attrs


def decode_n5_block(raw: bytes, dtype: np.dtype, compression: dict, expected: Sequence[int]) -> np.ndarray:
    """Parse one N5 block: header, decompression, big-endian data in (z, y, x) order."""
    mode, ndim = struct.unpack(">HH", raw[:4])
    if mode not in (0, 1):
        raise ValueError(f"unsupported N5 block mode {mode}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    start = 4 + 4 * ndim + (4 if mode == 1 else 0)
    shape = tuple(reversed(dims))
    payload = _n5_decompress(raw[start:], compression)
    count = int(np.prod(shape))
    data = np.frombuffer(payload, dtype=dtype.newbyteorder(">"), count=count).reshape(shape)
    block = np.zeros(tuple(expected), dtype=dtype)
    # Edge blocks may be stored at their cropped size or at full block size: copy the overlap.
    common = tuple(slice(0, min(a, b)) for a, b in zip(shape, expected))
    block[common] = data[common]
    return block


def _n5_decompress(payload: bytes, compression: dict) -> bytes:
    kind = compression.get("type", "raw")
    if kind == "raw":
        return payload
    if kind == "gzip":
        # N5 writes gzip streams by default and zlib streams with "useZlib": true.
        return zlib.decompress(payload) if compression.get("useZlib") else gzip.decompress(payload)
    if kind == "bzip2":
        return bz2.decompress(payload)
    if kind == "xz":
        return lzma.decompress(payload)
    if kind == "zstd":
        from numcodecs import Zstd

        return bytes(Zstd().decode(payload))
    from numcodecs import Blosc

    return bytes(Blosc().decode(payload))
