"""One run vocabulary: every block-wise command shows the same run options with the same text."""

from __future__ import annotations

import pytest

from cleftchunk_cli.main import cli
from cleftchunk_cli.options import RUN_HELP

BLOCKWISE = ["predict", "segment", "evaluate", "convert", "synth", "export", "threshold"]
SHARED = ["workers", "threads", "scheduler", "listen", "tls_ca_file", "tls_cert", "tls_key", "block_shape", "dry_run",
          "overwrite", "progress", "retries"]


def _options(name: str) -> dict:
    command = cli.get_command(None, name)
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("name", BLOCKWISE)
def test_every_blockwise_command_has_the_run_options_with_the_same_help(name):
    options = _options(name)
    for key in SHARED:
        assert key in options, f"{name} lacks --{key.replace('_', '-')}"
        assert options[key].help == RUN_HELP[key], f"{name} --{key}: other help text"
        assert options[key].opts == _options("threshold")[key].opts


def test_gpus_only_where_a_model_runs():
    assert _options("predict")["gpus"].help == RUN_HELP["gpus"]
    assert [n for n in BLOCKWISE if "gpus" in _options(n)] == ["predict"]


def test_no_command_has_its_own_processes_or_quiet_flag():
    for name in BLOCKWISE:
        assert not {"processes", "quiet", "cpus_scheduler"} & set(_options(name)), name


def test_train_has_no_scheduler_option_in_its_help(run_cli):
    result = run_cli("train", "--help")
    assert "--scheduler" not in result.output and "--lr-schedule" in result.output


def test_train_scheduler_names_its_new_spelling(run_cli):
    result = run_cli("train", "--scheduler", "cosine", expect=None)
    assert result.exit_code != 0
    assert "--lr-schedule" in result.output
