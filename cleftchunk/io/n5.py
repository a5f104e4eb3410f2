"""N5 datasets, read block by block (zarr 3 no longer reads N5).

N5 lists dimensions, block sizes, block indices and resolutions x-first; they are reversed here to
(z, y, x). Blocks are big-endian, carry a small header (mode, ndim, actual block size), and may be
compressed with raw, gzip, zlib, bzip2, xz, zstd or blosc; a block that is missing on disk reads as 0.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import ChunkGrid, Roi, drop_axes, normalize_key
from cleftchunk.io.access import damaged_file_errors, roi_of

N5_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")


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
            if not found:  # suggesting a name would only repeat a guess (maybe the path given)
                raise CleftchunkError(f"{self.path} is not an N5 dataset, and {self.container} holds none (no attributes.json with dimensions): check the path")
            raise CleftchunkError(
                f"{self.path} is not an N5 dataset; the container has: {', '.join(found)} (name one, e.g. {self.container}/{found[0]})"
            )
        missing = [key for key in ("dimensions", "blockSize") if not isinstance(meta.get(key), list)]
        if missing:
            raise CleftchunkError(f"{self.path}/attributes.json lacks {' and '.join(missing)}: the N5 metadata is damaged, repair or re-create it")
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
        return drop_axes(out, dropped)

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
        except damaged_file_errors(RuntimeError) as e:  # RuntimeError: numcodecs' Zstd and Blosc on bad input
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
