"""What a browser finds at the service's root: ``GET /``, a small index linking the
console, the API reference and the OpenAPI document, and ``GET /docs``, the API
reference: ``stock/static/docs.html`` and its script, which renders
``/openapi.json`` in the page. Like the console, every file comes from the
service (no CDN, nothing loaded from elsewhere: the same Content-Security-Policy).

Registered by ``setup_pages``, from ``stock.app.wiring.create_app``.
"""

from __future__ import annotations

from aiohttp import web

from stock.app.console import HEADERS, static_file
from stock.core.errors import NotFound

ASSETS = {
    "docs.js": "application/javascript",
    "docs.css": "text/css",
}


async def index(request: web.Request) -> web.Response:
    return web.Response(body=static_file("index.html"), content_type="text/html", headers=HEADERS)


async def docs(request: web.Request) -> web.Response:
    return web.Response(body=static_file("docs.html"), content_type="text/html", headers=HEADERS)


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no API reference file {name!r}")
    return web.Response(body=static_file(name), content_type=ASSETS[name], headers=HEADERS)


def setup_pages(app: web.Application) -> None:
    """Add ``/``, ``/docs`` and the reference's files."""
    app.router.add_get("/", index)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/{name}", asset)
