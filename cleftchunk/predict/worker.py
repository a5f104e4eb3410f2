"""What a worker keeps between the tasks of a prediction, in one object: :class:`WorkerState`.

- the models it loaded (:class:`ModelCache`: at most ``MODEL_CACHE_SIZE``, least recently used
  dropped first, since each may hold GPU memory), so a model is loaded once per worker, not once
  per block;
- per task thread, the block-sized sums array of the last tiles task (reused by the next one of
  that shape: a fresh one costs a page fault per page, measured as a third of the engine's CPU
  time, in the kernel). Each thread holds at most one array per name.

Whose state it is: a run whose tasks are threads of this process creates one for the run (the
:class:`~cleftchunk.predict.tasks.Job` carries it; it is dropped with the run). A worker process
of a Dask cluster gets tasks whose job was pickled, without it (:meth:`WorkerState.__reduce__`),
and keeps one on its ``distributed.Worker`` object (:func:`state_of`), for that worker's lifetime.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from cleftchunk.backend import configure_torch
from cleftchunk.errors import CleftchunkError
from cleftchunk.predict.params import PredictParams
from cleftchunk.predict.runner import ModelSource, TileRunner

#: Models kept per worker: a few, least recently used dropped first (each may hold GPU memory).
MODEL_CACHE_SIZE = 2


class ModelCache:
    """The models a worker has loaded, keyed by (model sha256, device, precision, compile), at
    most ``size`` of them: the least recently used is dropped first."""

    def __init__(self, size: int = MODEL_CACHE_SIZE):
        self.size = size
        self._models: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: ModelSource, device: Any, params: PredictParams) -> Any:
        # A shipped module is one object per worker (scattered once): run that very object (its
        # hooks, its counters), not an equal one loaded before; hence its id beside the sha256.
        model_key = source.sha256 if source.module is None else (source.sha256, id(source.module))
        key = (model_key, str(device), params.precision, params.compile)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = source.load(device)
            if params.compile:
                import torch

                model = torch.compile(model)
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model

    def __len__(self) -> int:
        return len(self._models)


def _no_state() -> None:
    return None


class WorkerState:
    """A worker's models and its task threads' reusable arrays (see the module docstring)."""

    def __init__(self, models: int = MODEL_CACHE_SIZE):
        self.models = ModelCache(models)
        self._threads = threading.local()

    def __reduce__(self):
        return _no_state, ()  # never shipped: another process keeps its own (state_of)

    def runner(self, source: ModelSource, params: PredictParams, torch_threads: int | None) -> TileRunner:
        """A runner of the model (loaded once per key and kept in :attr:`models`).
        ``torch_threads``: torch threads for this process (None: leave torch's setting)."""
        device = worker_device(params.device)
        configure_torch(torch_threads, cudnn_deterministic=True if device.type == "cuda" else None)
        return TileRunner(self.models.get(source, device, params), params, device)

    def workspace(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A block-sized array of this task thread, reused by its next task of that shape and
        type. Its contents are garbage; nothing may keep it beyond the task."""
        arrays = getattr(self._threads, "arrays", None)
        if arrays is None:
            arrays = self._threads.arrays = {}
        array = arrays.get(name)
        if array is None or array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            array = arrays[name] = np.empty(tuple(shape), dtype=dtype)
        return array


def state_of(given: WorkerState | None) -> WorkerState:
    """``given`` (a run in this process), else the state of the Dask worker running this task."""
    if given is not None:
        return given
    from distributed import get_worker

    worker = get_worker()  # outside a Dask task there is no worker: a ValueError says so
    state = getattr(worker, "cleftchunk_predict_state", None)
    if state is None:  # setdefault: two task threads of the worker get the same one
        state = vars(worker).setdefault("cleftchunk_predict_state", WorkerState())
    return state


def worker_device(kind: str):
    import torch

    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CleftchunkError("a Dask worker has no usable GPU: start GPU workers, or run with --gpus 0")
    index = 0
    with contextlib.suppress(ValueError):  # several GPUs visible to one worker: spread by worker name
        from distributed import get_worker

        name = get_worker().name  # ValueError outside a Dask worker (threads of this process): GPU 0
        index = (int(str(name).rsplit("-", 1)[-1]) if str(name).rsplit("-", 1)[-1].isdigit() else 0) % torch.cuda.device_count()
    return torch.device("cuda", index)
