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


@pytest.mark.parametrize("name", BLOCKWISE)
@pytest.mark.parametrize("flag, instead", [("--processes", "--workers N"), ("--quiet", "--no-progress")])
def test_removed_flags_are_hidden_and_name_their_replacement(run_cli, name, flag, instead):
    assert all(p.hidden for p in cli.get_command(None, name).params if p.opts == [flag])
    result = run_cli(name, "x", "-o" if name in ("segment", "threshold") else "y", "y.zarr", flag, expect=2)
    assert f"error: {flag} is gone: use {instead}" in result.output


def test_scheduler_threads_or_processes_names_workers(run_cli):
    result = run_cli("convert", "a.zarr", "b.zarr", "--scheduler", "processes", expect=2)
    assert "--scheduler processes is gone" in result.output and "--workers N" in result.output


def test_train_has_no_scheduler_option_in_its_help(run_cli):
    result = run_cli("train", "--help")
    assert "--scheduler" not in result.output and "--lr-schedule" in result.output


def test_train_scheduler_names_its_new_spelling(run_cli):
    result = run_cli("train", "--scheduler", "cosine", expect=None)
    assert result.exit_code != 0
    assert "--lr-schedule" in result.output
