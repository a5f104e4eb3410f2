"""The training section of benchmarks/gpu_check.py (at most about 3 minutes on one GPU node).

1. The model step (forward, backward, optimizer; bf16 autocast) with the batch already on the
   device: the ceiling.
2. The device augmentation alone (:class:`~cleftchunk.train.augment_torch.TorchAugmenter`), ms
   per crop at the whole recipe (goal ≤ 1 ms on a GPU).
3. The same step fed by the real loader: SourceSampler in DataLoader workers → DevicePrefetcher
   (copy + augmentation of batch n+1 on a side stream while the model steps on batch n): crops/s,
   the fraction of each iteration spent waiting for data, and the step's time against 1. (goal:
   within 5 %).
4. DDP over all GPUs found (``train(gpus=N)``, spawned processes): crops/s from two run lengths, so
   start-up cancels out. Skipped, and said so, with one GPU.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np


def make_training_volume(folder: Path, shape, chunks) -> tuple[str, str]:
    """A textured uint8 image and 0/1 cleft blobs (about 1 % of the voxels), Zarr."""
    from scipy import ndimage as ndi

    from cleftchunk.io.volumes import create_volume

    raw, labels = str(folder / "train.zarr" / "raw"), str(folder / "train.zarr" / "clefts")
    if Path(labels).exists():
        return raw, labels
    rng = np.random.default_rng(4)
    coarse = ndi.gaussian_filter(rng.standard_normal((shape[0], shape[1] // 8, shape[2] // 8)), (0, 1.5, 1.5))
    mask = np.kron(coarse > 2.2 * coarse.std(), np.ones((1, 8, 8), dtype=bool)).astype(np.uint8)
    image = rng.integers(90, 200, shape, dtype=np.uint8)
    image[mask > 0] //= 2
    for spec, array in ((raw, image), (labels, mask)):
        volume = create_volume(spec, shape, array.dtype, chunks=chunks, overwrite=True)
        volume.write(volume.roi, array)
    return raw, labels


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_section(device, quick: bool, work: Path) -> str:
    import torch

    from cleftchunk.backend import configure_torch
    from cleftchunk.train.augment import AugmentConfig
    from cleftchunk.train.augment_torch import TorchAugmenter
    from cleftchunk.train.config import TrainConfig
    from cleftchunk.train.data import CropStream, RejectionConfig, make_loader, open_training_volumes
    from cleftchunk.train.device_batches import DevicePrefetcher, SourceSampler
    from cleftchunk.train.distributed import Dist
    from cleftchunk.train.trainer import Trainer

    work.mkdir(parents=True, exist_ok=True)
    input_size = (8, 64, 64) if quick else (8, 256, 256)
    batch = 2 if quick else 8
    steps = 3 if quick else 30
    preset = "small" if quick else "default"
    shape, chunks = ((16, 192, 192), (8, 64, 64)) if quick else ((32, 1536, 1536), (16, 256, 256))
    raw, labels = make_training_volume(work, shape, chunks)
    if device.type == "cuda":
        configure_torch(cudnn_benchmark=True)
    settings = {"input_size": list(input_size), "preset": preset, "batch_size": batch, "output": str(work / "out"),
                "label_mode": "nonzero", "images": [raw], "labels": [labels]}
    trainer = Trainer(TrainConfig.from_dict(settings), Dist(device=device))
    lines = []

    # 1. the step with the data already on the device
    image = torch.rand(batch, 1, *input_size, device=device)
    on_device = {"image": image, "label": (torch.rand_like(image) > 0.99).float(), "mask": torch.ones_like(image)}
    for _ in range(3):
        trainer.step(on_device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(on_device)  # its loss.item() waits for the step: each one is timed whole
    synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    lines.append(f"data on the device: {1000 * step_s:.1f} ms a step of {batch} crops, {batch / step_s:.1f} crops/s")

    # 2. the device augmentation alone
    volumes = open_training_volumes([raw], [labels], label_mode="nonzero")
    sampler = SourceSampler(volumes, input_size, AugmentConfig(), RejectionConfig())
    augment = TorchAugmenter(sampler.augmenter, device)
    sources = [sampler.batch(0, b, batch) for b in range(3)]
    # Boxes on the device, plans on the host: as the prefetcher hands them over (control flow reads plans there).
    on_device_sources = [{k: v.to(device) if k in ("image", "codes") else v for k, v in s.items()} for s in sources]
    augment(on_device_sources[0])
    synchronize(device)
    start = time.perf_counter()
    for s in on_device_sources * 3:
        augment(s)
    synchronize(device)
    augment_ms = 1000 * (time.perf_counter() - start) / (9 * batch)
    lines.append(f"device augmentation alone (whole recipe, batch {batch}): {augment_ms:.2f} ms a crop (goal ≤ 1 ms)")

    # 3. the same step fed by the loader and the prefetcher
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    stream = CropStream(sampler, batch, seed=0)
    batches = DevicePrefetcher(iter(make_loader(stream, workers, prefetch=4)), augment)
    for _ in range(3 + workers):  # warm-up: workers start, chunk caches fill
        trainer.step(next(batches))
    waits, totals = [], []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fed = next(batches)
        t1 = time.perf_counter()
        trainer.step(fed)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        totals.append(t2 - t0)
    elapsed = time.perf_counter() - start
    del batches
    fed_s = statistics.median(totals)
    lines.append(
        f"fed by {workers} loader workers + device augmentation: {steps * batch / elapsed:.1f} crops/s; "
        f"median iteration {1000 * fed_s:.1f} ms = {fed_s / step_s:.3f}× the data-on-device step (goal ≤ 1.05×); "
        f"waiting for data {100 * sum(waits) / sum(totals):.1f} % of the time"
    )

    # 4. DDP over the GPUs found
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus > 1:
        lines.append(ddp_line(gpus, settings, workers, batch, work))
    else:
        lines.append(f"DDP: {gpus or 'no'} GPU{'s' if gpus != 1 else ''} found, nothing to spread over (needs 2 or more)")
    return "\n".join(f"- {line}" for line in lines)


def ddp_line(gpus: int, settings: dict, workers: int, batch: int, work: Path) -> str:
    """crops/s of ``train(gpus=N)`` from runs of 5 and 25 iterations (start-up cancels out)."""
    from cleftchunk.train import train

    seconds = {}
    for iterations in (5, 25):
        values = {**settings, "gpus": gpus, "batch_size": batch * gpus, "loader_workers": max(1, workers // gpus),
                  "iteration_total": iterations, "iteration_save": iterations, "progress": False,
                  "output": str(work / f"ddp{iterations}"), "log_dir": str(work / "runs"), "augment_on": "device"}
        start = time.perf_counter()
        train(values, overwrite=True)
        seconds[iterations] = time.perf_counter() - start
    rate = 20 * batch * gpus / (seconds[25] - seconds[5])
    return f"DDP over {gpus} GPUs (batch {batch} each, device augmentation): {rate:.0f} crops/s, {rate / gpus:.0f} per GPU"
