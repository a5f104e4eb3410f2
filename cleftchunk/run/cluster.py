"""Where prediction runs: a local Dask cluster started for the job, or an existing one.

- CPU: ``workers`` processes, each one Dask thread; torch threads per worker = cores // workers,
  so that workers × torch threads ≤ cores (oversubscription makes PyTorch far slower).
- GPUs: one worker process per GPU, pinned with ``CUDA_VISIBLE_DEVICES`` set by its nanny before
  the process starts (so CUDA inside the worker only ever sees its own device), with a ``GPU``
  resource of 1 and two task threads (one computes while the other does I/O and blending).
- ``scheduler``: the address of a running scheduler (e.g. one started by dask-jobqueue on SLURM);
  its workers are used as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

from cleftchunk.errors import CleftchunkError


@dataclass(frozen=True)
class ClusterSpec:
    workers: int | None = None  # CPU worker processes (default 1; 0: one worker thread in this process)
    gpus: int = 0  # one worker per GPU
    cores: int | None = None  # CPU cores to use in all (default: all)
    scheduler: str | None = None  # address of an existing scheduler
    processes: bool = True  # False: workers are threads of this process (tests, debugging)

    def torch_threads(self) -> int:
        cores = self.cores or os.cpu_count() or 1
        return max(1, cores // max(1, self.n_workers))

    @property
    def n_workers(self) -> int:
        return self.gpus if self.gpus else max(1, self.workers if self.workers is not None else 1)

    @property
    def in_process(self) -> bool:
        return not self.processes or (self.workers == 0 and not self.gpus)


def available_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install means: no GPUs
        return 0


def resolve_gpus(requested: int | None) -> int:
    """``None`` means: all GPUs of this machine (0 without CUDA)."""
    have = available_gpus()
    if requested is None:
        return have
    if requested < 0:
        raise CleftchunkError(f"--gpus {requested} must be 0 or more")
    if requested > have:
        raise CleftchunkError(f"--gpus {requested} asked, but this machine has {have} usable GPU(s): use --gpus {have}")
    return requested


@contextlib.contextmanager
def dask_client(spec: ClusterSpec) -> Iterator["object"]:
    """A ``distributed.Client`` on the cluster ``spec`` describes; a started cluster is closed after."""
    from distributed import Client

    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="20s")
        except OSError as e:
            raise CleftchunkError(f"no Dask scheduler answers at {spec.scheduler} ({e}): check --scheduler") from e
        with client:
            yield client
        return
    cluster = _local_cluster(spec)
    with cluster, Client(cluster) as client:
        yield client


def _local_cluster(spec: ClusterSpec):
    import dask
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    threads = spec.torch_threads()
    # Port 0: several runs (and test sessions) on one machine must not fight over 8786/8787.
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "port": 0}}
    with dask.config.set({"distributed.worker.daemon": False}):
        if spec.in_process:
            return LocalCluster(
                n_workers=spec.n_workers, threads_per_worker=1, processes=False, dashboard_address=":0", scheduler_port=0
            )
        workers = {}
        for i in range(spec.n_workers):
            env = {"OMP_NUM_THREADS": str(threads), "CLEFTCHUNK_TORCH_THREADS": str(threads)}
            resources = {}
            if spec.gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
                resources = {"GPU": 1}
            workers[f"predict-{i}"] = {
                "cls": Nanny,
                "options": {
                    # On a GPU, a second task thread reads, blends and writes while the first keeps the
                    # device busy; on a CPU, torch's own threads already use the cores.
                    "nthreads": 2 if spec.gpus else 1, "env": env, "resources": resources, "memory_limit": 0, "silence_logs": logging.ERROR,
                },
            }
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)
