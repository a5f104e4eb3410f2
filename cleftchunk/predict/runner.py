"""Running a model over tiles: fixed-shape batches, flip TTA, autocast, and the fixed-point
accumulation of a block's tiles; the model to run (:class:`ModelSource`). A worker keeps the
models it loaded in its :class:`cleftchunk.predict.worker.WorkerState`."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cleftchunk.intensity import FULL_SCALE, check_unit_range
from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Coord
from cleftchunk.predict.tiling import blended_uint8_of_parts_torch, fixed_scaled
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

    The next batch is copied in (from one of two pinned host buffers, non-blocking) and launched
    before the previous batch's result is used, so on a GPU the host prepares and copies while the
    device computes; :meth:`accumulate_tensor` keeps the fixed-point partial sum on the device, so
    nothing comes back until the block is done (and :meth:`blend` brings back only uint8).
    Input buffers are allocated once per runner and reused for every batch.
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
        self._inputs: dict[tuple, Any] = {}  # (shape, dtype) → reusable input buffers
        self._turn = 0  # which of the two host staging buffers the next batch fills

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

    def accumulate(
        self, tiles: Iterable[np.ndarray], where: Sequence[tuple[slice, ...]], shape: Coord, weights: np.ndarray, *,
        dtype=np.int64, out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Σ to_fixed(w·p) over the tiles, each added at ``where``, into an integer array of ``shape``.

        ``dtype``: int64, or int32 when the grid's sums fit it (:func:`tiling.sums_dtype`).
        ``out``: an array of ``shape`` and ``dtype`` to sum in (zeroed here; reused, it spares the
        page faults of a fresh block-sized array); it is then the result.
        """
        if not self.cuda:
            return self._accumulate_numpy(tiles, where, shape, weights, dtype, out)
        return self.accumulate_tensor(tiles, where, shape, weights, dtype).cpu().numpy()

    def accumulate_tensor(self, tiles: Iterable[np.ndarray], where: Sequence[tuple[slice, ...]], shape: Coord, weights: np.ndarray,
                          dtype=np.int64):
        """:meth:`accumulate`, leaving the sum on the device.

        Same arithmetic as :func:`tiling.to_fixed`: float64(p)·(float64(w)·2^FIXED_BITS) is exact,
        and round-half-even then gives the same integers as numpy's ``rint``. Each rounded product
        is added into the integer sums; every sum stays below 2^53 (``check_fixed_headroom``), so
        the addition — done in float64 by numpy, in the sums' type by torch — is exact. One tile
        costs a multiply, a rounding and an add in place.
        """
        if not self.cuda:
            return self.torch.from_numpy(self._accumulate_numpy(tiles, where, shape, weights, dtype))
        return self._accumulate_torch(tiles, where, shape, weights, dtype)

    def _accumulate_torch(self, tiles, where, shape, weights, dtype=np.int64):
        """The device version: the same three steps per tile, in torch on ``self.device``."""
        torch = self.torch
        total = torch.zeros(tuple(shape), dtype=_torch_int(dtype), device=self.device)
        scaled = torch.from_numpy(fixed_scaled(weights)).to(self.device)
        product = torch.empty(scaled.shape, dtype=torch.float64, device=self.device)
        rounded = torch.empty(scaled.shape, dtype=total.dtype, device=self.device)  # torch adds no float into ints in place
        for at, p in zip(where, self.run_tensors(tiles)):
            torch.mul(p, scaled, out=product)  # float32 · float64 → float64, exact
            rounded.copy_(product.round_())  # integers: the conversion is exact
            total[at].add_(rounded)
        return total

    def _accumulate_numpy(self, tiles, where, shape, weights, dtype=np.int64, out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`accumulate_tensor` on the CPU, in numpy: the same operations, single-threaded
        (torch's thread pool spin-waits between such small element-wise steps; the model keeps it),
        a slab of each tile at a time (:func:`add_fixed`). ``dtype``, ``out``: see :meth:`accumulate`."""
        if out is None:
            total = np.zeros(tuple(shape), dtype=dtype)
        else:
            total = out
            total.fill(0)
        scaled = fixed_scaled(weights)
        slabs = cache_slabs(scaled.shape)
        buffer = np.empty(max(scaled[slab].size for slab in slabs), dtype=np.float64)
        for at, p in zip(where, self.run_tensors(tiles)):
            add_fixed(total[at], p.numpy(), scaled, slabs, buffer)
        return total

    def blend(self, numerator, denominator: np.ndarray) -> np.ndarray:
        """round(255 · Σw·p / Σw) on the runner's device; only the uint8 result comes back."""
        return blended_uint8_of_parts_torch([((), numerator)], denominator, self.device)

    def _launch(self, batch: list[np.ndarray]):
        torch = self.torch
        b = self.params.batch_size
        x = self._fill(batch)
        try:
            y = self._forward(x)
        except torch.cuda.OutOfMemoryError as e:
            raise GpuOutOfMemory(
                f"out of GPU memory at batch size {b} with window {self.params.window}: try -b {max(1, b // 2)}"
                + (" or --precision bf16" if self.params.precision == "fp32" else "")
            ) from e
        if _shares_memory(y, x):  # e.g. an identity model: the next batch overwrites x
            y = y.clone()
        self.tiles_run += len(batch)
        return y

    def _fill(self, batch: list[np.ndarray]):
        """The batch as the model's float input (N,1,z,y,x) on the device by the intensity rule
        (cleftchunk.intensity: integers over their full scale, floats checked to lie in [0, 1]
        after ``scale``); a short batch is padded with zero tiles. Buffers are reused."""
        shape, dtype = tuple(batch[0].shape), np.dtype(batch[0].dtype)
        full, scale = FULL_SCALE.get(dtype), self.params.scale
        if full is None:
            for tile in batch:
                check_unit_range(tile, "the input", scale)
        if dtype != np.uint8:  # float32 on the host: uint16 over its full scale, floats scaled
            batch = [_as_unit_float32(tile, full, scale) for tile in batch]
            dtype = np.dtype(np.float32)
        stage, x = self._buffers(shape, dtype)
        if not self.cuda:  # numpy, in place: raw/255 in float32 is the same division torch does
            host = x.numpy()
            for i, tile in enumerate(batch):
                if dtype == np.uint8:
                    np.divide(tile, np.float32(255.0), out=host[i, 0], dtype=np.float32)
                else:
                    host[i, 0] = tile
            host[len(batch) :] = 0
            return x
        # Two pinned staging buffers in turn: the copy from the other one may still be in flight.
        stage, done = stage[self._turn], self._done[self._turn]
        done.synchronize()
        for i, tile in enumerate(batch):
            stage[i, 0].copy_(self.torch.from_numpy(np.ascontiguousarray(tile)))
        stage[len(batch) :].zero_()
        x.copy_(stage, non_blocking=True)  # uint8 (or float) over PCIe, converted on the device
        done.record()
        self._turn ^= 1
        if dtype == np.uint8:
            x.div_(255.0)
        return x

    def _buffers(self, shape: Coord, dtype: np.dtype):
        torch = self.torch
        key = (shape, np.dtype(dtype).str)
        if key not in self._inputs:
            full = (self.params.batch_size, 1) + shape
            if self.cuda:
                host_dtype = torch.uint8 if dtype == np.uint8 else torch.float32
                stage = [torch.zeros(full, dtype=host_dtype).pin_memory() for _ in range(2)]
                self._done = [torch.cuda.Event() for _ in range(2)]
                for event in self._done:
                    event.record()
                x = torch.empty(full, dtype=torch.float32, device=self.device)
                self._inputs[key] = (stage, x)
            else:
                self._inputs[key] = (None, torch.zeros(full, dtype=torch.float32))
        return self._inputs[key]


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


#: Voxels of a tile handled at a time by :func:`add_fixed`: its float64 product (256 KiB) stays in
#: a core's L2 cache between the multiply, the rounding and the add (measured 1.7× faster than
#: whole-tile steps, whose 4 MiB temporaries go out to memory and back three times).
CACHE_SLAB = 1 << 15


def cache_slabs(shape: Coord, voxels: int = CACHE_SLAB) -> list[tuple[slice, ...]]:
    """A C-order partition of an array of ``shape`` into boxes of about ``voxels`` voxels (whole
    trailing axes, a run of indices of one axis, single indices before it)."""
    shape = tuple(shape)
    for axis in range(len(shape)):
        inner = math.prod(shape[axis + 1 :])
        if inner <= voxels or axis == len(shape) - 1:
            step = max(1, voxels // max(inner, 1))
            heads = itertools.product(*(range(n) for n in shape[:axis]))
            return [
                tuple(slice(i, i + 1) for i in head) + (slice(j, min(j + step, shape[axis])),)
                for head in heads for j in range(0, shape[axis], step)
            ]
    return [()]


def add_fixed(target: np.ndarray, p: np.ndarray, scaled: np.ndarray, slabs: Sequence[tuple[slice, ...]], buffer: np.ndarray) -> None:
    """target += rint(p · scaled), exactly (see :meth:`TileRunner.accumulate_tensor`), slab by slab
    through ``buffer`` (float64, at least one slab long). An integer ``target`` is added to in
    float64 and stored back: exact, its sums being integers below 2^53 (measured as fast as a
    float64 target: 0.94–1.12 against 0.95–1.05 ms per 8×256×256 tile)."""
    for slab in slabs:
        scaled_part = scaled[slab]
        product = buffer[: scaled_part.size].reshape(scaled_part.shape)
        np.multiply(p[slab], scaled_part, out=product)
        np.rint(product, out=product)
        part = target[slab]
        np.add(part, product, out=part, casting="unsafe")


def _torch_int(dtype):
    """torch's integer type for a numpy sums type (int32 or int64)."""
    import torch

    return torch.int32 if np.dtype(dtype) == np.int32 else torch.int64


def _shares_memory(y, x) -> bool:
    return y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


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

            from cleftchunk.model import on_device

            module = on_device(copy.deepcopy(module), device)
        return module.eval()


def _as_unit_float32(tile: np.ndarray, full: int | None, scale: float | None) -> np.ndarray:
    """A non-uint8 tile as float32 in [0, 1]: integers divided by their full scale, floats times ``scale``."""
    out = tile.astype(np.float32)
    if full is not None:
        out /= np.float32(full)
    elif scale is not None:
        out *= np.float32(scale)
    return out
