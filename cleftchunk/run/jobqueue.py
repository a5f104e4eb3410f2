"""Run a block-wise command on batch-system jobs (``--cluster slurm|pbs|lsf|sge``), through
dask-jobqueue: the Dask scheduler runs in this process, ``--jobs N`` jobs each start worker
processes on a compute node, and every job is cancelled when the command ends, fails or is
interrupted.

- Workers: one per GPU (``--gpus G``: G GPUs per job, G workers, each with the ``GPU=1``
  resource, as the local cluster's), or ``--workers`` CPU worker processes per job (default 1);
  ``--threads`` task threads each. The job asks for the GPUs (SLURM ``--gres=gpu:G``, PBS
  ``-l ngpus=G``, LSF ``-gpu num=G``, SGE ``-l gpu=G``); a worker that sees several picks one by
  its name (cleftchunk.predict.worker.worker_device).
- The job's queue, account, walltime, memory, ... come from Dask's ``jobqueue.yaml`` (section
  ``jobqueue.<system>``), or ``--job-memory`` and ``--job-extra`` directives. SLURM's
  ``--mem-per-gpu``/``--mem-per-cpu`` replace the ``--mem`` line dask-jobqueue always writes
  (the two conflict, and sbatch refuses the job).
- Security: a Dask scheduler runs any code a client sends it, and compute nodes must reach it, so
  it speaks TLS by default, with the certificates given (``--tls-*``) or temporary ones made for
  this run. dask-jobqueue writes temporary keys to ``shared-temp-directory`` (else, with a
  warning, the current directory): here they go to a new private folder (mode 700) in it (default
  the home directory, which compute nodes usually share), removed when the command ends. Plain
  TCP needs ``--cluster-tcp``, and is warned about. Dashboards: the scheduler's on 127.0.0.1 (an
  SSH tunnel reaches it), the workers' HTTP servers on 127.0.0.1 (their dashboards off).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cleftchunk.errors import CleftchunkError

#: Batch system -> (dask-jobqueue cluster class, submit command, GPU request directive, the
#: command that says why a job waits).
SYSTEMS = {
    "slurm": ("SLURMCluster", "sbatch", "--gres=gpu:{gpus}", "squeue -j {ids}"),
    "pbs": ("PBSCluster", "qsub", "-l ngpus={gpus}", "qstat -f {ids}"),
    "lsf": ("LSFCluster", "bsub", '-gpu "num={gpus}"', "bjobs -p {ids}"),
    "sge": ("SGECluster", "qsub", "-l gpu={gpus}", "qstat -j {ids}"),
}

#: Seconds between "no worker yet" notices: the first after 1 minute, then 2 and 5 minutes later,
#: then every 10 minutes.
WAIT_NOTICES = (60.0, 120.0, 300.0, 600.0)

#: SLURM memory directives that replace ``--mem`` (sbatch refuses a job with both).
SLURM_MEMORY_PER = ("--mem-per-gpu", "--mem-per-cpu")


def check_cluster(name: str | None) -> str | None:
    if name is None:
        return None
    key = str(name).lower()
    if key not in SYSTEMS:
        raise CleftchunkError(f"cluster={name} is not a batch system cleftchunk can use: give one of {', '.join(SYSTEMS)}")
    return key


def preflight(options: Any) -> None:
    """What a batch run needs before any output is created: dask-jobqueue, the submit command on
    PATH and the memory of a job."""
    import_jobqueue()
    check_submit_command(options.cluster)
    job_memory(options)


def job_memory(options: Any) -> str:
    import dask

    section = f"jobqueue.{options.cluster}"
    memory = options.job_memory or dask.config.get(f"{section}.memory", None)
    if not memory:
        raise CleftchunkError(
            f"cluster={options.cluster} needs the memory of a job: give job_memory=32GB or set memory in the {section} "
            "section of ~/.config/dask/jobqueue.yaml"
        )
    return str(memory)


def check_submit_command(system: str) -> None:
    """The batch system's submit command must be on PATH."""
    submit = SYSTEMS[system][1]
    if shutil.which(submit) is None:
        raise CleftchunkError(
            f"cluster={system} submits jobs with {submit}, which is not on PATH: run on the cluster's login "
            "node (or load its module), or leave out cluster to run on this machine"
        )


def worker_layout(options: Any) -> tuple[int, int]:
    """(worker processes per job, task threads per worker process)."""
    processes = options.gpus or options.workers or 1
    threads = options.threads or (2 if options.gpus else 1)  # as the local cluster's workers
    return processes, threads


def job_config(options: Any, security: Any, temp_dir: str | None) -> dict:
    """The keywords of the dask-jobqueue cluster class for ``options`` (nothing is submitted)."""
    import dask

    system = options.cluster
    gpu_directive = SYSTEMS[system][2]
    section = f"jobqueue.{system}"
    processes, threads = worker_layout(options)
    memory = job_memory(options)
    extra = list(dask.config.get(f"{section}.job-extra-directives", None) or []) + list(options.job_extra)
    skip = set(dask.config.get(f"{section}.job-directives-skip", None) or [])
    if system == "slurm" and any(d.lstrip().startswith(SLURM_MEMORY_PER) for d in extra):
        skip.add("--mem=")  # the line dask-jobqueue always writes; "--mem=" does not match --mem-per-*
    if options.gpus:
        extra.append(gpu_directive.format(gpus=options.gpus))
    # A worker's HTTP server (health, metrics; the dashboard with bokeh) listens on every interface
    # of the compute node, without TLS, unless told otherwise: loopback, and no dashboard.
    worker_args = list(dask.config.get(f"{section}.worker-extra-args", None) or []) + ["--dashboard-address", "127.0.0.1:0", "--no-dashboard"]
    if options.gpus:
        worker_args += ["--resources", "GPU=1"]
    prologue = list(dask.config.get(f"{section}.job-script-prologue", None) or [])
    prologue.append(f"export OMP_NUM_THREADS={threads}")  # torch threads of each worker = its task threads
    scheduler_options = dict(dask.config.get(f"{section}.scheduler-options", None) or {})
    scheduler_options["dashboard_address"] = "127.0.0.1:0"
    scheduler_options.setdefault("port", 0)
    if options.listen:
        scheduler_options["host"] = options.listen
    return dict(
        processes=processes, cores=processes * threads, memory=memory, job_extra_directives=extra,
        job_directives_skip=sorted(skip), worker_extra_args=worker_args, job_script_prologue=prologue,
        scheduler_options=scheduler_options, security=security, protocol="tls://" if security is not None else "tcp://",
        shared_temp_directory=temp_dir, silence_logs="error",
    )


def import_jobqueue():
    """``dask_jobqueue``, without the SIGINT handler its import installs (``dask_jobqueue.runner``:
    ``sys.exit()`` on Ctrl-C, which would end a run with status 0 and no "interrupted" message)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise CleftchunkError("--cluster needs dask-jobqueue: pip install 'cleftchunk[cluster]'") from None

    if threading.current_thread() is threading.main_thread() and previous is not None:
        signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def make_cluster(options: Any, security: Any, temp_dir: str | None):
    """The dask-jobqueue cluster (scheduler started, no job submitted yet)."""
    dask_jobqueue = import_jobqueue()
    check_submit_command(options.cluster)
    cls_name = SYSTEMS[options.cluster][0]
    try:
        return getattr(dask_jobqueue, cls_name)(**job_config(options, security, temp_dir))
    except ValueError as e:  # dask-jobqueue's checks of the job's settings (memory, cores, ...)
        raise CleftchunkError(f"cluster={options.cluster}: {str(e).splitlines()[0][:300]} (see jobqueue.yaml or job_extra)") from None


def job_script(options: Any, security: Any = None) -> str:
    """The script one job of ``options`` runs (to read, and for tests); submits nothing, but starts
    and stops a scheduler (dask-jobqueue writes its address into the script)."""
    with _private_dir(options) as temp_dir:
        cluster = make_cluster(options, security if security is not None else _security(options), temp_dir)
        try:
            return cluster.job_script()
        finally:
            _close(cluster)


@contextlib.contextmanager
def batch_client(options: Any, announce: bool = False, log: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` of ``options.jobs`` batch jobs; the jobs are cancelled at the end."""
    import dask
    from distributed import Client

    log = log or _stderr
    security = _security(options)
    if security is None:
        log("warning: --cluster-tcp: the Dask scheduler takes plain TCP connections from every machine that "
            "can reach this one, and runs their code as you (leave it out for TLS)")
    with _private_dir(options) as temp_dir, _interrupt_on_sigterm():
        cluster = make_cluster(options, security, temp_dir)
        try:
            _submit(cluster, options)
            ids = [str(job.job_id) for job in cluster.workers.values()]
            log(f"submitted {len(ids)} {options.cluster.upper()} job(s): {', '.join(ids)}; the run starts as their workers connect")
            # The dashboard listens on loopback: its link must not name the address compute nodes use.
            with Client(cluster, security=security) as client, dask.config.set({"distributed.dashboard.link": "http://127.0.0.1:{port}/status"}):
                if announce and client.dashboard_link:
                    print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
                with _notices_while_queued(client, options.cluster, ids, log):
                    yield client
        finally:
            ids = [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]
            _close(cluster)
            if ids:
                log(f"cancelled job(s) {', '.join(ids)}: the batch system lists a job ended this way as CANCELLED, "
                    "also when its work was done (not a failure)")


@contextlib.contextmanager
def _notices_while_queued(client: Any, system: str, ids: list[str], log: Callable[[str], None]) -> Iterator[None]:
    """Say, now and then, that no job has started a worker yet: a job can wait in the queue for
    hours (or for ever, asking for more than a partition has), and the run waits with it."""
    stop = threading.Event()
    ids = sorted(ids, key=lambda job: (len(job), job))  # as submitted: 999 before 1000
    status = SYSTEMS[system][3].format(ids=",".join(ids) if system in ("slurm", "lsf") else " ".join(ids))

    def watch() -> None:
        waited = 0.0
        for pause in itertools.chain(WAIT_NOTICES, itertools.repeat(WAIT_NOTICES[-1])):
            if stop.wait(pause):
                return
            waited += pause
            try:
                if client.scheduler_info().get("workers"):
                    return
            except (OSError, RuntimeError):  # the client closing
                return
            log(f"no worker has connected after {waited / 60:.0f} min: the job(s) still wait in the queue "
                f"(`{status}` says why); the run waits for them, Ctrl-C cancels them")

    thread = threading.Thread(target=watch, name="cleftchunk-queue-notices", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _close(cluster: Any) -> None:
    """Cancel the jobs, close the cluster, then the key files dask-jobqueue keeps open (their folder
    is removed next: closed later, at garbage collection, they would complain it is gone).

    The jobs are cancelled first, then marked closed: dask-jobqueue's ``Job.close`` runs scancel
    but leaves the job's status "running", and ``SpecCluster.close`` asserts that every worker it
    created that is still alive is closed or failed (an AssertionError, once the run is over). A
    refused job has nothing to cancel: it is marked failed."""
    from distributed.core import Status

    jobs = list(cluster.workers.values())
    for job in jobs:
        if not getattr(job, "job_id", None):
            job.status = Status.failed
    cluster.worker_spec.clear()
    try:
        cluster.sync(cluster._correct_state_internal)  # Job.close for each: the cancel command
    finally:
        for job in jobs:
            if job.status != Status.failed:
                job.status = Status.closed
        cluster.close()
        for name in ("_job_ca_file", "_job_cert", "_job_key"):
            handle = vars(cluster).pop(name, None)
            if handle is not None:
                with contextlib.suppress(FileNotFoundError):
                    handle.close()


def _submit(cluster: Any, options: Any) -> None:
    """Submit ``options.jobs`` jobs now, waiting for the submit commands, so that a refused job is
    an error here. (``cluster.scale`` submits them later, on the event loop, where a refusal is
    only a log line and the run waits for workers that never come.) One worker spec is one job."""
    for _ in range(options.jobs):
        cluster.worker_spec.update(cluster.new_worker_spec())
    try:
        cluster.sync(cluster._correct_state_internal)
    except RuntimeError as e:  # dask-jobqueue: the submit command exited non-zero
        text = str(e)
        said = text.split("stderr:", 1)[-1].strip().splitlines() if "stderr:" in text else []
        reason = (said or text.splitlines() or ["no output"])[0][:300]
        raise CleftchunkError(
            f"the batch system refused a job ({SYSTEMS[options.cluster][1]}: {reason}): check the queue, account, "
            "walltime and memory (jobqueue.yaml, job_memory, job_extra)"
        ) from None


def _security(options: Any) -> Any:
    """The TLS credentials of the scheduler and workers: the given ones, or temporary ones."""
    if options.cluster_tcp:
        return None
    if options.security is not None:
        return options.security
    from distributed import Security

    try:
        return Security.temporary()
    except ImportError:  # cryptography makes the certificates
        raise CleftchunkError("--cluster's temporary TLS certificates need cryptography: pip install 'cleftchunk[cluster]'") from None


@contextlib.contextmanager
def _private_dir(options: Any) -> Iterator[str]:
    """A new folder only this user can read, in the shared temp directory (default: home), for
    the temporary keys dask-jobqueue hands the workers; removed with everything in it at the end."""
    import dask

    base = dask.config.get(f"jobqueue.{options.cluster}.shared-temp-directory", None) or "~"
    base = os.path.expanduser(os.path.expandvars(base))
    try:
        path = tempfile.mkdtemp(prefix=".cleftchunk-tls-", dir=base)  # mode 0o700
    except OSError as e:
        raise CleftchunkError(
            f"cannot create a private folder for the cluster's temporary keys in {base} ({e.strerror}): set "
            f"shared-temp-directory in the jobqueue.{options.cluster} section of jobqueue.yaml to a folder compute nodes can read"
        ) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, or this command's own job being cancelled) ends the run as Ctrl-C does, so
    that the jobs are cancelled on the way out; by default Python would exit without cleaning up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
