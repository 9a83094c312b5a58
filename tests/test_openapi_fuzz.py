"""schemathesis against the app's own /openapi.json: no 5xx, every answer matches the spec."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from stock.app.embedded import free_port
from stock.app.wiring import create_app
from stock.app.wiring import openapi_document as spec
from stock.core.config import Settings
from tests.conftest import BUCKETS
from tests.servers import ServerProcess

TOKEN = "fuzz-token"
# No webhook routes: a made-up subscription would make a dispatcher POST to made-up
# hosts, and our machines may send traffic only to loopback.
schema = schemathesis.openapi.from_dict(spec()).exclude(path_regex=r"^/v1/webhooks")


@pytest.fixture(scope="module")
def live_url(standalone_server: ServerProcess) -> Iterator[str]:
    """The API served from a background thread with its own event loop."""
    config = Settings(redis_url=standalone_server.url, buckets=BUCKETS, admin_token=TOKEN)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(replace(config), run_reaper=True, run_writer=False))
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_matches_its_spec(case: Any, live_url: str) -> None:
    # Every check but "valid data is accepted": "no SKU twice in items" cannot be
    # said in JSON Schema, so a schema-valid cart may rightly get a 400.
    case.call_and_validate(
        base_url=live_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        excluded_checks=[positive_data_acceptance],
    )
