"""A fake payment service on loopback (a pytest plugin of tests/conftest.py): the
``payments`` fixture answers ``GET /pay/{order_id}`` per order: paid, pending, unpaid,
404, slow, 500."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from stock.app.embedded import free_port


@dataclass
class PaymentService:
    """Answers ``GET /pay/{order_id}`` as ``answers`` says (default unpaid)."""

    answers: dict[str, str] = field(default_factory=dict)
    asked: Counter[str] = field(default_factory=Counter)
    asked_at: dict[str, list[float]] = field(default_factory=dict)  # time.monotonic()
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        order_id = request.match_info["order_id"]
        self.asked[order_id] += 1
        self.asked_at.setdefault(order_id, []).append(time.monotonic())
        answer = self.answers.get(order_id, "unpaid")
        if answer == "slow":
            await asyncio.sleep(30)
        if answer == "404":
            return web.json_response({"error": "unknown"}, status=404)
        if answer == "500":
            return web.json_response({"error": "down"}, status=500)
        return web.json_response({"status": answer})


@pytest.fixture
async def payments() -> AsyncIterator[PaymentService]:
    service = PaymentService()
    app = web.Application()
    app.router.add_get("/pay/{order_id}", service.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    service.url = f"http://127.0.0.1:{port}/pay/{{order_id}}"
    yield service
    await runner.cleanup()
