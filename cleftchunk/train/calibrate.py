"""Torch threads and loader workers for CPU training, chosen by measuring this machine.

A rule (cores minus loader workers) is wrong both ways on small machines: with 2 cores it gives
one torch thread while the loader worker idles at ~5 % of the other core, and more threads than
free cores make torch's parallel kernels spin-wait. So the two layouts that fit the cores are
timed on the run's own crops and model, and the faster is used:

- ``n`` torch threads and crops made in the training process: an iteration costs T(n) + S;
- ``n - 1`` threads and one loader worker making crops alongside: max(T(n - 1), S);

with T(t) the wall time of one optimisation step on t threads and S the time to make one batch.
Measuring takes a few steps (seconds); the weights it trains are thrown away.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from cleftchunk.backend import usable_cores
from cleftchunk.train.config import TrainConfig


available_cores = usable_cores


def measure_cpu_layout(config: TrainConfig, steps: int = 3) -> dict:
    """``{"threads", "workers", "seconds_per_iteration", "measured": {...}}`` for CPU training."""
    from cleftchunk.train.augment import AugmentConfig
    from cleftchunk.train.data import (
        CropSampler,
        RejectionConfig,
        open_training_volumes,
    )
    from cleftchunk.train.distributed import init_distributed
    from cleftchunk.train.trainer import Trainer

    cores = available_cores()
    volumes = open_training_volumes(config.images, config.labels, config.root, config.label_mode, config.ignore_frame)
    sampler = CropSampler(
        volumes, config.input_size, AugmentConfig.from_dict(config.augment), RejectionConfig.from_dict(config.rejection),
        cache_mb=config.cache_mb,
    )
    sampler.batch(config.seed, 0, config.batch_size)  # builds indexes and fills the chunk cache
    start = time.perf_counter()
    batches = [sampler.batch(config.seed, i, config.batch_size) for i in range(1, steps + 2)]
    make = (time.perf_counter() - start) / len(batches)
    trainer = Trainer(dataclasses.replace(config, ema=0.0), init_distributed(0, 1, 0, False))
    saved = torch.get_num_threads()
    step: dict[int, float] = {}
    try:
        for threads in sorted({max(cores - 1, 1), cores}):
            torch.set_num_threads(threads)
            trainer.step(batches[0])  # warm-up: first-call allocations
            start = time.perf_counter()
            for batch in batches[1:]:
                trainer.step(batch)
            step[threads] = (time.perf_counter() - start) / (len(batches) - 1)
    finally:
        torch.set_num_threads(saved)
    layouts = {(cores, 0): step[cores] + make}
    if cores > 1:
        layouts[(cores - 1, 1)] = max(step[cores - 1], make)
    (threads, workers), seconds = min(layouts.items(), key=lambda kv: (kv[1], kv[0][1]))
    return {
        "threads": threads,
        "workers": workers,
        "seconds_per_iteration": seconds,
        "measured": {"cores": cores, "batch_s": make, "step_s": {str(k): v for k, v in step.items()},
                     "layouts_s": {f"{t} threads + {w} workers": v for (t, w), v in layouts.items()}},
    }
