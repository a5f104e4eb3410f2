"""Convert any supported volume (HDF5, CREMI files, TIFF, image folders, Zarr, N5, .npy) to OME-Zarr.

A conversion is first planned as a value (:class:`ConversionPlan`: source, output layout, frame,
mask rule), then run as a block-wise operation (:class:`Convert`, on
:func:`cleftchunk.run.operation.run_operation`, which owns the dry run, the lock, create/resume/
refuse, the completion record and "complete"). Data streams through in tasks of whole output
storage units (:mod:`cleftchunk.run.chunks`) run by the one block-wise executor, so memory is
bounded by a few tasks whatever the volume size; where the work runs (threads of this process,
local worker processes, an existing Dask scheduler) is the ``run`` options'
(:class:`~cleftchunk.run.options.RunOptions`).

Decisions, documented here once:

- **Chunks** default to :data:`cleftchunk.io.volumes.DEFAULT_CHUNKS` = (16, 256, 256): 1 MiB for
  uint8, thin in z because EM voxels are 10× longer in z (40 nm sections, 4 nm pixels), so a chunk
  covers a roughly isotropic 640 × 1024 × 1024 nm; 256 px in-plane matches the model window and
  divides prediction blocks, so blocks read whole chunks.
- **Voxel size** comes from the source's metadata (HDF5 ``resolution``, Zarr/OME-Zarr, N5
  ``resolution``/``pixelResolution``), else from ``voxel_size=`` (``--voxel-size``). With neither
  the conversion is refused rather than guessing: every distance the project reports (the CREMI
  score is in nm) depends on it, and a silent 40×4×4 would be wrong for e.g. SNEMI (30×6×6).
- **Mask** (``mask=True``): a uint8 0/1 cleft mask. A voxel is a cleft unless its value is a
  "not-cleft" value: ``background=`` if given (an int, or ``"cremi"``); else, when
  :mod:`cleftchunk.labels` finds CREMI ids, 0xFFFFFFFFFFFFFFFF (background) and
  0xFFFFFFFFFFFFFFFE (invalid); else 0 (PyTorch Connectomics ``main`` files, binary masks).
- **Kind**: the output records what it holds (``cleft_kind``: ``ids``, ``main``, ``mask``,
  ``image``, ``neurons``) whenever the source's metadata, name or a few sampled boxes tell it.
- **Existing output**: never replaced without ``run.overwrite``. If it exists with the same plan
  (its identity is stored in the ``cleftchunk_convert`` attribute of ``s0``, written when the
  array is created) the conversion *resumes*: only storage units missing from the store are
  written; a complete output is left as is. Another conversion's output is refused naming the
  parameters that differ; anything else is refused too. The pyramid (``levels``,
  ``level_method``) is not part of the identity: asking for other levels rebuilds them, keeps s0.
- **Passes**: level 0 is the operation's recorded pass (one byte per task in the completion
  record); each pyramid level is one more pass, which resumes from the chunks it has stored.
- **Resume safety**: Zarr's local store writes each chunk/shard to a temporary file and renames
  it, so an interrupted run (kill, disk full) leaves only whole units behind.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.run import chunks as chunkwrite

from cleftchunk.io import pyramid, stores
from cleftchunk.io.cremi import cremi_volumes, read_cremi_annotations
from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import output_lock
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.run.layout import GridLayout
from cleftchunk.io.outputs import VolumeOperation
from cleftchunk.run.operation import Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID, kind_attrs, known_kind, not_cleft_values
from cleftchunk.io.volumes import (Volume, check_output_spec, chunk_shape, container_refusal, create_volume, image_name,
                                   is_hdf5, open_volume, split_spec)

PLAN_ATTR = "cleftchunk_convert"
#: Recorded plan entries that only concern the pyramid: changing them rebuilds levels, keeps s0.
LEVEL_KEYS = ("levels", "level_method")


@dataclass(frozen=True)
class ConversionPlan:
    """Everything that determines the output of converting one volume."""

    source: Volume
    dst: str
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    compressor: str
    voxel_size: tuple[float, ...]
    offset_nm: tuple[float, ...]
    not_cleft: tuple[int, ...] | None = None  # mask mode: values that are not clefts
    levels: int = 1
    level_method: str = "mean"
    fill_value: Any = 0
    attrs: dict = field(default_factory=dict)
    given: str | None = None  # the source as the user named it (an image, where source is its s0)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def record(self) -> dict:
        """What is stored in the output to recognise the same conversion when resuming."""
        src = self.source
        return {
            "source": stores.resolved(src.container) + (f":{src.inner}" if src.inner else ""),
            "channel": src.channel,
            "source_shape": list(src.shape),
            "source_dtype": str(src.dtype),
            "dtype": self.dtype,
            "chunks": list(self.chunks),
            "shards": list(self.shards) if self.shards else None,
            "compressor": self.compressor,
            "voxel_size": list(self.voxel_size),
            "offset": list(self.offset_nm),
            "mask_not_cleft": [str(v) for v in self.not_cleft] if self.not_cleft is not None else None,
            "levels": self.levels,
            "level_method": self.level_method,
        }

    def describe(self) -> str:
        what = f"uint8 cleft mask (not cleft: {', '.join(hex(v) for v in self.not_cleft)})" if self.not_cleft else self.dtype
        shards = f", shards {self.shards}" if self.shards else ""
        return (
            f"{self.source} -> {self.dst}: {self.shape} {what}, chunks {self.chunks}{shards}, "
            f"{self.compressor}, voxel size {self.voxel_size} nm, offset {self.offset_nm} nm, levels {self.levels}"
        )


@dataclass(frozen=True)
class ConversionResult:
    plan: ConversionPlan
    status: str  # "converted", "resumed" or "complete" (nothing left to do)
    units: int
    written: int
    bytes_read: int


# -- planning -----------------------------------------------------------------------------
def plan_conversion(
    src: str | os.PathLike | Volume, dst: str | os.PathLike, *, dataset: str | None = None, channel: int | None = None,
    chunks: Sequence[int] | None = None, compressor: str = "zstd", shards: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None, offset_nm: Sequence[float] | None = None, mask: bool = False,
    background: int | str | None = None, levels: int = 1, level_method: str | None = None,
) -> ConversionPlan:
    source = src if isinstance(src, Volume) else open_volume(src, dataset=dataset, voxel_size=voxel_size, offset_nm=offset_nm, channel=channel)
    if not source.voxel_size_known:
        raise CleftchunkError(f"{source} has no voxel size in its metadata: pass --voxel-size Z,Y,X in nm (40,4,4 for CREMI)")
    if levels < 1:
        raise CleftchunkError(f"--levels {levels}: give 1 (no pyramid) or more")
    check_output_spec(dst)
    not_cleft = mask_rule(source, background) if mask else None
    dtype = "uint8" if mask else source.dtype.newbyteorder("=").name  # big-endian sources are stored native
    if 0 in source.shape:
        raise CleftchunkError(f"{source.spec} has shape {source.shape}, with an axis of length 0: there is nothing to convert; check the dataset")
    most = pyramid.max_levels(source.shape)
    if levels > most:
        raise CleftchunkError(f"--levels {levels}: {source.spec} {source.shape} is down to 1 voxel in y or x at level s{most - 1}: give --levels {most} or fewer")
    chunks = chunk_shape(chunks, source.shape)
    method = level_method or pyramid.default_method(np.dtype(dtype), is_mask=mask)
    if method not in pyramid.METHODS:
        raise CleftchunkError(f"unknown downsampling {method!r}: use {' or '.join(pyramid.METHODS)}")
    return ConversionPlan(
        source=source,
        dst=str(dst),
        dtype=dtype,
        chunks=chunks,
        shards=tuple(int(s) for s in shards) if shards else None,
        compressor=(compressor or "zstd").lower(),
        voxel_size=tuple(source.voxel_size),
        offset_nm=tuple(source.offset_nm),
        not_cleft=not_cleft,
        levels=int(levels),
        level_method=method,
        fill_value=_fill_value(source, mask),
        attrs=_carried_attrs(source, not_cleft),
        given=None if isinstance(src, Volume) else str(src) if dataset is None else f"{src}:{dataset}",
    )


def mask_rule(source: Volume, background: int | str | None = None) -> tuple[int, ...]:
    """The values that are *not* clefts when making a mask (see the module docstring)."""
    if background is not None:
        if str(background).lower() == "cremi":
            return (int(CREMI_BACKGROUND), int(CREMI_INVALID))
        try:
            return (int(background),)
        except ValueError:
            raise CleftchunkError(f"--background {background!r}: give an integer or 'cremi'") from None
    return not_cleft_values("ids" if known_kind(source) == "ids" else "main")


def _fill_value(source: Volume, mask: bool) -> Any:
    """Unwritten chunks read as this: the CREMI background for CREMI label volumes (mostly background)."""
    if not mask and known_kind(source) == "ids":
        return int(CREMI_BACKGROUND)
    return 0


def _carried_attrs(source: Volume, not_cleft: tuple[int, ...] | None) -> dict:
    """The kind of the output, decided here once (:mod:`cleftchunk.labels`) and read by every stage."""
    if not_cleft is not None:
        return {"background": 0, **kind_attrs("mask")}
    kind = known_kind(source)
    if kind == "ids":
        return {"background": int(CREMI_BACKGROUND), **kind_attrs(kind)}
    attrs = source.attrs
    carried = {"background": attrs["background"]} if "background" in attrs else {}
    return {**carried, **kind_attrs(kind)}


# -- the data path ------------------------------------------------------------------------
class SourceReader:
    """Producer of output data for a ROI (array-local voxels): the source, masked if asked."""

    def __init__(self, source: Volume, not_cleft: tuple[int, ...] | None = None):
        self.source = source
        self.not_cleft = not_cleft

    def __call__(self, roi: Roi) -> np.ndarray:
        try:
            data = self.source[roi.to_slices()]
        except OSError as e:
            if e.errno is not None:  # the system's (permissions, disk, network): reported as it is
                raise
            raise self._damaged(roi, e) from e  # h5py: "Can't read data", a truncated file
        except (RuntimeError, ValueError, EOFError) as e:  # a codec that cannot decode a damaged chunk
            raise self._damaged(roi, e) from e
        if self.not_cleft is None:
            return data
        cleft = np.ones(data.shape, dtype=bool)
        for value in self.not_cleft:
            cleft &= data != np.asarray(value).astype(data.dtype)
        return cleft.astype(np.uint8)

    def _damaged(self, roi: Roi, error: BaseException) -> CleftchunkError:
        return CleftchunkError(f"cannot read {roi} of {self.source} ({type(error).__name__}: {error}): the file is corrupt or truncated")


# -- executing ----------------------------------------------------------------------------
class Convert(VolumeOperation):
    """One volume's conversion as a block-wise operation (see the module docstring): level 0 is
    the recorded pass, each pyramid level one more pass. ``run_operation`` returns a
    :class:`ConversionResult` (None for a dry run)."""

    stage = "convert"

    def __init__(self, conversion: ConversionPlan, task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES):
        self.conversion, self.task_bytes = conversion, int(task_bytes)
        self.output, self.inputs = conversion.dst, (conversion.given or conversion.source,)
        self.status = "converted"  # or "resumed" once an existing output is reopened
        self.levels_changed = False

    def identity(self) -> dict:
        return {k: v for k, v in self.conversion.record().items() if k not in LEVEL_KEYS}

    def _levels(self) -> dict:
        return {k: self.conversion.record()[k] for k in LEVEL_KEYS}

    def extra_state(self) -> dict:
        return self._levels()

    def layout(self, options: RunOptions) -> GridLayout:
        """The tasks of level 0: ``block_shape`` (a multiple of the storage unit), else by bytes."""
        c = self.conversion
        unit = c.shards or c.chunks
        if options.block_shape is not None:
            return GridLayout(Roi.from_shape(c.shape), block_shape_for(options.block_shape, unit, c.shape, unit))
        return chunkwrite.task_layout(ChunkGrid(Roi.from_shape(c.shape), unit), c.source.dtype.itemsize, self.task_bytes,
                                      source_chunking(c.source))

    def plan(self, options: RunOptions) -> Plan:
        c = self.conversion
        out_itemsize = np.dtype(c.dtype).itemsize
        layout = self.layout(options)
        shapes = [c.shape]
        for _ in range(1, c.levels):
            shapes.append(pyramid.level_shape(shapes[-1]))
        level_tasks = 0
        for shape in shapes[1:]:
            chunks = tuple(min(k, n) for k, n in zip(c.chunks, shape))
            if options.block_shape is not None:
                level_tasks += len(GridLayout(Roi.from_shape(shape), block_shape_for(options.block_shape, chunks, shape, chunks)))
            else:
                level_tasks += len(chunkwrite.task_layout(ChunkGrid(Roi.from_shape(shape), chunks), out_itemsize, self.task_bytes))
        # a task holds its source box, the converted box and the compressed chunks being written
        memory = math.prod(layout.block_shape) * (c.source.dtype.itemsize + 2 * out_itemsize)
        output = sum(math.prod(s) for s in shapes) * out_itemsize
        return Plan(f"convert {c.source} -> {c.dst}", layout, len(layout) + level_tasks, output, memory,
                    extra=(f"  conversion: {c.describe()}",))

    def read_state(self) -> dict | None:
        state = super().read_state()
        if state is None:
            refusal = container_refusal(self.output)  # out.zarr holding images: name one inside it
            if refusal:
                raise CleftchunkError(refusal)
            return None
        if {k: state.get(k) for k in LEVEL_KEYS} != self._levels():
            # Level 0 is kept; the pyramid is rebuilt as now asked.
            self.levels_changed = True
            state = {**state, "complete": False}
        return state

    def write_state(self, handle: Volume, state: dict) -> None:
        handle.array.attrs[self.attribute] = {**state, **self._levels()}

    def create(self, state: dict, overwrite: bool) -> Volume:
        c = self.conversion
        self.status = "converted"
        return create_volume(
            c.dst, c.shape, c.dtype, chunks=c.chunks, voxel_size=c.voxel_size, offset_nm=c.offset_nm,
            compressor=c.compressor, shards=c.shards, fill_value=c.fill_value,
            # the state is stored with the array itself, so that even a run killed right after
            # creating it resumes
            attrs={**c.attrs, self.attribute: state}, overwrite=overwrite,
        )

    def reopen(self) -> Volume:
        self.status = "resumed"
        volume = open_volume(f"{self.output}/s0", mode="r+")
        if self.levels_changed:
            pyramid.drop_levels(_image_group(volume))
        return volume

    def execute(self, running: Running, handle: Volume) -> "ConversionResult":
        c = self.conversion
        report = chunkwrite.fill(
            handle.array, SourceReader(c.source, c.not_cleft), running, layout=self.layout(running.options),
            name=_label(c.dst), source_itemsize=c.source.dtype.itemsize,
            resume=self.status != "converted",  # nothing is stored in an array just created
            recorded=True,
        )
        group = _image_group(handle)
        pyramid.build_levels(group, image_name(handle.container, group.path or None), c.levels, c.level_method, c.voxel_size,
                             c.offset_nm, running, block_shape=running.options.block_shape)
        from cleftchunk.io.tables import count_written_labels

        count_written_labels(handle, running)  # labels: their cleft table, for training (io/tables.py)
        return ConversionResult(c, self.status, report.units, report.written, report.bytes_read)

    def finished(self, handle: Volume, result: object) -> "ConversionResult":
        return ConversionResult(self.conversion, "complete", 0, 0, 0)


def convert(plan: ConversionPlan, run: RunOptions | None = None, *, task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES,
            log: object = None, client: object = None) -> ConversionResult | None:
    """Execute ``plan``: create (or resume) the output and write what is missing, as ``run``
    says (where, dry run, overwrite, progress; the bytes are the same wherever it runs).
    ``client``: an open client to run on (several conversions sharing one cluster)."""
    return run_operation(Convert(plan, task_bytes), run, log, client)


def source_chunking(source: Volume) -> tuple[int, ...] | None:
    """The source's chunk shape if tasks should be aligned to it; None for unchunked storage.

    Contiguous HDF5 and ``.npy`` report the whole volume as one chunk: any slab reads only
    what it needs, so there is nothing to align to.
    """
    return None if source.chunks == source.shape else source.chunks


def _label(dst: str) -> str:
    return Path(dst).name if "/" in str(dst) else str(dst)


def _image_group(volume: Volume) -> Any:
    import zarr

    parent = (volume.inner or "").rpartition("/")[0]
    return zarr.open_group(stores.zarr_store(volume.container, "r+"), mode="r+", path=parent)


# -- one call for any source ---------------------------------------------------------------
def convert_path(src: str | os.PathLike, dst: str | os.PathLike, *, dataset: str | None = None, mask: bool = False,
                 run: RunOptions | None = None, task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES, log: Any = None,
                 **plan_options: Any) -> list[ConversionResult]:
    """What ``cleftchunk convert SRC DST`` does: a whole CREMI file into a container, else one volume.

    ``plan_options`` are those of :func:`plan_conversion` (chunks, compressor, voxel_size, ...).
    With ``run.dry_run`` the plan of each volume is logged and [] returned; nothing is created.
    """
    if is_whole_file_request(src, dataset, dst) and cremi_volumes(src) is not None:
        return convert_cremi_file(src, dst, mask=mask, run=run, task_bytes=task_bytes, log=log, **plan_options)
    result = convert(plan_conversion(src, dst, dataset=dataset, mask=mask, **plan_options), run, task_bytes=task_bytes, log=log)
    return [] if result is None else [result]


def plan_all(src: str | os.PathLike, dst: str | os.PathLike, dataset: str | None = None, mask: bool = False, **plan_options: Any) -> list[ConversionPlan]:
    """The plans of ``convert_path``: one per volume of a whole CREMI file, else one."""
    if is_whole_file_request(src, dataset, dst) and cremi_volumes(src) is not None:
        return _cremi_plans(src, dst, mask, **plan_options)
    return [plan_conversion(src, dst, dataset=dataset, mask=mask, **plan_options)]


# -- whole CREMI files --------------------------------------------------------------------
def convert_cremi_file(src: str | os.PathLike, dst: str | os.PathLike, *, mask: bool = False, run: RunOptions | None = None,
                       task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES, log: Any = None, **plan_options: Any) -> list[ConversionResult]:
    """Convert every volume of a CREMI file into images of the Zarr container ``dst`` (one
    operation each, on one client).

    With ``mask``, the ``clefts`` volume becomes a uint8 mask; the others keep their values.
    Annotations, if present, are kept as the ``cremi_annotations`` attribute of the container.
    """
    import zarr

    run = run or RunOptions()
    plans = _cremi_plans(src, dst, mask, **plan_options)
    if run.dry_run:
        for plan in plans:
            convert(plan, run, task_bytes=task_bytes, log=log)
        return []
    with run.client() as client:  # one cluster for every volume
        results = [convert(plan, run, task_bytes=task_bytes, log=log, client=client) for plan in plans]
    annotations = read_cremi_annotations(src)
    if annotations is not None:
        with output_lock(dst, "convert", log):
            zarr.open_group(stores.zarr_store(dst, "a"), mode="a").attrs["cremi_annotations"] = annotations
    return results


def _cremi_plans(src: str | os.PathLike, dst: str | os.PathLike, mask: bool, **plan_options: Any) -> list[ConversionPlan]:
    volumes = cremi_volumes(src)
    if volumes is None:
        raise CleftchunkError(f"{src} is not a CREMI file (no volumes/ group): name the dataset with --dataset or FILE:DATASET")
    return [plan_conversion(str(src), f"{dst}/{name}", dataset=ds, mask=mask and name == "clefts", **plan_options)
            for name, ds in volumes.items()]


def is_whole_file_request(src: str | os.PathLike, dataset: str | None, dst: str | os.PathLike) -> bool:
    """True when ``src`` is an HDF5 file given without a dataset and ``dst`` is a bare container."""
    container, inner = split_spec(src, dataset)
    _, dst_inner = split_spec(dst)
    return is_hdf5(container) and inner is None and dst_inner is None and stores.exists(container)


__all__ = ["ConversionPlan", "ConversionResult", "Convert", "convert", "convert_cremi_file", "convert_path",
           "cremi_volumes", "mask_rule", "plan_conversion"]
