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
def test_demo_chooses_the_operating_point_on_the_whole_training_sample(finished_demo):
    """By default, like the baseline's threshold: the stored entry names no region (all of it)."""
    folder, _ = finished_demo
    state = json.loads((folder / "demo.json").read_text())
    assert state["results"]["operating_point"]["chosen_on"]["roi"] is None
    assert "whole sample" in (folder / "report.md").read_text()


def test_operating_point_region_is_a_setting(tmp_path):
    from dataclasses import replace

    from cleftchunk.demo.pipeline import Demo
    from cleftchunk.errors import CleftchunkError

    quick = DemoSettings.named("quick")
    held = Demo(tmp_path / "a", replace(quick, operating_point_on="held-out"))
    config = held.train_config()
    assert held.operating_point_roi(config) == config["validate_roi"] == f"{quick.train_shape[0] - quick.validation_sections}:{quick.train_shape[0]},:,:"
    assert Demo(tmp_path / "b", quick).operating_point_roi(config) is None
    with pytest.raises(CleftchunkError, match="operating_point_on 'test'"):
        Demo(tmp_path / "c", replace(quick, operating_point_on="test")).train_config()


def test_operating_point_thresholds_stop_at_the_setting(tmp_path):
    from dataclasses import replace

    from cleftchunk.demo.pipeline import Demo
    from cleftchunk.errors import CleftchunkError

    quick = DemoSettings.named("quick")
    assert max(Demo(tmp_path / "a", quick).operating_point_thresholds()) == quick.operating_point_max == 240
    assert max(Demo(tmp_path / "b", replace(quick, operating_point_max=255)).operating_point_thresholds()) == 254
    with pytest.raises(CleftchunkError, match="operating_point_max 300"):
        Demo(tmp_path / "c", replace(quick, operating_point_max=300)).train_config()
