"""``stock serve`` as a real child process (a pytest plugin of tests/conftest.py).

The ``service`` fixture is one serving process on a free port with the test's Redis
and database, ready (/readyz 200) before the test and stopped with SIGTERM after
it, which must end it with exit code 0.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests.servers import stock_env

TOKEN = "service-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


async def wait_ready(base: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Wait until ``base``/readyz answers 200; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the service exited during start-up"
            try:
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("service never became ready")


@asynccontextmanager
async def serving(
    settings: Settings, dsn: str, *args: str
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``stock serve *args`` on a free port: its base URL and process once ready;
    SIGTERM after, and it must exit 0."""
    port = free_port()
    command = [sys.executable, "-m", "stock.app.cli", "serve", *args]
    proc = subprocess.Popen(command, env=stock_env(settings, port, dsn, TOKEN))
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, proc)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0, "stock serve did not exit cleanly on SIGTERM"


@pytest.fixture
async def service(settings: Settings, dsn: str, redis: Any) -> AsyncIterator[str]:
    """The base URL of a ready ``stock serve`` (``redis`` empties the keyspace first)."""
    async with serving(settings, dsn) as (base, _proc):
        yield base
