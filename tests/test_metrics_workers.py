"""``stock serve --workers 2``: one scrape of /metrics covers both workers
(prometheus-client multiprocess mode, DESIGN §11)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stock.app.embedded import free_port
from stock.core.config import Settings
from tests import servers
from tests.service import wait_ready

TOKEN = "metrics-token"
REQUESTS = 60


def samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


async def scrape(base: str) -> dict[str, list[Any]]:
    connector = aiohttp.TCPConnector(force_close=True)  # a new connection: any worker
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 200
            return samples(await response.text())


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_one_scrape_covers_every_worker(settings: Settings, dsn: str, redis: Any) -> None:
    port = free_port()
    env = servers.stock_env(settings, port, dsn, TOKEN)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    dirs_before = set(Path(tempfile.gettempdir()).glob("stock-metrics-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stock.app.cli", "serve", "--workers", "2"], env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, proc)
        connector = aiohttp.TCPConnector(force_close=True)  # each request a new connection
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(REQUESTS):
                async with http.get(f"{base}/healthz") as response:
                    assert response.status == 200
        deadline = time.monotonic() + 20
        while True:  # the two writers split the buckets between them
            found = await scrape(base)
            held = found.get("stock_writer_buckets_held", [])
            up = {s.labels.get("pid") for s in found.get("stock_worker_up", []) if s.value == 1}
            if held and held[0].value == settings.buckets and len(up) == 2:
                break  # both workers started and report (slow on a loaded machine)
            assert time.monotonic() < deadline, f"buckets held {held}, workers up {up}"
            await asyncio.sleep(0.2)
        for _ in range(6):  # whichever worker answers, it answers for both
            found = await scrape(base)
            pids = {s.labels.get("pid") for s in found["stock_worker_up"] if s.value == 1}
            healthz = [
                s.value
                for s in found["stock_http_requests_total"]
                if s.labels["route"] == "/healthz" and s.labels["status"] == "200"
            ]
            assert (len(pids), healthz) == (2, [REQUESTS]), "a scrape saw one worker only"
            assert [s.value for s in found["stock_buckets"]] == [settings.buckets]
            assert [s.value for s in found["stock_oversell_skus"]] == [0]
        async with aiohttp.ClientSession() as http:  # the health route, from pg_locks
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{base}/v1/admin/health", headers=auth) as response:
                health = await response.json()
        writer = health["writer"]  # one writer may hold them all until they rebalance
        assert (writer["held"], writer["buckets"]) == (settings.buckets, settings.buckets)
        assert writer["writers"] in (1, 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0
    left = set(Path(tempfile.gettempdir()).glob("stock-metrics-*")) - dirs_before
    assert not left, f"the metrics directory was left behind: {left}"
