"""A visual report of a run: PNG figures plus the same content as HTML and Markdown.

Figures are drawn with pillow (section overlays) and matplotlib (curves), headless. The report
is self-contained in its folder: ``report.html``, ``report.md`` and ``figures/*.png``.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cleftchunk.figures import overlay
from cleftchunk.train.loss import loss_name

GT_COLOUR = np.array([0, 220, 0], dtype=np.float32)  # ground truth: green
PRED_COLOUR = np.array([230, 0, 230], dtype=np.float32)  # prediction: magenta (overlap reads white)


def overlay_section(raw: np.ndarray, gt: np.ndarray | None = None, pred: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image of one raw section with boolean masks blended on top."""
    return overlay(raw, ((gt, GT_COLOUR), (pred, PRED_COLOUR)), alpha)


def section_panel_png(
    path: Path,
    raw: np.ndarray,
    gt: np.ndarray | None,
    pred: np.ndarray | None,
    sections: Sequence[int],
    max_width: int = 1600,
    others: Sequence[np.ndarray] = (),
) -> Path:
    """Several z-sections side by side: raw, then raw with GT (green) and prediction (magenta),
    then the same for each of ``others`` (further predictions, compared on the same sections)."""
    from PIL import Image

    rows = []
    for z in sections:
        columns = [overlay_section(raw[z])]
        for p in (pred, *others):
            columns.append(overlay_section(raw[z], None if gt is None else gt[z], None if p is None else p[z]))
        gap = np.full((raw.shape[1], 8, 3), 255, np.uint8)
        rows.append(np.concatenate([c for column in columns for c in (column, gap)][:-1], axis=1))
    hgap = np.full((8, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([r for row in rows for r in (row, hgap)][:-1], axis=0)
    image = Image.fromarray(grid)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def sections_with_most(mask: np.ndarray, count: int = 3) -> list[int]:
    """The z-sections with the most foreground voxels (fall back to evenly spaced ones)."""
    per_section = mask.reshape(mask.shape[0], -1).sum(axis=1)
    order = [int(z) for z in np.argsort(-per_section, kind="stable") if per_section[z] > 0]
    if len(order) < count:
        order += [int(z) for z in np.linspace(0, mask.shape[0] - 1, count).round() if int(z) not in order]
    return sorted(order[:count])


def curve_png(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, log_y: bool = False) -> Path:
    """A line plot of named (x, y) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, (x, y) in series.items():
        # A series of one point (e.g. a chosen operating point) is drawn as a marker.
        ax.plot(x, y, label=name, linewidth=1.2, marker="o" if len(x) == 1 else None, markersize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def format_value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if math.isinf(value):
            return "∞"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Table:
    header: list[str]
    rows: list[list[object]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(format_value(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(format_value(c))}</td>" for c in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Report:
    title: str
    sections: list[tuple[str, list[object]]] = field(default_factory=list)

    def add(self, heading: str, *items: object) -> None:
        """Items: str (a paragraph), Table, or Path (a figure, relative to the report folder)."""
        self.sections.append((heading, list(items)))

    def write(self, folder: Path) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md = [f"# {self.title}", ""]
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for heading, items in self.sections:
            md += [f"## {heading}", ""]
            body.append(f"<h2>{html.escape(heading)}</h2>")
            for item in items:
                if isinstance(item, Table):
                    md += [item.markdown(), ""]
                    body.append(item.html())
                elif isinstance(item, Path):
                    rel = Path(os.path.relpath(item, folder))
                    md += [f"![{rel.stem}]({rel.as_posix()})", ""]
                    body.append(f'<figure><img src="{html.escape(rel.as_posix())}" alt="{html.escape(rel.stem)}"></figure>')
                else:
                    md += [str(item), ""]
                    body.append(f"<p>{html.escape(str(item))}</p>")
        style = (
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "th{background:#f3f3f3}img{max-width:100%}"
        )
        page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
        md_path, html_path = folder / "report.md", folder / "report.html"
        md_path.write_text("\n".join(md))
        html_path.write_text(page)
        return md_path, html_path


# -- the report -------------------------------------------------------------------------
METRIC_ROWS = [
    ("CREMI score (nm, lower is better)", "cremi_score"),
    ("ADGT (nm)", "adgt"),
    ("ADF (nm)", "adf"),
    ("false positives at θ", "fp"),
    ("false negatives at θ", "fn"),
    ("precision within θ", "precision"),
    ("recall within θ", "recall"),
    ("F1 within θ", "f1"),
]


def write_demo_report(demo: Any) -> Path:
    """The demo's report.md / report.html from its finished stages (a :class:`cleftchunk.demo.pipeline.Demo`)."""
    from cleftchunk.labels import CREMI_BACKGROUND
    from cleftchunk.io.volumes import open_volume

    figures = demo.folder / "figures"
    s = demo.settings
    report = Report("cleftchunk demo: synthetic CREMI-like sample, held-out evaluation")
    point = demo.results.get("operating_point", {})
    layout = demo.records["train"].detail.get("cpu_layout") if "train" in demo.records else None
    report.add(
        "What ran",
        f"Training sample {_shape(s.train_shape)} (synthesis seed {demo.sample_seed('train')}), validation sample "
        f"{_shape(s.validate_shape)} (seed {demo.sample_seed('validate')}: the model's operating point), held-out test "
        f"sample {_shape(s.test_shape)} (seed {demo.sample_seed('test')}), difficulty {s.difficulty}; unetv0 preset '{s.preset}', input {_shape(s.input_size)}, "
        f"{s.iterations} iterations of batch {s.batch_size} on {s.device} ({s.optimizer}, {s.scheduler} schedule, "
        f"{loss_name(s.dice, s.max_weight)}, lr {s.lr:g}; {s.near_cleft:.0%} of the crops centred on a cleft voxel, the others uniform draws, "
        f"{'all kept' if s.keep_p >= 1 else f'kept with probability {s.keep_p:g} when they hold no cleft'})"
        + (f"; {layout['threads']} torch threads + {layout['workers']} loader workers, measured fastest here" if layout else "")
        + ".",
    )

    model, baseline = demo.results.get("model", {}), demo.results.get("baseline", {})
    rows = [[label, model.get(key), baseline.get(key)] for label, key in METRIC_ROWS]
    model_name = f"trained unetv0: p ≥ {point.get('threshold')}/255, clefts ≥ {point.get('min_size')} voxels"
    report.add(
        "Held-out CREMI cleft metrics (θ = 200 nm)",
        Table(["metric", model_name, f"baseline: raw ≤ {demo.results.get('baseline_threshold')}"], rows),
        "The model's operating point and the baseline's threshold were both chosen on the validation "
        "sample; the test sample was never used to choose anything.",
    )
    standing = seed_sweep_standing(s, model.get("cremi_score"), baseline.get("cremi_score"), model.get("f1"), baseline.get("f1"))
    if standing:
        report.add("This run among the measured seeds", standing)

    raw = open_volume(demo.sample_zarr("test") / "raw")[:]
    gt = open_volume(demo.sample_zarr("test") / "clefts")[:] != CREMI_BACKGROUND
    pred = open_volume(demo.results_zarr / "clefts")[:] != CREMI_BACKGROUND
    base = open_volume(demo.results_zarr / "baseline")[:] != 0
    panel = section_panel_png(figures / "sections.png", raw, gt, pred, sections_with_most(gt, 3), others=[base])
    report.add(
        "Test sections: model and baseline side by side",
        "Left: raw. Middle: the trained model. Right: the threshold baseline. Ground-truth clefts in green, "
        "predicted clefts in magenta (white where both).",
        panel,
    )

    if point.get("thresholds"):
        curve = [r for r in point["thresholds"] if r.get("precision") is not None and r.get("recall") is not None]
        chosen = point["validation"]
        region = "validation sample"
        pr = curve_png(
            figures / "precision-recall.png",
            {
                "thresholds (min size 0)": ([r["recall"] for r in curve], [r["precision"] for r in curve]),
                f"chosen: p ≥ {point['threshold']}/255, ≥ {point['min_size']} voxels": ([chosen["recall"]], [chosen["precision"]]),
            },
            f"recall within θ ({region})",
            "precision within θ",
        )
        rows = [[r["threshold"], r["min_size"], r["cremi_score"], r["precision"], r["recall"], r["f1"]]
                for r in point["thresholds"] + point["min_sizes"]]
        report.add(
            f"Operating point ({region})",
            f"Chosen: threshold {point['threshold']} of 255 and minimum cleft size {point['min_size']} voxels. "
            + operating_point_rule(point)
            + " It is stored in the checkpoint; predict records it and segment uses it by default.",
            pr,
            Table(["threshold", "min size", "CREMI score (nm)", "precision", "recall", "F1"], rows),
        )

    steps, losses = training_losses(demo.folder / "runs")
    if steps:
        curve = curve_png(
            figures / "loss.png",
            {"loss": (steps, losses), "moving mean": (steps, smooth(losses, 10))},
            "iteration",
            f"training loss ({loss_name(demo.settings.dice, demo.settings.max_weight)})",
        )
        report.add("Training loss", curve)

    test_raw, results = demo.sample_zarr("test") / "raw", demo.results_zarr
    report.add(
        "Look at the volumes",
        "In a local neuroglancer viewer (on 127.0.0.1; `pip install \"cleftchunk[view]\"`): "
        f"`cleftchunk view {test_raw} --prediction {results / 'pred'} --clefts {results / 'clefts'}` "
        "(add `--screenshot view.png` for a picture). napari reads the same OME-Zarr images.",
    )
    stage_rows = [
        [r.name, round(r.seconds, 1), round(r.peak_rss_mib), _stage_note(r)] for r in demo.records.values()
    ]
    report.add("Stages: time and peak memory (process tree RSS)", Table(["stage", "seconds", "peak MiB", "notes"], stage_rows))
    md, page = report.write(demo.folder)
    return page


def operating_point_rule(point: dict) -> str:
    """How the threshold was chosen, and whether it lies on the edge of the thresholds tried."""
    tried = [r["threshold"] for r in point["thresholds"]]
    tolerance = point.get("tolerance", 0)
    text = (f"Thresholds {min(tried)}–{max(tried)} were scored at minimum size 0; "
            + (f"those within {tolerance:.0%} of the lowest CREMI score ({point['lowest_threshold']}) were "
               f"{', '.join(map(str, point['near_best']))}, and the middle one was taken"
               if tolerance and "near_best" in point else "the lowest CREMI score was taken")
            + "; then minimum sizes at that threshold.")
    if point.get("at_edge"):
        text += (f" **The chosen threshold is at the edge of the range tried ({min(tried)}–{max(tried)})**: "
                 "the model's best threshold on other data may lie beyond it.")
    return text


def seed_sweep_standing(settings: Any, cremi: Any, baseline_cremi: Any, f1: Any, baseline_f1: Any) -> str | None:
    """Where this run's model/baseline ratios fall among the seeds measured by benchmarks/demo_seeds.py
    (``seed_sweep.json`` beside this module); None when that sweep used other settings."""
    import json
    import statistics

    path = Path(__file__).with_name("seed_sweep.json")
    if not path.exists() or None in (cremi, baseline_cremi, f1, baseline_f1) or not baseline_cremi or not baseline_f1:
        return None
    sweep = json.loads(path.read_text())

    def recipe(values: dict) -> dict:  # what the seed and the machine's layout leave unchanged
        return {k: v for k, v in values.items() if k not in ("seed", "threads", "loader_workers")}

    if recipe(sweep["settings"]) != recipe(settings.as_dict()):
        return None
    ratio, f1_ratio = cremi / baseline_cremi, f1 / baseline_f1
    ratios = sorted(r["cremi_ratio"] for r in sweep["runs"])
    f1s = sorted(r["f1_ratio"] for r in sweep["runs"])
    median = statistics.median(ratios)
    better = sum(r > ratio for r in ratios)
    return (f"Over seeds {', '.join(str(r['seed']) for r in sweep['runs'])} of these settings ({sweep['machine']}, "
            f"{sweep['date']}), the model's CREMI score was {ratios[0]:.2f}–{ratios[-1]:.2f}× the baseline's "
            f"(median {median:.2f}×) and its F1 {f1s[0]:.2f}–{f1s[-1]:.2f}× the baseline's. This run: "
            f"CREMI ×{ratio:.2f}, F1 ×{f1_ratio:.2f} — its CREMI ratio is better than {better} of the "
            f"{len(ratios)} measured seeds" + (" (outside the measured range)" if not ratios[0] <= ratio <= ratios[-1] else "") + ".")


def training_losses(log_dir: Path) -> tuple[list[int], list[float]]:
    """The ``loss/train`` scalars of the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "loss/train" in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars("loss/train"):
                points[event.step] = event.value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _stage_note(record: Any) -> str:
    d = record.detail
    if record.name == "predict" and "voxels_per_s" in d:
        return f"{d['voxels_per_s'] / 1e6:.2f} Mvoxel/s, tiles run / grid = {d.get('tiles_ratio', float('nan')):.3g}"
    if record.name == "train" and "samples" in d:
        seconds = d.get("train_seconds", record.seconds)
        return (f"{d['samples'] / max(seconds, 1e-9):.2f} crops/s in {seconds:.0f} s of training"
                + (f"; operating point {d['operating_point_seconds']:.0f} s" if "operating_point_seconds" in d else ""))
    if record.name == "segment" and "components" in d:
        return f"{d['components']} clefts" + (f" (p ≥ {d['threshold']:g}/255, ≥ {d['min_size']} voxels)" if "threshold" in d else "")
    return ""


def _shape(shape: Any) -> str:
    return "×".join(str(int(v)) for v in shape)
