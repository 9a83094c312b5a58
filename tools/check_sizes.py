"""The size rules (STYLE.md, issue 21): modules <= 400 lines, functions <= 60.

``python tools/check_sizes.py stock persist`` prints each breach and exits 1 if
there is one. A function's length runs from its ``def`` (or first decorator) to
its last line, docstring included; a nested function counts in its parent too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODULE_MAX = 400
FUNCTION_MAX = 60


def breaches(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = len(text.splitlines())
    if lines > MODULE_MAX:
        found.append(f"{path}: module of {lines} lines (> {MODULE_MAX})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > FUNCTION_MAX:
                found.append(f"{path}:{first}: {node.name} of {length} lines (> {FUNCTION_MAX})")
    return found


def main(roots: list[str]) -> int:
    found = [b for root in roots for p in sorted(Path(root).rglob("*.py")) for b in breaches(p)]
    print("\n".join(found) or f"every module <= {MODULE_MAX} lines, function <= {FUNCTION_MAX}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["stock", "persist"]))
