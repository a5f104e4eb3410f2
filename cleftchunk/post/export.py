"""CREMI-layout HDF5 files, as the official CREMI tools read them.

Layout: ``volumes/labels/clefts`` (uint64, background 0xFFFFFFFFFFFFFFFF) with attributes
``resolution`` (nm, z y x) and ``offset`` (nm, the position of its first voxel in the sample's
frame); optionally ``volumes/raw`` (uint8, ``resolution``); root attribute ``file_format`` = "0.2".

Placing a prediction into a sample's frame: the padded CREMI samples are 200 x 3072 x 3072 with the
labelled 125 x 1250 x 1250 region at voxel offset (37, 911, 911). A prediction of the whole padded
sample is cut to the labelled region with ``crop`` (its ``offset`` then defaults to the crop's
begin, so the file says where it lies); a prediction of the labelled region alone is placed with
``offset`` = (37, 911, 911). Data are copied in slabs of whole input chunks along z, read by the
block-wise executor and written by this process (memory: two slabs in flight).

The export is a block-wise operation (:class:`Export`, on
:func:`cleftchunk.run.operation.run_operation`: dry run, lock, create/resume/refuse, completion
record, "complete"; where it runs is the ``run`` options'). The file is written under a temporary
name (``OUT.partial``, holding the operation's state as its ``cleftchunk_export`` attribute) and
renamed to ``OUT`` when complete, so an interrupted export leaves no half file at ``OUT``; the
same command resumes it: the clefts' slabs are the recorded pass (the slabs recorded done are
kept), the raw volume's, a second pass, is copied again.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.frames import Frame, align
from cleftchunk.geometry import Roi
from cleftchunk.io.cremi import hdf5_state
from cleftchunk.io.guard import refuse_overlap
from cleftchunk.io.volumes import HDF5_SUFFIXES, Volume
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_CLEFTS, CREMI_RAW, resolve_label_kind
from cleftchunk.post.segment import as_volume
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout
from cleftchunk.io.outputs import VolumeOperation
from cleftchunk.run.operation import Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for

CLEFTS_DATASET = CREMI_CLEFTS
RAW_DATASET = CREMI_RAW
FILE_FORMAT = "0.2"
#: In-plane HDF5 chunk edge; CREMI files are read section by section.
H5_CHUNK_YX = 256
#: Largest slab copied at once (an unchunked HDF5 source reports its whole shape as one chunk).
SLAB_BYTES = 256 * 2**20
#: Slabs open at once: the client holds at most this many (memory: two slabs).
IN_FLIGHT = 2


def parse_crop(text: str) -> Roi:
    """'z0:z1,y0:y1,x0:x1' (voxels, array-local) -> Roi."""
    try:
        bounds = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        bounds = []
    if len(bounds) != 3 or any(len(b) != 2 for b in bounds):
        raise CleftchunkError(f"--crop {text!r} is not Z0:Z1,Y0:Y1,X0:X1 (voxels): e.g. 37:162,911:2161,911:2161")
    return Roi.from_bounds([b[0] for b in bounds], [b[1] for b in bounds])


def export_cremi(clefts: Volume | str, out: str | os.PathLike, raw: Volume | str | None = None,
                 offset: Sequence[int] | None = None, crop: Roi | None = None, kind: str = "auto",
                 run: RunOptions | None = None, log: Any = None, ignore_frame: bool = False) -> dict:
    """Write ``clefts`` (CREMI ids, or labels with 0 = background) as a CREMI HDF5 file; what
    was (or, with ``run.dry_run``, would be) written.

    Slabs are read (and converted) on the executor, where ``run`` says, and written by this
    process (HDF5 has one writer) as they arrive; at most two slabs are in flight. ``raw`` must
    share the frame of ``clefts`` (:mod:`cleftchunk.frames`; ``ignore_frame``: the same shape is
    enough)."""
    operation = Export(clefts, out, raw, offset, crop, kind, read=not (run is not None and run.dry_run), ignore_frame=ignore_frame)
    run_operation(operation, run, log)
    return operation.info()


class Export(VolumeOperation):
    """A CREMI file of cleft ids (and raw) as a block-wise operation (see the module docstring)."""

    stage = "export"

    def __init__(self, clefts, out, raw=None, offset=None, crop: Roi | None = None, kind: str = "auto", read: bool = True,
                 ignore_frame: bool = False):
        source = as_volume(clefts)
        # read=False (a dry run): no voxel is read; a kind only the values could tell is decided when run
        self.kind = resolve_label_kind(source, kind, read=read)
        if self.kind is not None and self.kind not in ("ids", "main"):
            raise CleftchunkError(
                f"{source.spec} holds a {self.kind}, not cleft ids: run `cleftchunk segment` on it first and export the result"
            )
        out = Path(out)
        if out.suffix.lower() not in HDF5_SUFFIXES:
            raise CleftchunkError(f"{out}: a CREMI file is HDF5; give an output ending in .hdf, .h5 or .hdf5")
        # first of the checks on the inputs: an output on an input is the mistake that would destroy data
        refuse_overlap(out, (clefts, raw), volume=True)
        whole = Roi.from_shape(source.shape)
        region = whole if crop is None else crop
        if region.empty or not whole.contains(region):
            raise CleftchunkError(f"crop {region} is not a non-empty part of {source.spec} ({whole}): fix --crop")
        offset = tuple(offset) if offset is not None else tuple(o + b for o, b in zip(source.offset, region.begin))
        if len(offset) != 3:
            raise CleftchunkError(f"--offset {offset} must have three values, Z,Y,X voxels")
        if any(o < 0 for o in offset):  # CREMI places a sample's labels at offsets >= 0 in its frame
            raise CleftchunkError(f"offset {tuple(offset)} voxels is negative: give --offset Z,Y,X of 0 or more")
        raw_volume = as_volume(raw) if raw is not None else None
        if raw_volume is not None:
            # the file records each dataset's offset, so readers place raw and clefts by them: one
            # resolution, offsets whole voxels apart, an overlap, and (below) the same extent
            align(Frame.of(source, f"clefts {source.spec}"), Frame.of(raw_volume, f"raw {raw_volume.spec}"), ignore_frame, "overlap",
                  fix="export a raw volume of the same resolution")
        if raw_volume is not None and tuple(raw_volume.shape) != tuple(source.shape):
            raise CleftchunkError(
                f"raw {raw_volume.spec} has shape {raw_volume.shape}, clefts {source.spec} {source.shape}: "
                "export the raw volume the clefts were predicted from"
            )
        self.source, self.raw, self.region, self.offset = source, raw_volume, region, tuple(int(o) for o in offset)
        self.path, self.partial = out, out.with_name(out.name + ".partial")
        self.output, self.inputs = str(out), (clefts, raw)
        self.resolution = np.asarray(source.voxel_size, dtype=np.float64)

    def info(self) -> dict:
        return {"path": str(self.path), "shape": list(self.region.shape), "offset_voxels": list(self.offset),
                "resolution": list(self.resolution)}

    def identity(self) -> dict:
        raw = self.raw
        return {"clefts": self.source.spec, "shape": list(self.source.shape), "kind": self.kind,
                "region": [list(self.region.begin), list(self.region.end)], "offset": list(self.offset),
                "raw": None if raw is None else {"spec": raw.spec, "shape": list(raw.shape), "dtype": str(raw.dtype)}}

    def _layouts(self, options: RunOptions) -> tuple[GridLayout, GridLayout | None]:
        """The clefts' blocks and the raw volume's: ``block_shape`` (a multiple of the file's
        chunks) when given, else z-slabs of whole source chunks (:func:`slab_depth`)."""

        def layout(source: Volume, region: Roi) -> GridLayout:
            if options.block_shape is None:
                return GridLayout(region, (slab_depth(source, region),) + region.shape[1:])
            chunks = h5_chunks(region.shape)
            return GridLayout(region, block_shape_for(options.block_shape, chunks, region.shape, chunks))

        clefts = layout(self.source, self.region)
        return clefts, None if self.raw is None else layout(self.raw, Roi.from_shape(self.raw.shape))

    def plan(self, options: RunOptions) -> Plan:
        """The slabs read on workers, the bytes the client writes, the memory of two slabs."""
        layout, raw_layout = self._layouts(options)
        raw = self.raw
        raw_voxels = math.prod(raw.shape) if raw is not None else 0
        voxels = self.region.size + raw_voxels
        output = self.region.size * 8 + raw_voxels * (raw.dtype.itemsize if raw is not None else 0)
        memory = IN_FLIGHT * math.prod(layout.block_shape) * 8  # two uint64 slabs in flight
        extra = ("  the client writes the HDF5 file (one writer): two blocks in flight",) + (
            (f"  and volumes/raw: {raw_voxels} voxels in blocks of {raw_layout.block_shape}",) if raw is not None else ())
        tasks = len(layout) + (len(raw_layout) if raw_layout is not None else 0)
        return Plan(f"export {self.source.spec} ({voxels} voxels)", layout, tasks, output, memory, extra)

    # -- the state: in the file being written (OUT.partial), then in OUT ---------------------------
    def exists(self) -> bool:
        return self.partial.exists() or self.path.exists()

    def read_state(self) -> dict | None:
        return hdf5_state(self.partial if self.partial.exists() else self.path, self.attribute)

    def write_state(self, handle: Path, state: dict) -> None:
        import h5py

        with h5py.File(self.partial, "a") as f:
            f.attrs[self.attribute] = json.dumps(state)
        if state.get("complete"):
            os.replace(self.partial, self.path)

    def create(self, state: dict, overwrite: bool) -> Path:
        import h5py

        with h5py.File(self.partial, "w") as f:  # OUT, if any, is replaced only once this is complete
            f.attrs["file_format"] = FILE_FORMAT
            f.attrs[self.attribute] = json.dumps(state)
            clefts = _dataset(f, CLEFTS_DATASET, self.region.shape, np.uint64, int(CREMI_BACKGROUND))
            clefts.attrs["resolution"] = self.resolution
            clefts.attrs["offset"] = np.asarray(self.offset, dtype=np.float64) * self.resolution
            if self.raw is not None:
                raw = _dataset(f, RAW_DATASET, self.raw.shape, self.raw.dtype, 0)
                raw.attrs["resolution"] = self.resolution
                if any(self.raw.offset):
                    raw.attrs["offset"] = np.asarray(self.raw.offset, dtype=np.float64) * self.resolution
        return self.partial

    def reopen(self) -> Path:
        return self.partial

    def execute(self, running: Running, handle: Path) -> None:
        import h5py

        layout, raw_layout = self._layouts(running.options)
        convert = _pytc_to_cremi if self.kind == "main" else None
        with h5py.File(self.partial, "a") as f:
            _copy(running, f[CLEFTS_DATASET], self.source, layout, convert, recorded=True)
            if raw_layout is not None:
                _copy(running, f[RAW_DATASET], self.raw, raw_layout, None)


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


def h5_chunks(shape) -> tuple[int, int, int]:
    """The file's chunks: one section of up to :data:`H5_CHUNK_YX` squared."""
    return (1, min(H5_CHUNK_YX, shape[1]), min(H5_CHUNK_YX, shape[2]))


def _dataset(f: Any, name: str, shape, dtype, fill) -> Any:
    return f.create_dataset(name, shape=tuple(shape), dtype=dtype, chunks=h5_chunks(shape), compression="gzip", fillvalue=fill)


def _copy(running: Running, dataset: Any, source: Volume, layout: GridLayout, convert, recorded: bool = False) -> None:
    """Copy ``layout``'s region of ``source`` into ``dataset``, one z-slab of whole chunks at a
    time (read on a worker, written here, flushed before the record may mark it)."""
    name = dataset.name.strip("/")

    def write(block, data):
        dataset[block.write_roi.relative_to(layout.roi).to_slices()] = data
        dataset.file.flush()

    task = BlockwiseTask(f"export {name}", layout, functools.partial(_read_slab, source, convert), collect=write)
    running.run(task, recorded=recorded, in_flight=IN_FLIGHT)


def _read_slab(source: Volume, convert, block, _prepared=None) -> np.ndarray:
    data = source[block.write_roi.to_slices()]
    return convert(data) if convert else data
