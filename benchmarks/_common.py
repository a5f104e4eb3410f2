"""Helpers shared by the benchmarks: machine description, measured subprocess runs, result fragments.

Every benchmark runs each contender in a fresh subprocess (so that peak memory is its own), and
repeats it; results are medians. Each benchmark writes ``benchmarks/results/<name>.md``;
``benchmarks/run`` assembles them into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DATA_DIR = HERE / "_data"  # scratch inputs, git-ignored


@dataclass
class Measurement:
    seconds: float
    peak_rss_mib: float  # peak of the summed RSS of the process and all its descendants
    stdout: str


def machine_info() -> str:
    """One line: CPU model, cores, memory, Python and key package versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for name in ("torch", "zarr", "dask", "numpy"):
        try:
            module = __import__(name)
            versions.append(f"{name} {module.__version__}")
        except ImportError:
            pass
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}; "
        f"{', '.join(versions)}; {_dt.date.today().isoformat()}"
    )


def measure(argv: list[str], env: dict | None = None, cwd: str | None = None, poll_s: float = 0.02,
            whole_env: bool = False) -> Measurement:
    """Run a command, sampling the summed RSS of its whole process tree; fail loudly if it fails.
    ``env`` is added to this process's environment, or with ``whole_env`` is the whole of it."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
        env=dict(env or {}) if whole_env else {**os.environ, **(env or {})},
    )
    peak = 0
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(poll_s)
    seconds = time.perf_counter() - start
    reader.join()
    text = "".join(out)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with exit {proc.returncode}:\n{text[-3000:]}")
    return Measurement(seconds, peak / 2**20, text)


def python_argv(code: str) -> list[str]:
    """argv that runs ``code`` in a fresh interpreter of the current environment."""
    return [sys.executable, "-c", code]


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_fragment(name: str, title: str, body: str) -> Path:
    """Write ``results/<name>.md``: a section of RESULTS.md with the machine and date."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(f"## {title}\n\nMachine: {machine_info()}\n\n{body.strip()}\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
