"""``predict(model, volume, output)``: the Python API and command behind ``cleftchunk predict``.

A prediction is an operation on the block-wise base (:class:`Predict`, run by
:func:`cleftchunk.run.operation.run_operation`): checks before anything exists, the ``--dry-run``
plan, the output's create / resume / refusal (naming the parameters that differ), "already
complete", the completion record and the lock are the base's lifecycle. Predict adds its scratch
folder for partial sums and keeps its completion record beside it (:meth:`Predict.record_path`),
and its provenance attribute ``cleftchunk_predict`` holds, besides the identity and ``complete``,
the run's settings, library versions, the checkpoint's operating point (``postprocess``, read by
``segment``) and the tile counts (``tiles``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from cleftchunk.backend import tune_malloc, usable_cores
from cleftchunk.errors import CleftchunkError
from cleftchunk.frames import Frame, align
from cleftchunk.geometry import Coord, as_coord
from cleftchunk.intensity import check_image_dtype, check_scale, check_unit_range
from cleftchunk.io.volumes import Volume, chunk_shape, open_volume
from cleftchunk.predict.engine import PredictResult, run_blocks
from cleftchunk.predict.params import ATTR, DEFAULT_BLOCK_SHAPE, PREDICT_FORMAT, WORKER_BLOCK_SHAPE, OutputOptions, PredictParams, WindowOptions
from cleftchunk.predict.plan import describe_lines, task_memory, tile_layout
from cleftchunk.predict.runner import ModelSource
from cleftchunk.predict.scratch import Scratch
from cleftchunk.predict.tasks import Job
from cleftchunk.predict.tiling import check_fixed_headroom, frame_padding
from cleftchunk.predict.worker import WorkerState
from cleftchunk.io.outputs import VolumeOperation, create_image
from cleftchunk.run.operation import Plan, Running, run_operation
from cleftchunk.run.options import RunOptions, block_shape_for
from cleftchunk.run.records import remove_record


# -- the Python API -----------------------------------------------------------------------
def predict(
    model_or_checkpoint: Any,
    input_volume: Any,
    output_spec: str | os.PathLike,
    window: WindowOptions | None = None,
    run: RunOptions | None = None,
    out: OutputOptions | None = None,
    *,
    architecture: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictResult:
    """Predict cleft probabilities of ``input_volume`` into ``output_spec`` (``out.zarr/pred``).

    ``model_or_checkpoint``: a checkpoint path, or an ``nn.Module`` mapping float (N,1,z,y,x)
    raw/255 to probabilities (e.g. from ``cleftchunk.load_model``; then ``window.window`` is
    required). ``input_volume``: a :class:`Volume` or a spec ``open_volume`` reads.
    ``window``: the window, blending, batch, TTA and precision (:class:`WindowOptions`).
    ``run``: where and how the work runs (:class:`~cleftchunk.run.options.RunOptions`): by
    default on one task thread per core (``out.cores``) of this process without GPUs, one worker
    process per GPU (``gpus``; None: all of this machine's), ``workers`` CPU worker processes, or
    the cluster at ``scheduler``; ``dry_run`` logs the plan (blocks, tiles, tasks, scratch,
    memory, output bytes) and returns without running it or creating anything.
    ``out``: the output's chunks, a mask, the scratch folder, the cores (:class:`OutputOptions`).
    ``architecture``: the architecture the checkpoint must hold (a mismatch is an error).
    Raises :class:`CleftchunkError` for bad input, and after the run if some blocks failed.
    """
    log = log or _stderr
    started = time.perf_counter()
    operation = Predict(model_or_checkpoint, input_volume, output_spec, window or WindowOptions(), run or RunOptions(),
                        out or OutputOptions(), architecture, log)
    result = run_operation(operation, operation.run, log)
    if result is None:  # a dry run
        result = PredictResult(operation.output, operation.grid.count, blocks=len(operation.layout))
    result.seconds = time.perf_counter() - started
    return result


class Predict(VolumeOperation):
    """A prediction as an operation (see the module docstring). The constructor checks
    everything (input, model, parameters, mask, block shape) before any output exists."""

    stage = "predict"
    format = 2  # PREDICT_FORMAT, "cleftchunk-predict/2": sums at 24 fractional bits (1: 40)
    output_name = "a cleftchunk prediction"
    written_by = "predicted"
    #: Run the GPU code path (sums kept as torch tensors, the blend in torch) on the CPU: for
    #: tests, which have no GPU. Its arithmetic is the numpy path's, operation for operation.
    sums_as_tensors_on_cpu: ClassVar[bool] = False

    def __init__(self, model: Any, input_volume: Any, output_spec: str | os.PathLike, window: WindowOptions, run: RunOptions,
                 out: OutputOptions, architecture: str | None, log: Callable[[str], None]):
        from cleftchunk.run.cluster import check_listen, resolve_gpus

        check_listen(run.listen, log)
        self.volume = _open_input(input_volume, window.scale)
        self.source, window_shape, self.architecture, self.postprocess = _model_source(model, window.window, architecture)
        if not run.remote:  # this machine's GPUs (a cluster's workers have their own)
            run = run.but(gpus=resolve_gpus(run.gpus))
        self.params = window.resolve(window_shape, "cuda" if run.gpus else "cpu")
        self.mask = _open_mask(out.mask, self.volume, out.ignore_frame)
        self.grid = self.params.grid(self.volume.roi)
        check_fixed_headroom(self.grid)
        _warn_if_small(self.volume, self.params, log)
        shape = self.volume.shape
        self.chunks = chunk_shape(out.chunks, shape)
        default = DEFAULT_BLOCK_SHAPE if run.in_this_process else WORKER_BLOCK_SHAPE
        self.layout = tile_layout(self.grid, self.volume.roi, block_shape_for(run.block_shape, self.chunks, shape, default))
        if run.in_this_process and run.threads is None:
            run = run.but(threads=_task_threads(out.cores, len(self.layout)))
        self.run, self.out, self.log = run, out, log
        self.output, self.inputs = str(output_spec), (input_volume, out.mask)
        self.result: PredictResult | None = None

    # -- what the base asks --------------------------------------------------------------------
    def identity(self) -> dict:
        volume = self.volume
        return {
            "model_sha256": self.source.sha256,
            "architecture": self.architecture,
            "input": {"spec": volume.spec, "shape": list(volume.shape), "dtype": str(volume.dtype), "offset": list(volume.offset)},
            "mask": None if self.mask is None else self.mask.spec,
            "chunks": list(self.chunks),
            **self.params.as_dict(),
        }

    def full_identity(self) -> tuple[dict, str]:
        """The identity and the hash predict has always stored (sha256 of its JSON), so that
        outputs started before predict ran on the operation base are still recognised."""
        identity = {"format": PREDICT_FORMAT, **self.identity()}
        return identity, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def plan(self, options: RunOptions) -> Plan:
        layout = self.layout
        return Plan(f"predict {self.volume.spec} -> {self.output}", layout, 2 * len(layout), layout.roi.size,
                    task_memory(layout, self.volume, self.mask, self.params),
                    describe_lines(layout, self.volume, self.mask, self.params, options.in_this_process))

    def record_path(self) -> Path:
        return _record_path(self.output, self.out.scratch)

    def extra_state(self) -> dict:
        run = self.run
        state = {"run": {"block_shape": list(self.layout.block_shape), "workers": run.workers, "gpus": run.gpus,
                         "scheduler": run.scheduler, "retries": run.retries},
                 "versions": _versions()}
        if self.postprocess is not None:
            state["postprocess"] = self.postprocess
        return state

    def create(self, state: dict, overwrite: bool) -> Volume:
        if overwrite:  # partial sums of the output replaced must not be used
            _remove_scratch_dirs(self.output, self.out.scratch)
        return create_image(self, self.volume, np.uint8, self.chunks, state, overwrite)

    def write_state(self, handle: Volume, state: dict) -> None:
        result = self.result
        if state.get("complete") and result is not None:
            state = {**state, "tiles": {"in_grid": result.tiles_in_grid, "run": result.tiles_run,
                                        "empty": result.tiles_skipped, "reused": result.tiles_reused}}
        handle.array.attrs[ATTR] = state

    def finished(self, handle: Volume, result: Any) -> PredictResult:
        """An output complete already: nothing run, every block done."""
        blocks = len(self.layout)
        return PredictResult(self.output, self.grid.count, blocks=blocks, blocks_already_done=blocks)

    def execute(self, running: Running, handle: Volume) -> PredictResult:
        options, layout = running.options, self.layout
        _, digest = self.full_identity()
        scratch = Scratch(str(_scratch_dir(handle, digest, self.out.scratch)))
        scratch.ensure()
        if not running.trusted:  # spills of another block layout (or of a replaced output) must not be used
            scratch.clear()
        job = Job(self.volume, handle, self.mask, self.params, self.grid, self.volume.roi, scratch, self._torch_threads(options),
                  sums_as_tensors=self.params.device == "cuda" or self.sums_as_tensors_on_cpu,
                  state=WorkerState() if options.in_this_process else None)
        result = PredictResult(self.output, self.grid.count, blocks=len(layout))
        result.dashboard = getattr(running.client, "dashboard_link", None)
        if result.dashboard and not options.progress:  # with progress, the client announced it
            self.log(f"Dask dashboard: {result.dashboard}")
        self.log(f"plan: {layout.describe()}")
        with contextlib.ExitStack() as stack:
            if options.in_this_process:
                stack.enter_context(_torch_threads_restored())
                budget = _memory_spill_budget() if self.out.memory_spills is None else self.out.memory_spills
                if budget:
                    stack.enter_context(scratch.in_memory(budget))
                tune_malloc()  # before the task threads run: their arrays, freed, go back (see backend)
            run_blocks(running, job, layout, self.source, result)
        scratch.remove()
        self.result = result
        return result

    def _torch_threads(self, options: RunOptions) -> int | None:
        """Torch threads of each task thread of this process, or of each worker process this run
        starts: cores ÷ task threads or workers. Workers of a given scheduler keep their own."""
        if options.remote:  # a cluster's workers keep their own (batch jobs: OMP_NUM_THREADS)
            return None
        cores = self.out.cores or usable_cores()
        share = options.task_threads() if options.in_this_process else (options.gpus or options.workers or 1)
        return max(1, cores // share)


def _task_threads(cores: int | None, blocks: int) -> int:
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


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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


def _open_mask(mask: Any, volume: Volume, ignore_frame: bool = False) -> Volume | None:
    """The mask, placed by its frame: it must cover the input (cleftchunk.frames); with
    ``ignore_frame`` it is taken in the input's frame, voxel for voxel."""
    if mask is None:
        return None
    mask_volume = mask if isinstance(mask, Volume) else open_volume(mask)
    align(Frame.of(mask_volume, f"mask {mask_volume.spec}"), Frame.of(volume, f"the input {volume.spec}"), ignore_frame, "cover",
          fix="give a mask at the input's resolution")
    if ignore_frame or not (mask_volume.voxel_size_known and volume.voxel_size_known):
        # used voxel for voxel (align checked the shapes), but read by world position: give it the input's frame
        mask_volume = copy.copy(mask_volume)
        mask_volume.voxel_size, mask_volume.offset_nm = volume.voxel_size, volume.offset_nm
    return mask_volume


def _model_source(model_or_checkpoint: Any, window: Sequence[int] | None, architecture: str | None) -> tuple[ModelSource, Coord, str, dict | None]:
    """The model to ship, its window, its architecture's name, and the checkpoint's operating point
    (threshold, min_size; recorded for ``segment``'s defaults), reading a checkpoint once."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from cleftchunk.model import check_input_shape, checkpoint_input_size, checkpoint_postprocess, load_checkpoint, model_from_checkpoint

        from cleftchunk.urls import local_file

        path = local_file(model_or_checkpoint, "checkpoint")  # a URL refused with its text intact, not mangled by Path
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


def _warn_if_small(volume: Volume, params: PredictParams, log: Callable[[str], None]) -> None:
    before, after = frame_padding(volume.shape, params.window, params.pad)
    short = [a for a, (s, w) in enumerate(zip(volume.shape, params.window)) if s < w]
    if short:
        padded = tuple(s + b + a for s, b, a in zip(volume.shape, before, after))
        log(
            f"warning: input {volume.shape} is smaller than the model window {params.window} along "
            f"{', '.join('zyx'[a] for a in short)}: padding it by reflection to {padded} (the padding is not written)"
        )


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("cleftchunk", "torch", "numpy", "zarr", "dask", "distributed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


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
