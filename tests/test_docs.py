"""The docs stay walkable: README short and its links alive, the architecture picture
drawn from today's import rules. (``mkdocs build --strict`` in ``make lint`` checks
the pages under docs/ and their links.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _drawing() -> ModuleType:
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "docs" / "architecture.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(page: Path) -> set[str]:
    """The heading anchors mkdocs gives a page (Python-Markdown's toc slugs)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(h, "-") for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_the_picture_is_drawn_from_the_import_rules() -> None:
    """docs/architecture.dot is what docs/architecture.py draws from pyproject.toml
    today: change a contract or a floor's docstring, and run it (it redraws the SVG)."""
    drawing = _drawing()
    assert (ROOT / "docs" / "architecture.dot").read_text() == drawing.draw()
    svg = (ROOT / "docs" / "architecture.svg").read_text()
    for floor in ("stock/core/", "stock/redis/", "stock/orders/", "stock/app/", "persist/"):
        assert floor in svg, floor


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    broken = []
    for target in LINK.findall(readme.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        page = ROOT / path
        if not page.exists() or (anchor and anchor not in anchors(page)):
            broken.append(target)
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "index.md"}
    assert pages <= {t.partition("#")[0] for t in linked}, pages
