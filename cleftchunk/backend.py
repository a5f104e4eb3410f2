"""The one place that sets torch's process-wide backend flags (threads, cuDNN), for every stage.

Prediction wants bit-stable kernels (cuDNN picks by shape, deterministically, never by timing);
training wants the fastest kernels (cuDNN benchmarks them). Both pass what they need explicitly:
no environment variable side channels.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and batch schedulers
    narrow; ``os.cpu_count()`` counts the whole machine): the one rule every stage sizes threads by."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_torch(threads: int | None = None, *, cudnn_benchmark: bool | None = None, cudnn_deterministic: bool | None = None) -> None:
    """Set torch's intra-op threads (when given) and the cuDNN flags (those given).

    ``cudnn_deterministic=True`` implies ``cudnn_benchmark=False`` unless asked otherwise: a
    benchmarked kernel choice can change between runs, and with it the bits of the output.
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if cudnn_deterministic is not None:
        torch.backends.cudnn.deterministic = cudnn_deterministic
        if cudnn_deterministic and cudnn_benchmark is None:
            cudnn_benchmark = False
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark
