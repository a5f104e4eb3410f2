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


#: glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
#: Arrays from this size on are mapped and unmapped by glibc rather than kept in its heaps.
MMAP_THRESHOLD = 4 << 20


def tune_malloc(arenas: int = 2) -> bool:
    """Keep the process's freed block-sized arrays from piling up in glibc's heaps (Linux only;
    elsewhere nothing is done and False is returned).

    Task threads each get a malloc arena, and glibc raises its mmap threshold to the largest
    array freed so far (up to 32 MiB), so block-sized arrays freed by one thread's blend stay in
    that thread's heap, unusable by the others: measured, a null-model predict of 128×1024×1024
    peaked at 830–880 MiB of RSS with 375–400 MiB of live arrays; with two arenas and a fixed
    4 MiB threshold it peaked at 701 MiB, as fast (benchmarks/RESULTS.md). Process-wide and for
    the process's life: predict calls it for the task threads it starts, before they start."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave its allocator alone
        return False
    return bool(mallopt(_M_ARENA_MAX, int(arenas))) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
