"""Writing synthetic samples of any size: block by block on the one block-wise executor (threads
of this process, local worker processes, or an existing Dask scheduler), resumable, constant memory.

Zarr output (default): ``DST.zarr/{raw,clefts,neuron_ids}`` OME-Zarr images whose chunks are the
work blocks. Each block writes its labels first and its raw last; zarr's local store writes a
chunk atomically, so a block whose raw chunk exists is finished and a re-run skips it (each task
checks its own raw chunk: the client holds nothing per block). The
generation parameters are kept in the root group's attributes, so that a re-run resumes only
the same sample, and ``complete`` is set when every block is written.

CREMI output (``format="cremi"``): one HDF5 file in the CREMI layout, written by the main process
(HDF5 has a single writer) as results arrive from the workers, a few blocks in flight at a time, so
memory stays bounded. Progress is kept in a ``synth_progress`` dataset removed at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import writes_output
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.synth.generate import VOXEL_SIZE, SynthParams, check_seed, generate_region, make_params
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_CLEFTS, CREMI_NEURONS, CREMI_RAW, kind_attrs
from cleftchunk.io.stores import is_url
from cleftchunk.io.volumes import DEFAULT_CHUNKS, HDF5_SUFFIXES, create_volume, open_volume, split_spec
from cleftchunk.run.chunks import unit_stored
from cleftchunk.run.executor import BlockwiseTask, run_blockwise
from cleftchunk.run.records import BlockRecord, identity_hash, record_path_beside, remove_record
from cleftchunk.run.layout import GridLayout, SubsetLayout
from cleftchunk.run.local import block_client, default_threads, describe_plan, where

#: Larger requests are refused as typos (10^13 voxels is ~10 TB of raw, ~170 TB with labels).
MAX_VOXELS = 10**13
FORMATS = ("zarr", "cremi")
NAMES = ("raw", "clefts", "neuron_ids")
DTYPES = {"raw": np.uint8, "clefts": np.uint64, "neuron_ids": np.uint64}
FILL = {"raw": 0, "clefts": int(CREMI_BACKGROUND), "neuron_ids": 0}
#: What each volume holds (:mod:`cleftchunk.labels`), recorded in its attributes.
KIND = {"raw": "image", "clefts": "ids", "neuron_ids": "neurons"}
CREMI_PATHS = {"raw": CREMI_RAW, "clefts": CREMI_CLEFTS, "neuron_ids": CREMI_NEURONS}
ATTR = "cleftchunk_synth"


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise CleftchunkError(f"shape {shape!r} must be 3 integers Z,Y,X, e.g. 125,1250,1250") from None
    if len(shape) != 3:
        raise CleftchunkError(f"shape {shape} must have 3 extents Z,Y,X, e.g. 125,1250,1250")
    if any(s <= 0 for s in shape):
        raise CleftchunkError(f"shape {shape} must be positive in every axis, e.g. 125,1250,1250")
    if math.prod(shape) > MAX_VOXELS:
        raise CleftchunkError(f"shape {shape} is {math.prod(shape):.1e} voxels, over the 1e13 limit: check the extents")
    return shape


def check_chunks(chunks: Sequence[int] | None, shape: Sequence[int]) -> tuple[int, int, int]:
    chunks = DEFAULT_CHUNKS if chunks is None else chunks
    try:
        chunks = tuple(int(c) for c in chunks)
    except (TypeError, ValueError):
        raise CleftchunkError(f"chunks {chunks!r} must be 3 integers Z,Y,X, e.g. 16,256,256") from None
    if len(chunks) != 3 or any(c <= 0 for c in chunks):
        raise CleftchunkError(f"chunks {chunks} must be 3 positive extents Z,Y,X, e.g. 16,256,256")
    return tuple(min(c, s) for c, s in zip(chunks, shape))


@writes_output("synth", "dst")
def synthesize(
    dst: str | os.PathLike,
    shape: Sequence[int],
    seed: int = 0,
    difficulty: float = 0.5,
    chunks: Sequence[int] | None = None,
    workers: int | None = None,
    format: str | None = None,
    overwrite: bool = False,
    scheduler: str = "threads",
    progress: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    **params,
) -> dict | None:
    """Write a synthetic sample of ``shape`` to ``dst``; returns a summary dict.

    ``dst`` is ``out.zarr`` (format zarr) or ``out.hdf`` / ``.h5`` (format cremi; the format is
    inferred from the name when not given). An existing
    destination is refused unless ``overwrite``, except an unfinished run of the same sample,
    which is resumed. ``workers`` threads (or processes with ``scheduler="processes"``, or the
    workers of the Dask scheduler at ``scheduler="tcp://HOST:PORT"``) generate blocks of ``chunks``
    voxels; the result does not depend on either. ``dry_run``: log the plan, return None and
    create nothing. Threads are the default
    because they measured faster, leaner and with no start-up cost on 2 cores (numpy releases
    the GIL in the heavy loops; benchmarks/results/synth.md); processes avoid the GIL on many cores.
    """
    if is_url(dst):
        raise CleftchunkError(
            f"{dst}: synth writes a local sample (it resumes from the files it finds); write it here, then "
            "cleftchunk convert each volume to the object store"
        )
    if format is None:
        format = "cremi" if Path(dst).name.lower().endswith(HDF5_SUFFIXES) else "zarr"
    if format not in FORMATS:
        raise CleftchunkError(f"unknown format {format!r}: use zarr or cremi")
    if scheduler not in ("processes", "threads") and "://" not in str(scheduler):
        raise CleftchunkError(f"unknown scheduler {scheduler!r}: use processes, threads or the address of a Dask scheduler (tcp://HOST:PORT)")
    shape = check_shape(shape)
    chunks = check_chunks(chunks, shape)
    seed = check_seed(seed)
    p = make_params(difficulty, **params)
    workers = _worker_count(workers)
    if dry_run:
        log(describe_synth(shape, chunks, format, workers, scheduler))
        return None
    identity = {"seed": int(seed), "shape": list(shape), "chunks": list(chunks), "params": dataclasses.asdict(p)}
    writer = _write_zarr if format == "zarr" else _write_cremi
    start = time.perf_counter()
    done, total = writer(Path(dst), shape, chunks, int(seed), p, identity, workers, scheduler, overwrite, progress)
    return {
        "path": str(dst),
        "format": format,
        "shape": shape,
        "chunks": chunks,
        "blocks": total,
        "skipped": done,
        "seconds": time.perf_counter() - start,
        "workers": workers,
    }


#: Peak bytes per voxel of generating a block (measured with tracemalloc on 16×256×256: 67).
GENERATE_BYTES_PER_VOXEL = 70


def describe_synth(shape, chunks, format: str, workers: int, scheduler: str) -> str:
    """The ``--dry-run`` text of a synth run: blocks, output bytes, memory per worker."""
    layout = GridLayout(Roi.from_shape(shape), chunks)
    written = sum(np.dtype(d).itemsize for d in DTYPES.values())
    return describe_plan(f"synth ({format})", layout, where(workers, scheduler), -(-len(layout) // layout.auto_batch()),
                         math.prod(shape) * written, math.prod(chunks) * GENERATE_BYTES_PER_VOXEL)


def _worker_count(workers: int | None) -> int:
    if workers is None:
        return max(1, default_threads())
    if int(workers) < 1:
        raise CleftchunkError(f"workers {workers} must be at least 1")
    return int(workers)


# -- zarr -----------------------------------------------------------------------------------
def _write_zarr(dst, shape, chunks, seed, p, identity, workers, scheduler, overwrite, progress):
    import zarr

    if not str(dst).lower().endswith((".zarr", ".zarr3")) or split_spec(dst)[1] is not None:
        raise CleftchunkError(f"{dst}: the zarr format writes a container ending in .zarr, e.g. sample.zarr")
    resume = _can_resume_zarr(dst, identity, overwrite)
    volumes = {}
    for name in NAMES:
        volumes[name] = create_volume(
            f"{dst}/{name}", shape, DTYPES[name], chunks=chunks, voxel_size=VOXEL_SIZE,
            fill_value=FILL[name], overwrite=overwrite, exist_ok=resume,
            attrs={ATTR: {"seed": seed, "difficulty": p.difficulty}, **kind_attrs(KIND[name])},
        )
    root = zarr.open_group(str(dst), mode="a")
    root.attrs[ATTR] = {**identity, "complete": False}
    grid = ChunkGrid(Roi.from_shape(shape), chunks)
    layout = GridLayout(grid.roi, chunks)
    task = partial(_zarr_task, volumes, grid, seed, p)
    # One byte per block, so that a resumed run skips finished blocks without asking the store;
    # blocks it does not mark check their raw chunk (written last) on the worker.
    record, _ = BlockRecord.open(record_path_beside(str(dst), None, "synth"), len(layout),
                                 identity_hash("synth", 1, identity, list(shape), list(chunks)), fresh=not resume)
    report = _run(BlockwiseTask("synth", layout, task, record=record, batch=layout.auto_batch(), fatal=(Exception,)),
                  workers, scheduler, progress)
    root.attrs[ATTR] = {**identity, "complete": True}
    remove_record(record.path)
    return report.counts["skipped"] + report.already_done, grid.num_chunks


def _can_resume_zarr(dst: Path, identity: dict, overwrite: bool) -> bool:
    import zarr

    if overwrite or not dst.exists():
        return False
    try:
        stored = dict(zarr.open_group(str(dst), mode="r").attrs).get(ATTR)
    except Exception:
        stored = None
    if stored and not stored.get("complete") and {k: stored.get(k) for k in identity} == identity:
        return True
    raise CleftchunkError(f"{dst} exists: pass --overwrite to replace it (or choose another output)")


def _zarr_block(index, volumes, grid: ChunkGrid, seed: int, params: SynthParams) -> None:
    roi = grid.chunk_roi(index)
    data = generate_region(roi, seed, resolved=params)
    for name in ("clefts", "neuron_ids", "raw"):  # raw last: its chunk marks the block done
        volumes[name].write(roi, data[name])


def _zarr_task(volumes, grid: ChunkGrid, seed: int, params: SynthParams, block, _prepared=None) -> dict:
    """One block on a worker: skipped when its raw chunk is stored (written last, so the block is done)."""
    if unit_stored(volumes["raw"].array, block.index):
        return {"skipped": 1}
    _zarr_block(block.index, volumes=volumes, grid=grid, seed=seed, params=params)
    return {"written": 1}


# -- CREMI HDF5 -----------------------------------------------------------------------------
def _write_cremi(dst, shape, chunks, seed, p, identity, workers, scheduler, overwrite, progress):
    import json

    import h5py

    if not dst.name.lower().endswith(HDF5_SUFFIXES):
        raise CleftchunkError(f"{dst}: the cremi format writes an HDF5 file ending in .hdf, .h5 or .hdf5")
    grid = ChunkGrid(Roi.from_shape(shape), chunks)
    key = json.dumps(identity, sort_keys=True)
    resume = _can_resume_cremi(dst, key, overwrite)
    with h5py.File(dst, "a" if resume else "w") as f:
        if not resume:
            _create_cremi_layout(f, shape, chunks, seed, p, key, grid)
        done_flags = f["synth_progress"]
        flags = done_flags[...]
        todo = [index for index in grid.indices() if not flags[index]]

        def consume(block, data):
            roi = grid.chunk_roi(block.index)
            for name in NAMES:
                f[CREMI_PATHS[name]][roi.to_slices()] = data[name]
            done_flags[block.index] = 1
            f.flush()

        layout = SubsetLayout(GridLayout(grid.roi, chunks), todo)
        task = partial(_cremi_task, grid, seed, p)
        _run(BlockwiseTask("synth", layout, task, fatal=(Exception,), collect=consume), workers, scheduler, progress)
        del f["synth_progress"]
        del f.attrs[ATTR]
    return grid.num_chunks - len(todo), grid.num_chunks


def _can_resume_cremi(dst: Path, key: str, overwrite: bool) -> bool:
    import h5py

    if overwrite or not dst.exists():
        return False
    try:
        with h5py.File(dst, "r") as f:
            if f.attrs.get(ATTR) == key and "synth_progress" in f:
                return True
    except OSError:
        pass
    raise CleftchunkError(f"{dst} exists: pass --overwrite to replace it (or choose another output)")


def _create_cremi_layout(f, shape, chunks, seed, p, key, grid) -> None:
    f.attrs["file_format"] = "0.2"
    f.attrs[ATTR] = key
    for name in NAMES:
        ds = f.create_dataset(
            CREMI_PATHS[name], shape=shape, dtype=DTYPES[name], chunks=chunks,
            fillvalue=FILL[name], compression="gzip", compression_opts=1, shuffle=True,
        )
        ds.attrs["resolution"] = np.array(VOXEL_SIZE, dtype=np.float64)
        ds.attrs["offset"] = np.zeros(3, dtype=np.float64)
    f["volumes"].attrs["synth_seed"] = seed
    f["volumes"].attrs["synth_difficulty"] = p.difficulty
    f.create_dataset("synth_progress", shape=grid.grid_shape, dtype=np.uint8)


def _region_block(index, grid: ChunkGrid, seed: int, params: SynthParams) -> dict:
    return generate_region(grid.chunk_roi(index), seed, resolved=params)


def _cremi_task(grid: ChunkGrid, seed: int, params: SynthParams, block, _prepared=None) -> dict:
    return _region_block(block.index, grid=grid, seed=seed, params=params)


# -- running blocks -------------------------------------------------------------------------
def _run(task: BlockwiseTask, workers: int, scheduler: str, progress: bool):
    """Run ``task`` on the executor; the first error stops the run and is raised here. A block
    whose results are handed to the client (``collect``: the HDF5 writer) is over only then."""
    with block_client(workers, scheduler, announce=progress) as client:
        return run_blockwise(client, task, progress=progress)


def read_sample(dst: str | os.PathLike, roi: Roi | None = None) -> dict:
    """The raw, clefts and neuron ids of a written sample (zarr or CREMI), for tests and previews."""
    dst = Path(dst)
    out = {}
    for name in NAMES:
        spec = f"{dst}:{CREMI_PATHS[name]}" if dst.name.lower().endswith(HDF5_SUFFIXES) else f"{dst}/{name}"
        volume = open_volume(spec)
        out[name] = volume.read(roi or volume.roi)
        volume.close()
    return out
