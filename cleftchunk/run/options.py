"""How a block-wise command runs, as one value: :class:`RunOptions`.

Every block-wise stage (predict, segment, evaluate, convert, synth, export, threshold) takes one
``RunOptions`` instead of loose keywords, and the command line builds it from the same flags
(``cli/options.py``): ``--workers N`` worker processes (0: threads of this process, the default
without GPUs), ``--threads`` per worker, ``--scheduler ADDRESS`` (an existing cluster, with the
TLS options), ``--gpus``, ``--block-shape``, ``--dry-run``, ``--overwrite``,
``--progress/--no-progress``, and ``--cluster slurm|pbs|lsf|sge`` with ``--jobs`` (batch jobs, see
``cleftchunk/run/jobqueue.py``). The rules those flags share live here, once: the worker-count rule,
the scheduler-address rule and the block-shape rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from cleftchunk.errors import CleftchunkError

#: Schemes of a Dask scheduler's address.
SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


def check_count(value: int | None, name: str, minimum: int) -> int | None:
    """The one rule for counts of workers, threads, GPUs and retries: a whole number >= minimum."""
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise CleftchunkError(f"{name}={value} must be a whole number >= {minimum}")
    return int(value)


def check_scheduler_address(address: str | None) -> str | None:
    """The address of a running Dask scheduler (``tcp://HOST:PORT`` or ``tls://HOST:PORT``)."""
    if address is None:
        return None
    text = str(address)
    if text in ("threads", "processes"):
        raise CleftchunkError(
            f"scheduler={text} is gone: threads of this process are workers=0 (the default), worker processes workers=N; "
            "the scheduler is only ever the address of a running Dask scheduler"
        )
    if not text.startswith(SCHEDULER_SCHEMES) or not text.split("://", 1)[1]:
        raise CleftchunkError(
            f"scheduler={text} is not the address of a Dask scheduler: give tcp://HOST:PORT or tls://HOST:PORT "
            "(leave it out to run on this machine)"
        )
    return text


def checked_block_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Three positive whole extents Z,Y,X."""
    shape = tuple(int(b) for b in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise CleftchunkError(f"block_shape={','.join(map(str, shape))} must be 3 positive extents Z,Y,X")
    return shape


def block_shape_for(given: Sequence[int] | None, chunks: Sequence[int], shape: Sequence[int], default: Sequence[int]) -> tuple[int, ...]:
    """The one block-shape rule: blocks are whole output chunks, so that no two tasks write one
    chunk. A given shape must be a multiple of ``chunks`` on every axis shorter than the volume
    (refused otherwise, naming the nearest shape that is); the default is rounded to one. Blocks
    never extend past the volume's (chunk-rounded) end."""
    chunks = tuple(int(c) for c in chunks)
    if given is None:
        given = tuple(max(c, (int(b) // c) * c) for b, c in zip(default, chunks))
    else:
        given = checked_block_shape(given)
        bad = [a for a, (b, c, s) in enumerate(zip(given, chunks, shape)) if b % c and b < s]
        if bad:
            fixed = tuple(max(c, round(b / c) * c) for b, c in zip(given, chunks))
            raise CleftchunkError(
                f"block_shape={','.join(map(str, given))} is not a multiple of the output chunks {','.join(map(str, chunks))}: "
                f"use block_shape={','.join(map(str, fixed))}"
            )
    return tuple(min(b, c * math.ceil(s / c)) for b, c, s in zip(given, chunks, shape))


@dataclass(frozen=True)
class RunOptions:
    """Where and how a block-wise stage runs, and what it may do to an existing output.

    ``workers``: worker processes of a local Dask cluster; 0 (the default without GPUs) runs on
    ``threads`` threads of this process (default: one per usable core), no cluster started.
    ``threads``: task threads per worker process (default 1; torch threads are cores // workers).
    ``scheduler``: the address of a running Dask scheduler (``security``: its TLS credentials);
    its workers are used as they are. ``gpus``: GPUs to use, one worker process each (stages
    that run a model; None: all of this machine's). ``listen``: the interface a local cluster
    binds (127.0.0.1 unless given). ``block_shape``: the block of work, Z,Y,X voxels (None:
    the stage's default; see :func:`block_shape_for`). ``dry_run``: describe the plan, run and
    create nothing. ``overwrite``: replace an existing output (else it is resumed, when it was
    started with the same parameters, or refused). ``progress``: a progress bar on stderr.
    ``retries``: retries of a failing block before it is reported.
    ``cluster``: a batch system (slurm, pbs, lsf, sge) to run ``jobs`` jobs on, each with
    ``gpus`` GPUs (one worker each) or ``workers`` CPU worker processes; ``job_memory`` and
    ``job_extra`` (directives) add to Dask's jobqueue.yaml; ``cluster_tcp``: plain TCP instead of
    TLS (see :mod:`cleftchunk.run.jobqueue`).
    """

    workers: int = 0
    threads: int | None = None
    scheduler: str | None = None
    security: Any = None
    gpus: int | None = None
    listen: str | None = None
    block_shape: tuple[int, ...] | None = None
    dry_run: bool = False
    overwrite: bool = False
    progress: bool = False
    retries: int = 2
    cluster: str | None = None
    jobs: int = 1
    job_memory: str | None = None
    job_extra: tuple[str, ...] = ()
    cluster_tcp: bool = False

    def __post_init__(self) -> None:
        from cleftchunk.run.jobqueue import check_cluster

        object.__setattr__(self, "workers", check_count(self.workers if self.workers is not None else 0, "workers", 0))
        object.__setattr__(self, "threads", check_count(self.threads, "threads", 1))
        object.__setattr__(self, "gpus", check_count(self.gpus, "gpus", 0))
        object.__setattr__(self, "retries", check_count(self.retries, "retries", 0))
        object.__setattr__(self, "scheduler", check_scheduler_address(self.scheduler))
        object.__setattr__(self, "cluster", check_cluster(self.cluster))
        object.__setattr__(self, "jobs", check_count(self.jobs, "jobs", 1))
        object.__setattr__(self, "job_extra", tuple(str(d) for d in self.job_extra))
        if self.cluster is None and (self.jobs != 1 or self.job_memory or self.job_extra or self.cluster_tcp):
            raise CleftchunkError("jobs, job_memory, job_extra and cluster_tcp describe batch jobs: give cluster=slurm (or pbs, lsf, sge) too")
        if self.cluster is not None and self.scheduler is not None:
            raise CleftchunkError(f"cluster={self.cluster} starts its own scheduler: leave out scheduler={self.scheduler}, or cluster")
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", checked_block_shape(self.block_shape))

    def but(self, **changes: Any) -> "RunOptions":
        """A copy with ``changes`` (checked again)."""
        return replace(self, **changes)

    @property
    def in_this_process(self) -> bool:
        """Tasks run on threads of this process: no scheduler, no worker processes, no GPUs."""
        return self.scheduler is None and self.cluster is None and not self.workers and not self.gpus

    @property
    def remote(self) -> bool:
        """Tasks run on other machines' workers (a given scheduler, or batch jobs): this machine's
        GPUs and cores do not matter."""
        return self.scheduler is not None or self.cluster is not None

    def task_threads(self) -> int:
        """Threads of this process that run tasks (when :attr:`in_this_process`)."""
        from cleftchunk.backend import usable_cores

        return self.threads or usable_cores()

    def where(self) -> str:
        """Where the tasks run, in words (for plans and logs)."""
        if self.scheduler:
            return f"the cluster at {self.scheduler}"
        if self.cluster:
            from cleftchunk.run.jobqueue import worker_layout

            processes, threads = worker_layout(self)
            each = f"{self.gpus} GPU(s), one worker each" if self.gpus else f"{processes} worker process(es)"
            return f"{self.jobs} {self.cluster.upper()} job(s) of {each}, {threads} task thread(s) per worker"
        if self.gpus:
            return f"{self.gpus} local GPU worker processes"
        if self.workers:
            per = f", {self.threads} threads each" if self.threads and self.threads > 1 else ""
            return f"{self.workers} local worker processes{per}"
        return f"{self.task_threads()} threads of this process"

    def client(self, announce: bool | None = None):
        """A context manager giving the client the executor runs on (see :func:`client_for`)."""
        return client_for(self, self.progress if announce is None else announce)


def client_for(options: RunOptions, announce: bool = False):
    """Threads of this process (:class:`~cleftchunk.run.local.ThreadClient`), a local cluster of
    worker processes on 127.0.0.1 (or ``listen``), a client of the scheduler at ``scheduler``, or
    of batch jobs (``cluster``; cancelled at the end)."""
    import contextlib
    import sys

    from cleftchunk.run.cluster import ClusterSpec, dask_client
    from cleftchunk.run.local import ThreadClient

    if options.in_this_process:
        return ThreadClient(options.task_threads())
    if options.cluster:
        from cleftchunk.run.jobqueue import batch_client

        return batch_client(options, announce)

    @contextlib.contextmanager
    def cluster():
        spec = ClusterSpec(workers=options.workers or 1, gpus=options.gpus or 0, cores=None, scheduler=options.scheduler,
                           listen=options.listen, security=options.security, threads=options.threads)
        with dask_client(spec) as client:
            if announce and getattr(client, "dashboard_link", None):
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
            yield client

    return cluster()
