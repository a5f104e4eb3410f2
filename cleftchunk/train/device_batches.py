"""Batches for augmentation on the model's device: what the loader workers still do, and the
prefetch in the training process.

- :class:`SourceSampler` is :class:`~cleftchunk.train.data.CropSampler` with the same draws
  (positions, plans, rejection coins from the same per-sample seed), but a kept sample is the
  oversized uint8 box and its uint8 label codes (only the slices its plan keeps), read with the
  volume edges mirrored, plus its plan; nothing is warped on the CPU. The rejection test counts
  the valid cleft voxels of the plan's output slices in the crop's *unwarped* footprint: the
  warps keep the area within the rescale's ±20 %, and warping labels only to count them would
  cost what the device saves. So the two paths keep slightly different crops from the same
  candidates; each stream is still a pure function of (seed, batch index).
- :class:`DevicePrefetcher` runs in the training process (a CUDA context per loader worker is
  what breaks other attempts): while the model steps on batch n, batch n+1 is copied
  (non-blocking, from pinned memory) and augmented on a side stream.
- :func:`resolve_augment_on`: ``--augment-on auto|cpu|device`` (auto: device on a GPU).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from cleftchunk.errors import CleftchunkError
from cleftchunk.geometry import Roi
from cleftchunk.labels import CLEFT_BIT, INVALID_BIT
from cleftchunk.predict.tiling import reflect_index
from cleftchunk.train.augment_torch import TorchAugmenter, pack_plans
from cleftchunk.train.config import AUGMENT_ON
from cleftchunk.train.data import ChunkedView, CropSampler


def resolve_augment_on(choice: str, device: torch.device) -> str:
    """``cpu`` or ``device``: where a run augments (auto: on the model's device when it is a GPU)."""
    if choice not in AUGMENT_ON:
        raise CleftchunkError(f"unknown --augment-on {choice!r}: use auto, cpu or device")
    if choice == "auto":
        return "device" if device.type == "cuda" else "cpu"
    return choice


def read_box(view: Any, extent: Roi, box: Roi, out: np.ndarray | None = None) -> np.ndarray:
    """``box`` (local voxels, possibly beyond ``extent``) of ``view``, mirrored at the volume edges
    as the numpy path's ``map_coordinates(mode="mirror")`` and ``reflect_index`` do; into ``out``
    when given (a batch's buffer: one copy from the decoded chunks, no fresh pages per box)."""
    if box.intersect(extent) == box:
        return np.asarray(view[box.to_slices()]) if out is None else read_inside(view, box, out)
    index = [reflect_index(np.arange(b, e), n) for b, e, n in zip(box.begin, box.end, extent.shape)]
    read = Roi.from_bounds([int(i.min()) for i in index], [int(i.max()) + 1 for i in index])
    picked = np.asarray(view[read.to_slices()])[np.ix_(*[i - o for i, o in zip(index, read.offset)])]
    if out is None:
        return picked
    out[...] = picked
    return out


def read_inside(view: Any, box: Roi, out: np.ndarray) -> np.ndarray:
    """``box`` (inside the volume) into ``out``: chunk by chunk from a cached view, else one read."""
    if isinstance(view, ChunkedView):
        return view.read_into(box.begin, box.end, out)
    out[...] = np.asarray(view[box.to_slices()])
    return out


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A batch tensor; in a loader worker made in shared memory at once, which the DataLoader
    would otherwise copy it into to hand it over (a third of a worker's time at 10×512×512)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what share_memory_() itself calls
    if new_shared is None:
        return torch.empty(tuple(shape), dtype=dtype).share_memory_()
    storage = new_shared(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage).view(tuple(shape))


class SourceSampler(CropSampler):
    """The crop stream of :class:`CropSampler`, left unaugmented for :class:`TorchAugmenter`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # uint8 images cross as uint8 (a quarter of the bytes); others as float32 already scaled.
        self.image_uint8 = all(np.dtype(v.image.dtype) == np.uint8 for v in self.volumes)

    def judge(self, index: int, offset: Sequence[int], plan: Any) -> tuple[float, Any]:
        """Counts on the footprint only (the plan's slices, the crop's y–x): rejected tries read no more."""
        extent = Roi.from_shape(self.volumes[index].shape)
        box = self.source_box(offset)
        m = self.augmenter.margin_yx
        footprint = Roi((box.offset[0], box.offset[1] + m, box.offset[2] + m), (box.shape[0], *self.input_size[1:]))
        codes = read_box(self.codes[index], extent, footprint)[np.asarray(plan.z_keep)]
        cleft = np.count_nonzero((codes & (CLEFT_BIT | INVALID_BIT)) == CLEFT_BIT)
        return float(cleft), lambda: {"source": (index, box), "plan": plan}

    def read_sample(self, source: tuple[int, Roi], plan: Any, image: np.ndarray, codes: np.ndarray) -> None:
        """The box's slices the plan keeps (missing sections are never read nor shipped)."""
        index, box = source
        extent = Roi.from_shape(self.volumes[index].shape)
        for k, z in enumerate(np.asarray(plan.z_keep).tolist()):
            section = Roi((box.offset[0] + z, *box.offset[1:]), (1, *box.shape[1:]))
            read_box(self.codes[index], extent, section, codes[k : k + 1])
            if self.image_uint8:
                read_box(self.images[index], extent, section, image[k : k + 1])
            else:
                data = read_box(self.images[index], extent, section).astype(np.float32)
                image[k : k + 1] = data * np.float32(self.volumes[index].scale)

    def collate(self, samples: list[dict[str, Any]], batch_index: int) -> dict[str, torch.Tensor]:
        z, _, _ = self.input_size
        shape = (len(samples), z, *self.augmenter.source_shape[1:])
        if self.image_uint8:
            image, codes = batch_buffer((2, *shape), torch.uint8).unbind(0)  # one segment to hand over
        else:
            image, codes = batch_buffer(shape, torch.float32), batch_buffer(shape, torch.uint8)
        for i, s in enumerate(samples):
            self.read_sample(s["source"], s["plan"], image[i].numpy(), codes[i].numpy())
        out = {"image": image, "codes": codes, "tries": torch.tensor([s["tries"] for s in samples]), "index": torch.tensor(batch_index)}
        out.update(pack_plans([s["plan"] for s in samples], self.augmenter))
        out["z_keep"] = torch.arange(z).repeat(len(samples), 1)  # the boxes hold the kept slices only
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
        try:
            self.ahead = self._prepare()
        except StopIteration:  # a finite source: hand out what is ready, stop on the next call
            self.ahead = None
        return current


__all__ = ["AUGMENT_ON", "DevicePrefetcher", "SourceSampler", "read_box", "resolve_augment_on"]
