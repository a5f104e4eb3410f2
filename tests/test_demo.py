"""The demo end to end in its quick setting (the shorter setting CI runs), resume and refusals."""

from __future__ import annotations

import json

import pytest

from cleftchunk.demo import STAGES, DemoSettings


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    from click.testing import CliRunner

    from cleftchunk_cli.main import cli

    folder = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(cli, ["demo", str(folder), "--size", "quick", "--iterations", "6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return folder, result.output


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(finished_demo):
    folder, output = finished_demo
    state = json.loads((folder / "demo.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    assert state["stages"]["predict"]["detail"]["tiles_ratio"] == 1
    model, baseline = state["results"]["model"], state["results"]["baseline"]
    for result in (model, baseline):
        assert result["gt_voxels"] > 0
        assert result["cremi_score"] is None or result["cremi_score"] >= 0
    md = (folder / "report.md").read_text()
    assert "CREMI score" in md and "baseline: raw ≤" in md
    for figure in ("figures/sections.png", "figures/loss.png"):
        assert (folder / figure).stat().st_size > 1000
        assert f"({figure})" in md
    assert "report.html" in output


@pytest.mark.slow
def test_demo_resumes_finished_stages(finished_demo, run_cli):
    folder, _ = finished_demo
    result = run_cli("demo", folder, "--size", "quick", "--iterations", "6")
    assert result.output.count("done in an earlier run") == len(STAGES)


@pytest.mark.slow
def test_demo_refuses_other_settings_and_foreign_folders(finished_demo, run_cli, tmp_path):
    folder, _ = finished_demo
    result = run_cli("demo", folder, "--size", "quick", "--iterations", "7", expect=2)
    assert "--overwrite" in result.output
    (tmp_path / "mine.txt").write_text("precious")
    result = run_cli("demo", tmp_path, "--size", "quick", expect=2)
    assert "not a demo folder" in result.output
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_named_sizes():
    assert DemoSettings.named("quick").iterations < DemoSettings.named("cpu").iterations
    assert DemoSettings.named("gpu").preset == "default"
    with pytest.raises(Exception, match="unknown demo size"):
        DemoSettings.named("huge")


@pytest.mark.slow
def test_demo_chooses_the_operating_point_on_its_validation_sample(finished_demo):
    """Neither on the sample it was trained on nor on the test sample."""
    folder, _ = finished_demo
    state = json.loads((folder / "demo.json").read_text())
    chosen_on = state["results"]["operating_point"]["chosen_on"]
    assert chosen_on["image"].endswith("validate.zarr/raw") and chosen_on["roi"] is None
    seeds = {which: state["stages"]["synthesize"]["detail"][which]["seed"] for which in ("train", "validate", "test")}
    assert len(set(seeds.values())) == 3
    assert "validation sample" in (folder / "report.md").read_text()


def test_demo_seeds_share_no_sample(tmp_path):
    """Seeds 0–4 (the sweep of benchmarks/demo_seeds.py) synthesize 15 different samples."""
    from dataclasses import replace

    from cleftchunk.demo.pipeline import SAMPLES, Demo

    quick = DemoSettings.named("quick")
    seeds = [Demo(tmp_path / str(n), replace(quick, seed=n)).sample_seed(which) for n in range(5) for which in SAMPLES]
    assert len(set(seeds)) == 15


def test_operating_point_tolerance_is_checked(tmp_path):
    from dataclasses import replace

    from cleftchunk.demo.pipeline import Demo
    from cleftchunk.errors import CleftchunkError

    with pytest.raises(CleftchunkError, match="operating_point_tolerance 1.5"):
        Demo(tmp_path, replace(DemoSettings.named("quick"), operating_point_tolerance=1.5)).train_config()


def test_report_places_the_run_among_the_measured_seeds(tmp_path, monkeypatch):
    from cleftchunk.demo import report

    settings = DemoSettings.named("cpu")
    sweep = {"settings": settings.as_dict(), "machine": "2-core test", "date": "today",
             "runs": [{"seed": n, "cremi_ratio": r, "f1_ratio": 2.0} for n, r in enumerate((0.6, 0.7, 0.8))]}
    fake = tmp_path / "report.py"
    (tmp_path / "seed_sweep.json").write_text(json.dumps(sweep))
    monkeypatch.setattr(report, "__file__", str(fake))
    text = report.seed_sweep_standing(settings, 65.0, 100.0, 0.5, 0.25)
    assert "0.60–0.80×" in text and "median 0.70×" in text and "better than 2 of the 3" in text
    assert "outside" not in text
    assert "outside the measured range" in report.seed_sweep_standing(settings, 90.0, 100.0, 0.5, 0.25)
    from dataclasses import replace

    assert report.seed_sweep_standing(replace(settings, iterations=5), 65.0, 100.0, 0.5, 0.25) is None
