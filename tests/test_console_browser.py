"""The operator console driven in a real browser: Debian's Chromium under Playwright,
against a real ``stock serve`` with valkey and PostgreSQL.

Never skipped: without Chromium the test fails and says how to install it
(``make test`` installs it when run as root). The screenshot it takes is the one
docs/console-webhooks.md shows (docs/console.png).
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Page, async_playwright, expect

from stock.core.config import Settings
from tests.service import ADMIN, TOKEN

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "console.png"
CHROMIUM = os.environ.get("STOCK_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = [  # the machine's network is closed: no background calls out (python.md)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def seed(base: str) -> None:
    """A SKU with 10 units, at most 4 per customer, and an order holding 3 of them."""
    async with aiohttp.ClientSession() as http:
        put = await http.put(f"{base}/v1/stock/HOODIE-M", json={"available": 10}, headers=ADMIN)
        assert put.status == 200
        limit = {"per_customer": 4}
        put = await http.put(f"{base}/v1/stock/HOODIE-M/limits", json=limit, headers=ADMIN)
        assert put.status == 200
        order = {
            "order_id": "web-1001",
            "items": [{"sku": "HOODIE-M", "qty": 3}],
            "ttl_s": 900,
            "customer_id": "c-42",
        }
        assert (await http.post(f"{base}/v1/reservations", json=order)).status == 201


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_console_in_a_browser(service: str, dsn: str, settings: Settings) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: `make test-tools` (apt-get chromium)"
    await seed(service)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(10_000)
            await page.goto(f"{service}/console")
            await _login(page)
            await _sku_and_adjust(page)
            await _order_release(page)
            await page.click("[data-test=health-refresh]")
            health = page.locator("[data-test=health]")
            await expect(health).to_contain_text(f"{settings.buckets} / {settings.buckets}")
            await expect(health).to_contain_text("never run")  # no reconcile yet
            await expect(page.locator("[data-test=error]")).to_be_hidden()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            await browser.close()
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conn = await asyncpg.connect(dsn)
    try:  # what the page did is in the ledger with the reasons typed
        rows = await conn.fetch(
            "SELECT op, qty, available, reason FROM stock_ledger WHERE sku = 'HOODIE-M' "
            "AND op IN ('adjust', 'release') ORDER BY seq"
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        ("adjust", 5, 12, "restock from warehouse B"),
        ("release", 3, 15, "customer called to cancel"),
    ]


async def _login(page: Page) -> None:
    error = page.locator("[data-test=error]")
    await page.fill("[data-test=token]", "not-the-token")
    await page.click("[data-test=login]")
    await expect(error).to_contain_text("Wrong admin token")
    await expect(page.locator("[data-test=sku-input]")).to_be_hidden()
    await page.fill("[data-test=token]", TOKEN)
    await page.click("[data-test=login]")
    await expect(error).to_be_hidden()
    await expect(page.locator("[data-test=health]")).to_contain_text("flush lag")
    stored = await page.evaluate("sessionStorage.getItem('stock-admin-token')")
    assert stored == TOKEN


async def _sku_and_adjust(page: Page) -> None:
    await page.fill("[data-test=sku-input]", "HOODIE-M")
    await page.click("[data-test=sku-lookup]")
    await expect(page.locator("[data-test=sku-available]")).to_have_text("7")
    await expect(page.locator("[data-test=sku-reserved]")).to_have_text("3")
    await expect(page.locator("[data-test=sku-sold]")).to_have_text("0")
    await expect(page.locator("[data-test=limits]")).to_have_text("at most 4 per customer")
    # the reason is mandatory: nothing is sent without one
    await page.fill("[data-test=adjust-delta]", "5")
    await page.click("[data-test=adjust-submit]")
    await expect(page.locator("[data-test=error]")).to_contain_text("reason is required")
    await expect(page.locator("[data-test=sku-available]")).to_have_text("7")
    await page.fill("[data-test=adjust-reason]", "restock from warehouse B")
    await page.click("[data-test=adjust-submit]")
    await expect(page.locator("[data-test=sku-available]")).to_have_text("12")
    await expect(page.locator("[data-test=error]")).to_be_hidden()
    newest = page.locator("[data-test=ledger] tbody tr").first
    await expect(newest).to_contain_text("restock from warehouse B")
    await expect(newest).to_contain_text("adjust")


async def _order_release(page: Page) -> None:
    await page.fill("[data-test=order-input]", "web-1001")
    await page.click("[data-test=order-lookup]")
    await expect(page.locator("[data-test=order-status]")).to_have_text("reserved")
    await page.click("[data-test=order-release]")  # the reason is mandatory here too
    await expect(page.locator("[data-test=error]")).to_contain_text("reason is required")
    await expect(page.locator("[data-test=order-status]")).to_have_text("reserved")
    await page.fill("[data-test=order-reason]", "customer called to cancel")
    await page.click("[data-test=order-release]")
    await expect(page.locator("[data-test=order-status]")).to_have_text("released")
    await expect(page.locator("[data-test=order-release]")).to_be_disabled()
    await expect(page.locator("[data-test=sku-available]")).to_have_text("15")
    await expect(page.locator("[data-test=sku-reserved]")).to_have_text("0")
    # a refusal of the service is shown: confirming the released order
    await page.evaluate("document.querySelector('[data-test=order-confirm]').disabled = false")
    await page.fill("[data-test=order-reason]", "paid after all")
    await page.click("[data-test=order-confirm]")
    await expect(page.locator("[data-test=error]")).to_contain_text("invalid_transition")
    await expect(page.locator("[data-test=order-status]")).to_have_text("released")


@pytest.mark.parametrize("settings", ["standalone"], indirect=True)
async def test_index_and_api_reference_in_a_browser(service: str) -> None:
    """/ links the API reference; /docs lists the operations of /openapi.json, each
    with its method, path and answers, rendered by files the service serves."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: `make test-tools` (apt-get chromium)"
    async with aiohttp.ClientSession() as http:
        spec = await (await http.get(f"{service}/openapi.json")).json()
    operations = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(10_000)
            outside: list[str] = []
            page.on(
                "request", lambda r: None if r.url.startswith(service) else outside.append(r.url)
            )
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"{service}/")
            await expect(page.locator("a[href='/console']")).to_be_visible()
            await page.click("a[href='/docs']")
            await page.wait_for_url(f"{service}/docs")
            ops = page.locator("[data-test=operation]")
            await expect(ops).to_have_count(len(operations))
            shown = {
                (
                    await op.locator("[data-test=method]").inner_text(),
                    await op.locator("[data-test=path]").inner_text(),
                )
                for op in await ops.all()
            }
            assert shown == operations
            reserve = page.locator("[data-test=operation][data-op='POST /v1/reservations']")
            await reserve.locator("summary").click()
            await expect(reserve).to_contain_text("order_id")
            await expect(reserve).to_contain_text("insufficient_stock")
            await page.click("a[href='/openapi.json']")
            await page.wait_for_url(f"{service}/openapi.json")
        finally:
            await browser.close()
    assert outside == [] and errors == [], (outside, errors)
