"""The demo report: overlays put colours where the masks are; the writer links every figure."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cleftchunk.demo.report import Report, Table, curve_png, overlay_section, section_panel_png, sections_with_most, smooth


def test_overlay_colours_only_masked_pixels():
    raw = np.full((4, 5), 100, np.uint8)
    gt = np.zeros((4, 5), bool)
    gt[1, 1] = True
    pred = np.zeros((4, 5), bool)
    pred[2, 3] = True
    rgb = overlay_section(raw, gt, pred)
    assert rgb.shape == (4, 5, 3)
    assert tuple(rgb[0, 0]) == (100, 100, 100)
    assert rgb[1, 1, 1] > rgb[1, 1, 0]  # green dominates on ground truth
    assert rgb[2, 3, 0] > rgb[2, 3, 1] and rgb[2, 3, 2] > rgb[2, 3, 1]  # magenta on prediction


def test_sections_with_most_prefers_busy_sections():
    mask = np.zeros((6, 3, 3), bool)
    mask[4] = True
    mask[1, 0, 0] = True
    assert sections_with_most(mask, 2) == [1, 4]
    assert len(sections_with_most(np.zeros((6, 3, 3), bool), 3)) == 3


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth([1, 3, 5, 7], 2), [1, 2, 4, 6])


def test_report_writes_html_markdown_and_figures(tmp_path):
    raw = (np.arange(2 * 16 * 16) % 255).astype(np.uint8).reshape(2, 16, 16)
    gt = raw > 200
    panel = section_panel_png(tmp_path / "figures" / "panel.png", raw, gt, gt, [0, 1])
    curve = curve_png(tmp_path / "figures" / "loss.png", {"loss": ([1, 2, 3], [1.0, 0.5, 0.25])}, "iteration", "loss")
    assert Image.open(panel).size[0] == 2 * 16 + 8
    report = Report("run")
    report.add("Metrics", Table(["metric", "value"], [["CREMI score", 12.3456], ["FP", 1234], ["ADF", float("inf")]]))
    report.add("Figures", panel, curve, "a paragraph & more")
    md, page = report.write(tmp_path)
    text = md.read_text()
    assert "| CREMI score | 12.3 |" in text and "| FP | 1,234 |" in text and "∞" in text
    assert "figures/panel.png" in text and "figures/loss.png" in page.read_text()
    assert "a paragraph &amp; more" in page.read_text()
