"""A real webhook receiver on loopback for the tests, and a writer + dispatcher harness.

Tests only ever subscribe ``http://127.0.0.1:<port>/...`` URLs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from persist.dispatcher import Dispatcher
from persist.writer import Writer
from stock.app.embedded import free_port
from stock.core.config import Settings


@dataclass
class Got:
    at: float  # time.monotonic() on arrival
    event_id: str
    signature: str
    raw: bytes
    body: dict[str, Any]


@dataclass
class Receiver:
    """Answers ``status`` after ``delay_s``; keeps what arrived."""

    secret: str
    delay_s: float = 0.0
    status: int = 200
    port: int = field(default_factory=free_port)
    got: list[Got] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.got.append(
            Got(
                time.monotonic(),
                request.headers.get("X-Stock-Event-Id", ""),
                request.headers.get("X-Stock-Signature", ""),
                raw,
                orjson.loads(raw),
            )
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status)

    def verified(self, got: Got) -> bool:
        """The receiver's side of the contract: HMAC-SHA256 of the raw body."""
        expected = "sha256=" + hmac.new(self.secret.encode(), got.raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, got.signature)

    def of_type(self, kind: str) -> list[Got]:
        return [g for g in self.got if g.body["type"] == kind]


@asynccontextmanager
async def receiving(*receivers: Receiver) -> AsyncIterator[None]:
    for r in receivers:
        await r.start()
    try:
        yield
    finally:
        for r in receivers:
            await r.stop()


@asynccontextmanager
async def pipeline(
    redis: Any, settings: Settings, dispatchers: int = 1
) -> AsyncIterator[list[Dispatcher]]:
    """A writer and ``dispatchers`` dispatchers running until the block ends."""
    stop = asyncio.Event()
    writer = Writer(redis, settings, settings.database_url)
    sent = [Dispatcher(settings, settings.database_url, poll_s=0.05) for _ in range(dispatchers)]
    tasks = [asyncio.create_task(writer.run(stop))]
    tasks += [asyncio.create_task(d.run(stop)) for d in sent]
    try:
        yield sent
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def until(check: Callable[[], bool], within_s: float, what: str) -> float:
    """Wait for ``check`` to hold; returns the seconds it took (fails after ``within_s``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started
