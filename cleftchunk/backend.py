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


#: glibc's mallopt parameter (malloc.h): the most malloc arenas (heaps) the process may have.
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2) -> bool:
    """Keep the process's freed block-sized arrays from piling up in glibc's heaps (Linux with
    glibc only; elsewhere nothing is done and False is returned).

    Each task thread otherwise gets a malloc arena of its own, and a block-sized array freed in
    one thread's arena is of no use to the others: measured, a null-model predict of
    128×1024×1024 peaked at 830–960 MiB of RSS with 375–400 MiB of live arrays, and at 740–830
    MiB with two arenas, as fast (benchmarks/RESULTS.md). (A fixed 4 MiB mmap threshold as well
    brought it to 700 MiB but cost a real model 35 % more CPU: every activation was mapped afresh.)
    Process-wide and for the process's life: predict calls it for the task threads it starts,
    before they start."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave its allocator alone
        return False
    return bool(mallopt(_M_ARENA_MAX, int(arenas)))
