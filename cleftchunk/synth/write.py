"""Writing synthetic samples of any size: one block-wise operation (:class:`Synth`, on
:func:`cleftchunk.run.operation.run_operation`, which owns the dry run, the lock, create/resume/
refuse, the completion record and "complete"), run where the ``run`` options say (threads of this
process, local worker processes, an existing Dask scheduler), resumable, constant memory. Every
voxel is a function of the seed and its coordinate, so the bytes depend on neither the work block
(``block_shape``, a multiple of the chunks; default: one chunk) nor where it runs.

Zarr output (default): ``DST.zarr/{raw,clefts,neuron_ids}`` OME-Zarr images. Each block writes
its labels first and its raw last; zarr's local store writes a chunk atomically, so a block whose
raw chunks all exist is finished: a re-run skips the blocks its completion record marks done, and
every other block checks its own raw chunks on the worker (the client holds nothing per block).
The operation's state (identity: seed, shape, chunks, generator parameters) is kept in the root
group's ``cleftchunk_synth`` attribute.

CREMI output (``format="cremi"``): one HDF5 file in the CREMI layout, written by the client
(HDF5 has a single writer) as results arrive from the workers, a few blocks in flight at a time,
so memory stays bounded; the file is flushed after each block, before the completion record may
mark it. The state is the file's ``cleftchunk_synth`` attribute (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.synth.generate import VOXEL_SIZE, SynthParams, check_seed, generate_region, make_params
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_CLEFTS, CREMI_NEURONS, CREMI_RAW, kind_attrs
from cleftchunk.io.cremi import hdf5_state
from cleftchunk.io.stores import is_url
from cleftchunk.io.volumes import HDF5_SUFFIXES, chunk_shape, create_volume, open_volume, split_spec
from cleftchunk.run.chunks import unit_grid, unit_stored, units_in
from cleftchunk.run.executor import BlockwiseTask
from cleftchunk.run.layout import GridLayout
from cleftchunk.io.outputs import VolumeOperation
from cleftchunk.run.operation import Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for

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


def synthesize(
    dst: str | os.PathLike,
    shape: Sequence[int],
    seed: int = 0,
    difficulty: float = 0.5,
    chunks: Sequence[int] | None = None,
    format: str | None = None,
    run: RunOptions | None = None,
    log: Callable[[str], None] | None = None,
    **params,
) -> dict | None:
    """Write a synthetic sample of ``shape`` to ``dst``; returns a summary dict (None for a dry run).

    ``dst`` is ``out.zarr`` (format zarr) or ``out.hdf`` / ``.h5`` (format cremi; the format is
    inferred from the name when not given). An existing destination is refused unless
    ``run.overwrite``, except a run of the same sample, which is resumed (or, when complete, left
    as it is). ``chunks``: the chunk shape; the work block is ``run.block_shape`` (default: one
    chunk). Threads of this process are the default because they measured faster, leaner and
    with no start-up cost on 2 cores (numpy releases the GIL in the heavy loops;
    benchmarks/results/synth.md); worker processes avoid the GIL on many cores.
    """
    run = run or RunOptions()
    start = time.perf_counter()
    operation = Synth(dst, shape, seed, chunks, make_params(difficulty, **params), format)
    result = run_operation(operation, run, log)
    if result is None:
        return None
    return {"path": str(dst), "format": operation.kind, "shape": operation.shape, "chunks": operation.chunks, **result,
            "seconds": time.perf_counter() - start}


#: Peak bytes per voxel of generating a block (measured with tracemalloc on 16×256×256: 67).
GENERATE_BYTES_PER_VOXEL = 70


class Synth(VolumeOperation):
    """A synthetic sample as a block-wise operation (see the module docstring); ``execute``
    returns ``{"blocks": n, "skipped": blocks already written by an earlier run}``."""

    stage = "synth"

    def __init__(self, dst, shape, seed: int, chunks, params: SynthParams, format: str | None = None):
        if is_url(dst):
            raise CleftchunkError(
                f"{dst}: synth writes a local sample (it resumes from the files it finds); write it here, then "
                "cleftchunk convert each volume to the object store"
            )
        self.path = Path(dst)
        self.kind = format or ("cremi" if self.path.name.lower().endswith(HDF5_SUFFIXES) else "zarr")
        if self.kind not in FORMATS:
            raise CleftchunkError(f"unknown format {format!r}: use zarr or cremi")
        if self.kind == "zarr" and (not str(dst).lower().endswith((".zarr", ".zarr3")) or split_spec(dst)[1] is not None):
            raise CleftchunkError(f"{dst}: the zarr format writes a container ending in .zarr, e.g. sample.zarr")
        if self.kind == "cremi" and not self.path.name.lower().endswith(HDF5_SUFFIXES):
            raise CleftchunkError(f"{dst}: the cremi format writes an HDF5 file ending in .hdf, .h5 or .hdf5")
        self.shape = check_shape(shape)
        self.chunks = chunk_shape(chunks, self.shape)
        self.seed, self.params = check_seed(seed), params
        self.output = str(dst)

    def identity(self) -> dict:
        return {"seed": int(self.seed), "shape": list(self.shape), "chunks": list(self.chunks),
                "params": dataclasses.asdict(self.params)}

    def layout(self, options: RunOptions) -> GridLayout:
        return GridLayout(Roi.from_shape(self.shape), block_shape_for(options.block_shape, self.chunks, self.shape, self.chunks))

    def plan(self, options: RunOptions) -> Plan:
        layout = self.layout(options)
        self.blocks = len(layout)
        written = sum(np.dtype(d).itemsize for d in DTYPES.values())
        return Plan(f"synth ({self.kind})", layout, -(-len(layout) // layout.auto_batch()), math.prod(self.shape) * written,
                    math.prod(layout.block_shape) * GENERATE_BYTES_PER_VOXEL)

    # -- where the state lives -------------------------------------------------------------------
    def read_state(self) -> dict | None:
        if self.kind == "cremi":
            return hdf5_state(self.path, ATTR)
        import zarr

        try:
            state = dict(zarr.open_group(str(self.path), mode="r").attrs).get(ATTR)
        except zarr.errors.BaseZarrError:  # not a zarr group (an array, a plain folder): not a sample
            return None
        return state if isinstance(state, dict) and "identity_hash" in state else None

    def write_state(self, handle: Any, state: dict) -> None:
        if self.kind == "cremi":
            import h5py

            with h5py.File(self.path, "a") as f:
                f.attrs[ATTR] = json.dumps(state)
            return
        import zarr

        zarr.open_group(str(self.path), mode="a").attrs[ATTR] = state

    def create(self, state: dict, overwrite: bool) -> Any:
        if self.kind == "cremi":
            import h5py

            with h5py.File(self.path, "w") as f:
                _create_cremi_layout(f, self.shape, self.chunks, self.seed, self.params)
                f.attrs[ATTR] = json.dumps(state)
            return self.path
        import zarr

        # the state first: a run killed while creating the images resumes (reopen creates them)
        # created with its state in one write: a bare group left by a full disk would be refused as someone's
        zarr.open_group(str(self.path), mode="w" if overwrite else "a", attributes={ATTR: state}).attrs[ATTR] = state
        return self.reopen()

    def reopen(self) -> Any:
        """The file, or the images of the sample (any a killed run did not create yet, created)."""
        if self.kind == "cremi":
            return self.path
        from cleftchunk.io.guard import holds_nothing
        from cleftchunk.run.chunks import remove_partial_writes

        # an image a failed run began and left empty (a full disk between its group and its array) is created afresh
        images = {name: create_volume(
            f"{self.path}/{name}", self.shape, DTYPES[name], chunks=self.chunks, voxel_size=VOXEL_SIZE, fill_value=FILL[name],
            exist_ok=True, overwrite=not is_url(self.path) and holds_nothing(Path(f"{self.path}/{name}"), bare_group=True), attrs={ATTR: {"seed": self.seed, "difficulty": self.params.difficulty}, **kind_attrs(KIND[name])},
        ) for name in NAMES}
        for volume in images.values():  # the temporary files of writes a kill cut short
            remove_partial_writes(volume.array)
        return images

    # -- the work --------------------------------------------------------------------------------
    def execute(self, running: Running, handle: Any) -> dict:
        layout = self.layout(running.options)
        if self.kind == "cremi":
            report = self._write_cremi(running, layout)
        else:
            task = partial(_zarr_task, handle, layout.grid, self.seed, self.params)
            report = running.run(BlockwiseTask("synth", layout, task, batch=layout.auto_batch()), recorded=True)
        return {"blocks": len(layout), "skipped": report.counts["skipped"] + report.already_done}

    def _write_cremi(self, running: Running, layout: GridLayout):
        import h5py

        with h5py.File(self.path, "a") as f:

            def consume(block, data):
                for name in NAMES:
                    f[CREMI_PATHS[name]][block.write_roi.to_slices()] = data[name]
                f.flush()  # on disk before the record may say "done"

            task = partial(_cremi_task, layout.grid, self.seed, self.params)
            return running.run(BlockwiseTask("synth", layout, task, collect=consume), recorded=True)

    def finished(self, handle: Any, result: Any) -> dict:
        return {"blocks": self.blocks, "skipped": self.blocks}


def _zarr_block(index, volumes, grid: ChunkGrid, seed: int, params: SynthParams) -> None:
    roi = grid.chunk_roi(index)
    data = generate_region(roi, seed, resolved=params)
    for name in ("clefts", "neuron_ids", "raw"):  # raw last: its chunks mark the block done
        volumes[name].write(roi, data[name])


def _zarr_task(volumes, grid: ChunkGrid, seed: int, params: SynthParams, block, _prepared=None) -> dict:
    """One block on a worker: skipped when its raw chunks are all stored (written last, so the
    block is done)."""
    raw = volumes["raw"].array
    if all(unit_stored(raw, index) for index in units_in(unit_grid(raw), block.write_roi)):
        return {"skipped": 1}
    _zarr_block(block.index, volumes=volumes, grid=grid, seed=seed, params=params)
    return {"written": 1}


# -- CREMI HDF5 -----------------------------------------------------------------------------
def _create_cremi_layout(f, shape, chunks, seed, p) -> None:
    f.attrs["file_format"] = "0.2"
    for name in NAMES:
        ds = f.create_dataset(
            CREMI_PATHS[name], shape=shape, dtype=DTYPES[name], chunks=chunks,
            fillvalue=FILL[name], compression="gzip", compression_opts=1, shuffle=True,
        )
        ds.attrs["resolution"] = np.array(VOXEL_SIZE, dtype=np.float64)
        ds.attrs["offset"] = np.zeros(3, dtype=np.float64)
    f["volumes"].attrs["synth_seed"] = seed
    f["volumes"].attrs["synth_difficulty"] = p.difficulty


def _region_block(index, grid: ChunkGrid, seed: int, params: SynthParams) -> dict:
    return generate_region(grid.chunk_roi(index), seed, resolved=params)


def _cremi_task(grid: ChunkGrid, seed: int, params: SynthParams, block, _prepared=None) -> dict:
    return _region_block(block.index, grid=grid, seed=seed, params=params)


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
