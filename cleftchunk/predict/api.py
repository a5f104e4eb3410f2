"""``predict(model, volume, output)``: the Python API and command behind ``cleftchunk predict``:
check the input, open or resume the output, plan, run the engine, record completion."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cleftchunk.backend import tune_malloc, usable_cores
from cleftchunk.errors import CleftchunkError
from cleftchunk.io.guard import writes_output
from cleftchunk.geometry import Coord, as_coord
from cleftchunk.intensity import check_image_dtype, check_scale, check_unit_range
from cleftchunk.predict.tiling import (
    check_fixed_headroom,
    frame_padding,
)
from cleftchunk.io.volumes import DEFAULT_CHUNKS, Volume, create_like, open_volume
from cleftchunk.io.volumes import exists as volume_exists
from cleftchunk.predict.engine import Job, PredictResult, _execute
from cleftchunk.predict.params import ATTR, DEFAULT_BLOCK_SHAPE, PRECISIONS, PREDICT_FORMAT, WORKER_BLOCK_SHAPE, PredictParams
from cleftchunk.predict.plan import describe_run, make_plan, record_identity
from cleftchunk.run.local import ThreadClient
from cleftchunk.run.records import BlockRecord, remove_record
from cleftchunk.predict.runner import ModelSource
from cleftchunk.predict.scratch import Scratch



# -- the Python API -----------------------------------------------------------------------
@writes_output("predict", "output_spec", ("input_volume", "mask"))
def predict(
    model_or_checkpoint: Any,
    input_volume: Any,
    output_spec: str | os.PathLike,
    *,
    window: Sequence[int] | None = None,
    overlap: float = 0.5,
    blend: str = "gaussian",
    pad: bool = False,
    batch_size: int | None = None,
    tta: int = 1,
    scale: float | None = None,
    precision: str = "auto",
    compile: bool = False,
    mask: Any = None,
    block_shape: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    cores: int | None = None,
    scheduler: str | None = None,
    listen: str | None = None,
    security: Any = None,
    processes: bool = True,
    client: Any = None,
    overwrite: bool = False,
    retries: int = 2,
    progress: bool = True,
    architecture: str | None = None,
    log: Callable[[str], None] | None = None,
    scratch: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> PredictResult:
    """Predict cleft probabilities of ``input_volume`` into ``output_spec`` (``out.zarr/pred``).

    ``model_or_checkpoint``: a checkpoint path, or an ``nn.Module`` mapping float (N,1,z,y,x)
    raw/255 to probabilities (e.g. from ``cleftchunk.load_model``; then ``window`` is required).
    ``input_volume``: a :class:`Volume` or a spec ``open_volume`` reads. Work runs on ``client``,
    or the cluster at ``scheduler``, or a local cluster started here that listens on 127.0.0.1 only
    unless ``listen`` names another interface: one worker process per GPU (``gpus``), else
    ``workers`` CPU worker processes, or (``workers`` None or 0, the default without GPUs) one task
    thread per core (``cores``) in this process; ``security`` is a
    ``distributed.Security`` for a ``tls://`` scheduler (see :func:`cleftchunk.run.cluster.tls_security`).
    ``scratch``: the folder for per-block partial results, which must be a filesystem every
    worker sees (default: beside a local output; for an object-store output, the current
    directory); see :func:`_scratch_dir`.
    Raises :class:`CleftchunkError` for bad input, and after the run if some blocks failed.
    ``dry_run``: log the plan (blocks, tiles, tasks, scratch, memory, output bytes) and return
    without running it or creating the output.
    """
    from cleftchunk.run.cluster import ClusterSpec, check_listen, dask_client, resolve_gpus

    log = log or _stderr
    listen = check_listen(listen, log)
    started = time.perf_counter()
    volume = _open_input(input_volume, scale)
    source, window, arch_name, postprocess = _model_source(model_or_checkpoint, window, architecture)
    if client is None and scheduler is None:
        gpus = resolve_gpus(gpus)
    device = "cuda" if gpus else "cpu"
    params = PredictParams(
        window,
        overlap,
        blend,
        pad,
        batch_size if batch_size is not None else (4 if device == "cuda" else 1),
        tta,
        _resolve_precision(precision, device),
        device,
        compile,
        scale=scale,
    )
    mask_volume = _open_mask(mask, volume)
    grid = params.grid(volume.roi)
    check_fixed_headroom(grid)
    _warn_if_small(volume, params, log)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks or DEFAULT_CHUNKS, volume.shape))
    threaded = client is None and scheduler is None and not gpus and not workers
    block_shape = _check_block_shape(block_shape, chunks, volume.shape, DEFAULT_BLOCK_SHAPE if threaded else WORKER_BLOCK_SHAPE)

    ClusterSpec(workers=workers, cores=cores)  # checks workers and cores before any output exists
    plan = make_plan(grid, volume.roi, block_shape)
    if threaded:  # a local CPU job: threads of this process, one per core (see _in_process_threads)
        spec = ClusterSpec(workers=_in_process_threads(cores, len(plan)), cores=cores, processes=False, listen=listen, security=security)
    else:
        spec = ClusterSpec(workers=workers, gpus=gpus or 0, cores=cores, scheduler=scheduler, processes=processes,
                           listen=listen, security=security)
    identity, identity_hash = _identity(source, arch_name, volume, mask_volume, chunks, params)
    if dry_run:
        log(describe_run(plan, volume, mask_volume, params, spec))
        return PredictResult(str(output_spec), grid.count, blocks=len(plan), seconds=time.perf_counter() - started)
    run_info = {"block_shape": list(block_shape), "workers": workers, "gpus": gpus, "scheduler": scheduler, "retries": retries}
    scratch_option = scratch
    output, resuming = _open_output(output_spec, volume, chunks, identity, identity_hash, run_info, overwrite, scratch_option, postprocess)
    scratch = Scratch(str(_scratch_dir(output, identity_hash, scratch_option)))
    result = PredictResult(str(output_spec), grid.count)
    result.blocks = len(plan)
    if resuming and output.array.attrs.get(ATTR, {}).get("complete"):
        log(f"{output_spec} is already complete with these parameters: nothing to do (--overwrite to redo it)")
        result.blocks_already_done = result.blocks
        return result
    scratch.ensure()
    record_path = _record_path(output_spec, scratch_option)
    record, trusted = BlockRecord.open(record_path, len(plan), record_identity(identity_hash, plan), fresh=overwrite or not resuming)
    if not trusted:  # spills of another block layout (or of a replaced output) must not be used
        scratch.clear()
    # Worker processes we start, and the task threads of a local CPU job, get cores // workers torch
    # threads each; workers of a given client or scheduler (and explicit in-process workers) keep their own.
    threads = spec.torch_threads() if threaded or (client is None and scheduler is None and not spec.in_process) else None
    job = Job(volume, output, mask_volume, params, grid, volume.roi, scratch, threads)
    with contextlib.ExitStack() as stack:
        if threaded:
            stack.enter_context(_torch_threads_restored())
            stack.enter_context(scratch.in_memory(_memory_spill_budget()))
            tune_malloc()  # before the task threads exist: their arrays, freed, go back (see backend)
        if client is None:
            # A local CPU job needs no scheduler: plain threads of this process (distributed's
            # in-process cluster cost its import and start-up: about 0.5 CPU-s a run).
            client = stack.enter_context(ThreadClient(spec.workers) if threaded else dask_client(spec))
        result.dashboard = getattr(client, "dashboard_link", None)
        if result.dashboard:
            log(f"Dask dashboard: {result.dashboard}")
        log(f"plan: {plan.describe()}")
        _execute(client, job, plan, source, record, retries, progress, result)
    result.seconds = time.perf_counter() - started
    _raise_if_failed(result)
    _mark_complete(output, result)
    scratch.remove()
    remove_record(record_path)
    return result


def _in_process_threads(cores: int | None, blocks: int) -> int:
    """Task threads of a local CPU job: one per core, each running torch on one thread — or, with
    fewer blocks than cores, one per block, each running torch on cores // blocks threads (a
    one-block volume on 2 cores otherwise ran its model on one core: 0.65× MONAI's wall time with
    the small preset on 16×512×512, idle).

    Measured (benchmarks/results/predict-hotpath.md, docs/engine.md): on one machine without GPUs
    a worker process buys nothing — torch and numpy release the GIL — and costs a second
    interpreter that imports torch, zarr and distributed, and a copy of every task's result; and
    one task per core with one torch thread each keeps the cores busy through the engine's
    single-threaded steps (reads, sums, blending, writes) where one task with a torch thread pool
    leaves them idle, and spin-waits less on a loaded machine.
    """
    return max(1, min(cores or usable_cores(), blocks))


def _memory_spill_budget() -> int:
    """Bytes of spills a local CPU job hands over in memory (its tasks are threads of this
    process) before the rest goes to scratch files: a quarter of the memory available, at most 4 GiB."""
    import psutil

    return int(min(4 * 2**30, psutil.virtual_memory().available // 4))


@contextlib.contextmanager
def _torch_threads_restored():
    """The caller's torch thread count, back after a run whose tasks set it in this process."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _identity(source: ModelSource, arch_name: str, volume: Volume, mask: Volume | None, chunks: Coord, params: PredictParams) -> tuple[dict, str]:
    """What the output's bytes depend on, and its hash (stored in the output; resume compares it)."""
    identity = {
        "format": PREDICT_FORMAT,
        "model_sha256": source.sha256,
        "architecture": arch_name,
        "input": {"spec": volume.spec, "shape": list(volume.shape), "dtype": str(volume.dtype), "offset": list(volume.offset)},
        "mask": None if mask is None else mask.spec,
        "chunks": list(chunks),
        **params.as_dict(),
    }
    return identity, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _raise_if_failed(result: PredictResult) -> None:
    if result.failed:
        shown = "; ".join(f"{roi}: {err}" for roi, err in result.failed[:3])
        raise CleftchunkError(
            f"{len(result.failed)} of {result.blocks} blocks failed ({shown}{'; ...' if len(result.failed) > 3 else ''}): "
            "fix the cause and re-run the same command to finish them"
        )


# -- checks and set-up --------------------------------------------------------------------
def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _open_input(input_volume: Any, scale: float | None = None) -> Volume:
    volume = input_volume if isinstance(input_volume, Volume) else open_volume(input_volume)
    if volume.ndim != 3:
        raise CleftchunkError(f"{volume.spec} has {volume.ndim} axes {volume.shape}: predict needs a 3-D (z, y, x) volume")
    if 0 in volume.shape:
        raise CleftchunkError(f"{volume.spec} has shape {volume.shape}, with an axis of length 0: there is nothing to predict; check the dataset")
    check_image_dtype(volume.dtype, volume.spec)
    if volume.dtype.kind == "f":  # a cheap look before any work; every tile is checked again as it is read
        first = volume[tuple(slice(0, min(c, s)) for c, s in zip(volume.chunks, volume.shape))]
        check_unit_range(first, f"{volume.spec} (its first chunk)", check_scale(scale))
    return volume


def _open_mask(mask: Any, volume: Volume) -> Volume | None:
    if mask is None:
        return None
    mask_volume = mask if isinstance(mask, Volume) else open_volume(mask)
    if tuple(mask_volume.voxel_size) != tuple(volume.voxel_size):
        raise CleftchunkError(
            f"mask {mask_volume.spec} has voxel size {mask_volume.voxel_size}, the input {volume.voxel_size}: "
            "give a mask at the input's resolution"
        )
    if not mask_volume.roi.contains(volume.roi):
        raise CleftchunkError(f"mask {mask_volume.spec} ({mask_volume.roi}) does not cover the input ({volume.roi}): give a mask covering it")
    return mask_volume


def _model_source(model_or_checkpoint: Any, window: Sequence[int] | None, architecture: str | None) -> tuple[ModelSource, Coord, str, dict | None]:
    """The model to ship, its window, its architecture's name, and the checkpoint's operating point
    (threshold, min_size; recorded for ``segment``'s defaults), reading a checkpoint once."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from cleftchunk.model import check_input_shape, checkpoint_input_size, checkpoint_postprocess, load_checkpoint, model_from_checkpoint

        path = Path(model_or_checkpoint)
        ckpt = load_checkpoint(path)
        model_from_checkpoint(ckpt)  # an unknown architecture or weights that do not fit fail here, not on a worker
        arch = str(ckpt["arch"].get("name", "unetv0"))
        if architecture is not None and architecture != arch:
            raise CleftchunkError(f"{path} holds a {arch} model, not {architecture}: drop -ac or give a {architecture} checkpoint")
        window = tuple(window or checkpoint_input_size(ckpt))
        if arch == "unetv0":
            check_input_shape(window)
        source = ModelSource(_file_sha256(path), checkpoint=str(path.resolve()))
        return source, as_coord(window, 3), arch, checkpoint_postprocess(ckpt)
    if window is None:
        raise CleftchunkError("predict with an in-memory model needs window= (the model input size z,y,x)")
    source = ModelSource(_module_sha256(model_or_checkpoint), module=model_or_checkpoint)
    return source, as_coord(tuple(window), 3), type(model_or_checkpoint).__name__, None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _module_sha256(module: Any) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve_precision(precision: str, device: str) -> str:
    if precision not in PRECISIONS:
        raise CleftchunkError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def _warn_if_small(volume: Volume, params: PredictParams, log: Callable[[str], None]) -> None:
    before, after = frame_padding(volume.shape, params.window, params.pad)
    short = [a for a, (s, w) in enumerate(zip(volume.shape, params.window)) if s < w]
    if short:
        padded = tuple(s + b + a for s, b, a in zip(volume.shape, before, after))
        log(
            f"warning: input {volume.shape} is smaller than the model window {params.window} along "
            f"{', '.join('zyx'[a] for a in short)}: padding it by reflection to {padded} (the padding is not written)"
        )


def _check_block_shape(block_shape: Sequence[int] | None, chunks: Coord, shape: Sequence[int], default: Coord = DEFAULT_BLOCK_SHAPE) -> Coord:
    if block_shape is None:
        block_shape = tuple(max(c, (b // c) * c) for b, c in zip(default, chunks))
    block_shape = tuple(int(b) for b in block_shape)
    if len(block_shape) != 3 or any(b <= 0 for b in block_shape):
        raise CleftchunkError(f"block shape {block_shape} must be 3 positive extents z,y,x")
    bad = [a for a, (b, c, s) in enumerate(zip(block_shape, chunks, shape)) if b % c and b < s]
    if bad:
        fixed = tuple(max(c, round(b / c) * c) for b, c in zip(block_shape, chunks))
        raise CleftchunkError(
            f"block shape {block_shape} is not a multiple of the output chunks {chunks}: use --block-shape {','.join(map(str, fixed))}"
        )
    return tuple(min(b, s) for b, s in zip(block_shape, shape))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("cleftchunk", "torch", "numpy", "zarr", "dask", "distributed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def _open_output(
    spec: str | os.PathLike, volume: Volume, chunks: Coord, identity: dict, identity_hash: str, run_info: dict, overwrite: bool,
    scratch: str | os.PathLike | None = None,
    postprocess: dict | None = None,
) -> tuple[Volume, bool]:
    """Create the output, or reopen it to resume when it was started with the same identity."""
    resuming = False
    if volume_exists(spec) and not overwrite:
        previous = _previous_identity(spec)
        if previous is None:
            raise CleftchunkError(f"{spec} exists and is not a cleftchunk prediction: pass --overwrite to replace it, or choose another output")
        if previous.get("identity_hash") != identity_hash:
            changed = sorted(k for k in set(identity) | set(previous.get("identity", {})) if identity.get(k) != previous.get("identity", {}).get(k))
            raise CleftchunkError(
                f"{spec} exists, predicted with other parameters ({', '.join(changed) or 'model'} differ): "
                "pass --overwrite to replace it, or choose another output"
            )
        resuming = True
    if overwrite and volume_exists(spec):
        _remove_scratch_dirs(spec, scratch)
    provenance = {
        "identity": identity,
        "identity_hash": identity_hash,
        "run": run_info,
        "versions": _versions(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }
    if postprocess is not None:
        provenance["postprocess"] = postprocess
    output = create_like(
        spec,
        volume,
        np.uint8,
        chunks=chunks,
        attrs=None if resuming else {ATTR: provenance},
        overwrite=overwrite,
        exist_ok=resuming,
    )
    return output, resuming


def _previous_identity(spec: str | os.PathLike) -> dict | None:
    try:
        previous = open_volume(spec)
        return dict(previous.array.attrs).get(ATTR)
    except CleftchunkError:
        return None


def _scratch_dir(output: Volume, identity_hash: str, scratch: str | os.PathLike | None = None) -> Path:
    """Partials live in ``<base>/.<container>.<image>.predict-<hash>``, never inside the output
    (so Zarr readers do not see them) and always on a filesystem (object stores have no renames).

    ``base`` is ``scratch`` if given, else the output's folder, else (object-store output) the
    current directory.
    """
    image = (output.inner or "").rpartition("/")[0]  # the image group: inner is <image>/s0
    return _scratch_base(output.container, scratch) / f"{_scratch_prefix(output.container, image)}{identity_hash[:16]}"


def _remove_scratch_dirs(spec: str | os.PathLike, scratch: str | os.PathLike | None = None) -> None:
    from cleftchunk.io.volumes import split_spec

    container, inner = split_spec(spec)
    for old in _scratch_base(container, scratch).glob(f"{_scratch_prefix(container, inner)}*"):
        shutil.rmtree(old, ignore_errors=True)
    remove_record(_record_path(spec, scratch))


def _record_path(spec: str | os.PathLike, scratch: str | os.PathLike | None) -> Path:
    """The completion record: beside a local output (as its scratch), else in the scratch folder
    (a filesystem path the client writes, like the scratch partials)."""
    from cleftchunk.io.volumes import split_spec

    container, inner = split_spec(spec)
    return _scratch_base(container, scratch) / f"{_scratch_prefix(container, inner)}done.zarr"


def _scratch_base(container: Any, scratch: str | os.PathLike | None) -> Path:
    from cleftchunk.io.stores import is_url

    if scratch is not None:
        return Path(scratch).resolve()
    return Path.cwd() if is_url(container) else Path(container).resolve().parent


def _scratch_prefix(container: Any, image: str | None) -> str:
    name = str(container).rstrip("/").rpartition("/")[2]
    return f".{name}.{image.replace('/', '_')}.predict-" if image else f".{name}.predict-"


def _mark_complete(output: Volume, result: PredictResult) -> None:
    attrs = dict(output.array.attrs).get(ATTR, {})
    attrs.update(
        complete=True,
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tiles={"in_grid": result.tiles_in_grid, "run": result.tiles_run, "empty": result.tiles_skipped, "reused": result.tiles_reused},
    )
    output.array.attrs[ATTR] = attrs
