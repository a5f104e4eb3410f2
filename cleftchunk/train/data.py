"""Training samples: random, augmented crops read lazily from image + label volumes.

- Volumes are any spec :func:`cleftchunk.io.volumes.open_volume` accepts; only the box a sample
  needs is read (never a whole volume). :class:`~cleftchunk.io.volumes.Volume` is picklable and
  reopens in each DataLoader worker process.
- Sampling follows the original pipeline: a volume is chosen with probability proportional to its
  number of valid crop positions, the position uniformly; the oversized box around the crop feeds
  the augmentations (:mod:`cleftchunk.train.augment`); rejection sampling keeps a crop whose label has more
  than ``min_voxels`` cleft voxels, and otherwise keeps it with probability ``keep_p``.
- ``near_cleft`` (a fraction in [0, 1]) of the draws instead centre the crop on a cleft voxel taken
  uniformly from all cleft voxels of all volumes (``near_cleft_by="voxel"``) or from a cleft taken
  uniformly (``"cleft"``), drawn from the cleft tables (io/tables.py);
  crops come only from annotated space (train/sampling.py).
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

import pickle
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cleftchunk.backend import configure_torch
from cleftchunk.train.augment import AugmentConfig, Augmenter
from cleftchunk.errors import CleftchunkError
from cleftchunk.intensity import image_scale, nan_if_not_finite
from cleftchunk.labels import label_codes, resolve_label_kind
from cleftchunk.geometry import Roi
from cleftchunk.frames import paired
from cleftchunk.io.volumes import open_volume
from cleftchunk.train.sampling import NEAR_CLEFT_DRAWS, AnnotatedCodes, CleftIndex, Space, known_empty
from cleftchunk.io.tables import CleftTable, count_in_memory

#: Accepted by ``label_mode`` (see :mod:`cleftchunk.labels`).
LABEL_MODES = ("auto", "cremi", "nonzero", "zero-background")


@dataclass
class RejectionConfig:
    """Keep a crop with more than ``min_voxels`` cleft voxels; else keep it with probability ``keep_p``."""

    min_voxels: int = 100
    keep_p: float = 0.1
    max_tries: int = 10_000  # then the last candidate is taken, so a label-free volume cannot hang
    near_cleft: float = 0.0  # fraction of draws centred on a cleft voxel (kept without rejection)
    near_cleft_by: str = "voxel"  # voxel: uniform over cleft voxels; cleft: over clefts (train/sampling.py)

    #: ``cleftchunk train``'s defaults: most crops centred on a cleft from the tables, so a kept crop
    #: costs <= 1/0.85 ≈ 1.18 tries (the fields' defaults stay the original's pure rejection).
    TRAINING: ClassVar[dict] = {"near_cleft": 0.85}

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
        if config.near_cleft_by not in NEAR_CLEFT_DRAWS:
            raise CleftchunkError(f"rejection near_cleft_by={config.near_cleft_by!r} is unknown: use {' or '.join(NEAR_CLEFT_DRAWS)}")
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



def open_training_volumes(
    images: Sequence[str], labels: Sequence[str], root: str | Path | None = None, label_mode: str = "auto", ignore_frame: bool = False
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
        pairs.append(TrainingVolume(*paired(image, label, ignore_frame), label_mode, name=str(image)))  # frames: cleftchunk.frames
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


# the bounded cache of decoded chunks lives in chunk_cache.py (re-exported: callers import it from here)
from cleftchunk.train.chunk_cache import CACHE_CHUNKS, ChunkCache, ChunkedView, Converted, cache_chunk_shape  # noqa: E402,F401


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
        tables: Sequence[CleftTable] | None = None,
        regions: Sequence[Sequence[Roi] | None] | None = None,
    ):
        if not volumes:
            raise CleftchunkError("no training volumes given")
        self.volumes = list(volumes)
        # Regions (local voxels) of each volume that no training crop's source box may touch.
        self.holdout = list(holdout) if holdout is not None else [None] * len(self.volumes)
        self.cache = ChunkCache(int(cache_mb * 2**20))
        self.augmenter = Augmenter(input_size, augment)
        self.rejection = rejection or RejectionConfig()
        # Cleft tables (io/tables.py): given (a training run builds them once, stored beside the
        # labels), else counted in memory on the first near-cleft draw. Annotated space: regions
        # given, else what the tables say is annotated, else the whole volume (train/sampling.py).
        self.tables: list[CleftTable] | None = list(tables) if tables is not None else None
        self.cleft_index: CleftIndex | None = None
        self.ranges = [v.offset_range(self.augmenter) for v in self.volumes]
        regions = list(regions) if regions is not None else [None] * len(self.volumes)
        self.spaces = [
            Space(v.shape, r, self.input_size, regions[i], self.tables[i] if self.tables else None, v.name)
            for i, (v, r) in enumerate(zip(self.volumes, self.ranges))
        ]
        self.images: list[Any] = []
        self.codes: list[Any] = []
        for i, v in enumerate(self.volumes):
            convert = partial(label_codes, kind=v.label_mode)
            if cache_mb > 0:
                self.images.append(ChunkedView(v.image, self.cache, f"image{i}"))
                codes: Any = ChunkedView(v.labels, self.cache, f"labels{i}", convert)
            else:
                self.images.append(v.image)
                codes = Converted(v.labels, convert)
            self.codes.append(codes if self.spaces[i].mode == "whole" else AnnotatedCodes(codes, self.spaces[i]))
        counts = np.array([s.weight for s in self.spaces], dtype=np.float64)
        self.weights = counts / counts.sum()

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.augmenter.out_shape  # type: ignore[return-value]

    def reopen(self) -> "CropSampler":
        """A copy whose volumes reopen their stores (for a fresh worker process)."""
        return pickle.loads(pickle.dumps(self))

    def draw_position(self, rng: np.random.Generator, max_draws: int = 10_000) -> tuple[int, tuple[int, int, int]]:
        """A volume (∝ its valid positions) and a uniform crop offset, away from held-out regions."""
        for _ in range(max_draws):
            index = int(rng.choice(len(self.volumes), p=self.weights))
            offset = self.spaces[index].draw(rng)
            held = self.holdout[index]
            if held is None or self.source_box(offset).intersect(held).empty:
                return index, offset  # type: ignore[return-value]
        raise CleftchunkError(
            "the held-out validation region leaves (almost) no room for training crops: hold out a smaller --validate-roi"
        )

    def draw_near_cleft(self, rng: np.random.Generator, max_draws: int = 100) -> tuple[int, tuple[int, int, int]] | None:
        """A crop offset centring the crop on a cleft voxel (uniform over all cleft voxels), clipped
        to the valid offsets, away from held-out regions; None when the volumes have no clefts or
        ``max_draws`` draws all touched a held-out region (the caller then draws uniformly)."""
        if self.cleft_index is None:
            if self.tables is None:  # counted once, in memory (cell by cell)
                self.tables = [count_in_memory(v.labels, v.label_mode, cache_chunk_shape(v.labels)) for v in self.volumes]
            self.cleft_index = CleftIndex(self.tables, self.rejection.near_cleft_by)
        if self.cleft_index.total == 0:
            return None
        for _ in range(max_draws):
            index, voxel = self.cleft_index.draw(rng, self.codes)
            offset = tuple(
                int(min(max(c - o // 2, lo), hi)) for c, o, (lo, hi) in zip(voxel, self.input_size, self.ranges[index])
            )
            offset = self.spaces[index].settle(voxel, offset)  # inside annotated space where it fits
            held = self.holdout[index]
            if held is None or self.source_box(offset).intersect(held).empty:
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
            if not keep_anyway and tries < r.max_tries and self._known_empty(index, offset):
                continue  # cannot pass the test: not read (the random stream is the same)
            cleft_voxels, finish = self.judge(index, offset, plan)
            if cleft_voxels > r.min_voxels or keep_anyway or tries == r.max_tries:
                return {**finish(), "tries": tries, "volume": index, "offset": offset}
        raise AssertionError("unreachable")

    def _known_empty(self, index: int, offset: Sequence[int]) -> bool:
        if self.tables is None or self.rejection.min_voxels < 0:
            return False
        return known_empty(self.tables[index], self.source_box(offset))

    def source_box(self, offset: Sequence[int]) -> Roi:
        """The oversized box a crop at ``offset`` reads (its augmentations' context included)."""
        before, after = self.augmenter.source_context()
        return Roi(tuple(int(o) for o in offset), self.input_size).grow(before, after)

    def judge(self, index: int, offset: Sequence[int], plan: Any) -> tuple[float, Any]:  # device_batches replaces it
        base = self.augmenter.base_coordinates(plan)
        label, mask = self._labels(index, offset, plan, base)
        return float((label * mask).sum()), lambda: {"image": self._image(index, offset, plan, base), "label": label, "mask": mask}

    def _labels(self, index: int, offset: Sequence[int], plan: Any, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extent = Roi.from_shape(self.volumes[index].shape)
        code = self.augmenter.resample(self.codes[index], extent, offset, plan, order=0, base=base)
        return self.augmenter.finish_labels(code, plan)

    def _image(self, index: int, offset: Sequence[int], plan: Any, base: np.ndarray) -> np.ndarray:
        volume = self.volumes[index]
        image = self.augmenter.resample(self.images[index], Roi.from_shape(volume.shape), offset, plan, order=1, base=base, convert=nan_if_not_finite)
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
            # this loader worker's decoded-chunk cache so far (its hit rate goes to the log)
            "cache": torch.tensor([self.cache.hits, self.cache.misses, self.cache.bytes]),
            "where": torch.tensor([[s["volume"], *s["offset"]] for s in samples], dtype=torch.int64),  # volume, voxel offset: named if non-finite
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


def loader_context() -> str:
    """spawn rather than forkserver: a worker then sees this process's environment as it is now
    (storage endpoints and credentials), not as it was when a forkserver was first started."""
    return "spawn"


def make_loader(stream: CropStream, workers: int = 0, prefetch: int = 2) -> DataLoader:
    """A DataLoader over ``stream`` with ``workers`` processes (0: in this process)."""
    if workers < 0:
        raise CleftchunkError(f"-c {workers}: the number of loader workers must be 0 or more")
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": workers}
    if workers > 0:
        # Workers are started fresh (spawn), never forked: zarr's event loop,
        # fsspec's sessions and HDF5 handles of this process are not fork-safe. Each worker
        # unpickles the sampler, whose volumes reopen their stores there (see CropStream).
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      multiprocessing_context=loader_context())
    return DataLoader(stream, **kwargs)
