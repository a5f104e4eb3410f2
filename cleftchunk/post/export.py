"""CREMI-layout HDF5 files, as the official CREMI tools read them.

Layout: ``volumes/labels/clefts`` (uint64, background 0xFFFFFFFFFFFFFFFF) with attributes
``resolution`` (nm, z y x) and ``offset`` (nm, the position of its first voxel in the sample's
frame); optionally ``volumes/raw`` (uint8, ``resolution``); root attribute ``file_format`` = "0.2".

Placing a prediction into a sample's frame: the padded CREMI samples are 200 x 3072 x 3072 with the
labelled 125 x 1250 x 1250 region at voxel offset (37, 911, 911). A prediction of the whole padded
sample is cut to the labelled region with ``crop`` (its ``offset`` then defaults to the crop's
begin, so the file says where it lies); a prediction of the labelled region alone is placed with
``offset`` = (37, 911, 911). Data are copied in slabs of whole input chunks along z, read by the
block-wise executor and written by this process (memory: two slabs); the file is written under a
temporary name and renamed when complete, so an interrupted export leaves no half file behind.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import writes_output
from cleftchunk.geometry import Roi
from cleftchunk.labels import CREMI_CLEFTS, CREMI_RAW, resolve_label_kind
from cleftchunk.post.segment import as_volume
from cleftchunk.labels import CREMI_BACKGROUND
from cleftchunk.io.volumes import HDF5_SUFFIXES, Volume
from cleftchunk.run.executor import BlockwiseTask, run_blockwise
from cleftchunk.run.layout import GridLayout
from cleftchunk.run.local import block_client, describe_plan, where

CLEFTS_DATASET = CREMI_CLEFTS
RAW_DATASET = CREMI_RAW
FILE_FORMAT = "0.2"
#: In-plane HDF5 chunk edge; CREMI files are read section by section.
H5_CHUNK_YX = 256
#: Largest slab copied at once (an unchunked HDF5 source reports its whole shape as one chunk).
SLAB_BYTES = 256 * 2**20


def parse_crop(text: str) -> Roi:
    """'z0:z1,y0:y1,x0:x1' (voxels, array-local) -> Roi."""
    try:
        bounds = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        bounds = []
    if len(bounds) != 3 or any(len(b) != 2 for b in bounds):
        raise CleftchunkError(f"--crop {text!r} is not Z0:Z1,Y0:Y1,X0:X1 (voxels): e.g. 37:162,911:2161,911:2161")
    return Roi.from_bounds([b[0] for b in bounds], [b[1] for b in bounds])


@writes_output("export", "out", ("clefts", "raw"))
def export_cremi(
    clefts: Volume | str,
    out: str | os.PathLike,
    raw: Volume | str | None = None,
    offset: Sequence[int] | None = None,
    crop: Roi | None = None,
    kind: str = "auto",
    overwrite: bool = False,
    scheduler: str | None = None,
    progress: bool = False,
    dry_run: bool = False,
    log=print,
) -> dict:
    """Write ``clefts`` (CREMI ids, or labels with 0 = background) as a CREMI HDF5 file.

    Slabs are read (and converted) by the block-wise executor, on threads of this process or the
    workers of the Dask scheduler at ``scheduler``, and written by this process (HDF5 has one
    writer) as they arrive; at most two slabs are in flight."""
    import h5py

    source = as_volume(clefts)
    kind = resolve_label_kind(source, kind)
    if kind not in ("ids", "main"):
        raise CleftchunkError(
            f"{source.spec} holds a {kind}, not cleft ids: run `cleftchunk segment` on it first and export the result"
        )
    out = Path(out)
    if out.suffix.lower() not in HDF5_SUFFIXES:
        raise CleftchunkError(f"{out}: a CREMI file is HDF5; give an output ending in .hdf, .h5 or .hdf5")
    if out.exists() and not overwrite:
        raise CleftchunkError(f"{out} exists: pass --overwrite to replace it (or choose another output)")
    whole = Roi.from_shape(source.shape)
    region = whole if crop is None else crop
    if region.empty or not whole.contains(region):
        raise CleftchunkError(f"crop {region} is not a non-empty part of {source.spec} ({whole}): fix --crop")
    offset = tuple(offset) if offset is not None else tuple(o + b for o, b in zip(source.offset, region.begin))
    if len(offset) != 3:
        raise CleftchunkError(f"--offset {offset} must have three values, Z,Y,X voxels")
    raw_volume = as_volume(raw) if raw is not None else None
    if raw_volume is not None and tuple(raw_volume.voxel_size) != tuple(source.voxel_size):
        raise CleftchunkError(
            f"voxel sizes differ: raw {raw_volume.spec} has {raw_volume.voxel_size} nm, clefts {source.spec} "
            f"has {source.voxel_size} nm: export a raw volume of the same resolution"
        )
    if raw_volume is not None and tuple(raw_volume.shape) != tuple(source.shape):
        raise CleftchunkError(
            f"raw {raw_volume.spec} has shape {raw_volume.shape}, clefts {source.spec} {source.shape}: "
            "export the raw volume the clefts were predicted from"
        )
    resolution = np.asarray(source.voxel_size, dtype=np.float64)
    info = {"path": str(out), "shape": list(region.shape), "offset_voxels": list(offset), "resolution": list(resolution)}
    if dry_run:
        log(describe_export(source, region, raw_volume, scheduler))
        return info

    partial = out.with_name(out.name + ".partial")
    with block_client(2, scheduler or "threads", announce=progress) as client, h5py.File(partial, "w") as f:
        copy = functools.partial(_copy, f, client=client, progress=progress)
        f.attrs["file_format"] = FILE_FORMAT
        dataset = copy(CLEFTS_DATASET, source, region, np.uint64, _pytc_to_cremi if kind == "main" else None, int(CREMI_BACKGROUND))
        dataset.attrs["resolution"] = resolution
        dataset.attrs["offset"] = np.asarray(offset, dtype=np.float64) * resolution
        if raw_volume is not None:
            raw_set = copy(RAW_DATASET, raw_volume, Roi.from_shape(raw_volume.shape), raw_volume.dtype, None, 0)
            raw_set.attrs["resolution"] = resolution
            if any(raw_volume.offset):
                raw_set.attrs["offset"] = np.asarray(raw_volume.offset, dtype=np.float64) * resolution
    os.replace(partial, out)
    return info


def describe_export(source: Volume, region: Roi, raw: Volume | None, scheduler: str | None) -> str:
    """The ``--dry-run`` text: the slabs read on workers, the bytes the client writes, memory."""
    layout = GridLayout(region, (slab_depth(source, region),) + region.shape[1:])
    voxels = region.size + (raw.size if raw is not None else 0)
    output = region.size * 8 + (raw.size * raw.dtype.itemsize if raw is not None else 0)
    memory = 2 * math.prod(layout.block_shape) * 8  # two uint64 slabs in flight
    extra = ("  the client writes the HDF5 file (one writer): two slabs in flight",) + (
        (f"  and volumes/raw: {raw.size} voxels in slabs of the same depth",) if raw is not None else ())
    return describe_plan(f"export {source.spec} ({voxels} voxels)", layout, where(2, scheduler or "threads"),
                         len(layout) * (2 if raw is not None else 1), output, memory, extra)


def _pytc_to_cremi(labels: np.ndarray) -> np.ndarray:
    """PyTorch Connectomics labels (0 is background) as CREMI ids."""
    ids = labels.astype(np.uint64)
    ids[labels == 0] = CREMI_BACKGROUND
    return ids


def slab_depth(source: Volume, region: Roi) -> int:
    """Sections per slab: whole source chunks along z, within :data:`SLAB_BYTES`."""
    section = region.shape[1] * region.shape[2] * max(source.dtype.itemsize, 8)
    fits = max(1, SLAB_BYTES // section)
    chunk = max(1, source.chunks[0])
    return chunk * max(1, fits // chunk) if chunk <= fits else fits


def _copy(f, name: str, source: Volume, region: Roi, dtype, convert, fill, client, progress: bool = False) -> "object":
    """Copy ``region`` of ``source`` into a new dataset, one z-slab of whole chunks at a time
    (read on a worker, written here)."""
    chunks = (1, min(H5_CHUNK_YX, region.shape[1]), min(H5_CHUNK_YX, region.shape[2]))
    dataset = f.create_dataset(name, shape=region.shape, dtype=dtype, chunks=chunks, compression="gzip", fillvalue=fill)
    layout = GridLayout(region, (slab_depth(source, region),) + region.shape[1:])

    def write(block, data):
        dataset[block.write_roi.relative_to(region).to_slices()] = data

    task = BlockwiseTask(f"export {name}", layout, functools.partial(_read_slab, source, convert), collect=write, fatal=(Exception,))
    run_blockwise(client, task, progress=progress, in_flight=2)  # memory: two slabs
    return dataset


def _read_slab(source: Volume, convert, block, _prepared=None) -> np.ndarray:
    data = source[block.write_roi.to_slices()]
    return convert(data) if convert else data
