"""The README tells the truth and stays short.

- it is at most 250 lines and opens with exactly two commands: set up + demo, set up + tests; CI
  (.ci/run) runs the second one as the README writes it;
- every measured figure sits in its "Measured" table, each an exact string of the RESULTS.md
  section the row links to (a row's figures in one of its paragraphs or tables, in order), written once, with the benchmark command that reproduces it; no
  measurement (seconds, MiB, ratios, shares) appears anywhere else in the README;
- its Python example's imports exist; its links to files in the repository resolve;
- docs/troubleshooting.md is what `python tests/troubleshooting.py` writes from today's messages.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
FIGURES_START, FIGURES_END = "<!-- figures:", "<!-- /figures -->"
SEPARATOR = " · "


def readme_command():
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(text: str) -> str:
    """Markdown as it reads: bold marks dropped, line breaks and runs of spaces as one space."""
    return re.sub(r"\s+", " ", text.replace("**", ""))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def sections(markdown: str) -> dict[str, str]:
    """{anchor: the section's text, from its heading to the next heading of the same or a higher level}."""
    lines, headings, fenced = markdown.splitlines(), [], False
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"(#+) (.*)", line)
        if match:
            headings.append((i, len(match[1]), match[2]))
    found, seen = {}, {}
    for n, (i, level, title) in enumerate(headings):
        end = next((j for j, lv, _ in headings[n + 1 :] if lv <= level), len(lines))
        anchor = slug(title)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found[anchor if count == 0 else f"{anchor}-{count}"] = "\n".join(lines[i:end])
    return found


def figure_rows() -> list[tuple[str, str, list[str], str]]:
    """(what, RESULTS.md anchor, figures, command) of each row of the README's figures table."""
    block = README.split(FIGURES_START, 1)[1].split(FIGURES_END, 1)[0]
    rows = []
    for line in block.splitlines()[1:]:
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| what |"):
            continue
        what, figures, command = (c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1])
        link = re.fullmatch(r"\[(.+)\]\(benchmarks/RESULTS\.md#([^)]+)\)", what)
        assert link, f"the 'what' cell must link its RESULTS.md section: {what}"
        rows.append((link[1], link[2], figures.split(SEPARATOR), command))
    return rows


def in_order(text: str, figures: list[str]) -> bool:
    """Whether the figures occur in text one after the other (as a row's figures are read together)."""
    at = 0
    for figure in figures:
        at = text.find(figure, at)
        if at < 0:
            return False
        at += len(figure)
    return True


def outside_figures(text: str) -> str:
    return text.split(FIGURES_START, 1)[0] + text.split(FIGURES_END, 1)[1]


def without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


# -- length and the two commands -----------------------------------------------------------------
def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


def test_the_readme_opens_with_exactly_two_commands():
    before_block = README.split("```", 1)[0]
    assert len(before_block.splitlines()) <= 8, "the two commands must come first, after a short introduction"
    block = readme_command().first_block(README)
    commands = readme_command().commands(README)
    assert sorted(commands) == [1, 2] and len(block) == 4, block
    for command in commands.values():
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ")
    assert commands[1].endswith("cleftchunk demo demo-output")
    assert commands[2].endswith("python -m pytest -q") and '".[test]"' in commands[2]


def test_ci_runs_the_readmes_test_command_and_keeps_its_exit_status():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    assert 'command="$(python3 .ci/readme_command.py 2)"' in ci and 'bash -c "$command"' in ci
    assert "CLEFTCHUNK_REQUIRE_CHROMIUM=1" in ci
    code = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "pytest" in line.replace("PYTEST_ADDOPTS", "")], "CI runs pytest only through the README's line"
    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "2"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == readme_command().commands(README)[2]


# -- figures ---------------------------------------------------------------------------------------
def test_each_figure_is_an_exact_string_of_the_linked_results_section():
    results = sections(RESULTS)
    rows = figure_rows()
    assert len(rows) >= 10
    for what, anchor, figures, command in rows:
        assert anchor in results, f"{what}: no RESULTS.md section #{anchor}"
        paragraphs = [flat(p) for p in re.split(r"\n\s*\n", results[anchor])]
        for figure in figures:
            assert any(flat(figure) in p for p in paragraphs), f"{what}: '{figure}' is not in RESULTS.md #{anchor}"
        assert any(in_order(p, [flat(f) for f in figures]) for p in paragraphs), (
            f"{what}: RESULTS.md #{anchor} has no paragraph or table holding {figures} in this order"
        )
        script = re.fullmatch(r"`python (benchmarks/\w+\.py)( [^`]*)?`", command)
        assert script and (ROOT / script[1]).is_file(), f"{what}: name the benchmark command that reproduces it, not {command}"


def test_each_figure_appears_once_in_the_readme():
    prose = flat(without_code(README))
    for what, _, figures, _ in figure_rows():
        for figure in figures:
            found = re.findall(rf"(?<![\w.,]){re.escape(flat(figure))}(?![\w]|[.,]\d)", prose)
            assert len(found) == 1, f"'{figure}' ({what}) appears {len(found)} times"


MEASUREMENT = re.compile(
    r"\d[\d,.]*\s?(?:s|ms|min|h|MiB|GiB|KiB|MB|GB|%|bytes? per|B/vox\w*)(?![\w/])"  # times, memory, shares
    r"|\d(?:\.\d+)?×(?!\d)|×\s?\d+\.\d"  # ratios (2.29×, ×0.72), not shapes (16×256)
    r"|\d+(?:\.\d+)? ?M (?:output )?vox"  # throughputs
)


def test_no_measurement_outside_the_figures_table():
    found = MEASUREMENT.findall(outside_figures(README))
    assert not found, f"measured figures outside the 'Measured' table (move them there, from RESULTS.md): {found}"


def test_the_measurement_pattern_catches_what_the_old_readme_said():
    for claim in ("12 min on 2 CPU cores", "about 1.4 bytes per output voxel", "**2.29× / 2.12×**", "235 MiB peak", "CREMI score ×0.72", "18 s"):
        assert MEASUREMENT.search(claim), claim
    for fact in ("16×256×256", "40 × 4 × 4 nm", "Python ≥ 3.11", "7,731,922 parameters", "-g 4 starts", "θ = 200 nm"):
        assert not MEASUREMENT.search(fact), fact


# -- the Python API -----------------------------------------------------------------------------------
def test_the_python_examples_import_what_they_name():
    block = re.search(r"```python\n(.*?)```", README, re.S)[1]
    imports = [line for line in block.splitlines() if line.startswith(("import ", "from "))]
    assert len(imports) >= 5
    exec("\n".join(imports), {})  # noqa: S102 - the README's own import lines


# -- links -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))])
def test_links_to_repository_files_resolve(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / page).parent.joinpath(target).exists(), f"{page} links {target}, which does not exist"


# -- the troubleshooting page ------------------------------------------------------------------------
def test_the_troubleshooting_page_is_what_the_bad_input_cases_print_today():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "troubleshooting.py"), "--check"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
