"""Training samples: random, augmented crops read lazily from image + label volumes.

- Volumes are any spec :func:`cleftchunk.io.volumes.open_volume` accepts; only the box a sample
  needs is read (never a whole volume). :class:`~cleftchunk.io.volumes.Volume` is picklable and
  reopens in each DataLoader worker process.
- Sampling follows the original pipeline: a volume is chosen with probability proportional to its
  number of valid crop positions, the position uniformly; the oversized box around the crop feeds
  the augmentations (:mod:`cleftchunk.train.augment`); rejection sampling keeps a crop whose label has more
  than ``min_voxels`` cleft voxels, and otherwise keeps it with probability ``keep_p``.
- ``near_cleft`` (a fraction in [0, 1]) of the draws instead centre the crop on a cleft voxel taken
  uniformly from all cleft voxels of all volumes: clefts are ~0.5 % of the voxels, so most uniform
  draws are rejected (4 tries per kept crop in the demo) and the kept ones rarely show a cleft in
  the middle. The draw uses :class:`CleftIndex` (cleft voxels per label chunk, counted once) and
  then the chunk itself, so nothing the size of a volume is held in memory.
- Reproducibility: sample ``j`` of batch ``b`` is drawn from ``np.random.default_rng([seed, b, g])``
  with ``g = rank * per_rank_batch + j`` its index in the global batch. The stream of batches is
  therefore the same for any number of loader workers, and the same global batch is seen for any
  number of processes (DDP); resuming only needs the next batch index.

Label rule: :mod:`cleftchunk.labels` decides what a label volume holds, as for every other
stage (``label_mode`` overrides it: ``cremi``/``ids``, ``nonzero``/``main``, ``mask``, ``prob``);
CREMI's invalid value 0xFFFFFFFFFFFFFFFE is masked out of the loss.
Image rule: :mod:`cleftchunk.intensity` (uint8 / 255, uint16 / 65535, floats as they are), shared with predict.
"""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cleftchunk.backend import configure_torch
from cleftchunk.train.augment import AugmentConfig, Augmenter
from cleftchunk.errors import CleftchunkError
from cleftchunk.intensity import image_scale
from cleftchunk.labels import label_codes, resolve_label_kind
from cleftchunk.geometry import ChunkGrid, Roi
from cleftchunk.io.volumes import open_volume

#: Accepted by ``label_mode`` (see :mod:`cleftchunk.labels`).
LABEL_MODES = ("auto", "cremi", "nonzero", "zero-background")


@dataclass
class RejectionConfig:
    """Keep a crop with more than ``min_voxels`` cleft voxels; else keep it with probability ``keep_p``."""

    min_voxels: int = 100
    keep_p: float = 0.1
    max_tries: int = 10_000  # then the last candidate is taken, so a label-free volume cannot hang
    near_cleft: float = 0.0  # fraction of draws centred on a cleft voxel (kept without rejection)

    @classmethod
    def from_dict(cls, values: dict | None) -> "RejectionConfig":
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CleftchunkError(f"unknown rejection setting(s) {', '.join(unknown)}: use {', '.join(known)}")
        config = cls(**values)
        for name in ("keep_p", "near_cleft"):
            if not 0 <= getattr(config, name) <= 1:
                raise CleftchunkError(f"rejection {name}={getattr(config, name)} must lie in [0, 1]")
        return config

    def to_dict(self) -> dict:
        return asdict(self)


# -- labels and images -------------------------------------------------------------------------------
def resolve_label_mode(mode: str, labels: Any) -> str:
    """Training's name (``cremi``, ``nonzero`` or ``prob``) for the kind of a label volume, as
    :func:`cleftchunk.labels.resolve_label_kind` decides it for every stage."""
    if mode not in LABEL_MODES:
        raise CleftchunkError(f"unknown label mode {mode!r}: use {', '.join(LABEL_MODES)}")
    kind = resolve_label_kind(labels, mode, scan=False)
    return {"ids": "cremi", "main": "nonzero", "mask": "nonzero"}.get(kind, kind)


# -- the volumes a sampler draws from ----------------------------------------------------------------
@dataclass
class TrainingVolume:
    """One image volume and its labels (anything with shape, dtype and local ``[slices]``)."""

    image: Any
    labels: Any
    label_mode: str = "auto"
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or str(self.image)
        if tuple(self.image.shape) != tuple(self.labels.shape):
            raise CleftchunkError(
                f"image {self.image} has shape {tuple(self.image.shape)} but labels {self.labels} have "
                f"{tuple(self.labels.shape)}: give labels covering exactly the image"
            )
        if len(self.image.shape) != 3:
            raise CleftchunkError(f"{self.image} has shape {tuple(self.image.shape)}: training needs 3-D (z, y, x) volumes")
        self.label_mode = resolve_label_mode(self.label_mode, self.labels)
        self.scale = image_scale(self.image.dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape)  # type: ignore[return-value]

    def offset_range(self, augmenter: Augmenter) -> tuple[tuple[int, int], ...]:
        """Inclusive (low, high) crop offsets per axis: the whole oversized box fits where it can;
        along an axis too short for it, the crop alone fits and reads beyond the edge are mirrored."""
        before, after = augmenter.source_context()
        ranges = []
        for v, o, b, a in zip(self.shape, augmenter.out_shape, before, after):
            if o > v:
                raise CleftchunkError(
                    f"crop {','.join(map(str, augmenter.out_shape))} is larger than the volume {self.name} "
                    f"({','.join(map(str, self.shape))}): use a smaller model input -mi or a bigger volume"
                )
            ranges.append((b, v - o - a) if v >= o + b + a else (0, v - o))
        return tuple(ranges)

    def num_positions(self, augmenter: Augmenter) -> int:
        return math.prod(hi - lo + 1 for lo, hi in self.offset_range(augmenter))


def open_training_volumes(
    images: Sequence[str], labels: Sequence[str], root: str | Path | None = None, label_mode: str = "auto"
) -> list[TrainingVolume]:
    """Open image/label pairs; relative specs are taken relative to ``root`` (the tutorial's -t)."""
    images, labels = list(images), list(labels)
    if not images:
        raise CleftchunkError("no training images: give -dn IMAGE[@IMAGE...] (and -ln with their labels)")
    if len(images) != len(labels):
        raise CleftchunkError(f"{len(images)} image volume(s) but {len(labels)} label volume(s): -dn and -ln need one label per image")
    pairs = []
    for image_spec, label_spec in zip(images, labels):
        image = open_volume(under_root(image_spec, root))
        label = open_volume(under_root(label_spec, root))
        pairs.append(TrainingVolume(image, label, label_mode, name=str(image)))
    return pairs


def under_root(spec: str, root: str | Path | None) -> str:
    spec = str(spec)
    if root is None or Path(spec).is_absolute() or "://" in spec:  # a URL (s3://, precomputed://...) is never under -t
        return spec
    return str(Path(root) / spec)


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """The tutorial's ``a@b@c`` lists (or a list already)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split("@") if v]
    return [str(v) for v in value]


# -- a bounded cache of decoded chunks ----------------------------------------------------------------
#: Chunk shape used for caching sources stored without (or with very large) chunks.
CACHE_CHUNKS = (16, 256, 256)
MAX_CACHE_CHUNK_BYTES = 64 * 2**20


class ChunkCache:
    """Decoded chunks of several arrays, least recently used first out, within ``budget`` bytes.

    Random crops overlap the same chunks again and again (and rejection sampling reads several
    candidates per kept crop); keeping decoded chunks saves the decompression. Memory is bounded
    by the budget, not by the volumes. Pickling (a new worker process) yields an empty cache.
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._chunks: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:
        return {"budget": self.budget}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"])

    def get(self, key: Any, load: Any) -> np.ndarray:
        data = self._chunks.get(key)
        if data is not None:
            self._chunks.move_to_end(key)
            self.hits += 1
            return data
        self.misses += 1
        data = load()
        if data.nbytes <= self.budget:
            self._chunks[key] = data
            self.bytes += data.nbytes
            while self.bytes > self.budget:
                _, old = self._chunks.popitem(last=False)
                self.bytes -= old.nbytes
        return data


class ChunkedView:
    """Array-like ``source`` (optionally converted, e.g. ids → label codes) read chunk by chunk via a cache."""

    def __init__(self, source: Any, cache: ChunkCache, name: str, convert: Any = None):
        self.source = source
        self.cache = cache
        self.name = name
        self.convert = convert
        self.shape = tuple(int(s) for s in source.shape)
        self.grid = ChunkGrid(Roi.from_shape(self.shape), cache_chunk_shape(source))

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        roi = Roi.from_bounds([k.start for k in key], [k.stop for k in key])
        out = None
        for index in self.grid.indices_overlapping(roi):
            chunk_roi = self.grid.chunk_roi(index)
            data = self.cache.get((self.name, index), lambda r=chunk_roi: self._load(r))
            part = chunk_roi.intersect(roi)
            if out is None:
                out = np.empty(roi.shape, data.dtype)
            out[part.relative_to(roi).to_slices()] = data[part.relative_to(chunk_roi).to_slices()]
        return out

    def _load(self, roi: Roi) -> np.ndarray:
        data = np.asarray(self.source[roi.to_slices()])
        return self.convert(data) if self.convert is not None else data


def cache_chunk_shape(source: Any) -> tuple[int, ...]:
    """The source's storage chunks when they are a sensible cache unit, else CACHE_CHUNKS."""
    shape = tuple(int(s) for s in source.shape)
    chunks = getattr(source, "chunks", None)
    itemsize = np.dtype(source.dtype).itemsize
    if not chunks or math.prod(chunks) * itemsize > MAX_CACHE_CHUNK_BYTES:
        chunks = CACHE_CHUNKS  # unchunked (e.g. contiguous HDF5, numpy) or huge chunks
    return tuple(min(c, s) for c, s in zip(chunks, shape))


class Converted:
    """``source`` read through ``convert`` (no cache)."""

    def __init__(self, source: Any, convert: Any):
        self.source = source
        self.convert = convert
        self.shape = tuple(int(s) for s in source.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return self.convert(np.asarray(self.source[key]))


# -- sampling ----------------------------------------------------------------------------------------
class CleftIndex:
    """How many cleft voxels each label chunk of each volume holds, counted once by reading the
    labels chunk by chunk; a draw picks a cleft voxel uniformly over all volumes (a chunk ∝ its
    count, then the voxel within the re-read, usually cached, chunk). Small: one count per chunk."""

    def __init__(self, codes: Sequence[Any], labels: Sequence[Any]):
        self.grids: list[ChunkGrid] = []
        self.chunk_ids: list[np.ndarray] = []  # per volume, the chunks holding clefts (C-order numbers)
        counts: list[np.ndarray] = []
        for code, label in zip(codes, labels):
            grid = code.grid if isinstance(code, ChunkedView) else ChunkGrid(Roi.from_shape(code.shape), cache_chunk_shape(label))
            numbers, found = [], []
            for number, (_, roi) in enumerate(grid.chunks()):
                n = int(np.count_nonzero(np.asarray(code[roi.to_slices()]) & 1))
                if n:
                    numbers.append(number)
                    found.append(n)
            self.grids.append(grid)
            self.chunk_ids.append(np.array(numbers, dtype=np.int64))
            counts.append(np.array(found, dtype=np.int64))
        self.volume_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(counts)] + [np.zeros(0, np.int64)]).astype(np.int64)
        self.chunk_of = np.concatenate(self.chunk_ids + [np.zeros(0, np.int64)])
        self.cumulative = np.cumsum(np.concatenate(counts + [np.zeros(0, np.int64)]))
        self.total = int(self.cumulative[-1]) if self.cumulative.size else 0

    def draw(self, rng: np.random.Generator, codes: Sequence[Any]) -> tuple[int, tuple[int, int, int]]:
        """(volume, voxel) of a cleft voxel drawn uniformly over all cleft voxels."""
        k = int(rng.integers(self.total))
        entry = int(np.searchsorted(self.cumulative, k, side="right"))
        within = k - (int(self.cumulative[entry - 1]) if entry else 0)
        volume, number = int(self.volume_of[entry]), int(self.chunk_of[entry])
        grid = self.grids[volume]
        roi = grid.chunk_roi(tuple(int(i) for i in np.unravel_index(number, grid.grid_shape)))
        flat = np.flatnonzero(np.asarray(codes[volume][roi.to_slices()]) & 1)[within]
        local = np.unravel_index(flat, roi.shape)
        return volume, tuple(int(o + v) for o, v in zip(roi.offset, local))  # type: ignore[return-value]


class CropSampler:
    """Draws augmented, rejection-sampled training crops of ``input_size`` from ``volumes``."""

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        input_size: Sequence[int],
        augment: AugmentConfig | None = None,
        rejection: RejectionConfig | None = None,
        cache_mb: float = 512,
        holdout: Sequence[Roi | None] | None = None,
    ):
        if not volumes:
            raise CleftchunkError("no training volumes given")
        self.volumes = list(volumes)
        # Regions (local voxels) of each volume that no training crop's source box may touch.
        self.holdout = list(holdout) if holdout is not None else [None] * len(self.volumes)
        self.cache = ChunkCache(int(cache_mb * 2**20))
        self.images: list[Any] = []
        self.codes: list[Any] = []
        for i, v in enumerate(self.volumes):
            convert = partial(label_codes, kind=v.label_mode)
            if cache_mb > 0:
                self.images.append(ChunkedView(v.image, self.cache, f"image{i}"))
                self.codes.append(ChunkedView(v.labels, self.cache, f"labels{i}", convert))
            else:
                self.images.append(v.image)
                self.codes.append(Converted(v.labels, convert))
        self.augmenter = Augmenter(input_size, augment)
        self.rejection = rejection or RejectionConfig()
        self.cleft_index: CleftIndex | None = None  # built on the first near-cleft draw
        self.ranges = [v.offset_range(self.augmenter) for v in self.volumes]
        counts = np.array([v.num_positions(self.augmenter) for v in self.volumes], dtype=np.float64)
        self.weights = counts / counts.sum()

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.augmenter.out_shape  # type: ignore[return-value]

    def reopen(self) -> "CropSampler":
        """A copy whose volumes reopen their stores (for a fresh worker process)."""
        return pickle.loads(pickle.dumps(self))

    def draw_position(self, rng: np.random.Generator, max_draws: int = 10_000) -> tuple[int, tuple[int, int, int]]:
        """A volume (∝ its valid positions) and a uniform crop offset, away from held-out regions."""
        before, after = self.augmenter.source_context()
        for _ in range(max_draws):
            index = int(rng.choice(len(self.volumes), p=self.weights))
            offset = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in self.ranges[index])
            held = self.holdout[index]
            if held is None or Roi(offset, self.input_size).grow(before, after).intersect(held).empty:
                return index, offset  # type: ignore[return-value]
        raise CleftchunkError(
            "the held-out validation region leaves (almost) no room for training crops: hold out a smaller --validate-roi"
        )

    def draw_near_cleft(self, rng: np.random.Generator, max_draws: int = 100) -> tuple[int, tuple[int, int, int]] | None:
        """A crop offset centring the crop on a cleft voxel (uniform over all cleft voxels), clipped
        to the valid offsets, away from held-out regions; None when the volumes have no clefts or
        ``max_draws`` draws all touched a held-out region (the caller then draws uniformly)."""
        if self.cleft_index is None:
            self.cleft_index = CleftIndex(self.codes, [v.labels for v in self.volumes])
        if self.cleft_index.total == 0:
            return None
        before, after = self.augmenter.source_context()
        for _ in range(max_draws):
            index, voxel = self.cleft_index.draw(rng, self.codes)
            offset = tuple(
                int(min(max(c - o // 2, lo), hi)) for c, o, (lo, hi) in zip(voxel, self.input_size, self.ranges[index])
            )
            held = self.holdout[index]
            if held is None or Roi(offset, self.input_size).grow(before, after).intersect(held).empty:
                return index, offset  # type: ignore[return-value]
        return None

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One crop: image (z,y,x) float32 in [0,1], label and mask float32 0/1, tries (≥ 1)."""
        r = self.rejection
        for tries in range(1, r.max_tries + 1):
            # Both coins are drawn every try, so the stream does not depend on the labels' history.
            near = rng.random() < r.near_cleft if r.near_cleft else False
            centred = self.draw_near_cleft(rng) if near else None
            index, offset = centred if centred is not None else self.draw_position(rng)
            plan = self.augmenter.draw(rng)
            keep_anyway = rng.random() < r.keep_p or centred is not None
            base = self.augmenter.base_coordinates(plan)
            label, mask = self._labels(index, offset, plan, base)
            if (label * mask).sum() > r.min_voxels or keep_anyway or tries == r.max_tries:
                image = self._image(index, offset, plan, base)
                return {"image": image, "label": label, "mask": mask, "tries": tries, "volume": index, "offset": offset}
        raise AssertionError("unreachable")

    def _labels(self, index: int, offset: Sequence[int], plan: Any, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extent = Roi.from_shape(self.volumes[index].shape)
        code = self.augmenter.resample(self.codes[index], extent, offset, plan, order=0, base=base)
        return self.augmenter.finish_labels(code, plan)

    def _image(self, index: int, offset: Sequence[int], plan: Any, base: np.ndarray) -> np.ndarray:
        volume = self.volumes[index]
        image = self.augmenter.resample(self.images[index], Roi.from_shape(volume.shape), offset, plan, order=1, base=base)
        image *= np.float32(volume.scale)
        return self.augmenter.finish_image(image, plan)

    def batch(self, seed: int, batch_index: int, size: int, first_sample: int = 0) -> dict[str, torch.Tensor]:
        """Batch ``batch_index``: samples ``first_sample .. first_sample + size - 1`` of the global batch."""
        samples = [self.sample(np.random.default_rng([seed, batch_index, first_sample + j])) for j in range(size)]
        stack = lambda key: torch.from_numpy(np.stack([s[key] for s in samples])[:, None])  # noqa: E731
        return {
            "image": stack("image"),
            "label": stack("label"),
            "mask": stack("mask"),
            "tries": torch.tensor([s["tries"] for s in samples]),
            "index": torch.tensor(batch_index),
        }


class CropStream(IterableDataset):
    """An endless stream of batches ``start, start + 1, ...``; workers take every n-th batch.

    DataLoader (``batch_size=None``) collects workers round-robin, so the order and content of the
    stream do not depend on the number of workers. ``rank``/``world_size`` pick this process's part
    of each global batch of ``batch_size * world_size`` samples.
    """

    def __init__(self, sampler: CropSampler, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start = int(start)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        sampler, worker, workers = self.sampler, 0, 1
        if info is not None:
            sampler, worker, workers = self.sampler.reopen(), info.id, info.num_workers
            configure_torch(1)  # loader processes: one thread each, the cores are the trainer's
        first = self.rank * self.batch_size
        for b in count(self.start + worker, workers):
            yield sampler.batch(self.seed, b, self.batch_size, first)


def make_loader(stream: CropStream, workers: int = 0, prefetch: int = 2) -> DataLoader:
    """A DataLoader over ``stream`` with ``workers`` processes (0: in this process)."""
    if workers < 0:
        raise CleftchunkError(f"-c {workers}: the number of loader workers must be 0 or more")
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False, pin_memory=torch.cuda.is_available())
    return DataLoader(stream, **kwargs)
