"""Convert any supported volume (HDF5, CREMI files, TIFF, image folders, Zarr, N5, .npy) to OME-Zarr.

A conversion is first planned as a value (:class:`ConversionPlan`: source, output layout, frame,
mask rule), which can be printed (``--dry-run``: :func:`describe_conversion`), then executed by
:func:`convert`. Data streams through in tasks of whole output storage units
(:mod:`cleftchunk.run.chunks`) run by the one block-wise executor, so memory is bounded by a few
tasks whatever the volume size; the work runs on threads of this process (default), local worker
processes, or an existing Dask scheduler (``scheduler="tcp://HOST:PORT"``).

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
- **Existing output**: never replaced without ``overwrite``. If it exists with the same plan
  (recorded in its ``cleftchunk_convert`` attribute) the conversion *resumes*: only storage units
  missing from the store are written; a complete output is left as is. Any other existing output
  is an error that says so.
- **Resume safety**: Zarr's local store writes each chunk/shard to a temporary file and renames
  it, so an interrupted run (kill, disk full) leaves only whole units behind.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.backend import usable_cores
from cleftchunk.run import chunks as chunkwrite

from cleftchunk.io import pyramid, stores
from cleftchunk.io.cremi import cremi_volumes, read_cremi_annotations
from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import refuse_overlap, writes_output
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.run.local import block_client, describe_plan, where
from cleftchunk.run.records import identity_hash, record_path_beside
from cleftchunk.labels import CREMI_BACKGROUND, CREMI_INVALID, kind_attrs, known_kind, not_cleft_values
from cleftchunk.io.volumes import (
    DEFAULT_CHUNKS,
    Volume,
    check_output_spec,
    container_refusal,
    create_volume,
    exists,
    image_name,
    is_hdf5,
    open_volume,
    split_spec,
)

#: Workers of the local Dask scheduler: blosc compression releases the GIL, so a few threads pay
#: off even on 2 cores (see benchmarks/results/convert.md).
DEFAULT_WORKERS = min(4, usable_cores())
SCHEDULERS = ("threads", "processes")
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
    src: str | os.PathLike | Volume,
    dst: str | os.PathLike,
    *,
    dataset: str | None = None,
    channel: int | None = None,
    chunks: Sequence[int] | None = None,
    compressor: str = "zstd",
    shards: Sequence[int] | None = None,
    voxel_size: Sequence[float] | None = None,
    offset_nm: Sequence[float] | None = None,
    mask: bool = False,
    background: int | str | None = None,
    levels: int = 1,
    level_method: str | None = None,
) -> ConversionPlan:
    source = src if isinstance(src, Volume) else open_volume(src, dataset=dataset, voxel_size=voxel_size, offset_nm=offset_nm, channel=channel)
    if not source.voxel_size_known:
        raise CleftchunkError(
            f"{source} has no voxel size in its metadata: pass --voxel-size Z,Y,X in nm (40,4,4 for CREMI)"
        )
    if levels < 1:
        raise CleftchunkError(f"--levels {levels}: give 1 (no pyramid) or more")
    check_output_spec(dst)
    not_cleft = mask_rule(source, background) if mask else None
    dtype = "uint8" if mask else source.dtype.newbyteorder("=").name  # big-endian sources are stored native
    if 0 in source.shape:
        raise CleftchunkError(f"{source.spec} has shape {source.shape}, with an axis of length 0: there is nothing to convert; check the dataset")
    chunks = tuple(min(int(c), s) for c, s in zip(chunks or DEFAULT_CHUNKS, source.shape))
    if len(chunks) != 3 or any(c <= 0 for c in chunks):
        raise CleftchunkError(f"chunk shape {chunks} must be 3 positive sizes Z,Y,X")
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
        except CleftchunkError:
            raise
        except Exception as e:  # h5py/zarr/codec errors on damaged storage
            raise CleftchunkError(
                f"cannot read {roi} of {self.source} ({type(e).__name__}: {e}): the file is corrupt or truncated"
            ) from e
        if self.not_cleft is None:
            return data
        cleft = np.ones(data.shape, dtype=bool)
        for value in self.not_cleft:
            cleft &= data != np.asarray(value).astype(data.dtype)
        return cleft.astype(np.uint8)


# -- executing ----------------------------------------------------------------------------
def convert(
    plan: ConversionPlan,
    *,
    overwrite: bool = False,
    workers: int = DEFAULT_WORKERS,
    scheduler: str = "threads",
    task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES,
    progress: bool = False,
    client: Any = None,
) -> ConversionResult:
    """Execute ``plan``: create (or resume) the output and write what is missing, on ``client``
    or on :func:`~cleftchunk.run.local.block_client` (``workers``; ``scheduler``: threads,
    processes or the address of a running Dask scheduler; the bytes are the same on each)."""
    _check_scheduler(scheduler)
    _refuse_same_place(plan)
    output, status = prepare_output(plan, overwrite)
    if status == "complete":
        return ConversionResult(plan, status, 0, 0, 0)
    with _client(client, workers, scheduler, progress) as c:
        report = chunkwrite.fill(
            output.array,
            SourceReader(plan.source, plan.not_cleft),
            task_bytes=task_bytes,
            progress=_label(plan.dst) if progress else False,
            source_itemsize=plan.source.dtype.itemsize,
            align=source_chunking(plan.source),
            client=c,
            resume=status != "converted",  # nothing is stored in an array just created
            record_at=(record_path_beside(*split_spec(plan.dst), "convert"), identity_hash("convert", 1, plan.record())),
        )
        group = _image_group(output)
        pyramid.build_levels(
            group, image_name(output.container, group.path or None), plan.levels, plan.level_method, plan.voxel_size, plan.offset_nm,
            client=c, progress=progress,
        )
    group.attrs[PLAN_ATTR] = {**plan.record(), "complete": True}
    return ConversionResult(plan, status, report.units, report.written, report.bytes_read)


def _client(client: Any, workers: int, scheduler: str, progress: bool = False):
    """The given client, or one started for this command (closed after)."""
    return contextlib.nullcontext(client) if client is not None else block_client(workers, scheduler, announce=progress)


def describe_conversion(plan: ConversionPlan, workers: int = DEFAULT_WORKERS, scheduler: str = "threads",
                        task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES) -> str:
    """The ``--dry-run`` text of a conversion: its tasks, output bytes and memory per worker."""
    out_itemsize = np.dtype(plan.dtype).itemsize
    grid = ChunkGrid(Roi.from_shape(plan.shape), plan.shards or plan.chunks)
    layout = chunkwrite.task_layout(grid, plan.source.dtype.itemsize, task_bytes, source_chunking(plan.source))
    shapes = [plan.shape]
    for _ in range(1, plan.levels):
        shapes.append(pyramid.level_shape(shapes[-1]))
    level_tasks = sum(len(chunkwrite.task_layout(ChunkGrid(Roi.from_shape(s), tuple(min(c, n) for c, n in zip(plan.chunks, s))),
                                                 out_itemsize, task_bytes)) for s in shapes[1:])
    # a task holds its source box, the converted box and the compressed chunks being written
    memory = math.prod(layout.block_shape) * (plan.source.dtype.itemsize + 2 * out_itemsize)
    output = sum(math.prod(s) for s in shapes) * out_itemsize
    return describe_plan(f"convert {plan.source} -> {plan.dst}", layout, where(workers, scheduler), len(layout) + level_tasks,
                         output, memory, extra=(f"  conversion: {plan.describe()}",))


def source_chunking(source: Volume) -> tuple[int, ...] | None:
    """The source's chunk shape if tasks should be aligned to it; None for unchunked storage.

    Contiguous HDF5 and ``.npy`` report the whole volume as one chunk: any slab reads only
    what it needs, so there is nothing to align to.
    """
    return None if source.chunks == source.shape else source.chunks


def _label(dst: str) -> str:
    return Path(dst).name if "/" in str(dst) else str(dst)


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS and "://" not in str(scheduler):
        raise CleftchunkError(f"unknown scheduler {scheduler!r}: use {', '.join(SCHEDULERS)} or the address of a Dask scheduler (tcp://HOST:PORT)")


def _refuse_same_place(plan: ConversionPlan) -> None:
    refuse_overlap(plan.dst, [plan.source])


def prepare_output(plan: ConversionPlan, overwrite: bool) -> tuple[Volume, str]:
    """Create the output, or reopen a matching one to resume: (volume, status)."""
    if exists(plan.dst) and not overwrite:
        recorded = _recorded_plan(plan.dst)
        if recorded is None:
            raise CleftchunkError(container_refusal(plan.dst) or f"{plan.dst} exists and was not written by this conversion: pass --overwrite to replace it, or choose another output")
        complete = recorded.pop("complete", False)
        want = plan.record()
        changed = sorted(k for k in want if k not in LEVEL_KEYS and recorded.get(k) != want[k])
        if changed:
            raise CleftchunkError(
                f"{plan.dst} exists from a different conversion (differs in {', '.join(changed)}): "
                "pass --overwrite to replace it, or choose another output"
            )
        volume = open_volume(f"{plan.dst}/s0", mode="r+")
        if any(recorded.get(k) != want[k] for k in LEVEL_KEYS):
            # Level 0 is kept; the pyramid is rebuilt as now asked.
            pyramid.drop_levels(_image_group(volume))
            complete = False
        return volume, "complete" if complete else "resumed"
    volume = create_volume(
        plan.dst,
        plan.shape,
        plan.dtype,
        chunks=plan.chunks,
        voxel_size=plan.voxel_size,
        offset_nm=plan.offset_nm,
        compressor=plan.compressor,
        shards=plan.shards,
        fill_value=plan.fill_value,
        # Recorded with the array itself, so that even a run killed right after creating it resumes.
        attrs={**plan.attrs, PLAN_ATTR: plan.record()},
        overwrite=overwrite,
    )
    _image_group(volume).attrs[PLAN_ATTR] = {**plan.record(), "complete": False}
    return volume, "converted"


def _recorded_plan(dst: str) -> dict | None:
    import zarr

    container, inner = split_spec(dst)
    try:
        group = zarr.open_group(stores.zarr_store(container, "r"), mode="r", path=inner or "")
    except Exception:
        return None
    recorded = dict(group.attrs).get(PLAN_ATTR)
    if recorded is None and "s0" in group:  # killed before the group's record was written
        recorded = dict(group["s0"].attrs).get(PLAN_ATTR)
    return dict(recorded) if isinstance(recorded, dict) else None


def _image_group(volume: Volume) -> Any:
    import zarr

    parent = (volume.inner or "").rpartition("/")[0]
    return zarr.open_group(stores.zarr_store(volume.container, "r+"), mode="r+", path=parent)


# -- verifying ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    chunk: tuple[int, ...]
    roi: Roi
    voxels: int

    def __str__(self) -> str:
        return f"chunk {self.chunk} ({self.roi}): {self.voxels} voxels differ"


def verify(
    plan: ConversionPlan, *, workers: int = DEFAULT_WORKERS, scheduler: str = "threads", progress: bool = False, client: Any = None
) -> list[Mismatch]:
    """Compare every chunk of the output's level 0 with the source; the chunks that differ."""
    _check_scheduler(scheduler)
    output = open_volume(f"{plan.dst}/s0")
    if output.shape != plan.shape:
        return [Mismatch((), Roi.from_shape(plan.shape), int(np.prod(plan.shape)))]
    found = chunkwrite.compare(
        output.array,
        SourceReader(plan.source, plan.not_cleft),
        workers=workers,
        scheduler=scheduler,
        progress=f"verify {_label(plan.dst)}" if progress else False,
        align=source_chunking(plan.source),
        client=client,
    )
    return [Mismatch(index, roi, n) for index, roi, n in found]


# -- one call for any source ---------------------------------------------------------------
@writes_output("convert", "dst", ("src",))
def convert_path(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dataset: str | None = None,
    mask: bool = False,
    overwrite: bool = False,
    workers: int = DEFAULT_WORKERS,
    scheduler: str = "threads",
    task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES,
    progress: bool = False,
    dry_run: bool = False,
    log: Any = print,
    **plan_options: Any,
) -> list[ConversionResult]:
    """What ``cleftchunk convert SRC DST`` does: a whole CREMI file into a container, else one volume.

    ``plan_options`` are those of :func:`plan_conversion` (chunks, compressor, voxel_size, ...).
    ``dry_run``: log the plan of each volume and return [] without creating anything.
    """
    run = dict(overwrite=overwrite, workers=workers, scheduler=scheduler, task_bytes=task_bytes, progress=progress)
    if dry_run:
        _check_scheduler(scheduler)
        for plan in plan_all(src, dst, dataset, mask, **plan_options):
            log(describe_conversion(plan, workers, scheduler, task_bytes))
        return []
    if is_whole_file_request(src, dataset, dst) and cremi_volumes(src) is not None:
        return convert_cremi_file(src, dst, mask=mask, **run, **plan_options)
    plan = plan_conversion(src, dst, dataset=dataset, mask=mask, **plan_options)
    return [convert(plan, **run)]


def plan_all(src: str | os.PathLike, dst: str | os.PathLike, dataset: str | None = None, mask: bool = False, **plan_options: Any) -> list[ConversionPlan]:
    """The plans of ``convert_path``: one per volume of a whole CREMI file, else one."""
    if is_whole_file_request(src, dataset, dst) and cremi_volumes(src) is not None:
        return _cremi_plans(src, dst, mask, **plan_options)
    return [plan_conversion(src, dst, dataset=dataset, mask=mask, **plan_options)]


# -- whole CREMI files --------------------------------------------------------------------
def convert_cremi_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    workers: int = DEFAULT_WORKERS,
    scheduler: str = "threads",
    task_bytes: int = chunkwrite.DEFAULT_TASK_BYTES,
    progress: bool = False,
    mask: bool = False,
    **plan_options: Any,
) -> list[ConversionResult]:
    """Convert every volume of a CREMI file into images of the Zarr container ``dst``.

    With ``mask``, the ``clefts`` volume becomes a uint8 mask; the others keep their values.
    Annotations, if present, are kept as the ``cremi_annotations`` attribute of the container.
    """
    import zarr

    _check_scheduler(scheduler)
    plans = _cremi_plans(src, dst, mask, **plan_options)
    with _client(None, workers, scheduler, progress) as client:  # one cluster for every volume
        results = [
            convert(plan, overwrite=overwrite, task_bytes=task_bytes, progress=progress, client=client)
            for plan in plans
        ]
    annotations = read_cremi_annotations(src)
    if annotations is not None:
        zarr.open_group(stores.zarr_store(dst, "a"), mode="a").attrs["cremi_annotations"] = annotations
    return results


def _cremi_plans(src: str | os.PathLike, dst: str | os.PathLike, mask: bool, **plan_options: Any) -> list[ConversionPlan]:
    volumes = cremi_volumes(src)
    if volumes is None:
        raise CleftchunkError(f"{src} is not a CREMI file (no volumes/ group): name the dataset with --dataset or FILE:DATASET")
    return [
        plan_conversion(str(src), f"{dst}/{name}", dataset=ds, mask=mask and name == "clefts", **plan_options)
        for name, ds in volumes.items()
    ]


def is_whole_file_request(src: str | os.PathLike, dataset: str | None, dst: str | os.PathLike) -> bool:
    """True when ``src`` is an HDF5 file given without a dataset and ``dst`` is a bare container."""
    container, inner = split_spec(src, dataset)
    _, dst_inner = split_spec(dst)
    return is_hdf5(container) and inner is None and dst_inner is None and stores.exists(container)


__all__ = [
    "ConversionPlan",
    "ConversionResult",
    "DEFAULT_WORKERS",
    "Mismatch",
    "convert",
    "convert_cremi_file",
    "convert_path",
    "cremi_volumes",
    "mask_rule",
    "plan_conversion",
    "verify",
]
