"""Writers of small test inputs in every source format (shared by the convert/volumes/info tests).

The N5 writer follows the N5 specification independently of the reader: attributes x-first,
a big-endian header (mode 0, ndim, block size x-first), big-endian data, blocks at
``dataset/<ix>/<iy>/<iz>``, edge blocks stored at their cropped size.
"""

from __future__ import annotations

import gzip
import itertools
import json
import struct
from pathlib import Path

import h5py
import numpy as np

CREMI_BG = np.uint64(0xFFFFFFFFFFFFFFFF)


def ramp(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    """Data where every voxel differs from its neighbours (catches transposed or shifted copies)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, min(info.max, 2**62), size=shape, dtype=dtype, endpoint=False)


def write_n5(path: Path, dataset: str, data: np.ndarray, block, compression: str = "gzip", attrs: dict | None = None,
             skip_blocks=()) -> Path:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "attributes.json").write_text(json.dumps({"n5": "2.5.0"}))
    ds = root / dataset
    ds.mkdir(parents=True, exist_ok=True)
    meta = {
        "dimensions": list(reversed(data.shape)),
        "blockSize": list(reversed(block)),
        "dataType": str(data.dtype),
        "compression": {"type": "gzip", "useZlib": True} if compression == "zlib" else {"type": compression},
        **(attrs or {}),
    }
    (ds / "attributes.json").write_text(json.dumps(meta))
    grid = [range(-(-s // b)) for s, b in zip(data.shape, block)]
    for index in itertools.product(*grid):
        if tuple(index) in skip_blocks:
            continue
        sl = tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, block, data.shape))
        part = np.ascontiguousarray(data[sl])
        header = struct.pack(">HH", 0, 3) + struct.pack(">3I", *reversed(part.shape))
        payload = part.astype(part.dtype.newbyteorder(">")).tobytes()
        if compression == "gzip":
            payload = gzip.compress(payload)
        elif compression == "zstd":
            from numcodecs import Zstd

            payload = bytes(Zstd().encode(payload))
        elif compression == "zlib":
            import zlib

            payload = zlib.compress(payload)
        elif compression == "bzip2":
            import bz2

            payload = bz2.compress(payload)
        elif compression == "xz":
            import lzma

            payload = lzma.compress(payload)
        elif compression == "blosc":
            from numcodecs import Blosc

            payload = bytes(Blosc(cname="lz4").encode(payload))
        block_file = ds.joinpath(*(str(i) for i in reversed(index)))
        block_file.parent.mkdir(parents=True, exist_ok=True)
        block_file.write_bytes(header + payload)
    return ds


def write_cremi(path: Path, shape=(6, 40, 36), annotations: bool = True) -> dict:
    """A tiny CREMI-layout file; returns the arrays written."""
    raw = ramp(shape)
    clefts = np.full(shape, CREMI_BG, dtype=np.uint64)
    clefts[1:3, 5:15, 4:20] = 3
    clefts[-2, 30:33, 30:34] = 0  # 0 is a cleft id in CREMI files
    neurons = ramp(shape, np.uint64, seed=2) % 5
    with h5py.File(path, "w") as f:
        f.attrs["file_format"] = "0.2"
        for name, data in (("volumes/raw", raw), ("volumes/labels/clefts", clefts), ("volumes/labels/neuron_ids", neurons)):
            f[name] = data
            f[name].attrs["resolution"] = (40.0, 4.0, 4.0)
        f["volumes/labels/clefts"].attrs["offset"] = (80.0, 8.0, 4.0)
        f["volumes/labels/neuron_ids"].attrs["offset"] = (80.0, 8.0, 4.0)
        if annotations:
            f["annotations/ids"] = np.array([7, 8], dtype=np.uint64)
            f["annotations/types"] = np.array([b"presynaptic_site", b"postsynaptic_site"])
            f["annotations/locations"] = np.array([[80.0, 40.0, 40.0], [80.0, 44.0, 48.0]])
            f["annotations/presynaptic_site/partners"] = np.array([[7, 8]], dtype=np.uint64)
            f["annotations"].attrs["offset"] = (80.0, 8.0, 4.0)
    return {"raw": raw, "clefts": clefts, "neuron_ids": neurons}
