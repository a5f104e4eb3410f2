"""Print one of the README's two first commands, so that CI runs exactly what the README says.

The README opens with one ```bash block holding two commands, each after a comment line that
starts with its number: ``# 1. ...`` (set up and run the demo) and ``# 2. ...`` (set up and pass the
tests). ``python3 .ci/readme_command.py 2`` prints the second. Standard library only: CI calls it
before any virtual environment exists; tests/test_readme.py imports it.
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def first_block(text: str) -> list[str]:
    """The lines of the README's first fenced code block."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[start + 1 : end]


def commands(text: str) -> dict[int, str]:
    """{number: command} of the first block: each ``# N.`` comment names the command on the next line."""
    block = first_block(text)
    found = {}
    for comment, command in zip(block, block[1:]):
        head = comment.removeprefix("# ").split(".", 1)[0]
        if comment.startswith("# ") and head.isdigit() and not command.startswith("#"):
            found[int(head)] = command.strip()
    return found


def main(argv: list[str]) -> int:
    number = int(argv[1]) if len(argv) > 1 else 2
    found = commands(README.read_text(encoding="utf-8"))
    if number not in found:
        print(f"README.md's first code block has no command '# {number}.': it has {sorted(found)}", file=sys.stderr)
        return 1
    print(found[number])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
