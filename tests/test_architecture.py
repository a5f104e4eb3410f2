"""The shape of the house, checked: imports follow the data's way through the stages.

Every import in the library (module level or inside a function) is read from the source with
``ast``, so a lazy import cannot hide a cycle or a backward reference.
"""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "cleftchunk"

#: The order of the stages. A module may import its own stage and earlier ones, never a later
#: one; stages of equal rank are independent of each other. ``train`` comes after ``predict`` and
#: ``post`` because validation runs the shipped predictor and metrics.
RANKS = {
    "base": 0,  # errors, geometry, labels, model, figures, … (the top-level modules)
    "run": 1,
    "io": 2,
    "synth": 3,
    "predict": 4,
    "post": 5,
    "train": 6,
    "view": 6,
    "demo": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANKS:
        return parts[1]
    return "base"


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from package import submodule` imports the submodule
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py"
                ).exists():
                    found.add(candidate)
    return found


def library_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = imports_of(path)
    return graph


GRAPH = library_graph()


def test_the_library_never_imports_the_command_line():
    offenders = {m: sorted(i for i in imps if i.split(".")[0] in ("cleftchunk_cli", "cli")) for m, imps in GRAPH.items()}
    assert not {m: i for m, i in offenders.items() if i}


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in graph.items():
        if module == "cleftchunk":  # the public facade re-exports from every stage
            continue
        mine = stage_of(module)
        for imported in imports:
            if not imported.startswith("cleftchunk"):
                continue
            if imported == "cleftchunk":
                found.append(f"{module} imports the package facade (import the module itself)")
                continue
            theirs = stage_of(imported)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                found.append(f"{module} ({mine}) imports {imported} ({theirs})")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    internal = {m: {i for i in imps if i in graph and i != m and not m.startswith(i + ".")} for m, imps in graph.items()}
    # (a package's __init__ importing its own modules is how re-exports work: not a cycle)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(internal[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(internal):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_stage_imports_a_later_stage():
    backward = backward_imports(GRAPH)
    assert not backward, "\n".join(backward)


def test_there_is_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_stage_is_known_and_no_module_is_too_long():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) > 1:
            assert parts[0] in RANKS, f"{parts[0]}/ is not a stage this test knows: add it to RANKS in its place"
        lines = len(path.read_text().splitlines())
        assert lines <= 560, f"{path.relative_to(PACKAGE)} has {lines} lines: split it (about 500 at most)"


def test_the_checks_catch_what_they_are_for():
    """The rules themselves can fail: a backward import, the facade imported, and a cycle."""
    bad = {
        "cleftchunk.io.volumes": {"cleftchunk.predict.api", "numpy"},
        "cleftchunk.predict.api": {"cleftchunk.io.volumes"},
        "cleftchunk.post.segment": {"cleftchunk"},
        "cleftchunk.train.loop": {"cleftchunk.view.serve"},
        "cleftchunk.view.serve": set(),
    }
    found = backward_imports(bad)
    assert any("io.volumes (io) imports cleftchunk.predict.api" in f for f in found)
    assert any("facade" in f for f in found)
    assert any("train.loop (train) imports cleftchunk.view.serve (view)" in f for f in found)
    assert not any("predict.api (predict) imports" in f for f in found)
    assert find_cycle(bad) in (
        ["cleftchunk.io.volumes", "cleftchunk.predict.api", "cleftchunk.io.volumes"],
        ["cleftchunk.predict.api", "cleftchunk.io.volumes", "cleftchunk.predict.api"],
    )
    assert find_cycle({"cleftchunk.a": {"cleftchunk.b"}, "cleftchunk.b": set()}) is None
