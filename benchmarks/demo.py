"""The README's first command, measured: ``cleftchunk demo`` (default CPU setting) end to end.

    python benchmarks/demo.py                  # the default demo; writes benchmarks/results/demo.md
    python benchmarks/demo.py --size quick --iterations 6 --output /tmp/demo-check.md   # a check
    python benchmarks/demo.py --fresh-clone    # the README's first command verbatim, in a fresh clone

``--fresh-clone`` clones this repository's committed HEAD into a new folder and runs the README's
first command there with bash, exactly as written (venv, both pip installs from the machine's
package index, then the demo), so its time includes the install a new user waits for.

Runs the command in a fresh process (as a user would, in a new folder), and records its wall time
and peak memory (process tree), the time of every stage from the demo's own ``demo.json``, the
machine's load average before, during (sampled every 5 s: mean and max of the 1-minute figure) and
after, the CPU layout the demo measured for training, and the held-out metrics of the model and the
threshold baseline. The figure in docs/demo.md must come from this script on an otherwise idle
machine: the 1-minute load average before the run says whether it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from pathlib import Path

from _common import DATA_DIR, RESULTS_DIR, machine_info, markdown_table, measure

METRICS = [("CREMI score (nm)", "cremi_score"), ("ADGT (nm)", "adgt"), ("ADF (nm)", "adf"), ("precision", "precision"),
           ("recall", "recall"), ("F1", "f1"), ("false positives", "fp"), ("false negatives", "fn")]


class LoadSampler:
    """The 1-minute load average every ``interval`` seconds while the demo runs."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.values = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.values.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(size: str, iterations: int | None, folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, "-m", "cleftchunk_cli.main", "demo", str(folder), "--size", size]
    if iterations:
        argv += ["--iterations", str(iterations)]
    before = os.getloadavg()
    with LoadSampler() as load:
        measured = measure(argv, poll_s=0.2)
    after = os.getloadavg()
    state = json.loads((folder / "demo.json").read_text())
    during = load.values or [after[0]]
    return {
        "argv": argv[3:], "seconds": measured.seconds, "peak_mib": measured.peak_rss_mib, "state": state,
        "load": {"before": before, "after": after, "during_mean": sum(during) / len(during), "during_max": max(during)},
    }


def readme_first_command(readme: Path) -> str:
    """The command under the README's "# 1." comment in its first bash block."""
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# 1."))
    return lines[start + 1].strip()


def run_fresh_clone(folder: Path) -> dict:
    """The README's first command in a fresh clone of HEAD: wall time including the install."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(root), str(folder)], check=True)
    command = readme_first_command(folder / "README.md")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "/.venv/" not in p + "/")
    before = os.getloadavg()
    with LoadSampler() as load:
        measured = measure(["bash", "-c", command], env=env, whole_env=True, cwd=str(folder), poll_s=0.5)
    after = os.getloadavg()
    output = command.rsplit(" ", 1)[-1]
    state = json.loads((folder / output / "demo.json").read_text())
    during = load.values or [after[0]]
    return {
        "argv": ["(README first command)"], "command": command, "seconds": measured.seconds, "peak_mib": measured.peak_rss_mib,
        "state": state, "load": {"before": before, "after": after, "during_mean": sum(during) / len(during), "during_max": max(during)},
    }


def fragment(result: dict) -> str:
    state, load = result["state"], result["load"]
    settings, stages, results = state["settings"], state["stages"], state["results"]
    train = stages.get("train", {}).get("detail", {})
    layout = train.get("cpu_layout", {})
    stage_rows = [[name, f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:,.0f}"] for name, r in stages.items()]
    model, baseline = results.get("model", {}), results.get("baseline", {})
    point = results.get("operating_point", {})
    metric_rows = [[label, _fmt(model.get(key)), _fmt(baseline.get(key))] for label, key in METRICS]
    what = (f"Command: the README's first command in a fresh clone, `{result['command']}` (install included)"
            if "command" in result else f"Command: `cleftchunk {' '.join(result['argv'])}` (fresh folder)")
    lines = [
        f"{what}. **Whole command: {result['seconds']:.0f} s wall "
        f"({result['seconds'] / 60:.1f} min)**, peak {result['peak_mib']:,.0f} MiB (process tree RSS).",
        "",
        f"Load average (1/5/15 min) before: {_load(load['before'])}; during (1-min, sampled every 5 s): mean "
        f"{load['during_mean']:.2f}, max {load['during_max']:.2f}; after: {_load(load['after'])}. "
        f"The machine counts as idle when the 1-minute figure before the run is below 0.5.",
        "",
        f"Settings: {json.dumps(settings)}",
        "",
        (f"Training CPU layout measured by the demo: {layout['threads']} torch threads + {layout['workers']} loader "
         f"workers (measured: {json.dumps(layout['measured'])})" if layout else
         f"Training CPU layout set by the size: {settings.get('threads')} torch threads + {settings.get('loader_workers')} loader workers")
        + f"; training itself {train.get('train_seconds', float('nan')):.1f} s "
        f"({train.get('train_seconds', float('nan')) / max(settings['iterations'], 1):.2f} s per iteration), "
        f"operating point {train.get('operating_point_seconds', float('nan')):.1f} s.",
        "",
        markdown_table(["stage", "seconds", "peak MiB"], stage_rows),
        "",
        f"Held-out metrics (θ = 200 nm); model at p ≥ {point.get('threshold')}/255, clefts ≥ {point.get('min_size')} voxels "
        + f"{'(at the edge of the thresholds tried) ' if point.get('at_edge') else ''}"
        + f"and baseline raw ≤ {results.get('baseline_threshold')}, both chosen on the validation sample:",
        "",
        markdown_table(["metric", "trained unetv0", "threshold baseline"], metric_rows),
    ]
    ratio = _ratio(model.get("cremi_score"), baseline.get("cremi_score"))
    f1_ratio = _ratio(model.get("f1"), baseline.get("f1"))
    lines += ["", f"Model / baseline: CREMI score ×{ratio}, F1 ×{f1_ratio} (targets: ≤ 0.5 and ≥ 2)."]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if isinstance(value, int) else f"{value:.3g}"


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu", choices=["quick", "cpu", "gpu"])
    parser.add_argument("--iterations", type=int, help="override the size's training iterations (checks only)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "demo.md"))
    parser.add_argument("--folder", default=str(DATA_DIR / "demo-run"))
    parser.add_argument("--fresh-clone", action="store_true", help="the README's first command in a fresh clone (install included)")
    args = parser.parse_args()
    if args.fresh_clone:
        folder = Path(args.folder).with_name("fresh-clone") if args.folder == str(DATA_DIR / "demo-run") else Path(args.folder)
        result = run_fresh_clone(folder)
        title = "The README's first command in a fresh clone: install and `cleftchunk demo`"
        if args.output == str(RESULTS_DIR / "demo.md"):
            args.output = str(RESULTS_DIR / "demo-fresh-clone.md")
    else:
        result = run(args.size, args.iterations, Path(args.folder))
        title = "The demo: `cleftchunk demo` end to end" + ("" if args.size == "cpu" and not args.iterations else f" ({args.size} check)")
    body = f"## {title}\n\nMachine: {machine_info()}\n\n{fragment(result)}\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(body)
    print(body)
    print(f"wrote {args.output}; raw record: {args.folder}/demo.json, report: {args.folder}/report.html")


if __name__ == "__main__":
    main()
