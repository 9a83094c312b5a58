"""The console shows a SKU's locations, its allocation strategy and its open transfers,
and adjusts one location (DESIGN §13), in a real browser."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from stock.core.config import Settings
from tests.support.service import ADMIN
from tests.test_console_browser import CHROMIUM, FLAGS, _login


async def seed(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        for where, units in (("berlin", 3), ("paris", 4)):
            url = f"{base}/v1/stock/CAP-1/locations/{where}"
            assert (await http.put(url, json={"available": units}, headers=ADMIN)).status == 200
        strategy = {"strategy": "priority", "order": ["paris", "berlin"], "split": True}
        put = await http.put(f"{base}/v1/stock/CAP-1/allocation", json=strategy, headers=ADMIN)
        assert put.status == 200
        move = {"transfer_id": "t-9", "from": "berlin", "to": "rome", "qty": 2, "reason": "new"}
        sent = await http.post(f"{base}/v1/stock/CAP-1/transfers", json=move, headers=ADMIN)
        assert sent.status == 201


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_console_shows_locations(service: str, dsn: str, settings: Settings) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: `make test-tools` (apt-get chromium)"
    await seed(service)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(10_000)
            await page.goto(f"{service}/console")
            await _login(page)
            await page.fill("[data-test=sku-input]", "CAP-1")
            await page.click("[data-test=sku-lookup]")
            await expect(page.locator("[data-test=allocation]")).to_have_text(
                "allocation: priority (paris, berlin), split on; in transit 2"
            )
            rows = page.locator("[data-test=locations] tbody tr")
            await expect(rows).to_have_text(["berlin1002", "paris4000"])
            transfers = page.locator("[data-test=transfers] tbody tr")
            await expect(transfers).to_have_text(["t-9berlinrome2new"])
            await page.fill("[data-test=adjust-delta]", "5")
            await page.fill("[data-test=adjust-reason]", "restock")
            await page.fill("[data-test=adjust-location]", "paris")
            await page.click("[data-test=adjust-submit]")
            await expect(rows).to_have_text(["berlin1002", "paris9000"])
            await expect(page.locator("[data-test=error]")).to_be_hidden()
        finally:
            await browser.close()
