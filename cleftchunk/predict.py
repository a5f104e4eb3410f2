"""Block-wise prediction of cleft probabilities over volumes of any size, on Dask.

The answer (what :func:`predict_reference` computes in memory, and :func:`predict` block-wise):

- A global grid of windows over the *frame* (the volume, reflect-padded by half a window with
  ``pad``, and padded up to one window on axes shorter than it): :class:`tiling.TileGrid`.
- A tile whose input is a single value (e.g. zero padding around the tissue), or that contains no
  voxel of the optional ``mask``, is *empty*: its prediction is p = 0 without running the model.
  It still counts in the blending weights, so skipping changes nothing but the time.
- Each voxel gets Σ w·p / Σ w over the tiles covering it (w: the Gaussian importance map, or 1
  with ``blend="constant"``), written as uint8 round(255·p); voxels outside the mask are 0.

Why block-wise results are byte-identical to the reference, whatever the block size, the number
of workers, retries or resumes:

1. Every tile is run exactly once, by the block that contains its start (clamped into the volume),
   on the same input (the reflect-padded read of :func:`tiling.reflect_read` equals ``np.pad``).
2. The model sees batches of a fixed shape: a block's last batch is padded with zero tiles to
   ``batch_size``. Kernels are chosen by shape and compute each sample on its own, so a tile's
   probabilities do not depend on its batch-mates or on where a block boundary fell.
3. The sums Σ w·p and Σ w are accumulated in fixed point (int64, 40 fractional bits): each
   contribution is rounded once, by a rule that depends only on (w, p), and integer addition is
   associative. So the sums are the same whatever order contributions from neighbouring blocks
   are added in. Σ w is recomputed from the grid alone, where it is needed.

The engine (a Dask graph over blocks aligned to the output chunks):

- *tiles* task of block B: runs the tiles B owns and saves their weighted sum Σ q(w·p) over the
  region they cover as an int64 *partial* in a scratch directory (written to a temporary name and
  renamed, so that a partial either exists completely or not at all).
- *blend* task of block B: adds the partials of the (at most 2 per axis when blocks are at least
  a window wide) blocks whose tiles reach B, divides by Σ q(w), writes B's output chunks (no other
  task writes them, so no locks), and only then marks B done. A partial is deleted as soon as all
  blocks that need it are written, so scratch space follows the front of the computation, and
  memory is bounded by the block size times the number of workers.
- Resume: done blocks are skipped and saved partials reused; a hash of the model and of every
  parameter that can change a bit of the output is stored in the output's attributes, and a
  different one refuses to resume (``overwrite`` replaces the output).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import CleftchunkError
from .geometry import Coord, Roi, as_coord
from .tiling import (
    FIXED_BITS,
    TileGrid,
    blended_uint8,
    check_fixed_headroom,
    frame_padding,
    importance_map,
    reflect_read,
    to_fixed,
)
from .volumes import DEFAULT_CHUNKS, Volume, create_like, open_volume
from .volumes import exists as volume_exists

PREDICT_FORMAT = "cleftchunk-predict/1"
ATTR = "cleftchunk_predict"
DEFAULT_BLOCK_SHAPE = (32, 512, 512)
TTA_CHOICES = (1, 4, 8, 16)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class GpuOutOfMemory(CleftchunkError):
    """The GPU cannot hold a batch; the message says which batch size to try."""


# -- parameters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictParams:
    """Everything that can change a bit of the output (and nothing that cannot)."""

    window: Coord
    overlap: float = 0.5
    blend: str = "gaussian"
    pad: bool = False
    batch_size: int = 1
    tta: int = 1
    precision: str = "fp32"
    device: str = "cpu"  # the kind of device: "cpu" or "cuda"
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", as_coord(self.window, 3))
        if any(w <= 0 for w in self.window):
            raise CleftchunkError(f"model input size {self.window} must be positive: e.g. -mi 8,256,256")
        if self.batch_size < 1:
            raise CleftchunkError(f"batch size {self.batch_size} must be at least 1")
        if self.tta not in TTA_CHOICES:
            raise CleftchunkError(f"--tta {self.tta}: use one of {', '.join(map(str, TTA_CHOICES))}")
        if self.tta == 16 and self.window[1] != self.window[2]:
            raise CleftchunkError(f"--tta 16 transposes y and x, which needs a square window, not {self.window}: use --tta 8")
        if self.precision not in PRECISIONS[1:]:
            raise CleftchunkError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        importance_map((1, 1, 1), self.blend)  # validates the name

    def grid(self, volume_roi: Roi) -> TileGrid:
        return TileGrid.over(volume_roi, self.window, self.overlap, self.pad)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window)
        return d


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
        x = x.float().div_(255.0) if stack.dtype == np.uint8 else x.float()
        try:
            y = self._forward(x)
        except torch.cuda.OutOfMemoryError as e:
            raise GpuOutOfMemory(
                f"out of GPU memory at batch size {b} with window {self.params.window}: try -b {max(1, b // 2)}"
                + (" or --precision bf16" if self.params.precision == "fp32" else "")
            ) from e
        self.tiles_run += len(batch)
        return y

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


# -- the in-memory reference --------------------------------------------------------------
def predict_reference(
    model: Any,
    raw: np.ndarray,
    window: Sequence[int],
    overlap: float = 0.5,
    blend: str = "gaussian",
    pad: bool = False,
    batch_size: int = 1,
    tta: int = 1,
    precision: str = "fp32",
    mask: np.ndarray | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """The semantics of :func:`predict`, written plainly over one in-memory array (tests' oracle)."""
    params = PredictParams(tuple(window), overlap, blend, pad, batch_size, tta, precision, _device_kind(device))
    volume = Roi.from_shape(raw.shape)
    before, after = frame_padding(raw.shape, params.window, pad)
    widths = list(zip(before, after))
    padded = np.pad(raw, widths, mode="reflect")
    padded_mask = None if mask is None else np.pad(mask, widths, mode="reflect")
    grid = params.grid(volume)
    weights = importance_map(params.window, blend).astype(np.float64)
    numerator = np.zeros(padded.shape, dtype=np.int64)
    denominator = np.zeros(padded.shape, dtype=np.int64)
    to_run = []
    for _, tile in grid.tiles():
        where = tile.to_slices(grid.frame.offset)
        denominator[where] += to_fixed(weights)
        tile_mask = None if padded_mask is None else padded_mask[where]
        if not is_empty_tile(padded[where], tile_mask):
            to_run.append(where)
    runner = TileRunner(model, params, device)
    for where, p in zip(to_run, runner.run(padded[w] for w in to_run)):
        numerator[where] += to_fixed(weights * p)
    inside = volume.to_slices(grid.frame.offset)
    out = blended_uint8(numerator[inside], denominator[inside])
    if mask is not None:
        out[mask == 0] = 0
    return out


def _device_kind(device: Any) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


# -- the plan: blocks, the tiles each owns, and whose partials each needs -------------------
def _name(index: Coord) -> str:
    return "_".join(map(str, index))


@dataclass(frozen=True)
class BlockWork:
    index: Coord
    write_roi: Roi
    tiles: tuple[Coord, ...]  # tiles this block runs (it contains their clamped start), global order
    tiles_roi: Roi  # the union of those tiles (empty when it owns none)
    deps: tuple[tuple[Coord, Roi], ...]  # (block, its tiles_roi) of every block whose tiles reach write_roi


@dataclass(frozen=True)
class Plan:
    """The whole computation as a value: inspect it (``describe``) before running it."""

    grid: TileGrid
    volume_roi: Roi
    block_shape: Coord
    blocks: tuple[BlockWork, ...]  # raster order

    def block(self, index: Coord) -> BlockWork:
        return self._by_index[index]

    @property
    def _by_index(self) -> dict[Coord, BlockWork]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {b.index: b for b in self.blocks}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def describe(self) -> str:
        owners = sum(1 for b in self.blocks if b.tiles)
        max_deps = max((len(b.deps) for b in self.blocks), default=0)
        return (
            f"{len(self.blocks)} blocks of {self.block_shape} over {self.volume_roi}; "
            f"{self.grid.count} tiles of {self.grid.window} (stride {self.grid.stride}) over frame {self.grid.frame}, "
            f"run by {owners} blocks; each block blends the partials of at most {max_deps} blocks"
        )


def make_plan(grid: TileGrid, volume_roi: Roi, block_shape: Sequence[int]) -> Plan:
    """Blocks aligned to ``block_shape``; tile ownership and dependencies are computed per axis
    (the grids are products of per-axis grids), so planning stays cheap for millions of blocks."""
    block_shape = as_coord(block_shape, 3)
    owned, deps = [], []
    for a in range(3):
        begin, size, bs = volume_roi.offset[a], volume_roi.shape[a], block_shape[a]
        n_blocks = -(-size // bs)
        starts, w = grid.starts[a], grid.window[a]
        owner = [(min(max(s, begin), begin + size - 1) - begin) // bs for s in starts]
        owned.append([[i for i, o in enumerate(owner) if o == j] for j in range(n_blocks)])
        deps.append(
            [
                sorted({owner[i] for i, s in enumerate(starts) if s < begin + (j + 1) * bs and s + w > begin + j * bs})
                for j in range(n_blocks)
            ]
        )

    def tiles_roi(index: Coord) -> Roi:
        lists = [owned[a][index[a]] for a in range(3)]
        if not all(lists):
            return Roi(volume_roi.offset, (0, 0, 0))
        begin = tuple(grid.starts[a][lists[a][0]] for a in range(3))
        end = tuple(grid.starts[a][lists[a][-1]] + grid.window[a] for a in range(3))
        return Roi.from_bounds(begin, end)

    from .geometry import ChunkGrid

    blocks = []
    for index, write in ChunkGrid(volume_roi, block_shape).chunks():
        tiles = tuple(itertools.product(*(owned[a][index[a]] for a in range(3))))
        dep_blocks = tuple((d, tiles_roi(d)) for d in itertools.product(*(deps[a][index[a]] for a in range(3))))
        blocks.append(BlockWork(index, write, tiles, tiles_roi(index), dep_blocks))
    return Plan(grid, volume_roi, block_shape, tuple(blocks))


# -- scratch space: partial sums and done markers -----------------------------------------
@dataclass(frozen=True)
class Scratch:
    """Partials (``partials/<block>.npy``, or ``.zero`` when all its tiles were empty) and done
    markers (``done/<block>``). Each file appears by an atomic rename, complete or not at all."""

    root: str

    def _path(self, *parts: str) -> Path:
        return Path(self.root, *parts)

    def ensure(self) -> None:
        for sub in ("partials", "done", "tmp"):
            self._path(sub).mkdir(parents=True, exist_ok=True)

    def done(self) -> set[str]:
        d = self._path("done")
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def mark_done(self, index: Coord) -> None:
        self._atomic_write(self._path("done", _name(index)), b"")

    def partials(self) -> set[str]:
        d = self._path("partials")
        return {p.name.rsplit(".", 1)[0] for p in d.iterdir() if p.suffix in (".npy", ".zero")} if d.is_dir() else set()

    def has_partial(self, index: Coord) -> dict | None:
        """The stats saved with a block's partial, or None when it has none yet."""
        meta = self._path("partials", _name(index) + ".json")
        if self._path("partials", _name(index) + ".npy").exists() or self._path("partials", _name(index) + ".zero").exists():
            try:
                return json.loads(meta.read_text())
            except (OSError, ValueError):
                return {}
        return None

    def save_partial(self, index: Coord, partial: np.ndarray | None, stats: dict) -> None:
        # Stats first: the partial's appearance is what marks the block's tiles as done.
        self._atomic_write(self._path("partials", _name(index) + ".json"), json.dumps(stats).encode())
        if partial is None:
            self._atomic_write(self._path("partials", _name(index) + ".zero"), b"")
            return
        tmp = self._path("tmp", f"{_name(index)}-{uuid.uuid4().hex}.npy")
        with open(tmp, "wb") as f:
            np.save(f, partial)
        os.replace(tmp, self._path("partials", _name(index) + ".npy"))

    def load_partial(self, index: Coord) -> np.ndarray | None:
        """The partial as a read-only memory map (so only the slices used are read), None if zero."""
        path = self._path("partials", _name(index) + ".npy")
        if path.exists():
            return np.load(path, mmap_mode="r")
        if self._path("partials", _name(index) + ".zero").exists():
            return None
        raise FileNotFoundError(f"partial of block {index} is missing from {self.root}")

    def drop_partial(self, name: str) -> None:
        for suffix in (".npy", ".zero", ".json"):
            self._path("partials", name + suffix).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = self._path("tmp", f"{path.name}-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


# -- the two kinds of tasks (run on the workers) ------------------------------------------
@dataclass(frozen=True)
class Job:
    """What every task needs; small and picklable (volumes reopen lazily on each worker)."""

    input: Volume
    output: Volume
    mask: Volume | None
    params: PredictParams
    grid: TileGrid
    volume_roi: Roi
    scratch: Scratch
    torch_threads: int | None = None


@dataclass
class ModelSource:
    """A model to run: a checkpoint file (loaded once per worker, keyed by its sha256) or an
    ``nn.Module`` shipped to the workers (keyed by a hash of its weights)."""

    sha256: str
    checkpoint: str | None = None
    module: Any = field(default=None, repr=False)

    def load(self, device: Any) -> Any:
        if self.checkpoint is not None:
            from .model import load_model

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


def run_block_tiles(job: Job, work: BlockWork, source: ModelSource) -> dict:
    """The *tiles* task: run the tiles a block owns once, save Σ q(w·p) over them as a partial."""
    saved = job.scratch.has_partial(work.index)
    if saved is not None:  # done by an earlier run or attempt
        return {**saved, "reused": True}
    roi = work.tiles_roi
    raw = reflect_read(job.input.read, job.volume_roi, roi)
    mask = None if job.mask is None else reflect_read(job.mask.read, job.volume_roi, roi)
    tiles = [job.grid.tile(t).relative_to(roi).to_slices() for t in work.tiles]
    to_run = [s for s in tiles if not is_empty_tile(raw[s], None if mask is None else mask[s])]
    stats = {"tiles": len(tiles), "run": len(to_run), "skipped": len(tiles) - len(to_run), "reused": False}
    if not to_run:
        job.scratch.save_partial(work.index, None, stats)
        return stats
    weights = _weights(job.params.window, job.params.blend)
    runner = _runner_for(source, job.params, job.torch_threads)
    partial = runner.accumulate((raw[s] for s in to_run), to_run, roi.shape, weights)
    stats["run"] = runner.tiles_run
    job.scratch.save_partial(work.index, partial, stats)
    return stats


def blend_block(job: Job, work: BlockWork, *_tiles_done: Any) -> dict:
    """The *blend* task: add the partials reaching a block, divide by Σ q(w), write, mark done."""
    write = work.write_roi
    fixed_weights = _fixed_weights(job.params.window, job.params.blend)
    denominator = np.zeros(write.shape, dtype=np.int64)
    for _, tile in job.grid.tiles_overlapping(write):
        common = tile.intersect(write)
        denominator[common.relative_to(write).to_slices()] += fixed_weights[common.relative_to(tile).to_slices()]
    numerator = np.zeros(write.shape, dtype=np.int64)
    for dep, dep_roi in work.deps:
        partial = job.scratch.load_partial(dep)
        if partial is None:
            continue
        common = dep_roi.intersect(write)
        numerator[common.relative_to(write).to_slices()] += partial[common.relative_to(dep_roi).to_slices()]
    out = blended_uint8(numerator, denominator)
    if job.mask is not None:
        out[job.mask.read(write) == 0] = 0
    job.output.write(write, out)
    job.scratch.mark_done(work.index)
    return {"voxels": write.size}


_WEIGHTS: dict[tuple, np.ndarray] = {}


def _weights(window: Coord, blend: str) -> np.ndarray:
    key = ("w", window, blend)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = importance_map(window, blend).astype(np.float64)
    return _WEIGHTS[key]


def _fixed_weights(window: Coord, blend: str) -> np.ndarray:
    key = ("q", window, blend)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = to_fixed(_weights(window, blend))
    return _WEIGHTS[key]


# -- the result ---------------------------------------------------------------------------
@dataclass
class PredictResult:
    output: str
    tiles_in_grid: int
    tiles_needed: int = 0  # tiles this run had to produce (all of them unless resuming)
    tiles_run: int = 0  # tiles that went through the model in this run
    tiles_skipped: int = 0  # empty tiles (p = 0, model not run)
    tiles_reused: int = 0  # tiles whose partial an earlier run or attempt had saved
    blocks: int = 0
    blocks_written: int = 0
    blocks_already_done: int = 0
    failed: list[tuple[Roi, str]] = field(default_factory=list)
    seconds: float = 0.0
    dashboard: str | None = None

    @property
    def tiles_ratio(self) -> float:
        """Tiles produced (run + skipped + reused) ÷ tiles needed: 1 means each exactly once."""
        done = self.tiles_run + self.tiles_skipped + self.tiles_reused
        return done / self.tiles_needed if self.tiles_needed else 1.0

    def summary(self) -> str:
        return (
            f"{self.output}: {self.blocks_written} blocks written ({self.blocks_already_done} already done) "
            f"of {self.blocks}; tiles run {self.tiles_run}, empty {self.tiles_skipped}, reused {self.tiles_reused} "
            f"of {self.tiles_needed} needed ({self.tiles_in_grid} in the grid): ratio {self.tiles_ratio:g}; "
            f"{self.seconds:.1f} s"
        )


# -- the Python API -----------------------------------------------------------------------
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
    precision: str = "auto",
    compile: bool = False,
    mask: Any = None,
    block_shape: Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    workers: int | None = None,
    gpus: int | None = None,
    cores: int | None = None,
    scheduler: str | None = None,
    processes: bool = True,
    client: Any = None,
    overwrite: bool = False,
    retries: int = 2,
    progress: bool = True,
    architecture: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PredictResult:
    """Predict cleft probabilities of ``input_volume`` into ``output_spec`` (``out.zarr/pred``).

    ``model_or_checkpoint``: a checkpoint path, or an ``nn.Module`` mapping float (N,1,z,y,x)
    raw/255 to probabilities (e.g. from ``cleftchunk.load_model``; then ``window`` is required).
    ``input_volume``: a :class:`Volume` or a spec ``open_volume`` reads. Work runs on ``client``,
    or the cluster at ``scheduler``, or a local cluster started here (``workers``, ``gpus``).
    Raises :class:`CleftchunkError` for bad input, and after the run if some blocks failed.
    """
    from .cluster import ClusterSpec, dask_client, resolve_gpus

    log = log or _stderr
    started = time.perf_counter()
    volume = _open_input(input_volume)
    source, window, arch_name = _model_source(model_or_checkpoint, window, architecture)
    if client is None and scheduler is None:
        gpus = resolve_gpus(gpus)
    device = "cuda" if gpus else "cpu"
    params = PredictParams(
        window,
        overlap,
        blend,
        pad,
        batch_size or (4 if device == "cuda" else 1),
        tta,
        _resolve_precision(precision, device),
        device,
        compile,
    )
    mask_volume = _open_mask(mask, volume)
    grid = params.grid(volume.roi)
    check_fixed_headroom(grid)
    _warn_if_small(volume, params, log)
    chunks = tuple(min(int(c), s) for c, s in zip(chunks or DEFAULT_CHUNKS, volume.shape))
    block_shape = _check_block_shape(block_shape, chunks, volume.shape)

    identity, identity_hash = _identity(source, arch_name, volume, mask_volume, chunks, params)
    run_info = {"block_shape": list(block_shape), "workers": workers, "gpus": gpus, "scheduler": scheduler, "retries": retries}
    output, resuming = _open_output(output_spec, volume, chunks, identity, identity_hash, run_info, overwrite)
    scratch = Scratch(str(_scratch_dir(output, identity_hash)))
    result = PredictResult(str(output_spec), grid.count)
    plan = make_plan(grid, volume.roi, block_shape)
    result.blocks = len(plan.blocks)
    if resuming and output.array.attrs.get(ATTR, {}).get("complete"):
        log(f"{output_spec} is already complete with these parameters: nothing to do (--overwrite to redo it)")
        result.blocks_already_done = result.blocks
        return result
    scratch.ensure()
    spec = ClusterSpec(workers=workers, gpus=gpus or 0, cores=cores, scheduler=scheduler, processes=processes)
    # Worker processes we start get cores // workers torch threads each; others keep their own.
    threads = spec.torch_threads() if client is None and scheduler is None and not spec.in_process else None
    job = Job(volume, output, mask_volume, params, grid, volume.roi, scratch, threads)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(spec))
        result.dashboard = getattr(client, "dashboard_link", None)
        if result.dashboard:
            log(f"Dask dashboard: {result.dashboard}")
        log(f"plan: {plan.describe()}")
        _execute(client, job, plan, source, retries, progress, result)
    result.seconds = time.perf_counter() - started
    _raise_if_failed(result)
    _mark_complete(output, result)
    scratch.remove()
    return result


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


def _execute(client: Any, job: Job, plan: Plan, source: ModelSource, retries: int, progress: bool, result: PredictResult) -> None:
    """Run the blocks not done yet; follow them: progress, partial clean-up, failures."""
    scratch = job.scratch
    done = scratch.done()
    todo = [w for w in plan.blocks if _name(w.index) not in done]
    result.blocks_already_done = len(plan.blocks) - len(todo)
    needed = Counter(_name(d) for w in todo for d, _ in w.deps)
    for stale in scratch.partials() - set(needed):
        scratch.drop_partial(stale)
    tiles_futures, blend_futures = _submit(client, job, plan, todo, source, retries, result)
    try:
        _follow(blend_futures, needed, scratch, progress, result)
        _count_tiles(tiles_futures.values(), result)
    finally:
        for f in list(blend_futures) + list(tiles_futures.values()):
            if f.status != "finished":
                f.cancel()


def _submit(client: Any, job: Job, plan: Plan, todo: list[BlockWork], source: ModelSource, retries: int, result: PredictResult):
    """Submit tiles and blend tasks in raster order with falling priority, so that blocks finish
    in that order and the front of partials (scratch space) stays small."""
    source_arg = client.scatter(source, broadcast=True, hash=False) if source.module is not None else source
    token = uuid.uuid4().hex[:8]
    tiles_futures: dict[Coord, Any] = {}
    blend_futures: dict[Any, BlockWork] = {}
    for order, work in enumerate(todo):
        for dep, _ in work.deps:
            if dep not in tiles_futures:
                result.tiles_needed += len(plan.block(dep).tiles)
                tiles_futures[dep] = client.submit(
                    run_block_tiles, job, plan.block(dep), source_arg,
                    key=f"predict-tiles-{token}-{_name(dep)}", retries=retries, priority=-order, pure=False,
                )
        deps = [tiles_futures[d] for d, _ in work.deps]
        future = client.submit(
            blend_block, job, work, *deps, key=f"predict-blend-{token}-{_name(work.index)}", retries=retries, priority=-order, pure=False
        )
        blend_futures[future] = work
    return tiles_futures, blend_futures


def _follow(blend_futures: dict[Any, BlockWork], needed: Counter, scratch: Scratch, progress: bool, result: PredictResult) -> None:
    """Collect blend tasks as they finish; drop a partial once every block needing it is written."""
    from distributed import as_completed
    from tqdm import tqdm

    total = sum(w.write_roi.size for w in blend_futures.values())
    with tqdm(total=total, unit="vox", unit_scale=True, disable=not progress, desc="predict", file=sys.stderr, dynamic_ncols=True) as bar:
        for future in as_completed(list(blend_futures)):
            work = blend_futures.pop(future)
            if future.status != "finished":
                error = future.exception()
                if isinstance(error, GpuOutOfMemory):
                    raise error
                result.failed.append((work.write_roi, _one_line(error)))
                continue
            result.blocks_written += 1
            bar.update(work.write_roi.size)
            bar.set_postfix_str(f"blocks {result.blocks_written + result.blocks_already_done}/{result.blocks}")
            for dep, _ in work.deps:
                needed[_name(dep)] -= 1
                if needed[_name(dep)] == 0:
                    scratch.drop_partial(_name(dep))


def _count_tiles(futures: Iterable[Any], result: PredictResult) -> None:
    """Tile counts from the tiles tasks' own results: what really went through the model."""
    for future in futures:
        if future.status != "finished":
            continue
        stats = future.result()
        if stats.get("reused"):
            result.tiles_reused += stats["tiles"]
        else:
            result.tiles_run += stats["run"]
            result.tiles_skipped += stats["skipped"]


def _one_line(error: BaseException | None) -> str:
    text = str(error).splitlines()[0] if error is not None and str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


# -- checks and set-up --------------------------------------------------------------------
def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _open_input(input_volume: Any) -> Volume:
    volume = input_volume if isinstance(input_volume, Volume) else open_volume(input_volume)
    if volume.ndim != 3:
        raise CleftchunkError(f"{volume.spec} has {volume.ndim} axes {volume.shape}: predict needs a 3-D (z, y, x) volume")
    if volume.dtype != np.uint8 and volume.dtype.kind != "f":
        raise CleftchunkError(
            f"{volume.spec} is {volume.dtype}: the model reads uint8 EM intensities; convert it to uint8 first"
        )
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


def _model_source(model_or_checkpoint: Any, window: Sequence[int] | None, architecture: str | None) -> tuple[ModelSource, Coord, str]:
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        from .model import check_input_shape, checkpoint_input_size, load_checkpoint, model_from_checkpoint

        path = Path(model_or_checkpoint)
        ckpt = load_checkpoint(path)
        model_from_checkpoint(ckpt)  # an unknown architecture or weights that do not fit fail here, not on a worker
        arch = str(ckpt["arch"].get("name", "unetv0"))
        if architecture is not None and architecture != arch:
            raise CleftchunkError(f"{path} holds a {arch} model, not {architecture}: drop -ac or give a {architecture} checkpoint")
        window = tuple(window or checkpoint_input_size(ckpt))
        if arch == "unetv0":
            check_input_shape(window)
        return ModelSource(_file_sha256(path), checkpoint=str(path.resolve())), as_coord(window, 3), arch
    if window is None:
        raise CleftchunkError("predict with an in-memory model needs window= (the model input size z,y,x)")
    return ModelSource(_module_sha256(model_or_checkpoint), module=model_or_checkpoint), as_coord(tuple(window), 3), type(model_or_checkpoint).__name__


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


def _check_block_shape(block_shape: Sequence[int] | None, chunks: Coord, shape: Sequence[int]) -> Coord:
    if block_shape is None:
        block_shape = tuple(max(c, (b // c) * c) for b, c in zip(DEFAULT_BLOCK_SHAPE, chunks))
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
    spec: str | os.PathLike, volume: Volume, chunks: Coord, identity: dict, identity_hash: str, run_info: dict, overwrite: bool
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
        _remove_scratch_dirs(spec)
    provenance = {
        "identity": identity,
        "identity_hash": identity_hash,
        "run": run_info,
        "versions": _versions(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }
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


def _scratch_dir(output: Volume, identity_hash: str) -> Path:
    """Beside the output container (never inside it, so Zarr readers do not see it)."""
    inner = (output.inner or "").rsplit("/s0", 1)[0].replace("/", "_")
    container = Path(output.container).resolve()
    return container.parent / f".{container.name}.{inner}.predict-{identity_hash[:16]}"


def _remove_scratch_dirs(spec: str | os.PathLike) -> None:
    from .volumes import split_spec

    container, inner = split_spec(spec)
    container = Path(container).resolve()
    for old in container.parent.glob(f".{container.name}.{(inner or '').replace('/', '_')}.predict-*"):
        shutil.rmtree(old, ignore_errors=True)


def _mark_complete(output: Volume, result: PredictResult) -> None:
    attrs = dict(output.array.attrs).get(ATTR, {})
    attrs.update(
        complete=True,
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tiles={"in_grid": result.tiles_in_grid, "run": result.tiles_run, "empty": result.tiles_skipped, "reused": result.tiles_reused},
    )
    output.array.attrs[ATTR] = attrs
