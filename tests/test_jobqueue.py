"""--cluster slurm|pbs|lsf|sge: batch jobs through dask-jobqueue, tested on a fake batch system
(tests/fake_batch/: sbatch & co. run the job script on this machine, in its own process group).

What is checked: predict and segment on two SLURM jobs give the bytes of a local run; every job
is gone afterwards, also after Ctrl-C or SIGTERM; the job script asks for the GPUs and speaks
TLS; both GPU workers get tasks (dask-jobqueue #304/#230); --mem-per-gpu drops the conflicting
--mem line; the temporary keys live in a private folder that is removed; every non-loopback
listener speaks TLS; a missing sbatch or a refused job is a one-line error."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import read, tissue, write_volume

from cleftchunk.errors import CleftchunkError
from cleftchunk.run.options import RunOptions

FAKE = Path(__file__).parent / "fake_batch"
sys.path.insert(0, str(FAKE))
from fake_batch import group_alive  # noqa: E402


@pytest.fixture
def batch(tmp_path, monkeypatch):
    """The fake batch system on PATH; returns its state folder. The keys' shared folder is tmp_path."""
    state = tmp_path / "batch"
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BATCH_DIR", str(state))
    monkeypatch.setenv("FAKE_BATCH_PYTHON", sys.executable)
    shared = tmp_path / "shared"
    shared.mkdir()
    import dask

    from cleftchunk.run.jobqueue import import_jobqueue

    import_jobqueue()  # its defaults join the config first (set() restores what it found)

    with dask.config.set({f"jobqueue.{s}.shared-temp-directory": str(shared) for s in ("slurm", "pbs", "lsf", "sge")}):
        yield state


def running_jobs(state: Path) -> list[str]:
    return [p.stem for p in state.glob("*.pid") if group_alive(int(p.read_text()))]


def jobs_gone(state: Path, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while running_jobs(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running_jobs(state)


@pytest.fixture
def checkpoint(tmp_path):
    from cleftchunk.model import arch_spec, build_model, save_checkpoint

    torch.manual_seed(0)
    net = build_model("unetv0", preset="small")
    return save_checkpoint(tmp_path / "small.pth", net, arch_spec(net), (4, 32, 32))


# -- the job script (nothing submitted) -------------------------------------------------------------
@pytest.mark.parametrize("system, directive", [("slurm", "#SBATCH --gres=gpu:2"), ("pbs", "#PBS -l ngpus=2"),
                                               ("lsf", '#BSUB -gpu "num=2"'), ("sge", "#$ -l gpu=2")])
def test_the_job_script_asks_for_the_gpus_and_speaks_tls(batch, system, directive):
    from cleftchunk.run.jobqueue import job_script

    script = job_script(RunOptions(cluster=system, jobs=3, gpus=2, job_memory="8GB"))
    assert directive in script
    worker = script.splitlines()[-1]
    assert " tls://" in worker and "--protocol tls://" in worker
    for option in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert option in worker
    assert "--resources GPU=1" in worker and "--nworkers 2" in worker  # one worker per GPU
    assert "--dashboard-address 127.0.0.1:0 --no-dashboard" in worker and "export OMP_NUM_THREADS=2" in script
    assert not list(batch.glob("*.sh")), "writing a job script submits nothing"


def test_mem_per_gpu_replaces_the_mem_line(batch):
    from cleftchunk.run.jobqueue import job_script

    plain = job_script(RunOptions(cluster="slurm", gpus=1, job_memory="8GB"))
    assert "#SBATCH --mem=" in plain
    per_gpu = job_script(RunOptions(cluster="slurm", gpus=1, job_memory="8GB", job_extra=("--mem-per-gpu=16G",)))
    assert "#SBATCH --mem-per-gpu=16G" in per_gpu and "#SBATCH --mem=" not in per_gpu


def test_plain_tcp_only_when_asked(batch):
    from cleftchunk.run.jobqueue import job_script

    script = job_script(RunOptions(cluster="slurm", job_memory="2GB", cluster_tcp=True))
    assert " tcp://" in script and "--tls-" not in script


# -- runs on the fake batch system ------------------------------------------------------------------
def test_plain_tcp_is_warned_about(batch):
    from cleftchunk.run.jobqueue import batch_client

    said = []
    with batch_client(RunOptions(cluster="slurm", job_memory="2GB", cluster_tcp=True), log=said.append) as client:
        assert client.scheduler_info()["address"].startswith("tcp://")
    assert said[0].startswith("warning: --cluster-tcp: ") and "runs their code as you" in said[0]
    assert jobs_gone(batch)


def test_jobs_waiting_in_the_queue_are_said_so_and_cancelled(batch, monkeypatch):
    """A job that never starts (more than a partition has, a long queue): the run says so now and
    then, naming the command that says why, instead of waiting without a word."""
    from cleftchunk.run import jobqueue

    monkeypatch.setenv("FAKE_BATCH_PENDING", "1")
    monkeypatch.setattr(jobqueue, "WAIT_NOTICES", (0.3, 0.6))
    said = []
    with jobqueue.batch_client(RunOptions(cluster="slurm", jobs=2, job_memory="2GB"), log=said.append):
        deadline = time.monotonic() + 20
        while sum("no worker has connected" in s for s in said) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    notices = [s for s in said if "no worker has connected" in s]
    assert len(notices) >= 2 and "`squeue -j 1000,1001` says why" in notices[0] and "Ctrl-C cancels them" in notices[0]
    assert sorted(p.read_text() for p in batch.glob("*.state")) == ["CANCELLED"] * 2


def _listening_tls_only(client, state: Path) -> None:
    """Every listener beyond loopback of this process and of the jobs answers a TLS handshake (a
    plain TCP server, e.g. an HTTP dashboard, does not)."""
    import psutil

    info = client.scheduler_info()
    assert info["address"].startswith("tls://")
    for address, worker in info["workers"].items():
        assert address.startswith("tls://") and worker.get("nanny", "tls://").startswith("tls://")
    groups = {int(p.read_text()) for p in state.glob("*.pid")}
    pids = {os.getpid()} | {p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups}
    listeners = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids and not _loopback(c.laddr.ip)}
    assert listeners
    for ip, port in listeners:
        assert _speaks_tls("127.0.0.1" if ip in ("0.0.0.0", "::") else ip, port), f"{ip}:{port} listens beyond loopback without TLS"


def _speaks_tls(host: str, port: int) -> bool:
    import socket
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            return bool(tls.getpeercert(binary_form=True))
    except (ssl.SSLError, OSError):
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


def test_both_gpu_workers_get_tasks_and_only_tls_listens_beyond_loopback(batch):
    """dask-jobqueue #304/#230: with worker resources, only one worker received tasks."""
    from distributed import get_worker

    def which(i):
        time.sleep(0.3)
        return get_worker().name

    options = RunOptions(cluster="slurm", jobs=2, gpus=1, job_memory="2GB")
    with options.client() as client:
        client.wait_for_workers(2, timeout=120)
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        _listening_tls_only(client, batch)
        names = client.gather([client.submit(which, i, resources={"GPU": 1}, pure=False) for i in range(12)])
        keys = list(Path(batch.parent / "shared").iterdir())
        assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o700  # the private folder of the keys
    assert len(set(names)) == 2, names
    assert jobs_gone(batch) and sorted(p.read_text() for p in batch.glob("*.state")) == ["CANCELLED"] * 2
    assert not list((batch.parent / "shared").iterdir()), "the temporary keys are removed"
    assert not list(Path.cwd().glob(".dask-jobqueue.*"))
    script = next(batch.glob("*.sh")).read_text()
    assert "--gres=gpu:1" in script and "--resources GPU=1" in script and "--tls-key" in script


@pytest.mark.slow
@pytest.mark.parametrize("system", ["pbs", "lsf", "sge"])
def test_pbs_lsf_and_sge_jobs_run_and_are_cancelled(batch, system):
    """The other systems' submit and cancel commands (fake qsub/qdel, bsub/bkill) as dask-jobqueue calls them."""
    options = RunOptions(cluster=system, jobs=2, job_memory="2GB")
    with options.client() as client:
        client.wait_for_workers(2, timeout=120)
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert jobs_gone(batch) and sorted(p.read_text() for p in batch.glob("*.state")) == ["CANCELLED"] * 2
    calls = (batch / "calls.log").read_text()
    submit, cancel = {"pbs": ("qsub", "qdel"), "lsf": ("bsub", "bkill"), "sge": ("qsub", "qdel")}[system]
    assert calls.count(f"{submit}") == 2 and calls.count(f"{cancel} ") == 2


@pytest.mark.slow
def test_predict_and_segment_on_slurm_jobs_give_the_local_bytes(batch, tmp_path, run_cli, checkpoint):
    raw = tissue((6, 40, 40), seed=6)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(2, 32, 32))
    common = ("--checkpoint", checkpoint, "--chunks", "2,32,32", "--block-shape", "2,32,32", "--no-progress")
    cluster = ("--cluster", "slurm", "--jobs", "2", "--job-memory", "2GB")
    err = run_cli("predict", spec, tmp_path / "jobs.zarr/pred", *common, *cluster).output
    assert "submitted 2 SLURM job(s)" in err and "CANCELLED" in err and "not a failure" in err
    assert jobs_gone(batch)
    run_cli("predict", spec, tmp_path / "local.zarr/pred", *common, "--workers", "0")
    np.testing.assert_array_equal(read(tmp_path / "jobs.zarr/pred"), read(tmp_path / "local.zarr/pred"))

    seg = ("--threshold", "100", "--chunks", "2,32,32", "--block-shape", "2,32,32")
    run_cli("segment", str(tmp_path / "local.zarr/pred"), "-o", tmp_path / "jobs-seg.zarr/c", *seg, *cluster)
    run_cli("segment", str(tmp_path / "local.zarr/pred"), "-o", tmp_path / "local-seg.zarr/c", *seg)
    from cleftchunk.io.volumes import open_volume

    jobs, local = open_volume(str(tmp_path / "jobs-seg.zarr/c")), open_volume(str(tmp_path / "local-seg.zarr/c"))
    assert local[:].any()
    np.testing.assert_array_equal(jobs[:], local[:])
    assert jobs_gone(batch) and len(list(batch.glob("*.sh"))) == 4


INTERRUPT = """
import os, signal, sys
from cleftchunk.run.executor import BLOCK_DONE_HOOKS
BLOCK_DONE_HOOKS.append(lambda task, block, report: report.written == 1 and os.kill(os.getpid(), signal.{sig}))
from cleftchunk_cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_run_cancels_its_jobs(batch, tmp_path, checkpoint, sig):
    raw = tissue((8, 40, 40), seed=3)
    spec = write_volume(tmp_path / "in.zarr" / "raw", raw, chunks=(2, 32, 32))
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT.format(sig=sig))
    proc = subprocess.run(
        [sys.executable, str(script), "predict", spec, str(tmp_path / "o.zarr/pred"), "--checkpoint", str(checkpoint),
         "--chunks", "2,32,32", "--block-shape", "2,32,32", "--no-progress", "--cluster", "slurm", "--jobs", "2",
         "--job-memory", "2GB"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 130, proc.stderr
    assert "error: interrupted" in proc.stderr and "cancelled job(s)" in proc.stderr
    assert list(batch.glob("*.sh")) and jobs_gone(batch)
    assert not list((tmp_path / "shared").iterdir())


# -- mistakes ----------------------------------------------------------------------------------------
def test_a_missing_sbatch_or_a_refused_job_is_a_one_line_error(batch, tmp_path, run_cli, checkpoint, monkeypatch):
    spec = write_volume(tmp_path / "in.zarr" / "raw", tissue((4, 32, 32)), chunks=(2, 32, 32))
    args = ("predict", spec, tmp_path / "o.zarr/pred", "-pm", checkpoint, "--cluster", "slurm", "--jobs", "2", "--job-memory", "2GB")
    with monkeypatch.context() as patch:
        patch.setenv("PATH", "/usr/bin:/bin")
        result = run_cli(*args, expect=2)
    assert "submits jobs with sbatch, which is not on PATH" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o.zarr").exists(), "checked before the output is created"
    result = run_cli(*args[:-2], expect=2)
    assert "needs the memory of a job: give --job-memory 32GB" in result.output and not (tmp_path / "o.zarr").exists()
    monkeypatch.setenv("FAKE_BATCH_REFUSE", "Invalid account or account/partition combination specified")
    result = run_cli(*args, expect=2)
    assert "the batch system refused a job (sbatch: " in result.output and "Invalid account" in result.output
    assert "Traceback" not in result.output and not running_jobs(batch)


def test_batch_options_need_cluster_and_exclude_scheduler(run_cli, tmp_path):
    with pytest.raises(CleftchunkError, match="give cluster=slurm"):
        RunOptions(jobs=2)
    with pytest.raises(CleftchunkError, match="starts its own scheduler"):
        RunOptions(cluster="slurm", scheduler="tls://127.0.0.1:8786")
    with pytest.raises(CleftchunkError, match="not a batch system"):
        RunOptions(cluster="condor")
    assert "2 SLURM job(s) of 4 GPU(s), one worker each" in RunOptions(cluster="SLURM", jobs=2, gpus=4).where()
    result = run_cli("segment", tmp_path / "p.zarr", "-o", tmp_path / "s.zarr", "--jobs", "2", expect=2)
    assert "give --cluster slurm" in result.output and result.output.count("\n") == 1


def test_memory_of_a_job_is_required(batch):
    from cleftchunk.run.jobqueue import job_script

    with pytest.raises(CleftchunkError, match="needs the memory of a job: give job_memory=32GB"):
        job_script(RunOptions(cluster="slurm"))


def test_a_dry_run_submits_nothing(batch, tmp_path, run_cli, checkpoint):
    spec = write_volume(tmp_path / "in.zarr" / "raw", tissue((4, 32, 32)), chunks=(2, 32, 32))
    result = run_cli("predict", spec, tmp_path / "o.zarr/pred", "-pm", checkpoint, "--cluster", "slurm", "--jobs", "2",
                     "--job-memory", "2GB", "--dry-run")
    assert "2 SLURM job(s)" in result.output and not batch.exists()


def test_train_on_a_cluster_is_refused_with_the_way_to_do_it(run_cli):
    result = run_cli("train", "--cluster", "slurm", "-g", "4", "--nodes", "2", expect=2)
    assert "not built yet" in result.output and "sbatch" in result.output and result.output.count("\n") == 1
