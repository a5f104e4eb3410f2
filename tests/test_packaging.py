"""The wheel holds every package of the library and the CLI, and the data files the code reads."""

import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_in_tree() -> set[str]:
    library = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cleftchunk").rglob("__init__.py")}
    cli = {"cleftchunk_cli" + "".join("." + part for part in p.parent.relative_to(ROOT / "cli").parts)
           for p in (ROOT / "cli").rglob("__init__.py")}
    return library | cli


def test_every_package_of_the_tree_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert listed == _packages_in_tree()


def test_package_data_files_exist():
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        folder = ROOT / Path(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches nothing"


@pytest.mark.slow
@pytest.mark.filterwarnings("error::setuptools.warnings.SetuptoolsDeprecationWarning")  # what stops building later
def test_wheel_holds_subpackages_and_data(tmp_path):
    import os
    import shutil

    from setuptools import build_meta as build  # the project's build backend

    # Built from a copy of what the wheel is made of: a build/ left in the checkout holds the
    # modules of earlier builds, which setuptools packs too, so a removed module would still pass.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for name in ("cleftchunk", "cli"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    cwd = os.getcwd()
    os.chdir(source)
    try:
        name = build.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    files = set(zipfile.ZipFile(tmp_path / name).namelist())
    for module in ("cleftchunk/train/trainer.py", "cleftchunk/predict/runner.py", "cleftchunk/demo/seed_sweep.json",
                   "cleftchunk_cli/main.py"):
        assert module in files
