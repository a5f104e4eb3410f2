"""Running a model over tiles: fixed-shape batches, flip TTA, autocast, and the fixed-point
accumulation of a block's tiles; the model each worker loads once and keeps (a bounded cache)."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cleftchunk.intensity import FULL_SCALE, check_unit_range
from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Coord
from cleftchunk.predict.tiling import (
    FIXED_BITS,
)
from cleftchunk.predict.params import GpuOutOfMemory, PredictParams



# -- running the model on tiles -----------------------------------------------------------
def tta_variants(n: int) -> list[tuple[tuple[int, ...], bool]]:
    """(flipped tensor dims, transpose y–x) for flip TTA with n variants, identity first."""
    dims = {1: (), 4: (3, 4), 8: (2, 3, 4), 16: (2, 3, 4)}[n]
    flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    return [(f, t) for t in ((False, True) if n == 16 else (False,)) for f in flips]


class TileRunner:
    """Runs a model (float (N,1,z,y,x) raw/255 → probabilities) over tiles, in batches of a fixed
    size, with flip TTA and autocast.

    The next batch is copied in (pinned memory, non-blocking) and launched before the previous
    batch's result is used, so on a GPU the host prepares and copies while the device computes;
    :meth:`accumulate` keeps the fixed-point partial sum on the device, so nothing comes back
    until the block is done.
    """

    def __init__(self, model: Any, params: PredictParams, device: Any = "cpu"):
        import torch

        self.torch = torch
        self.model = model
        self.params = params
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.variants = tta_variants(params.tta)
        self.tiles_run = 0  # real tiles sent to the model (batch padding not counted)

    def run(self, tiles: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """float32 probabilities per tile, in order, as numpy arrays."""
        for p in self.run_tensors(tiles):
            yield p.cpu().numpy()

    def run_tensors(self, tiles: Iterable[np.ndarray]) -> Iterator[Any]:
        """float32 probabilities per tile, in order, as tensors on the device."""
        pending = None
        for batch in _batched(tiles, self.params.batch_size):
            launched = (self._launch(batch), len(batch))
            if pending is not None:
                yield from _split(*pending)
            pending = launched
        if pending is not None:
            yield from _split(*pending)

    def accumulate(self, tiles: Iterable[np.ndarray], where: Sequence[tuple[slice, ...]], shape: Coord, weights: np.ndarray) -> np.ndarray:
        """Σ to_fixed(w·p) over the tiles, each added at ``where``, into an int64 array of ``shape``.

        Same arithmetic as :func:`tiling.to_fixed`: (float64(w)·2^40)·float64(p) is exact, and
        round-half-even then gives the same integers as numpy's ``rint``.
        """
        torch = self.torch
        partial = torch.zeros(tuple(shape), dtype=torch.int64, device=self.device)
        scaled = torch.from_numpy(weights * float(2**FIXED_BITS)).to(self.device)
        for at, p in zip(where, self.run_tensors(tiles)):
            partial[at] += torch.round(p.double() * scaled).long()
        return partial.cpu().numpy()

    def _launch(self, batch: list[np.ndarray]):
        torch = self.torch
        b = self.params.batch_size
        stack = np.zeros((b, 1) + tuple(batch[0].shape), dtype=batch[0].dtype)
        for i, tile in enumerate(batch):
            stack[i, 0] = tile
        x = torch.from_numpy(stack)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = self._to_unit(x, stack[: len(batch)])
        try:
            y = self._forward(x)
        except torch.cuda.OutOfMemoryError as e:
            raise GpuOutOfMemory(
                f"out of GPU memory at batch size {b} with window {self.params.window}: try -b {max(1, b // 2)}"
                + (" or --precision bf16" if self.params.precision == "fp32" else "")
            ) from e
        self.tiles_run += len(batch)
        return y

    def _to_unit(self, x, tiles: np.ndarray):
        """The intensity rule (cleftchunk.intensity): integers over their full scale, floats checked."""
        full = FULL_SCALE.get(tiles.dtype)
        if full is not None:
            return x.float().div_(float(full))
        check_unit_range(tiles, "the input", self.params.scale)
        return x.float().mul_(self.params.scale) if self.params.scale is not None else x.float()

    def _forward(self, x):
        torch = self.torch
        total = None
        with torch.inference_mode(), self._autocast():
            for flips, transpose in self.variants:
                xi = x.transpose(3, 4) if transpose else x
                xi = xi.flip(flips) if flips else xi
                yi = self.model(xi).float()
                if yi.shape != xi.shape:
                    raise CleftchunkError(
                        f"the model maps input {tuple(xi.shape)} to {tuple(yi.shape)}; predict needs one probability "
                        "channel of the input's size: use a cleftchunk checkpoint with out_channels=1"
                    )
                yi = yi.flip(flips) if flips else yi
                yi = yi.transpose(3, 4) if transpose else yi
                total = yi if total is None else total + yi
        return total if len(self.variants) == 1 else total / len(self.variants)

    def _autocast(self):
        dtype = {"bf16": self.torch.bfloat16, "fp16": self.torch.float16}.get(self.params.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=dtype)


def _split(y: Any, n: int) -> Iterator[Any]:
    for i in range(n):
        yield y[i, 0]


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def is_empty_tile(raw: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """A tile the model is not run on (p = 0): single-valued input, or no voxel of the mask."""
    if mask is not None and not mask.any():
        return True
    return bool(raw.min() == raw.max())


@dataclass
class ModelSource:
    """A model to run: a checkpoint file (loaded once per worker, keyed by its sha256) or an
    ``nn.Module`` shipped to the workers (keyed by a hash of its weights)."""

    sha256: str
    checkpoint: str | None = None
    module: Any = field(default=None, repr=False)

    def load(self, device: Any) -> Any:
        if self.checkpoint is not None:
            from cleftchunk.model import load_model

            return load_model(self.checkpoint, device=device)
        module = self.module
        if str(device) != "cpu":
            import copy

            module = copy.deepcopy(module).to(device)
        return module.eval()


_RUNNERS: dict[tuple, Any] = {}
_RUNNERS_LOCK = threading.Lock()


def _runner_for(source: ModelSource, params: PredictParams, torch_threads: int | None) -> TileRunner:
    """The worker's model, loaded once per (model, device, precision, compile) and kept."""
    import torch

    device = _worker_device(params.device)
    # A shipped module is one object per worker (scattered once), so its identity is its id.
    model_key = source.sha256 if source.module is None else (source.sha256, id(source.module))
    key = (model_key, str(device), params.precision, params.compile)
    with _RUNNERS_LOCK:
        model = _RUNNERS.get(key)
        if model is None:
            threads = torch_threads or int(os.environ.get("CLEFTCHUNK_TORCH_THREADS", "0") or 0)
            if threads:
                torch.set_num_threads(threads)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = False  # kernel choice must not vary between runs
                torch.backends.cudnn.deterministic = True
            model = source.load(device)
            if params.compile:
                model = torch.compile(model)
            _RUNNERS[key] = model
    return TileRunner(model, params, device)


def _worker_device(kind: str):
    import torch

    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CleftchunkError("a Dask worker has no usable GPU: start GPU workers, or run with --gpus 0")
    index = 0
    with contextlib.suppress(Exception):  # several GPUs visible to one worker: spread by worker name
        from distributed import get_worker

        name = get_worker().name
        index = (int(str(name).rsplit("-", 1)[-1]) if str(name).rsplit("-", 1)[-1].isdigit() else 0) % torch.cuda.device_count()
    return torch.device("cuda", index)
