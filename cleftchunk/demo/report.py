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
from typing import Sequence

import numpy as np

GT_COLOUR = np.array([0, 220, 0], dtype=np.float32)  # ground truth: green
PRED_COLOUR = np.array([230, 0, 230], dtype=np.float32)  # prediction: magenta (overlap reads white)


def overlay_section(raw: np.ndarray, gt: np.ndarray | None = None, pred: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image of one raw section with boolean masks blended on top."""
    rgb = np.repeat(raw.astype(np.float32)[..., None], 3, axis=-1)
    for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        if mask is not None and mask.any():
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


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
