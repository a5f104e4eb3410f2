"""Shared test fixtures: tests run on small volumes on the CPU, with few torch threads."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _few_torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture
def run_cli():
    """Invoke the command line in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from cleftchunk_cli.main import cli

    def run(*args: str, expect: int | None = 0):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, f"exit {result.exit_code}, output:\n{result.output}"
        return result

    return run
