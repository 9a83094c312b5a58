"""The whole service app: the API, the console and the webhooks, with the process's
resources (Redis client, engine, reaper, writer) opened and closed with it.

``stock.http.routes.create_api`` knows the routes; this module plugs in what needs
PostgreSQL or the process's loops: the readiness check of the pool, the scrape
hook that measures the expiry lag, the console's and the webhooks' routes and
their part of the OpenAPI document.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from stock.app import lifecycle
from stock.app.console import setup_console
from stock.app.database import DATABASE, Database, postgres_check
from stock.app.pages import setup_pages
from stock.app.webhooks_api import COUNTERS, setup_webhooks
from stock.app.webhooks_spec import paths as webhook_paths
from stock.core.config import Settings
from stock.http.api import (
    BACKGROUND,
    BEFORE_SCRAPE,
    ENGINE,
    FRONT,
    METRICS,
    OPENAPI,
    READY_CHECKS,
    SOLDOUT,
)
from stock.http.locations_api import add_routes as add_location_routes
from stock.http.locations_spec import paths as location_paths
from stock.http.openapi import spec
from stock.http.routes import create_api


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the whole service (the API and the webhooks)."""
    return spec({**webhook_paths(), **location_paths()})


def create_app(
    settings: Settings, *, run_reaper: bool = True, run_writer: bool = True
) -> web.Application:
    """The service app; its Redis client, engine, reaper and writer open and close with it."""
    app = create_api(settings)
    app[OPENAPI] = openapi_document()
    database = app[DATABASE] = Database(settings.database_url)  # opened by the lifecycle
    setup_console(app)  # the console and its admin routes (DESIGN §11)
    add_location_routes(app)  # stock per location, allocation, transfers (DESIGN §13)
    setup_pages(app)  # / (an index) and /docs (the API reference)
    setup_webhooks(app)  # the webhook routes and their counters

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with lifecycle.running(
            settings,
            app[METRICS],
            app[SOLDOUT],
            database,
            run_reaper=run_reaper,
            run_writer=run_writer,
            webhook_counters=app[COUNTERS],
        ) as parts:
            app[ENGINE] = parts.engine
            app[BACKGROUND].update(parts.named())
            if parts.writer is not None:  # (as before: checked where the writer runs)
                app[READY_CHECKS]["postgres"] = functools.partial(postgres_check, database)
            if parts.reaper is not None:
                app[BEFORE_SCRAPE].append(
                    functools.partial(
                        lifecycle.measure_expiry_lag, parts.reaper, settings, app[METRICS]
                    )
                )
            yield

    app.cleanup_ctx.append(resources)
    app[FRONT].wrap_routes(app)  # last: every route added above
    return app
