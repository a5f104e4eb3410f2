"""Batches for augmentation on the model's device: what the loader workers still do, and the
prefetch in the training process.

- :class:`SourceSampler` is :class:`~cleftchunk.train.data.CropSampler` with the same draws
  (positions, plans, rejection coins from the same per-sample seed), but a kept sample is the
  oversized uint8 box and its uint8 label codes, read with the volume edges mirrored, plus its
  plan; nothing is warped on the CPU. The rejection test counts the valid cleft voxels of the
  plan's output slices in the crop's *unwarped* footprint: the warps keep the area within the
  rescale's ±20 %, and warping labels only to count them would cost what the device saves.
- :class:`DevicePrefetcher` runs in the training process (a CUDA context per loader worker is
  what breaks other attempts): while the model steps on batch n, batch n+1 is copied
  (non-blocking, from pinned memory) and augmented on a side stream.
- :func:`resolve_augment_on`: ``--augment-on auto|cpu|device`` (auto: device on a GPU).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.labels import CLEFT_BIT, INVALID_BIT
from cleftchunk.predict.tiling import reflect_index
from cleftchunk.train.augment_torch import TorchAugmenter, pack_plans
from cleftchunk.train.data import CropSampler

AUGMENT_ON = ("auto", "cpu", "device")


def resolve_augment_on(choice: str, device: torch.device) -> str:
    """``cpu`` or ``device``: where a run augments (auto: on the model's device when it is a GPU)."""
    if choice not in AUGMENT_ON:
        raise CleftchunkError(f"unknown --augment-on {choice!r}: use auto, cpu or device")
    if choice == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return choice


def read_box(view: Any, extent: Roi, box: Roi) -> np.ndarray:
    """``box`` (local voxels, possibly beyond ``extent``) of ``view``, mirrored at the volume edges
    as the numpy path's ``map_coordinates(mode="mirror")`` and ``reflect_index`` do."""
    have = box.intersect(extent)
    if have == box:
        return np.asarray(view[box.to_slices()])
    index = [reflect_index(np.arange(b, e), n) for b, e, n in zip(box.begin, box.end, extent.shape)]
    read = Roi.from_bounds([int(i.min()) for i in index], [int(i.max()) + 1 for i in index])
    data = np.asarray(view[read.to_slices()])
    return data[np.ix_(*[i - o for i, o in zip(index, read.offset)])]


class SourceSampler(CropSampler):
    """The crop stream of :class:`CropSampler`, left unaugmented for :class:`TorchAugmenter`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # uint8 images cross as uint8 (a quarter of the bytes); others as float32 already scaled.
        self.image_uint8 = all(np.dtype(v.image.dtype) == np.uint8 for v in self.volumes)

    def source_box(self, offset: Sequence[int]) -> Roi:
        before, after = self.augmenter.source_context()
        return Roi(tuple(int(o) for o in offset), self.input_size).grow(before, after)

    def judge(self, index: int, offset: Sequence[int], plan: Any) -> tuple[float, Any]:
        extent = Roi.from_shape(self.volumes[index].shape)
        box = self.source_box(offset)
        codes = read_box(self.codes[index], extent, box)
        m = self.augmenter.margin_yx
        z, h, w = self.input_size
        footprint = codes[np.asarray(plan.z_keep), m : m + h, m : m + w]
        cleft = np.count_nonzero((footprint & (CLEFT_BIT | INVALID_BIT)) == CLEFT_BIT)

        def finish() -> dict[str, Any]:
            image = read_box(self.images[index], extent, box)
            if not self.image_uint8:
                image = image.astype(np.float32) * np.float32(self.volumes[index].scale)
            return {"image": image, "codes": codes, "plan": plan}

        return float(cleft), finish

    def collate(self, samples: list[dict[str, Any]], batch_index: int) -> dict[str, torch.Tensor]:
        out = {
            "image": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "codes": torch.from_numpy(np.stack([s["codes"] for s in samples])),
            "tries": torch.tensor([s["tries"] for s in samples]),
            "index": torch.tensor(batch_index),
        }
        out.update(pack_plans([s["plan"] for s in samples], self.augmenter))
        return out

    def batch(self, seed: int, batch_index: int, size: int, first_sample: int = 0) -> dict[str, torch.Tensor]:
        samples = [self.sample(np.random.default_rng([seed, batch_index, first_sample + j])) for j in range(size)]
        return self.collate(samples, batch_index)


class DevicePrefetcher:
    """Batches from ``batches`` (source boxes + plans), augmented on ``device`` one batch ahead.

    On CUDA the copy and the augmentation of batch n+1 are queued on a side stream as soon as
    batch n is handed out, so they overlap the model's step on batch n; the main stream waits
    for them only when it takes batch n+1. On a CPU it simply augments in turn.
    """

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], augment: TorchAugmenter):
        self.batches = batches
        self.augment = augment
        device = augment.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: dict[str, torch.Tensor] | None = None

    def _prepare(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            return self.augment(batch)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        current = self.ahead if self.ahead is not None else self._prepare()
        if self.stream is not None:
            main = torch.cuda.current_stream(self.augment.device)
            main.wait_stream(self.stream)
            for value in current.values():
                if value.is_cuda:
                    value.record_stream(main)  # made on the side stream, used on the main one
        self.ahead = self._prepare()
        return current


__all__ = ["AUGMENT_ON", "DevicePrefetcher", "SourceSampler", "read_box", "resolve_augment_on"]
