"""The whole pipeline on synthetic data, with a report: :mod:`.pipeline` runs the stages,
:mod:`.baseline` is the intensity-threshold baseline, :mod:`.report` writes HTML and Markdown."""

from cleftchunk.demo.pipeline import STAGES, DemoSettings, run_demo

__all__ = ["STAGES", "DemoSettings", "run_demo"]
