"""Draw docs/architecture.svg: stock's floors and persist/, from the import rules.

The floors and what may import what come from pyproject.toml's
``[tool.importlinter]`` contracts (the same rules ``lint-imports`` enforces), each
floor's role from its package docstring. Writes docs/architecture.dot, and the
SVG when graphviz's ``dot`` is installed (``apt-get install -y graphviz``)::

    python docs/architecture.py

tests/test_docs.py checks that the committed .dot is what this draws today.
"""

from __future__ import annotations

import ast
import itertools
import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOT = ROOT / "docs" / "architecture.dot"
SVG = ROOT / "docs" / "architecture.svg"


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["importlinter"]["contracts"])


def role(package: str) -> str:
    """The first line of a package's docstring."""
    init = ROOT / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def node(package: str, color: str) -> str:
    label = package.replace(".", "/") + "/\\n" + "\\n".join(textwrap.wrap(role(package), 34))
    return f'  "{package}" [label="{label}", fillcolor="{color}"];'


def draw() -> str:
    """The graph in dot: one rank per floor, an arrow to the floor it may import."""
    rules = contracts()
    layers = next(c for c in rules if c["type"] == "layers")["layers"]
    floors = [[p.strip() for p in str(layer).split("|")] for layer in layers]
    persist_forbidden = next(
        c for c in rules if c["type"] == "forbidden" and c["source_modules"] == ["persist"]
    )["forbidden_modules"]
    persist_may = [p for floor in floors for p in floor if p not in persist_forbidden]
    out = [
        "// drawn by docs/architecture.py from pyproject.toml's import rules: do not edit",
        "digraph floors {",
        "  rankdir=TB; nodesep=0.4; ranksep=0.45;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
        '  edge [color="#667085", arrowsize=0.7, fontname="Helvetica", fontsize=10];',
        '  label="an arrow: may import (and what is below it); lint-imports enforces it";',
        '  labelloc=b; fontname="Helvetica"; fontsize=10;',
    ]
    for floor in floors:
        out += [node(p, "#e8effa") for p in floor]
        out.append("  { rank=same; " + " ".join(f'"{p}";' for p in floor) + " }")
    out.append(node("persist", "#fdf0e1"))
    for upper, lower in itertools.pairwise(floors):
        out += [f'  "{a}" -> "{b}";' for a in upper for b in lower]
    out.append('  "stock.app" -> "persist" [color="#b54708", label=" only app"];')
    lowest_of_persist = [p for p in persist_may if p in ("stock.loops", "stock.orders")]
    out += [f'  "persist" -> "{p}" [color="#b54708", style=dashed];' for p in lowest_of_persist]
    out.append("}")
    return "\n".join(out) + "\n"


def main() -> None:
    DOT.write_text(draw())
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg", str(DOT)], check=True, capture_output=True).stdout
        SVG.write_bytes(svg)
        print(f"wrote {DOT.name} and {SVG.name}")
    else:
        print(f"wrote {DOT.name}; no graphviz `dot` here, so {SVG.name} was not redrawn")


if __name__ == "__main__":
    main()
