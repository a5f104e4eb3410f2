"""Where a block-wise command runs: threads of this process (small jobs, no cluster to start), a
local cluster of worker processes, or an existing Dask scheduler; and the ``--dry-run`` text.

:class:`ThreadClient` is the part of ``distributed.Client`` the executor uses (``submit``,
``gather``, ``scatter``, ``scheduler_info`` and an ``as_completed`` queue), run on a thread pool
of this process: starting it costs nothing, so a small ``segment`` or ``convert`` does not pay
the second or so a distributed cluster takes to start. With one thread it is *lazy*: a task
runs when the executor waits for the next finished one, so an exception that stops the command
(Ctrl-C) stops it after the results of the tasks before it were handed over, exactly as a run
on a cluster would.

Tasks start highest ``priority`` first, then in submission order, as on a Dask scheduler: the
executor gives a block's *process* the priority of its place in raster order, so a block whose
inputs are ready is written before later blocks' *prepare* tasks start, and its prepared data
(predict: the block's own sums, 4 bytes a voxel) is not held while they run. (With a FIFO pool
predict held about seven blocks' sums at a time on 2 threads; see benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures import Future as _Future
from typing import Any, Callable, Iterator

from cleftchunk.backend import usable_cores
from cleftchunk.errors import CleftchunkError

#: Values of a ``scheduler`` argument that mean "run here" rather than the address of a scheduler.
LOCAL_SCHEDULERS = ("threads", "processes")


class LocalFuture:
    """A task of :class:`ThreadClient`: pending (lazy, one thread), running or over."""

    def __init__(self, call: Callable[[], Any] | None = None, future: _Future | None = None, rank: tuple = ()):
        self._call, self._future, self.rank = call, future, rank

    def _run(self) -> None:
        if self._future is None:  # lazy: run it now, in this thread
            future = _Future()
            try:
                future.set_result(self._call())
            except Exception as error:  # noqa: BLE001 - reported like a failed Dask task
                future.set_exception(error)
            self._future = future

    @property
    def status(self) -> str:
        if self._future is None or not self._future.done():
            return "pending"
        if self._future.cancelled():
            return "cancelled"
        return "error" if self._future.exception() is not None else "finished"

    def done(self) -> bool:
        return self._future is not None and self._future.done()

    def result(self) -> Any:
        self._run()
        return self._future.result()

    def exception(self) -> BaseException | None:
        self._run()
        return self._future.exception()

    def cancel(self) -> None:
        if self._future is not None:
            self._future.cancel()
        self._call = None


class _Completed:
    """``distributed.as_completed`` for :class:`LocalFuture` (``add``, ``next_batch``)."""

    def __init__(self):
        self.pending: list[LocalFuture] = []

    def add(self, future: LocalFuture) -> None:
        self.pending.append(future)

    def next_batch(self, block: bool = True) -> list[LocalFuture]:
        if not self.pending:
            return []
        if not any(f.done() for f in self.pending):
            lazy = min((f for f in self.pending if f._future is None), key=lambda f: f.rank, default=None)
            if lazy is not None:
                lazy._run()  # the first lazy task by priority, then submission
            else:
                wait([f._future for f in self.pending], return_when=FIRST_COMPLETED)
        # one look at each future: a task finishing between two looks would be in neither list,
        # lost, and the executor would wait for it forever
        done, pending = [], []
        for future in self.pending:
            (done if future.done() else pending).append(future)
        self.pending = pending
        return done


def _resolved(value: Any) -> Any:
    return value.result() if isinstance(value, LocalFuture) else value


def _with_retries(function: Callable, args: tuple, kwargs: dict, retries: int) -> Any:
    for attempt in range(retries + 1):
        try:
            return function(*map(_resolved, args), **kwargs)
        except Exception:  # noqa: BLE001 - any failure is retried, as Dask retries a task (``retries``)
            if attempt == retries:
                raise


class ThreadClient:
    """Run the executor's tasks on ``threads`` threads of this process (see the module docstring)."""

    dashboard_link = None

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))
        self.pool = _PriorityPool(self.threads) if self.threads > 1 else None
        self._submitted = itertools.count()

    def submit(self, function: Callable, *args: Any, key: str | None = None, retries: int = 0, pure: bool = False,
               priority: int = 0, **kwargs: Any) -> LocalFuture:
        rank = (-priority, next(self._submitted))
        if self.pool is None:
            return LocalFuture(call=lambda: _with_retries(function, args, kwargs, retries), rank=rank)
        return LocalFuture(future=self.pool.submit(rank, _with_retries, function, args, kwargs, retries), rank=rank)

    def gather(self, futures: list[LocalFuture]) -> list:
        return [f.result() for f in futures]

    def scatter(self, value: Any, **_: Any) -> Any:
        return value  # one process: nothing to ship

    def scheduler_info(self) -> dict:
        return {"workers": {"local": {"nthreads": self.threads}}}

    def as_completed(self) -> _Completed:
        return _Completed()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __enter__(self) -> "ThreadClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _PriorityPool:
    """A pool of threads that start queued calls lowest ``rank`` first (``concurrent.futures``'
    pool starts them in submission order only)."""

    def __init__(self, threads: int):
        self._queue: list[tuple[tuple, _Future, Callable, tuple]] = []
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"cleftchunk-task-{i}") for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, rank: tuple, function: Callable, *args: Any) -> _Future:
        future = _Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the thread pool is closed")
            heapq.heappush(self._queue, (rank, future, function, args))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                _, future, function, args = heapq.heappop(self._queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the waiting client
                future.set_exception(error)

    def shutdown(self) -> None:
        """Cancel what has not started, let what runs finish, and stop the threads."""
        with self._ready:
            self._closed = True
            for _, future, _, _ in self._queue:
                future.cancel()
            self._queue.clear()
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()


def default_threads() -> int:
    return usable_cores()


def check_workers(workers: int | None) -> int | None:
    if workers is not None and int(workers) < 1:
        raise CleftchunkError(f"workers {workers} must be at least 1 (--workers)")
    return None if workers is None else int(workers)


def is_address(scheduler: str | None) -> bool:
    """True for the address of a scheduler (``tcp://host:8786``), False for threads/processes/None."""
    return bool(scheduler) and scheduler not in LOCAL_SCHEDULERS


@contextlib.contextmanager
def block_client(workers: int | None = None, scheduler: str | None = "threads", announce: bool = False) -> Iterator[Any]:
    """A client for :func:`cleftchunk.run.executor.run_blockwise`: ``scheduler`` is ``"threads"``
    (``workers`` threads of this process, default one per core), ``"processes"`` (a local
    cluster of ``workers`` worker processes on 127.0.0.1) or the address of a running scheduler.
    ``announce``: print the Dask dashboard's address on stderr (with the progress display)."""
    from cleftchunk.run.cluster import ClusterSpec, dask_client

    workers = check_workers(workers)
    if scheduler in (None, "threads"):
        with ThreadClient(workers or default_threads()) as client:
            yield client
        return
    spec = ClusterSpec(workers=workers or 1, cores=workers, scheduler=scheduler if is_address(scheduler) else None)
    with dask_client(spec) as client:
        if announce and getattr(client, "dashboard_link", None):
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
        yield client


def where(workers: int | None, scheduler: str | None) -> str:
    """Where ``block_client`` runs, in words (for dry runs)."""
    if is_address(scheduler):
        return f"the cluster at {scheduler}"
    if scheduler == "processes":
        return f"{workers or 1} local worker processes"
    return f"{workers or default_threads()} threads of this process"


def describe_plan(what: str, layout: Any, place: str, tasks: int, output_bytes: int, memory: int, extra: tuple[str, ...] = ()) -> str:
    """The ``--dry-run`` text of a block-wise command (nothing is run, nothing created)."""
    return "\n".join([
        f"plan: {what}: {len(layout)} blocks of {layout.block_shape} over {layout.roi} on {place}",
        f"  tasks: about {tasks}, streamed in raster order, a few per worker thread in flight",
        f"  output: {_size(output_bytes)} before compression",
        f"  memory per worker thread: about {_size(memory)}",
        *extra,
        "  nothing was run and nothing was created (--dry-run)",
    ])


def _size(n: int) -> str:
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    units = ["GiB", "TiB", "PiB"]
    k = min(len(units) - 1, int(math.log(n, 1024)) - 3)
    return f"{n / 2 ** (30 + 10 * k):.1f} {units[k]}"
