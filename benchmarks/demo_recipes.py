"""Compare training recipes for the demo at a reduced size: one recipe per call, its held-out metrics,
CPU-seconds and the machine's load appended to benchmarks/results/demo-experiments.md.

    python benchmarks/demo_recipes.py NAME '{"iterations": 200, "near_cleft": 0.5}' [--data DIR]

The samples (the default demo's, synthesized once into --data) are reused by every recipe; each
recipe runs the demo's own train (with its operating-point choice), predict, segment and evaluate
stages. CPU-seconds (this process and its children) are the comparable figure on a loaded machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import time
from pathlib import Path

from cleftchunk.demo.pipeline import Demo, DemoSettings

HERE = Path(__file__).resolve().parent
LOG = HERE / "results" / "demo-experiments.md"


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def prepared_data(folder: Path, settings: DemoSettings) -> Path:
    """Synthesized and converted samples of ``settings`` (made once)."""
    if not (folder / "data" / "test.zarr").exists():
        demo = Demo(folder, settings, overwrite=True)
        for name in ("synthesize", "convert"):
            with demo.stage(name) as detail:
                getattr(demo, name)(detail)
    return folder / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("overrides", help="JSON object of DemoSettings fields")
    parser.add_argument("--data", default=str(HERE / "_data" / "demo-samples"))
    parser.add_argument("--work", default=str(HERE / "_data" / "demo-recipes"))
    args = parser.parse_args()
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.overrides).items()}
    settings = dataclasses.replace(DemoSettings(), **overrides)
    data = prepared_data(Path(args.data), dataclasses.replace(DemoSettings(), seed=settings.seed))
    folder = Path(args.work) / args.name
    shutil.rmtree(folder, ignore_errors=True)
    demo = Demo(folder, settings, overwrite=True)
    shutil.copytree(data, demo.data)
    load_before = os.getloadavg()
    start, cpu = time.perf_counter(), cpu_seconds()
    times = {}
    for name in ("train", "predict", "segment", "evaluate"):
        stage_start, stage_cpu = time.perf_counter(), cpu_seconds()
        with demo.stage(name) as detail:
            getattr(demo, name)(detail)
        times[name] = (time.perf_counter() - stage_start, cpu_seconds() - stage_cpu)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    model, baseline = demo.results["model"], demo.results["baseline"]
    point = demo.results["operating_point"]
    train = demo.records["train"].detail
    line = (
        f"| {args.name} | `{json.dumps(json.loads(args.overrides))}` | {settings.iterations} | "
        f"{times['train'][1]:.0f} ({times['train'][1] / settings.iterations:.2f}/it) | {cpu:.0f} (wall {wall:.0f}) | "
        f"t={point['threshold']} m={point['min_size']} val {point['validation']['cremi_score']:.1f}/{point['validation']['f1']:.3f} | "
        f"{_f(model.get('cremi_score'))} / {_f(model.get('f1'), 3)} | {_f(baseline.get('cremi_score'))} / {_f(baseline.get('f1'), 3)} | "
        f"{load_before[0]:.1f}→{os.getloadavg()[0]:.1f} | {train.get('cpu_layout', {}).get('threads', settings.threads)} |"
    )
    print(line)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    if not LOG.exists():
        LOG.write_text(HEADER)
    with LOG.open("a") as f:
        f.write(line + "\n")


def _f(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


HEADER = """## Demo training recipes (benchmarks/demo_recipes.py)

Each row: one recipe on the default demo's samples (train 48×512×512 seed 0, its last 8 sections held
out for the operating point; test 32×512×512 seed 1), run under `nice -n 10` on the shared 2-core
machine while other sessions ran tests (load average before→after in the row). CPU-s: this process
and its children. Operating point: threshold t (of 255) and minimum size m chosen on the validation
region (its CREMI score / F1 there). Held-out: CREMI score (nm) / F1 on the test sample.

| name | overrides | iterations | train CPU-s (incl. operating point) | all CPU-s | operating point (validation) | model held-out | baseline held-out | load | threads |
|---|---|---|---|---|---|---|---|---|---|
"""


if __name__ == "__main__":
    main()
