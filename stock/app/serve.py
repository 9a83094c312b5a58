"""Run the API: one process, or N processes sharing one port with SO_REUSEPORT.

aiohttp's ``run_app`` gives the graceful stop: on SIGTERM or SIGINT it stops
accepting, lets in-flight requests finish, then runs the app's cleanup, which
stops the reaper and the writer.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from typing import Any

import uvloop
from aiohttp import web

from stock.app.wiring import create_app
from stock.core.config import Settings
from stock.http.metrics import MULTIPROC_ENV

log = logging.getLogger("stock.app.serve")


def serve_one(settings: Settings, run_reaper: bool, run_writer: bool, reuse_port: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = create_app(settings, run_reaper=run_reaper, run_writer=run_writer)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port,
        shutdown_timeout=10,
        access_log=None,
        print=None,
    )


def _metrics_dir() -> str | None:
    """Give the workers one prometheus-client multiprocess directory, so that a scrape
    of any of them covers all. Set before they start: the client reads it on import.
    An operator's own ``PROMETHEUS_MULTIPROC_DIR`` is used as it is (and kept)."""
    if os.environ.get(MULTIPROC_ENV):
        return None
    made = tempfile.mkdtemp(prefix="stock-metrics-")
    os.environ[MULTIPROC_ENV] = made
    return made


def serve(
    settings: Settings, workers: int = 1, run_reaper: bool = True, run_writer: bool = True
) -> int:
    """Serve until SIGTERM/SIGINT. Several workers are safe: reapers expire each line
    once, and writers split the buckets between them with PostgreSQL advisory locks."""
    log.info("serving on http://%s:%d with %d worker(s)", settings.host, settings.port, workers)
    if workers <= 1:
        serve_one(settings, run_reaper, run_writer, reuse_port=False)
        return 0
    made = _metrics_dir()
    context = multiprocessing.get_context("spawn")
    children: list[Any] = [
        context.Process(target=serve_one, args=(settings, run_reaper, run_writer, True))
        for _ in range(workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.is_alive():
                child.terminate() if signum == signal.SIGTERM else child.kill()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, lambda *_: forward(signal.SIGTERM, None))
    for child in children:
        child.join()
    if made:
        shutil.rmtree(made, ignore_errors=True)
    return max((child.exitcode or 0) for child in children)
