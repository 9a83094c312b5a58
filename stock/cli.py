"""The ``stock`` command line. Each command runs under ``asyncio.run``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from stock.client import connect
from stock.config import Settings
from stock.errors import ConfigError
from stock.reaper import Reaper


async def _reaper(settings: Settings) -> None:
    client = connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Reaper(client, settings).run(stop)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stock", description=__doc__)
    parser.add_argument("--redis-url", help="overrides STOCK_REDIS_URL")
    parser.add_argument(
        "--redis-cluster", action="store_const", const=True, help="sets STOCK_REDIS_CLUSTER=1"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("reaper", help="expire due reservations until SIGTERM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = Settings.from_env(redis_url=args.redis_url, redis_cluster=args.redis_cluster)
    except ConfigError as exc:
        print(f"stock: {exc}", file=sys.stderr)
        return 2
    if args.command == "reaper":
        asyncio.run(_reaper(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
