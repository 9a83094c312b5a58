"""The docs stay walkable: README short and its links alive, the architecture picture
drawn from today's import rules. (``mkdocs build --strict`` in ``make lint`` checks
the pages under docs/ and their links.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from markdown.extensions.toc import slugify

from stock.app.dev import DEMO_STOCK
from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.http.api import ENGINE
from tests.conftest import flush

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


def readme_calls() -> list[tuple[str, str, dict[str, Any] | None, int | None, Any]]:
    """The curl calls of README's "A first reservation" with the answers its comments
    show: (method, path, body, status or None, answer or None)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## A first reservation")
    block = text[text.index("```sh\n", start) + 6 : text.index("```\n", start + 30)]
    block = block.replace("\\\n", " ")
    calls: list[tuple[str, str, dict[str, Any] | None, int | None, Any]] = []
    comment = ""
    for line in [*block.splitlines(), "curl END"]:
        if line.startswith("#"):
            comment += " " + line.lstrip("# ").strip()
            continue
        if calls and comment:  # the comment belongs to the call before it
            method, path, body, _, _ = calls[-1]
            found = re.match(r"\s*(\d{3})?\s*(\{.*\})?", comment)
            assert found, comment
            status = int(found.group(1)) if found.group(1) else None
            answer = orjson.loads(found.group(2)) if found.group(2) else None
            calls[-1] = (method, path, body, status, answer)
        comment = ""
        call = re.match(r"curl -s (?:-X(\w+) )?\$B(\S+)(.*)", line)
        if call:
            data = re.search(r"-d '(.*)'", call.group(3))
            body = orjson.loads(data.group(1)) if data else None
            calls.append((call.group(1) or "GET", call.group(2), body, None, None))
    return calls


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_the_readme_first_reservation_answers_as_shown(settings: Settings) -> None:
    """Each curl line of README's first reservation, sent to the app with the demo
    stock of ``stock dev``: the status and the body its comment shows (the expiry
    aside, a time of the day it was written)."""
    calls = readme_calls()
    assert len(calls) >= 6 and any(c[3] == 409 for c in calls), calls
    app = create_app(settings, run_reaper=False, run_writer=False)
    async with TestClient(TestServer(app)) as client:
        await flush(app[ENGINE].redis)
        for sku, available in DEMO_STOCK.items():
            await app[ENGINE].set_stock(sku, available, reason="demo")
        for method, path, body, status, answer in calls:
            response = await client.request(method, path, json=body)
            got = await response.json()
            if status is not None:
                assert response.status == status, (method, path, got)
            if answer is not None:
                got.pop("expires_at", None), answer.pop("expires_at", None)
                assert got == answer, (method, path)
